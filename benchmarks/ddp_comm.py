"""Gradient bytes each rank puts into collectives per step under DDP, and the step time: SparseGrad vs full FT and LoRA.

    torchrun --nproc_per_node=2 benchmarks/ddp_comm.py --name ddp_comm_smollm2_bf16     # CPU, gloo
    torchrun --nproc_per_node=2 benchmarks/ddp_comm.py --quick --output-dir /tmp/bench  # CI smoke run

A measurement script, not a test. SmolLM2-135M-Instruct in bf16 (``--quick``: a tiny random LLaMA), up_proj and
down_proj of blocks 0, 3, …, 27, each rank on its own synthetic batches (``--batch-size`` × ``--seq-len``), a plain loop
with ``torch.nn.parallel.DistributedDataParallel`` (gloo on CPU) and ``clip_grad_norm_(1.0)``. Counted per step, on
rank 0: every byte DDP's buckets all-reduce (a counting communication hook around DDP's default all-reduce) plus every
byte SparseGrad's own reduction all-reduces for the adapted weights (``StepInBackward.bytes_reduced``). Methods:
``full`` (those weights, AdamW, DDP reduces their dense gradients), ``lora`` (PEFT LoRA r=4), ``sparsegrad`` (the
default config, step inside backward: the adapted weights are excluded from DDP and SparseGrad reduces k values of
g[S] between refreshes), ``sparsegrad-dynamic`` (the same with dynamic selection: the dense gradient every step),
``sparsegrad-dense`` (the dense path: DDP reduces the adapted weights' dense gradients, as earlier versions did).
``--refresh-interval`` sets how often periodic selection re-selects (a refresh step sends the dense gradient).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

METHODS = ("full", "lora", "sparsegrad", "sparsegrad-dynamic", "sparsegrad-dense")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--refresh-interval", type=int, default=100)
    p.add_argument("--calibration-steps", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--output-dir", default=os.path.join(harness.HERE, "results"))
    p.add_argument("--name", default="ddp_comm")
    p.add_argument("--quick", action="store_true")
    return p.parse_args(argv)


def _model(args):
    import torch

    if args.quick:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        config = LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=4, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=512, max_position_embeddings=256, pad_token_id=0)
        return LlamaForCausalLM(config).to(torch.bfloat16), "tiny random LLaMA"
    from transformers import AutoModelForCausalLM

    from peft_sparsegrad.models import smollm2_path

    return AutoModelForCausalLM.from_pretrained(smollm2_path(), dtype=torch.bfloat16), "SmolLM2-135M-Instruct (bf16)"


def _batches(model, n: int, args, seed: int) -> list[dict]:
    import torch

    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(1, model.config.vocab_size, (args.batch_size, args.seq_len), generator=gen)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return out


def run(method: str, args, rank: int, bases) -> dict:
    import torch
    import torch.distributed as dist
    from peft import LoraConfig, get_peft_model
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    from torch.nn.parallel import DistributedDataParallel as DDP

    from peft_sparsegrad import SparseGradConfig, create_sparsegrad_optimizer, exclude_from_ddp

    model, desc = _model(args)
    layers = list(range(0, model.config.num_hidden_layers, 3))
    targets = [model.get_submodule(f"model.layers.{i}.mlp.{t}").weight for i in layers
               for t in ("up_proj", "down_proj")]
    adapted = sum(w.numel() for w in targets)
    for p in model.parameters():
        p.requires_grad_(False)
    fused = None
    if method == "full":
        for w in targets:
            w.requires_grad_(True)
        opt = torch.optim.AdamW(targets, lr=1e-4)
    elif method == "lora":
        model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, lora_dropout=0.0,
                                                 target_modules=["up_proj", "down_proj"], layers_to_transform=layers))
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    else:
        options = {"selection": "dynamic"} if method == "sparsegrad-dynamic" else {}
        model = get_peft_model(model, SparseGradConfig(
            task_type="CAUSAL_LM", target_modules=["up_proj", "down_proj"], layers_to_transform=layers,
            precomputed_bases=bases, refresh_interval=args.refresh_interval, **options))
        if method != "sparsegrad-dense":
            exclude_from_ddp(model)
    state = {"bytes": 0}

    def counting(process_group, bucket):
        state["bytes"] += bucket.buffer().numel() * bucket.buffer().element_size()
        return default_hooks.allreduce_hook(process_group, bucket)

    ddp = DDP(model)
    ddp.register_comm_hook(None, counting)
    if method.startswith("sparsegrad"):
        opt = create_sparsegrad_optimizer(model, lr=1e-3, step_in_backward=method != "sparsegrad-dense")
        fused = opt._fused
    batches = _batches(model, args.warmup + args.steps, args, seed=1 + rank)
    per_step, times = [], []
    for i, batch in enumerate(batches):
        before = state["bytes"] + (fused.bytes_reduced if fused is not None else 0)
        dist.barrier()
        start = time.perf_counter()
        ddp(**batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        elapsed = time.perf_counter() - start
        if i >= args.warmup:
            times.append(elapsed)
            per_step.append(state["bytes"] + (fused.bytes_reduced if fused is not None else 0) - before)
    if fused is not None:
        opt.disable_step_in_backward()
    return {"method": method, "model": desc, "adapted_weights": adapted, "bytes_per_step": per_step,
            "step_time_s": statistics.median(times), "step_times_s": times}


def main(argv=None) -> None:
    args = parse_args(argv)
    import torch
    import torch.distributed as dist

    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    from peft_sparsegrad import SparseGradConfig, calibrate

    model, _ = _model(args)
    layers = list(range(0, model.config.num_hidden_layers, 3))
    bases = calibrate(model, SparseGradConfig(target_modules=["up_proj", "down_proj"], layers_to_transform=layers,
                                              calibration_steps=args.calibration_steps),
                      _batches(model, args.calibration_steps, args, seed=100), progress=False)  # all-reduced Grams
    del model
    runs = {m: run(m, args, rank, bases) for m in args.methods.split(",")}
    if rank == 0:
        full = runs.get("full")
        dense = full["adapted_weights"] * 2 if full else None  # the bf16 gradients of the adapted weights
        lines = [f"# Gradient traffic per step under DDP ({world} ranks, gloo)", "",
                 "Generated by `benchmarks/ddp_comm.py`:", "",
                 f"    torchrun --nproc_per_node={world} {harness.command_line(__file__, argv)[len('python '):]}", "",
                 f"{next(iter(runs.values()))['model']}, up_proj/down_proj of blocks 0, 3, …: "
                 f"{next(iter(runs.values()))['adapted_weights']:,} adapted weights; batch {args.batch_size} × "
                 f"{args.seq_len} per rank, {args.warmup} + {args.steps} steps, refresh_interval "
                 f"{args.refresh_interval}, {args.threads} torch thread(s) per rank. Bytes = what rank 0 put into "
                 "all-reduces per step (DDP's buckets + SparseGrad's own reduction); the first timed step of "
                 "periodic selection falls between refreshes (the refresh is in the warm-up).", "",
                 "| method | bytes per step (median) | vs full FT's | step time (s) | × full FT |", "|---|---|---|---|---|"]
        for name, r in runs.items():
            b = statistics.median(r["bytes_per_step"])
            lines.append(f"| {name} | {b:,.0f} | {harness.fmt(b / dense if dense else None, '.2%')} | "
                         f"{r['step_time_s']:.3f} | "
                         f"{harness.fmt(r['step_time_s'] / full['step_time_s'] if full else None, '.2f')} |")
        os.makedirs(args.output_dir, exist_ok=True)
        path = os.path.join(args.output_dir, args.name)
        harness.write_json(path + ".json", {"command": harness.command_line(__file__, argv), "args": vars(args),
                                            "world_size": world, "runs": runs,
                                            "machine": harness.machine_info(threads=args.threads)})
        with open(path + ".md", "w") as f:
            f.write("\n".join(lines) + "\n")
        print("\n".join(lines))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
