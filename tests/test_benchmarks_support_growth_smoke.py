"""Smoke test of benchmarks/support_growth.py on a tiny random LLaMA and toy chat data: every rule trains, the
recorded support behaves as each selection rule says (bounded by max_support where set), the state and adapter
bytes follow the support, and the JSON / markdown reports are written."""

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
                           "--refresh-interval", "3", "--dtype", "fp32", "--lr", "1e-2", "--output", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    runs = {r["mode"]: r for r in report["runs"]}
    assert set(runs) == {"periodic", "dynamic", "periodic-unbounded", "dynamic-unbounded"}
    for mode, run in runs.items():
        curve = run["curve"]
        assert [c["step"] for c in curve] == list(range(1, steps + 1))
        support = [c["support_over_k"] for c in curve]
        assert support[0] == 1.0 and all(b >= a for a, b in zip(support, support[1:]))  # a growing union
        if mode.startswith("periodic"):  # refreshes at steps 1 and 4: k entries until the second one
            assert support[:3] == [1.0] * 3 and support[3] > 1.0
        else:
            assert support[-1] > 1.0  # toy gradients change their top-k
        if not mode.endswith("unbounded"):
            assert max(support) <= 2.0 + 1e-9  # the default max_support
        if mode == "dynamic-unbounded":
            assert support[-1] > 2.0
        # the state follows the support: ΔW' (8 B per entry) plus moments; the adapter file is measured at the marks
        for c in curve:
            assert c["state_bytes_per_weight"] * run["adapted_weights"] >= 8 * c["support_over_k"] * run["total_k"]
        marked = [c for c in curve if "adapter_bytes_per_weight" in c]
        assert [c["step"] for c in marked] == [1, 2, 5, 6]
        assert marked[-1]["adapter_bytes_per_weight"] >= marked[0]["adapter_bytes_per_weight"] > 0
    md = out.with_suffix(".md").read_text()
    assert "| dynamic-unbounded: support / Σk |" in md and f"step {steps}" in md and "adapter file B/w" in md
