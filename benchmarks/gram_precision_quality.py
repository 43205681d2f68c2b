"""Quality of ``gram_precision="bf16"`` bases against the default ``"fp32"`` on real gradients.

    python benchmarks/gram_precision_quality.py                      # MiniLM-L6 on SST-2, ~2 min on 2 CPU cores

The packaged pretrained all-MiniLM-L6-v2 (fresh classification head, seed 0) is calibrated twice on the same
``--calibration-steps`` SST-2 training batches, once per precision. The measure is what one SparseGrad step keeps: for
held-out gradients G of every adapted layer (``--heldout-batches`` batches from training rows the calibration never
saw), the share of Σ ‖G‖² that the top ``--keep-ratio`` entries of U_outᵀ G U_in hold, pooled per layer type. The
identity (MeProp) share is shown for scale. Also reported: |cos| between the leading eigenvectors of the two
precisions, the relative eigengaps there, and the orthogonality of the bf16 bases. Writes ``--output`` (.json) and the
same name with .md. A measurement script, not a test.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=os.path.join(REPO, "..", "shared", "data", "glue"),
                   help="GLUE directory containing SST-2/train.tsv")
    p.add_argument("--model", default=None, help="model directory (default: the packaged all-MiniLM-L6-v2)")
    p.add_argument("--calibration-steps", type=int, default=30)
    p.add_argument("--heldout-batches", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-seq-length", type=int, default=128)
    p.add_argument("--keep-ratio", type=float, default=0.01)
    p.add_argument("--top-vectors", type=int, default=4, help="leading eigenvectors compared between precisions")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--output", default=os.path.join(HERE, "results", "gram_precision_quality.json"))
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch

    from peft_sparsegrad import SparseGradConfig, calibrate
    from peft_sparsegrad.data import batches, load_glue, make_collator, resolve_task, subsample, tokenize
    from peft_sparsegrad.finetune import default_model_path, load_base_model, load_tokenizer
    from peft_sparsegrad.targets import find_target_modules, resolve_default_targets

    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    spec = resolve_task("sst2")
    model_path = args.model or default_model_path()
    tokenizer = load_tokenizer(model_path)
    n_cal = args.calibration_steps * args.batch_size
    n_held = args.heldout_batches * args.batch_size
    train = tokenize(subsample(load_glue(spec, args.data_dir)["train"], n_cal + n_held, seed=args.seed), tokenizer,
                     args.max_seq_length)
    cal_ds, held_ds = train.select(range(n_cal)), train.select(range(n_cal, n_cal + n_held))
    collator = make_collator(tokenizer)
    model = load_base_model(model_path, spec.num_labels, args.seed, list(spec.label_names or []) or None)

    results: dict = {"precisions": {}}
    bases = {}
    for precision in ("fp32", "bf16"):
        config = SparseGradConfig(calibration_steps=args.calibration_steps, gram_precision=precision)
        t0 = time.perf_counter()
        bases[precision] = calibrate(model, config, batches(cal_ds, collator, args.batch_size, args.seed),
                                     progress=False)
        results["precisions"][precision] = {"calibrate_s": time.perf_counter() - t0}

    # held-out weight gradients of every adapted layer, as the layer sees them (out × in)
    config = SparseGradConfig(bases="identity")
    resolve_default_targets(config, model.config.model_type)
    targets = find_target_modules(model, config)
    members = bases["fp32"].members
    type_of = {name: t for t, names in members.items() for name in names}
    for p in model.parameters():
        p.requires_grad_(False)
    for m in targets.values():
        m.weight.requires_grad_(True)
    pairs = {"fp32": bases["fp32"].pairs, "bf16": bases["bf16"].pairs}
    top = {key: {t: 0.0 for t in members} for key in ("fp32", "bf16", "identity")}
    total = {t: 0.0 for t in members}
    for step, batch in enumerate(batches(held_ds, collator, args.batch_size, args.seed + 1)):
        if step >= args.heldout_batches:
            break
        model.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        with torch.no_grad():
            for name, m in targets.items():
                g, layer_type = m.weight.grad.double(), type_of[name]
                k = math.ceil(args.keep_ratio * g.numel())
                total[layer_type] += g.square().sum().item()
                top["identity"][layer_type] += g.flatten().square().topk(k).values.sum().item()
                for precision, by_type in pairs.items():
                    pair = by_type[layer_type]
                    rotated = pair.U_out.double().T @ g @ pair.U_in.double()
                    top[precision][layer_type] += rotated.flatten().square().topk(k).values.sum().item()
    model.zero_grad(set_to_none=True)

    per_type = {}
    r = args.top_vectors
    for layer_type in members:
        p32, p16 = pairs["fp32"][layer_type], pairs["bf16"][layer_type]
        e_out, e_in = bases["fp32"].eigenvalues[layer_type]
        entry = {"shape": list(bases["fp32"].shape(layer_type)), "layers": len(members[layer_type]),
                 "top_share": {key: top[key][layer_type] / total[layer_type] for key in top}}
        for side, u32, u16, eigs in (("U_out", p32.U_out, p16.U_out, e_out), ("U_in", p32.U_in, p16.U_in, e_in)):
            eye = torch.eye(u16.shape[0], dtype=torch.float64)
            entry[side] = {
                "abs_cos_top": (u32[:, :r].double() * u16[:, :r].double()).sum(0).abs().tolist(),
                "relative_eigengaps_top": ((eigs[:r] - eigs[1:r + 1]) / eigs[0]).double().tolist(),
                "bf16_orthogonality_max_abs": (u16.double().T @ u16.double() - eye).abs().max().item(),
            }
        entry["share_difference_bf16_minus_fp32"] = entry["top_share"]["bf16"] - entry["top_share"]["fp32"]
        per_type[layer_type] = entry
    results.update({
        "per_type": per_type,
        "command": " ".join(["python", *map(shlex.quote, [os.path.relpath(os.path.abspath(__file__), REPO),
                                                          *(sys.argv[1:] if argv is None else argv)])]),
        "settings": {k: v for k, v in vars(args).items() if k != "output"},
        "model": os.path.basename(os.path.dirname(model_path)) if model_path.endswith("model") else model_path,
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "wall_s": time.perf_counter() - t_start,
    })
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(results, f, indent=1)
    md = os.path.splitext(args.output)[0] + ".md"
    with open(md, "w") as f:
        f.write(render(results))
    print(render(results))
    print(f"wrote {args.output} and {md}")


def render(results: dict) -> str:
    s = results["settings"]
    lines = ["# gram_precision: bf16 vs fp32 bases on real gradients", "",
             "Generated by `benchmarks/gram_precision_quality.py`. Command:", "", f"    {results['command']}", "",
             f"Model {results['model']} (fresh head, seed {s['seed']}), SST-2; calibration on {s['calibration_steps']} "
             f"batches of {s['batch_size']} (max {s['max_seq_length']} tokens), held-out gradients from "
             f"{s['heldout_batches']} other batches; torch {results['torch']}, {results['torch_threads']} threads, "
             f"{results['wall_s']:.0f} s. Share = Σ over held-out gradients and layers of the top-"
             f"{s['keep_ratio']:.0%} rotated-gradient energy / Σ ‖G‖².", "",
             "| layer type (out, in) | layers | top share fp32 | top share bf16 | bf16 − fp32 | identity (MeProp) | "
             f"top-{s['top_vectors']} \\|cos\\| U_out | top-{s['top_vectors']} \\|cos\\| U_in | "
             "bf16 ‖UᵀU − I‖max |",
             "|---|---|---|---|---|---|---|---|---|"]
    for layer_type, e in results["per_type"].items():
        sh = e["top_share"]
        orth = max(e["U_out"]["bf16_orthogonality_max_abs"], e["U_in"]["bf16_orthogonality_max_abs"])
        lines.append(f"| `{layer_type}` {tuple(e['shape'])} | {e['layers']} | {sh['fp32']:.5f} | {sh['bf16']:.5f} | "
                     f"{e['share_difference_bf16_minus_fp32']:+.1e} | {sh['identity']:.4f} | "
                     f"{', '.join(f'{c:.6f}' for c in e['U_out']['abs_cos_top'])} | "
                     f"{', '.join(f'{c:.6f}' for c in e['U_in']['abs_cos_top'])} | {orth:.1e} |")
    gaps = "; ".join(f"{t}: U_out {', '.join(f'{g:.3f}' for g in e['U_out']['relative_eigengaps_top'])}, "
                     f"U_in {', '.join(f'{g:.3f}' for g in e['U_in']['relative_eigengaps_top'])}"
                     for t, e in results["per_type"].items())
    cal = ", ".join(f"{p} {v['calibrate_s']:.1f} s" for p, v in results["precisions"].items())
    lines += ["", f"Relative eigengaps (λ_i − λ_(i+1)) / λ_1 of the fp32 path at the compared vectors: {gaps}.",
              f"calibrate() wall time (forward/backward included; fp32 ran first, with the warm-up; not a timing "
              f"benchmark): {cal}.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
