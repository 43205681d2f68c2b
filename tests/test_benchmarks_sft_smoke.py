"""Smoke test of benchmarks/sft.py on a tiny random LLaMA and toy chat data: the LR selection + seeds protocol runs
for every method and writes well-formed JSON, markdown and PNG. No assertion on which method wins."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

from sft_helpers import chat_rows, save_tiny_model, write_jsonl

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "benchmarks", "sft.py")


def test_sft_benchmark_smoke(tmp_path):
    model = save_tiny_model(tmp_path / "tiny", layers=4)
    train = write_jsonl(tmp_path / "train.jsonl", chat_rows(20))
    test = write_jsonl(tmp_path / "test.jsonl", chat_rows(6, 3))
    out = tmp_path / "res" / "sft.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, SCRIPT, "--model", model, "--train-file", train, "--eval-file", test,
                           "--methods", "full,lora,meprop,sparsegrad,sparsegrad-exact", "--seeds", "0,1", "--max-train-samples", "16",
                           "--max-eval-samples", "6", "--max-seq-length", "64", "--batch-size", "4",
                           "--calibration-steps", "2", "--lr-grid", "full=1e-3,1e-2", "--threads", "1",
                           "--in-process", "--output", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert set(report["results"]) == {"full", "lora", "meprop", "sparsegrad", "sparsegrad-exact"}
    before = {r["eval_loss_before"] for r in report["results"].values()}
    assert len(before) == 1  # the same base model and eval set for every method
    for method, r in report["results"].items():
        assert len(r["eval_losses"]) == 2 and r["eval_loss_std"] >= 0
        assert r["lr"] in [float(k) for k in r["lr_selection"]] and len(r["lr_selection"]) == 2
        assert r["lr_selection"][str(r["lr"])] == min(r["lr_selection"].values())  # lowest held-out loss
        assert 0 <= r["eval_token_accuracy_mean"] <= 1 and r["trainable_params"] > 0
        assert r["data"]["selection_fit"] == 12 and r["data"]["selection_heldout"] == 4
    assert report["results"]["sparsegrad"]["trainable_params"] == 84
    md = out.with_suffix(".md").read_text()
    assert "| base model (no training) |" in md and "| sparsegrad |" in md
    if importlib.util.find_spec("matplotlib") is not None:
        assert out.with_suffix(".png").stat().st_size > 0
