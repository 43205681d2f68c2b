"""What every benchmark here shares: memory readings from /proc, one subprocess per measured configuration, machine
facts, and writing a result as JSON plus Markdown with the command that produced it.

Peak memory on CPU. ``reset_hwm`` resets the kernel's RSS high-water mark (``/proc/self/clear_refs``, Linux >= 4.0)
and ``hwm_mib`` reads it (VmHWM): the peak of every byte resident between the two, transient ones included, with no
sampling gap. glibc keeps freed small blocks in its heap, so workers run with ``MALLOC_MMAP_THRESHOLD_`` pinned to
64 KiB (``WORKER_ENV``): every allocation above that is its own mapping, returned to the system when freed, and RSS
follows the live tensors closely.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import platform
import subprocess
import sys
import time
from typing import Any, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
MIB = 2**20
#: Environment of every worker process: offline, and the allocator's mmap threshold pinned (module docstring).
WORKER_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
              "TOKENIZERS_PARALLELISM": "false", "MALLOC_MMAP_THRESHOLD_": "65536"}


# ---- memory ----------------------------------------------------------------------------------------------------------


def proc_status_kib(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_mib() -> Optional[float]:
    kib = proc_status_kib("VmRSS")
    return None if kib is None else kib / 1024


def hwm_mib() -> Optional[float]:
    kib = proc_status_kib("VmHWM")
    return None if kib is None else kib / 1024


def reset_hwm() -> bool:
    """Reset the RSS high-water mark to the current RSS. False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# ---- workers ---------------------------------------------------------------------------------------------------------


def run_worker(cmd: list[str], out: str, timeout: int, env: Optional[dict] = None) -> dict:
    """Run one worker process that writes its result as JSON to ``out``; the result, or {"error": ...}. ``env``
    overrides ``WORKER_ENV`` (a value None removes the variable)."""
    environment = {**os.environ, **WORKER_ENV, **(env or {}),
                   "PYTHONPATH": os.pathsep.join([REPO, HERE, os.environ.get("PYTHONPATH", "")])}
    environment = {k: v for k, v in environment.items() if v is not None}  # env={"X": None} unsets X
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=environment, timeout=timeout, cwd=REPO)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    wall = time.perf_counter() - t0
    if proc.returncode != 0 or not os.path.exists(out):
        return {"error": f"worker exited with {proc.returncode}",
                "stderr_tail": (proc.stderr or proc.stdout or "")[-3000:], "worker_wall_s": wall}
    with open(out) as f:
        result = json.load(f)
    result["worker_wall_s"] = wall
    return result


def write_json(path: str, result: Any) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, path)


def command_line(script: str, argv: Optional[list[str]]) -> str:
    args = sys.argv[1:] if argv is None else argv
    return " ".join(["python", os.path.relpath(script, REPO), *args])


# ---- facts -----------------------------------------------------------------------------------------------------------


def _version(pkg: str) -> Optional[str]:
    try:
        return md.version(pkg)
    except md.PackageNotFoundError:
        return None


def _git(*args: str) -> Optional[str]:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=REPO, timeout=30).stdout.strip()
    except Exception:
        return None


def loadavg() -> Optional[float]:
    try:
        with open("/proc/loadavg") as f:
            return float(f.read().split()[0])
    except (OSError, ValueError):
        return None


def machine_info(device: str = "cpu", threads: Optional[int] = None) -> dict:
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    info = {"cpu": cpu, "cpu_count": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "torch": _version("torch"), "transformers": _version("transformers"),
            "peft": _version("peft"), "galore_torch": _version("galore-torch"),
            "git_commit": _git("log", "-1", "--format=%h"),
            "git_uncommitted_in_package": _git("status", "--porcelain", "--", "peft_sparsegrad"), "device": device,
            "torch_threads": threads, "loadavg_1min": loadavg()}
    if device == "cuda":
        try:
            import torch

            info["gpu"] = torch.cuda.get_device_name(0)
            info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
        except Exception:  # no usable GPU: the workers will say so
            pass
    try:
        with open("/proc/meminfo") as f:
            info["mem_total_gib"] = round(int(f.readline().split()[1]) / 2**20, 1)
    except OSError:
        pass
    return info


def blocks_text(blocks: list[int]) -> str:
    """0, 3, …, 27 for an arithmetic run of block indices."""
    if len(blocks) > 3 and all(b - a == blocks[1] - blocks[0] for a, b in zip(blocks, blocks[1:])):
        return f"{blocks[0]}, {blocks[1]}, …, {blocks[-1]}"
    return ", ".join(map(str, blocks))


def fmt(value: Any, spec: str = ".3g", none: str = "–") -> str:
    return none if value is None else format(value, spec)
