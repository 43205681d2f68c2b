"""CI smoke test of benchmarks/speed_memory.py: the --quick run completes and writes well-formed results.

No assertion on timings or on which method is faster: the numbers depend on the machine and its load.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "benchmarks", "speed_memory.py")
CORE_METHODS = ("full", "lora", "meprop", "sparsegrad", "sparsegrad-lean")
DECODER_METHODS = ("full", "lora", "sparsegrad-lean")  # what --quick runs on the tiny LLaMA causal LM


def _live_bytes():
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    try:
        from decoder_models import live_tensor_bytes
    finally:
        sys.path.pop(0)
    return live_tensor_bytes


@pytest.mark.parametrize("dtype_name, expected", [("float32", 12.0), ("bfloat16", 6.0)])
def test_live_bytes_full_ft_adamw(dtype_name, expected):
    """The generic live-tensor count on a toy: full FT of one layer with AdamW after backward holds the gradient and
    two moments in the weight dtype (12 B per weight in fp32, 6 in bf16), and nothing else of size."""
    import torch

    live_tensor_bytes = _live_bytes()
    dtype = getattr(torch, dtype_name)
    layer = torch.nn.Linear(256, 128, bias=False).to(dtype)
    x = torch.randn(4, 256, dtype=dtype)
    before = live_tensor_bytes()["bytes"]
    optimizer = torch.optim.AdamW(layer.parameters(), lr=1e-3)
    for _ in range(2):
        layer(x).float().pow(2).mean().backward()
        if _ == 0:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    extra = live_tensor_bytes()["bytes"] - before
    per_weight = extra / layer.weight.numel()
    assert abs(per_weight - expected) < 0.01, per_weight  # + AdamW's scalar step counter


@pytest.mark.slow
def test_speed_memory_quick(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, SCRIPT, "--quick", "--output-dir", str(tmp_path)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    data = json.loads((tmp_path / "speed_memory.json").read_text())
    assert set(data["models"]) == {"tiny-bert", "tiny-llama"}
    per_method = data["models"]["tiny-bert"]
    expected = set(CORE_METHODS)
    if importlib.util.find_spec("galore_torch") is not None:
        expected.add("galore")
    assert expected <= set(per_method), sorted(per_method)

    for method in expected:
        r = per_method[method]
        assert "error" not in r, (method, r.get("error"), r.get("stderr_tail"))
        assert r["method"] == method
        assert r["step_time_s"] > 0 and len(r["step_times_s"]) == 2 and len(r["warmup_times_s"]) == 1
        b = r["bytes"]
        assert b["params_total"] > 0 and b["params_trainable"] > 0
        assert b["grads"] > 0 and b["optimizer_state"] > 0
        assert b["params_trainable"] <= b["params_total"]
        assert r["memory"]["ru_maxrss_mib"] > 0
        assert r["ratios"]["step_time_vs_full"] > 0 and r["ratios"]["step_time_vs_lora"] > 0
        assert r["live"]["extra_bytes"] > 0 and r["live"]["extra_bytes_per_adapted_weight"] > 0, r["live"]

    # full fine-tuning trains (and keeps Adam state for) every parameter; LoRA's state is far smaller
    full, lora = per_method["full"]["bytes"], per_method["lora"]["bytes"]
    assert full["params_trainable"] == full["params_total"]
    assert full["optimizer_state"] >= 2 * full["params_total"]
    assert lora["optimizer_state"] < full["optimizer_state"]
    # SparseGrad holds its bases outside the parameters; MeProp (identity bases) none of them
    assert per_method["sparsegrad"]["bytes"]["adapter_extra"] > 0
    assert per_method["sparsegrad"]["calibration"]["setup_s"] > 0
    assert per_method["sparsegrad"]["calibration"]["gram_adds"] > 0

    # the decoder path (a tiny random LLaMA stands in for SmolLM2): up/down_proj of every third block, no head
    decoder = data["models"]["tiny-llama"]
    assert set(DECODER_METHODS) <= set(decoder), sorted(decoder)
    for method in DECODER_METHODS:
        r = decoder[method]
        assert "error" not in r, (method, r.get("error"), r.get("stderr_tail"))
        assert r["step_time_s"] > 0 and r["adapted_layers"] == 4  # blocks 0 and 3, up_proj + down_proj
        live = r["live"]
        assert live["extra_bytes"] > 0 and live["extra_bytes_per_adapted_weight"] > 0, live
        assert live["adapted_weights"] == r["mlp_params"]
    # fp32 full FT with AdamW: gradient + two moments = 12 B per adapted weight (+ AdamW's step counters)
    assert abs(decoder["full"]["live"]["extra_bytes_per_adapted_weight"] - 12.0) < 0.01
    assert decoder["full"]["trainable_numel"] == decoder["full"]["mlp_params"]  # only the adapted weights train
    assert decoder["lora"]["live"]["extra_bytes"] < decoder["full"]["live"]["extra_bytes"]
    split = decoder["sparsegrad-lean"]["live_split"]  # from the probe run at twice the keep_ratio
    assert split["bases_bytes"] > 0 and split["keep_ratios"] == [0.01, 0.02]
    # the storage the layers actually held (float16 by default), recorded per run and used for the bases' bytes
    assert decoder["sparsegrad-lean"]["bases_dtype"] == split["bases_dtype"] == "float16"
    assert decoder["full"]["bases_dtype"] is None
    assert "sparsegrad-lean" in data["probes"]["tiny-llama"]
    table = data["state_table"]["by_dtype"]["fp32"]
    for case in table["rows"].values():
        assert {"full", "lora", "galore", "sparsegrad-lean"} <= set(case["methods"])
        assert case["methods"]["full"]["bytes_per_weight"] == 12.0
        assert all(m["bytes"] > 0 for m in case["methods"].values())
    assert abs(table["check"]["full"]["measured_over_formula"] - 1.0) < 1e-3

    gram = data["gram"]
    assert "error" not in gram, gram
    assert [tuple(s["shape"]) for s in gram["shapes"]] == [(256, 128), (128, 256)]
    for s in gram["shapes"]:
        assert len(s["add_times_s"]) == 2 and s["add_median_s"] > 0 and s["bases_s"] > 0
        assert s["gram_bytes"] == 8 * (s["shape"][0] ** 2 + s["shape"][1] ** 2)
    assert all(e["measured"] and e["seconds"] > 0 for e in gram["eigh"])
    assert gram["extrapolation"]["total_s"] > 0

    md = (tmp_path / "speed_memory.md").read_text()
    assert "speed_memory.py --quick" in md and "## tiny-bert" in md and "## tiny-llama" in md
    assert "extra live B / adapted weight" in md and "LLaMA-2-7B MLP shapes (formula" in md
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / "speed_memory.png").stat().st_size > 0

    # --render recomputes the derived figures from the stored measurements: the same numbers, noted as re-rendered
    json_path = tmp_path / "speed_memory.json"
    proc = subprocess.run([sys.executable, SCRIPT, "--render", str(json_path), "--no-plot"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    again = json.loads(json_path.read_text())
    assert again["rendered"]["command"].endswith("--no-plot")
    assert again["models"]["tiny-llama"]["sparsegrad-lean"]["live_split"] == split
    assert again["state_table"] == data["state_table"]
    assert "recomputed from the measurements" in (tmp_path / "speed_memory.md").read_text()


@pytest.mark.slow
def test_trainer_memory_quick(tmp_path):
    """benchmarks/trainer_memory.py --quick: every method trains through the Trainer in its own worker; SparseGrad
    runs the step inside backward (the dense variants the dense path) and reports its state and adapter bytes."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    script = os.path.join(REPO, "benchmarks", "trainer_memory.py")
    methods = "full,lora,sparsegrad,sparsegrad-exact"
    proc = subprocess.run([sys.executable, script, "--quick", "--methods", methods, "--output-dir", str(tmp_path),
                           "--name", "tm"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((tmp_path / "tm.json").read_text())
    runs = data["runs"]
    assert set(methods.split(",")) <= set(runs) and not [m for m in runs if "error" in runs[m]]
    assert runs["sparsegrad"]["path"] == "step-in-backward" and runs["sparsegrad-exact"]["path"] == "dense"
    assert runs["sparsegrad"]["state_bytes"]["residual"] == 0 and runs["sparsegrad-exact"]["state_bytes"]["residual"] > 0
    for name in methods.split(","):
        assert runs[name]["peak_rss_mib"] > 0 and len(runs[name]["step_times_s"]) == 2
    assert "| sparsegrad |" in (tmp_path / "tm.md").read_text()


@pytest.mark.slow
def test_ddp_comm_quick(tmp_path):
    """benchmarks/ddp_comm.py --quick on 2 gloo ranks: between refreshes SparseGrad sends k values of g[S] (in
    bf16) plus DDP's one-number anchor, full FT and the dense path the dense gradient."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
           "--master_addr=127.0.0.1", f"--master_port={port}", os.path.join(REPO, "benchmarks", "ddp_comm.py"), "--quick",
           "--steps", "2", "--warmup", "2", "--output-dir", str(tmp_path), "--name", "comm"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs = json.loads((tmp_path / "comm.json").read_text())["runs"]
    dense = runs["full"]["adapted_weights"] * 2
    assert runs["full"]["bytes_per_step"] == [dense, dense] == runs["sparsegrad-dense"]["bytes_per_step"]
    k = -(-runs["full"]["adapted_weights"] // 100)  # keep_ratio 0.01 per layer, rounded up per layer
    assert all(dense // 100 <= b - 4 <= 2 * (k + 8) for b in runs["sparsegrad"]["bytes_per_step"])
    assert runs["sparsegrad-dynamic"]["bytes_per_step"] == [dense + 4] * 2
