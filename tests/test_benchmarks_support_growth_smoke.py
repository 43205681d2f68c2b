"""Smoke test of benchmarks/support_growth.py on a tiny random LLaMA and toy chat data: every mode trains, the
recorded support behaves as each selection rule says, and the JSON / markdown reports are written."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from sft_helpers import chat_rows, save_tiny_model, write_jsonl

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "benchmarks", "support_growth.py")


def test_support_growth_smoke(tmp_path):
    model = save_tiny_model(tmp_path / "tiny", layers=4)
    train = write_jsonl(tmp_path / "train.jsonl", chat_rows(40))
    out = tmp_path / "res" / "growth.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    steps = 6
    proc = subprocess.run([sys.executable, SCRIPT, "--model", model, "--train-file", train, "--steps", str(steps),
                           "--batch-size", "4", "--max-seq-length", "64", "--calibration-steps", "2",
                           "--dtype", "fp32", "--lr", "1e-2", "--output", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    runs = {r["mode"]: r for r in report["runs"]}
    assert set(runs) == {"dynamic-adamw", "dynamic-sparse_adam", "periodic-adamw"}
    for mode, run in runs.items():
        curve = run["curve"]
        assert [c["step"] for c in curve] == list(range(1, steps + 1))
        support = [c["support_over_k"] for c in curve]
        if mode.startswith("dynamic"):
            assert support[0] == 1.0 and all(b >= a for a, b in zip(support, support[1:]))  # a growing union
            assert support[-1] > 1.0  # toy gradients change their top-k
            assert all(c["moments_over_k"] == c["support_over_k"] for c in curve)  # moments on all of ΔW'
        else:  # one support of k entries until the first refresh (step 101)
            assert support == [1.0] * steps and all(c["moments_over_k"] == 1.0 for c in curve)
        k, n = run["total_k"], run["adapted_weights"]
        for c in curve:
            expected = (8 * c["support_over_k"] * k + 8 * c["moments_over_k"] * k + 4 * k) / n
            assert abs(c["state_bytes_per_weight"] - expected) < 1e-9
    md = out.with_suffix(".md").read_text()
    assert "| dynamic-adamw: support / Σk |" in md and f"step {steps}" in md
