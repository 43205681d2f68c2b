"""Peak memory and step time of a Hugging Face ``Trainer`` step: SparseGrad vs LoRA, GaLore, MeProp and full FT.

    python benchmarks/trainer_memory.py --dtype bf16 --name trainer_memory_smollm2_bf16      # the memory protocol
    python benchmarks/trainer_memory.py --dtype fp32 --name trainer_memory_smollm2_fp32
    python benchmarks/trainer_memory.py --dtype bf16 --batch-size 8 --seq-len 128 --steps 12 --warmup 2 \\
        --name trainer_time_smollm2_bf16                                                    # step times
    python benchmarks/trainer_memory.py --quick --output-dir /tmp/bench                     # CI smoke run

A measurement script, not a test: nothing here passes or fails on a number.

Protocol. SmolLM2-135M-Instruct (``peft_sparsegrad.models``; ``--quick``: a tiny random LLaMA), up_proj and
down_proj of blocks 0, 3, …, 27 (``--blocks-every``), nothing else trainable. The plain ``Trainer`` — max_grad_norm
1.0, gradient accumulation 1, constant LR 1e-4, no logging or saving — on synthetic batches (random token ids,
labels = ids) of ``--batch-size`` × ``--seq-len``, for ``--warmup`` + ``--steps`` optimizer steps. Every method runs
in its own process with ``MALLOC_MMAP_THRESHOLD_=65536`` (``harness.WORKER_ENV``), after importing every library any
method needs, so all start from the same baseline.

Peak. The kernel's RSS high-water mark is reset when the first step begins and read after the last one ends: the
largest resident set of the steps, with every transient of forward, backward, clipping and the optimizer step in it
(``harness``). The table reports it over LoRA's peak, per adapted weight; also over the worker's own RSS when the
first step began (what the steps add to the state present before them). Step time: median of the steps after the
warm-up, from the callback events around each step.

Methods: ``full`` (the Trainer's AdamW on those weights), ``lora`` (PEFT LoRA, rank ``--lora-rank``), ``galore``
(the Trainer's ``optim="galore_adamw"`` on those weights, rank ``--galore-rank``, update_proj_gap 200, scale 0.25),
``meprop`` (SparseGrad, identity bases), ``sparsegrad`` (the default SparseGradConfig: periodic selection, support of
at most 2k, stochastic rounding, step inside backward), ``sparsegrad-dynamic`` (the same with selection="dynamic"),
``sparsegrad-bf16`` (the default with bfloat16 products, what "auto" picks on a GPU for bf16 weights; CPU: float32),
``sparsegrad-dense`` (the default config on the dense path, ``SparseGradCallback(step_in_backward=False)``) and
``sparsegrad-exact`` (what earlier versions did: dynamic selection, unbounded support, compensated rounding, the dense
path). SparseGrad's bases come from one calibration (``--calibration-steps`` synthetic batches) in a worker of its own,
shared through a file. For SparseGrad the worker also records the training state (optimizer state of the adapted
weights + ΔW' + bases, exact bytes) and the size of the saved adapter.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import statistics
import sys
import tempfile
import time
from typing import Any

import harness

METHODS = {  # name: SparseGradConfig overrides and callback options (None: not SparseGrad)
    "full": None,
    "lora": None,
    "galore": None,
    "meprop": ({"bases": "identity"}, {}),
    "sparsegrad": ({}, {}),
    "sparsegrad-dynamic": ({"selection": "dynamic"}, {}),
    "sparsegrad-bf16": ({"compute_dtype": "bfloat16"}, {}),
    "sparsegrad-dense": ({}, {"step_in_backward": False}),
    "sparsegrad-exact": ({"selection": "dynamic", "max_support": None, "rounding": "compensated"},
                         {"step_in_backward": False}),
}
TARGETS = ("up_proj", "down_proj")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16", help="dtype of the model's weights")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--warmup", type=int, default=0, help="steps before the timed ones (inside the peak window)")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--blocks-every", type=int, default=3, help="adapt blocks 0, N, 2N, ...")
    p.add_argument("--keep-ratio", type=float, default=0.01)
    p.add_argument("--lora-rank", type=int, default=4)
    p.add_argument("--galore-rank", type=int, default=128)
    p.add_argument("--calibration-steps", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--worker-timeout", type=int, default=3600)
    p.add_argument("--output-dir", default=os.path.join(harness.HERE, "results"))
    p.add_argument("--name", default="trainer_memory")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cuda: peaks are torch.cuda.max_memory_allocated (reset when the first step begins)")
    p.add_argument("--shape", choices=("smollm2", "llama7b"), default="smollm2",
                   help="llama7b: a randomly initialised LLaMA-2-7B-shaped model (hidden 4096, MLP 11008, 32 heads, "
                        "vocabulary 32000) with --layers blocks")
    p.add_argument("--layers", type=int, default=32, help="blocks of the llama7b shape")
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--memory-limit-gib", type=float, default=None,
                   help="cuda: cap the process's GPU memory (torch.cuda.set_per_process_memory_fraction), e.g. 24")
    p.add_argument("--gram-precision", choices=("fp32", "bf16"), default="fp32", help="calibration arithmetic")
    p.add_argument("--time-only", action="store_true",
                   help="step times without the pinned mmap threshold (it makes every large allocation a fresh "
                        "mapping, which slows allocation-heavy steps); peaks are then not comparable")
    p.add_argument("--quick", action="store_true", help="tiny random LLaMA, 2 steps (CI smoke run)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker-output", default=None, help=argparse.SUPPRESS)
    p.add_argument("--bases-file", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.warmup, args.calibration_steps = 2, 0, 2
    unknown = sorted(set(args.methods.split(",")) - set(METHODS))
    if unknown:
        p.error(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
    return args


# ---- the worker ------------------------------------------------------------------------------------------------------


def _load_model(args):
    import torch

    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    torch.manual_seed(args.seed)
    if args.device == "cuda" and args.memory_limit_gib:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.memory_limit_gib * 2**30 / total))
    if args.quick or args.shape == "llama7b":
        from transformers import LlamaConfig, LlamaForCausalLM

        if args.quick:
            config = LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=4, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=512, max_position_embeddings=256, pad_token_id=0)
            desc = "tiny random LLaMA (hidden 64, MLP 160, 4 blocks)"
        else:
            config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=args.layers,
                                 num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                                 max_position_embeddings=4096, rms_norm_eps=1e-5, pad_token_id=0)
            desc = f"random LLaMA-2-7B-shaped model ({args.layers} blocks, hidden 4096, MLP 11008)"
        default = torch.get_default_dtype()
        torch.set_default_dtype(dtype)  # initialise directly in the weights' dtype, on the device
        try:
            with torch.device(args.device):
                model = LlamaForCausalLM(config)
        finally:
            torch.set_default_dtype(default)
        return model, desc
    from transformers import AutoModelForCausalLM

    from peft_sparsegrad.models import smollm2_path

    model = AutoModelForCausalLM.from_pretrained(smollm2_path(), dtype=dtype).to(args.device)
    return model, "SmolLM2-135M-Instruct (30 blocks, hidden 576, MLP 1536)"


def _memory(args):
    """(current bytes, peak bytes since the last reset, reset) of the measured device."""
    import torch

    if args.device == "cuda":
        return (torch.cuda.memory_allocated(), torch.cuda.max_memory_allocated(), torch.cuda.reset_peak_memory_stats)
    rss, hwm = harness.rss_mib(), harness.hwm_mib()
    return (None if rss is None else rss * harness.MIB, None if hwm is None else hwm * harness.MIB, harness.reset_hwm)


def _batches(model, n: int, args) -> list[dict]:
    import torch

    gen = torch.Generator().manual_seed(args.seed + 1)
    ids = torch.randint(1, model.config.vocab_size, (n, args.seq_len), generator=gen)
    return [{"input_ids": row, "attention_mask": torch.ones_like(row), "labels": row.clone()} for row in ids]


class _Probe:
    """Trainer callback (built lazily, transformers imported in the worker): the peak window and step times."""

    @staticmethod
    def make(args):
        from transformers import TrainerCallback

        class Probe(TrainerCallback):
            def __init__(self):
                self.times, self.start, self.before, self.reset_ok, self.peak = [], None, None, False, None

            def on_step_begin(self, args_, state, control, **kwargs):
                if state.global_step == 0:
                    gc.collect()
                    current, _, reset = _memory(args)
                    self.before = current
                    self.reset_ok = reset() is not False
                self.start = time.perf_counter()

            def on_step_end(self, args_, state, control, **kwargs):
                if args.device == "cuda":
                    import torch

                    torch.cuda.synchronize()
                self.times.append(time.perf_counter() - self.start)
                self.peak = _memory(args)[1] if self.reset_ok else None

        return Probe()


def _calibrate(args) -> dict:
    """The bases every SparseGrad worker shares (``--bases-file``), from ``--calibration-steps`` synthetic batches."""
    import peft_sparsegrad
    from peft_sparsegrad import SparseGradConfig

    model, _ = _load_model(args)
    if args.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    layers = list(range(0, model.config.num_hidden_layers, args.blocks_every))
    import torch

    rows = _batches(model, args.calibration_steps * args.batch_size, args)
    loader = [{key: torch.stack([r[key] for r in rows[i:i + args.batch_size]]).to(args.device) for key in rows[0]}
              for i in range(0, len(rows), args.batch_size)]
    config = SparseGradConfig(target_modules=list(TARGETS), layers_to_transform=layers,
                              calibration_steps=args.calibration_steps, gram_precision=args.gram_precision)
    t0 = time.perf_counter()
    bases = peft_sparsegrad.calibrate(model, config, loader, progress=False)
    peft_sparsegrad.save_bases(bases, args.bases_file)
    return {"calibration_s": time.perf_counter() - t0}


def worker(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    # every library any method needs, imported before the baseline
    import peft
    import transformers

    import peft_sparsegrad
    from peft_sparsegrad import SparseGradCallback, SparseGradConfig
    try:
        import galore_torch  # noqa: F401
    except ImportError:
        galore_torch = None

    method = args.worker
    model, desc = _load_model(args)
    layers = list(range(0, model.config.num_hidden_layers, args.blocks_every))
    weights = {f"model.layers.{i}.mlp.{t}": model.get_submodule(f"model.layers.{i}.mlp.{t}").weight
               for i in layers for t in TARGETS}
    adapted = sum(w.numel() for w in weights.values())
    for p in model.parameters():
        p.requires_grad_(False)
    data = _batches(model, (args.warmup + args.steps) * args.batch_size, args)
    extra_args: dict[str, Any] = {}
    callbacks: list = []
    info: dict[str, Any] = {}
    if method == "full":
        for w in weights.values():
            w.requires_grad_(True)
    elif method == "galore":
        if galore_torch is None:
            raise RuntimeError("galore needs galore-torch (pip install -e '.[bench]')")
        for w in weights.values():
            w.requires_grad_(True)
        extra_args = {"optim": "galore_adamw", "optim_target_modules": [rf"model\.layers\.({'|'.join(map(str, layers))})"
                                                                         rf"\.mlp\.({'|'.join(TARGETS)})"],
                      "optim_args": f"rank={args.galore_rank}, update_proj_gap=200, scale=0.25"}
    elif method == "lora":
        config = peft.LoraConfig(task_type="CAUSAL_LM", r=args.lora_rank, lora_alpha=2 * args.lora_rank,
                                 lora_dropout=0.0, target_modules=list(TARGETS), layers_to_transform=layers)
        model = peft.get_peft_model(model, config)
    else:
        overrides, callback_options = METHODS[method]
        overrides = {"bases": args.bases_file, **overrides}
        config = SparseGradConfig(task_type="CAUSAL_LM", target_modules=list(TARGETS), layers_to_transform=layers,
                                  keep_ratio=args.keep_ratio, **overrides)
        model = peft.get_peft_model(model, config)
        callback = SparseGradCallback(**callback_options)
        callbacks.append(callback)
        info["config"] = {k: getattr(config, k) for k in ("selection", "refresh_interval", "max_support", "rounding",
                                                          "sparse_optimizer", "bases_dtype", "compute_dtype")}
    probe = _Probe.make(args)
    out_dir = tempfile.mkdtemp(prefix="trainer_memory_")
    training = transformers.TrainingArguments(
        output_dir=out_dir, max_steps=args.warmup + args.steps, per_device_train_batch_size=args.batch_size,
        learning_rate=1e-4, lr_scheduler_type="constant", max_grad_norm=1.0, gradient_accumulation_steps=1,
        logging_strategy="no", save_strategy="no", report_to=[], use_cpu=args.device == "cpu", disable_tqdm=True,
        dataloader_num_workers=0, seed=args.seed, gradient_checkpointing=args.activation_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if args.activation_checkpointing else None,
        **extra_args)
    trainer = transformers.Trainer(model=model, args=training, train_dataset=data, callbacks=[probe, *callbacks])
    out_of_memory = None
    try:
        trainer.train()
    except torch.OutOfMemoryError as exc:  # the answer to "does it fit?" for a capped GPU
        out_of_memory = str(exc).split("\n")[0][:300]
        probe.peak = _memory(args)[1]
    result = {"method": method, "model": desc, "adapted_weights": adapted, "adapted_layers": len(weights),
              "blocks": layers, "device": args.device, "peak_rss_mib": None if probe.peak is None
              else probe.peak / harness.MIB, "rss_at_first_step_mib": None if probe.before is None
              else probe.before / harness.MIB, "hwm_reset_supported": probe.reset_ok, "step_times_s": probe.times,
              "step_time_s": statistics.median(probe.times[args.warmup:]) if len(probe.times) > args.warmup
              else None, "out_of_memory": out_of_memory, **info}
    if out_of_memory:
        return result
    if callbacks:
        from peft_sparsegrad.layer import SparseGradLayer

        sparse = [m for m in model.modules() if isinstance(m, SparseGradLayer)]
        result["path"] = callbacks[0].path
        result["support_over_k"] = (sum(m.sparsegrad_delta["default"].nnz for m in sparse)
                                    / sum(m.sparsegrad_k["default"] for m in sparse))
        result["state_bytes"] = _state_bytes(trainer.optimizer, sparse)
    if method in ("lora", *[m for m in METHODS if METHODS[m]]) and args.shape != "llama7b":
        model.save_pretrained(os.path.join(out_dir, "adapter"))
        result["adapter_file_bytes"] = os.path.getsize(os.path.join(out_dir, "adapter",
                                                                    "adapter_model.safetensors"))
    return result


def _state_bytes(optimizer, layers) -> dict:
    """Exact bytes SparseGrad holds between steps: the adapted weights' optimizer state, ΔW', the bases (each
    distinct storage once)."""
    import torch

    seen: set = set()

    def size(tensors) -> int:
        total = 0
        for t in tensors:
            if isinstance(t, torch.Tensor) and t.numel():
                key = t.untyped_storage().data_ptr()
                if key not in seen:
                    seen.add(key)
                    total += t.untyped_storage().nbytes()
        return total

    inner = getattr(optimizer, "optimizer", optimizer)
    moments = 0
    for layer in layers:
        st = inner.state.get(layer.get_base_layer().weight, {}).get("sparsegrad")
        if st is not None:
            moments += size([st.exp_avg, st.exp_avg_sq, st.indices, st.prev_selected])
    delta = size(t for m in layers for t in (m.sparsegrad_delta["default"].flat, m.sparsegrad_delta["default"].values))
    bases = size(u for m in layers for p in [m.sparsegrad_bases["default"]] if p is not None and not p.is_identity
                 for u in (p.U_out, p.U_in))
    residual = size(m._residual for m in layers if m._residual is not None)
    return {"optimizer": moments, "delta": delta, "bases": bases, "residual": residual}


# ---- the driver ------------------------------------------------------------------------------------------------------


def _cmd(args, job: str, out: str) -> list[str]:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", job, "--worker-output", out,
           "--bases-file", args.bases_file]
    for key in ("dtype", "batch_size", "seq_len", "warmup", "steps", "blocks_every", "keep_ratio", "lora_rank",
                "galore_rank", "calibration_steps", "threads", "seed", "device", "shape", "layers", "gram_precision"):
        cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    if args.memory_limit_gib:
        cmd += ["--memory-limit-gib", str(args.memory_limit_gib)]
    return cmd + (["--quick"] if args.quick else []) + (["--activation-checkpointing"]
                                                         if args.activation_checkpointing else [])


def summarize(runs: dict[str, dict]) -> dict[str, dict]:
    lora = runs.get("lora", {}).get("peak_rss_mib")
    table = {}
    for name, r in runs.items():
        if "error" in r or r.get("peak_rss_mib") is None:
            continue
        w = r["adapted_weights"]
        row = {"peak_gib": r["peak_rss_mib"] / 1024, "out_of_memory": bool(r.get("out_of_memory")),
               "peak_over_first_step_b_per_w": (r["peak_rss_mib"] - r["rss_at_first_step_mib"]) * harness.MIB / w
               if r.get("rss_at_first_step_mib") is not None else None, "step_time_s": r["step_time_s"]}
        if lora is not None:
            row["peak_over_lora_b_per_w"] = (r["peak_rss_mib"] - lora) * harness.MIB / w
        if "state_bytes" in r:
            row["state_b_per_w"] = sum(r["state_bytes"].values()) / w
        if "adapter_file_bytes" in r:
            row["adapter_b_per_w"] = r["adapter_file_bytes"] / w
        full = runs.get("full", {}).get("step_time_s")
        if full and r["step_time_s"]:
            row["time_over_full"] = r["step_time_s"] / full
        table[name] = row
    return table


def markdown(result: dict) -> str:
    a, table = result["args"], result["table"]
    first = next(iter(r for r in result["runs"].values() if "adapted_weights" in r), {})
    cuda = a["device"] == "cuda"
    measure = ("torch.cuda.max_memory_allocated over all steps (reset when the first begins)" if cuda else
               "kernel RSS high-water mark over all steps (reset when the first begins), workers with "
               "MALLOC_MMAP_THRESHOLD_=65536" + ("" if not a.get("time_only") else " — not here: --time-only"))
    limit = f", GPU memory capped at {a['memory_limit_gib']:g} GiB" if a.get("memory_limit_gib") else ""
    lines = [f"# Peak memory of a Trainer step ({a['dtype']}, {a['device']})", "",
             "Generated by `benchmarks/trainer_memory.py`:", "", f"    {result['command']}", "",
             f"{first.get('model', '?')}, up_proj/down_proj of blocks {harness.blocks_text(first.get('blocks', []))}: "
             f"{first.get('adapted_weights', 0):,} adapted weights; batch {a['batch_size']} × {a['seq_len']}, "
             f"{a['warmup']} + {a['steps']} steps"
             f"{', activation checkpointing' if a.get('activation_checkpointing') else ''}{limit}; "
             f"{result['machine'].get('gpu') or result['machine']['cpu']} (git {result['machine']['git_commit']}). "
             f"Peak = {measure}. B/w = bytes per adapted weight.", "",
             "| method | peak (GiB) | peak − LoRA's peak (B/w) | peak − memory at step 1 (B/w) | state (B/w) | "
             "adapter file (B/w) | step time (s) | × full FT | path |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, row in table.items():
        run = result["runs"][name]
        peak = f"{row['peak_gib']:.2f}" + (" (out of memory)" if row["out_of_memory"] else "")
        lines.append(f"| {name} | {peak} | {harness.fmt(row.get('peak_over_lora_b_per_w'), '.2f')} | "
                     f"{harness.fmt(row['peak_over_first_step_b_per_w'], '.2f')} | "
                     f"{harness.fmt(row.get('state_b_per_w'), '.2f')} | {harness.fmt(row.get('adapter_b_per_w'), '.2f')}"
                     f" | {harness.fmt(row['step_time_s'], '.3f')} | {harness.fmt(row.get('time_over_full'), '.2f')} | "
                     f"{run.get('path', '')} |")
    failed = {n: r["error"] for n, r in result["runs"].items() if "error" in r}
    if failed:
        lines += ["", "Failed: " + "; ".join(f"{n}: {e}" for n, e in failed.items())]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        result = _calibrate(args) if args.worker == "calibrate" else worker(args)
        harness.write_json(args.worker_output, result)
        return
    tmp = tempfile.mkdtemp(prefix="trainer_memory_")
    args.bases_file = os.path.join(tmp, "bases.safetensors")
    methods = args.methods.split(",")
    runs: dict[str, dict] = {}
    if any(METHODS[m] is not None and METHODS[m][0].get("bases") != "identity" for m in methods):
        out = os.path.join(tmp, "calibrate.json")
        runs["calibration"] = harness.run_worker(_cmd(args, "calibrate", out), out, args.worker_timeout)
    for method in methods:
        out = os.path.join(tmp, f"{method}.json")
        env = {"MALLOC_MMAP_THRESHOLD_": None} if args.time_only else None
        runs[method] = harness.run_worker(_cmd(args, method, out), out, args.worker_timeout, env=env)
        r = runs[method]
        print(f"[trainer_memory] {method}: " + (r["error"] + " " + r.get("stderr_tail", "")[-800:] if "error" in r
              else f"peak {r['peak_rss_mib']:.0f} MiB, step {r['step_time_s']:.3f} s"), flush=True)
    calibration = runs.pop("calibration", None)
    result = {"command": harness.command_line(__file__, argv), "args": {k: v for k, v in vars(args).items()
                                                                        if not k.startswith("worker")},
              "machine": harness.machine_info(args.device, threads=args.threads), "calibration": calibration,
              "runs": runs,
              "table": summarize(runs)}
    os.makedirs(args.output_dir, exist_ok=True)
    path = os.path.join(args.output_dir, args.name)
    harness.write_json(path + ".json", result)
    with open(path + ".md", "w") as f:
        f.write(markdown(result))
    print(f"[trainer_memory] wrote {path}.json and .md")


if __name__ == "__main__":
    main()
