"""CI smoke test of benchmarks/speed_memory.py: the --quick run completes and writes well-formed results.

No assertion on timings or on which method is faster: the numbers depend on the machine and its load.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "benchmarks", "speed_memory.py")
CORE_METHODS = ("full", "lora", "meprop", "sparsegrad", "sparsegrad-lean")


@pytest.mark.slow
def test_speed_memory_quick(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, SCRIPT, "--quick", "--output-dir", str(tmp_path)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    data = json.loads((tmp_path / "speed_memory.json").read_text())
    assert set(data["models"]) == {"tiny-bert"}
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

    # full fine-tuning trains (and keeps Adam state for) every parameter; LoRA's state is far smaller
    full, lora = per_method["full"]["bytes"], per_method["lora"]["bytes"]
    assert full["params_trainable"] == full["params_total"]
    assert full["optimizer_state"] >= 2 * full["params_total"]
    assert lora["optimizer_state"] < full["optimizer_state"]
    # SparseGrad holds its bases outside the parameters; MeProp (identity bases) none of them
    assert per_method["sparsegrad"]["bytes"]["adapter_extra"] > 0
    assert per_method["sparsegrad"]["calibration"]["setup_s"] > 0
    assert per_method["sparsegrad"]["calibration"]["gram_adds"] > 0

    gram = data["gram"]
    assert "error" not in gram, gram
    assert [tuple(s["shape"]) for s in gram["shapes"]] == [(256, 128), (128, 256)]
    for s in gram["shapes"]:
        assert len(s["add_times_s"]) == 2 and s["add_median_s"] > 0 and s["bases_s"] > 0
        assert s["gram_bytes"] == 8 * (s["shape"][0] ** 2 + s["shape"][1] ** 2)
    assert all(e["measured"] and e["seconds"] > 0 for e in gram["eigh"])
    assert gram["extrapolation"]["total_s"] > 0

    md = (tmp_path / "speed_memory.md").read_text()
    assert "speed_memory.py --quick" in md and "## tiny-bert" in md
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / "speed_memory.png").stat().st_size > 0
