"""How the support of ΔW' — and with it the O(support) training state — grows over a real SFT run.

    python benchmarks/support_growth.py --steps 200 --output benchmarks/results/support_growth.json

With the default dynamic selection every step picks its own top-k, so the support (the entries ever selected) is
a union that grows over training; ``selection="periodic"`` keeps it at k between refreshes. This script trains
SmolLM2-135M-Instruct's up_proj/down_proj of blocks 0, 3, ..., 27 (bf16 weights, the decoder protocol of
``speed_memory.py``) on Dolly-15k chat data for ``--steps`` optimizer steps per mode and records, after every step,
the support over Σk and the state it implies per adapted weight: ΔW' (int32 index + float32 value) and, for the
moments, 8 bytes per entry that holds them, plus the last selection of the dynamic modes (4 bytes per k). The counts
come from the optimizer (``last_stats["support"]``) and the layers' ΔW', not from a formula of the step count.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

MODES = {  # name: (sparse_optimizer, selection)
    "dynamic-adamw": ("adamw", "dynamic"),
    "dynamic-sparse_adam": ("sparse_adam", "dynamic"),
    "periodic-adamw": ("adamw", "periodic"),
}


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


def run_mode(mode: str, args, conversations, bases) -> dict:
    import torch

    from peft_sparsegrad import create_sparsegrad_optimizer
    from peft_sparsegrad.layer import SparseGradLayer
    from peft_sparsegrad.models import smollm2_path
    from peft_sparsegrad.sft import (batches, block_indices, build_sft_data, load_causal_lm, make_collator,
                                     setup_sft_method)

    sparse_optimizer, selection = MODES[mode]
    model, tokenizer = load_causal_lm(args.model or smollm2_path(), seed=args.seed)
    if args.dtype == "bf16":
        model = model.to(torch.bfloat16)
    data = build_sft_data(conversations, tokenizer, args.max_seq_length)
    collator = make_collator(tokenizer)
    layers = block_indices(model, 3)
    stream = iter(batches(data.examples, collator, args.batch_size, seed=args.seed,
                          n_batches=args.steps + args.calibration_steps))
    calibration = [next(stream) for _ in range(args.calibration_steps)]  # skipped by every mode alike
    setup = setup_sft_method("sparsegrad", model, layers=layers, keep_ratio=args.keep_ratio,
                             calibration=calibration if bases is None else None, calibration_steps=args.calibration_steps, bases=bases,
                             sparse_optimizer=sparse_optimizer, selection=selection,
                             refresh_interval=args.refresh_interval)
    peft_model = setup.model
    peft_model.train()
    opt = create_sparsegrad_optimizer(peft_model, lr=args.lr)
    sparse_layers = [m for m in peft_model.modules() if isinstance(m, SparseGradLayer)]
    total_k = sum(m.sparsegrad_k["default"] for m in sparse_layers)
    weights = sum(m.out_features * m.in_features for m in sparse_layers)
    curve = []
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        batch = next(stream)
        peft_model(**batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        delta_nnz = sum(m.sparsegrad_delta["default"].nnz for m in sparse_layers)
        with_moments = int(opt.last_stats["support"])  # entries holding moments (Σ support, or Σ k for periodic)
        # + 4 B per k: the last selection (dynamic) or the indices of S the moments belong to (periodic)
        state = 8 * delta_nnz + 8 * with_moments + 4 * total_k
        curve.append({"step": step, "support_over_k": delta_nnz / total_k, "moments_over_k": with_moments / total_k,
                      "state_bytes_per_weight": state / weights, "overlap": opt.last_stats["overlap"]})
    return {"mode": mode, "sparse_optimizer": sparse_optimizer, "selection": selection, "total_k": total_k,
            "adapted_weights": weights, "train_s": time.perf_counter() - start, "curve": curve,
            "bases": setup.bases}


def markdown(result: dict) -> str:
    a = result["args"]
    lines = ["# Support growth of ΔW' over an SFT run", "",
             f"Generated by `benchmarks/support_growth.py`. Command:", "", f"    {result['command']}", "",
             f"SmolLM2-135M-Instruct ({a['dtype']}), up_proj/down_proj of blocks 0, 3, …, 27, Dolly-15k chat data, "
             f"batch {a['batch_size']} × ≤ {a['max_seq_length']} tokens, keep_ratio {a['keep_ratio']}, lr {a['lr']}, "
             f"refresh_interval {a['refresh_interval']} (periodic). Σk = {result['runs'][0]['total_k']:,} entries per "
             f"step over {result['runs'][0]['adapted_weights']:,} adapted weights. State = ΔW' (8 B per support "
             "entry) + moments (8 B per entry holding them) + the last selection (4 B per k).", ""]
    marks = [s for s in (1, 2, 5, 10, 20, 50, 100, 150, 200, 300, 500, 1000) if s <= a["steps"]]
    if a["steps"] not in marks:
        marks.append(a["steps"])
    lines += ["| mode | " + " | ".join(f"step {s}" for s in marks) + " |",
              "|---|" + "---|" * len(marks)]
    for run in result["runs"]:
        by_step = {c["step"]: c for c in run["curve"]}
        lines.append(f"| {run['mode']}: support / Σk | " +
                     " | ".join(f"{by_step[s]['support_over_k']:.2f}" for s in marks) + " |")
        lines.append(f"| {run['mode']}: state B / adapted weight | " +
                     " | ".join(f"{by_step[s]['state_bytes_per_weight']:.3f}" for s in marks) + " |")
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
        print(f"[support_growth] {mode}: support {last['support_over_k']:.2f} × Σk, "
              f"{last['state_bytes_per_weight']:.3f} B/weight after {args.steps} steps ({run['train_s']:.0f} s)",
              flush=True)
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
