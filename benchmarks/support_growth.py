"""How ΔW''s support — and with it the training state and the adapter file — grows over a real SFT run, per rule.

    python benchmarks/support_growth.py --steps 500 --output benchmarks/results/support_growth.json

Every selection picks its own top-k, so the support (the entries ever selected) is a union that grows over training:
without a bound, dynamic selection passes the size of the weights it adapts within a few hundred steps. The rules
measured: the default (periodic selection, support of at most 2·k), dynamic selection with that bound, and both
without it (``max_support=None``; dynamic unbounded is the paper's method). This script trains SmolLM2-135M-Instruct's
up_proj/down_proj of blocks 0, 3, ..., 27 (bf16 weights, the decoder protocol of the memory benchmarks) on Dolly-15k
chat data for ``--steps`` optimizer steps per rule and records after every step the support over Σk and the exact
bytes per adapted weight of the training state (every tensor the adapted weights' optimizer state holds, plus ΔW'),
and at a few marks the size of the saved adapter file (ΔW' as int32 indices + float32 values, plus the float16 bases
once per layer type).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

MODES = {  # name: SparseGradConfig overrides ("periodic" is the default config; "dynamic-unbounded" the paper's method)
    "periodic": {},
    "dynamic": {"selection": "dynamic"},
    "periodic-unbounded": {"max_support": None},
    "dynamic-unbounded": {"selection": "dynamic", "max_support": None},
}
MARKS = (1, 2, 5, 10, 20, 50, 100, 150, 200, 300, 400, 500, 1000)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train-file", default=os.path.join(REPO, "..", "shared", "data", "dolly-15k", "train.jsonl"))
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-seq-length", type=int, default=128)
    p.add_argument("--keep-ratio", type=float, default=0.01)
    p.add_argument("--refresh-interval", type=int, default=100)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--calibration-steps", type=int, default=4)
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default=None, help="a causal LM path (default: the packaged SmolLM2)")
    p.add_argument("--output", default=os.path.join(REPO, "benchmarks", "results", "support_growth.json"))
    return p.parse_args(argv)


def _state_bytes(optimizer, layers) -> int:
    """Exact bytes of what the adapted weights' training state holds: each distinct storage of their optimizer state
    (SparseState tensors) and of ΔW' once."""
    import torch

    seen, total = set(), 0
    tensors = [t for m in layers for t in (m.sparsegrad_delta["default"].flat, m.sparsegrad_delta["default"].values)]
    for m in layers:
        st = optimizer.state.get(m.get_base_layer().weight, {}).get("sparsegrad")
        if st is not None:
            tensors += [st.exp_avg, st.exp_avg_sq, st.indices, st.prev_selected]
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.numel() and t.untyped_storage().data_ptr() not in seen:
            seen.add(t.untyped_storage().data_ptr())
            total += t.untyped_storage().nbytes()
    return total


def run_mode(mode: str, args, conversations, bases) -> dict:
    import torch

    from peft_sparsegrad import create_sparsegrad_optimizer
    from peft_sparsegrad.layer import SparseGradLayer
    from peft_sparsegrad.models import smollm2_path
    from peft_sparsegrad.sft import (batches, block_indices, build_sft_data, load_causal_lm, make_collator,
                                     setup_sft_method)

    model, tokenizer = load_causal_lm(args.model or smollm2_path(), seed=args.seed,
                                      dtype="bfloat16" if args.dtype == "bf16" else "float32")
    data = build_sft_data(conversations, tokenizer, args.max_seq_length)
    collator = make_collator(tokenizer)
    layers = block_indices(model, 3)
    stream = iter(batches(data.examples, collator, args.batch_size, seed=args.seed,
                          n_batches=args.steps + args.calibration_steps))
    calibration = [next(stream) for _ in range(args.calibration_steps)]  # skipped by every mode alike
    setup = setup_sft_method("sparsegrad", model, layers=layers, keep_ratio=args.keep_ratio,
                             calibration=calibration if bases is None else None, calibration_steps=args.calibration_steps,
                             bases=bases, refresh_interval=args.refresh_interval, **MODES[mode])
    peft_model = setup.model
    peft_model.train()
    opt = create_sparsegrad_optimizer(peft_model, lr=args.lr, step_in_backward=True)
    sparse_layers = [m for m in peft_model.modules() if isinstance(m, SparseGradLayer)]
    total_k = sum(m.sparsegrad_k["default"] for m in sparse_layers)
    weights = sum(m.out_features * m.in_features for m in sparse_layers)
    curve = []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        for step in range(1, args.steps + 1):
            batch = next(stream)
            peft_model(**batch).loss.backward()
            torch.nn.utils.clip_grad_norm_(peft_model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            delta_nnz = sum(m.sparsegrad_delta["default"].nnz for m in sparse_layers)
            point = {"step": step, "support_over_k": delta_nnz / total_k,
                     "state_bytes_per_weight": _state_bytes(opt, sparse_layers) / weights,
                     "overlap": opt.last_stats["overlap"]}
            if step in MARKS or step == args.steps:
                peft_model.save_pretrained(out)
                point["adapter_bytes_per_weight"] = os.path.getsize(os.path.join(out, "adapter_model.safetensors")) \
                    / weights
            curve.append(point)
    opt.disable_step_in_backward()
    return {"mode": mode, "config": MODES[mode], "total_k": total_k, "adapted_weights": weights,
            "train_s": time.perf_counter() - start, "curve": curve, "bases": setup.bases}


def markdown(result: dict) -> str:
    a = result["args"]
    run0 = result["runs"][0]
    lines = ["# Support growth of ΔW' over an SFT run", "",
             "Generated by `benchmarks/support_growth.py`. Command:", "", f"    {result['command']}", "",
             f"SmolLM2-135M-Instruct ({a['dtype']}), up_proj/down_proj of blocks 0, 3, …, 27, Dolly-15k chat data, "
             f"batch {a['batch_size']} × ≤ {a['max_seq_length']} tokens, keep_ratio {a['keep_ratio']}, lr {a['lr']}, "
             f"refresh_interval {a['refresh_interval']} (periodic), max_grad_norm 1.0. Σk = {run0['total_k']:,} "
             f"entries per step over {run0['adapted_weights']:,} adapted weights. State = exact bytes of the adapted "
             "weights' optimizer state and ΔW'; adapter = the saved adapter_model.safetensors (ΔW' + float16 bases). "
             "All per adapted weight (B/w).", ""]
    marks = [s for s in MARKS if s <= a["steps"]]
    if a["steps"] not in marks:
        marks.append(a["steps"])
    lines += ["| rule | " + " | ".join(f"step {s}" for s in marks) + " |", "|---|" + "---|" * len(marks)]
    for run in result["runs"]:
        by_step = {c["step"]: c for c in run["curve"]}
        lines.append(f"| {run['mode']}: support / Σk | " +
                     " | ".join(f"{by_step[s]['support_over_k']:.2f}" for s in marks) + " |")
        lines.append(f"| {run['mode']}: state B/w | " +
                     " | ".join(f"{by_step[s]['state_bytes_per_weight']:.3f}" for s in marks) + " |")
        lines.append(f"| {run['mode']}: adapter file B/w | " +
                     " | ".join(f"{by_step[s]['adapter_bytes_per_weight']:.3f}" for s in marks) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    from peft_sparsegrad.sft import load_conversations, subsample

    conversations = subsample(load_conversations(args.train_file), args.steps * args.batch_size + 64, args.seed)
    runs, bases = [], None
    for mode in args.modes.split(","):
        run = run_mode(mode, args, conversations, bases)
        bases = run.pop("bases") or bases  # one calibration, reused by the other modes
        runs.append(run)
        last = run["curve"][-1]
        print(f"[support_growth] {mode}: support {last['support_over_k']:.2f} × Σk, state "
              f"{last['state_bytes_per_weight']:.3f} B/w, adapter {last['adapter_bytes_per_weight']:.3f} B/w after "
              f"{args.steps} steps ({run['train_s']:.0f} s)", flush=True)
    command = "python benchmarks/support_growth.py " + " ".join(argv if argv is not None else sys.argv[1:])
    result = {"command": command.strip(), "args": vars(args), "runs": runs}
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.splitext(args.output)[0] + ".md", "w") as f:
        f.write(markdown(result))
    print(f"[support_growth] wrote {args.output} and .md")


if __name__ == "__main__":
    main()
