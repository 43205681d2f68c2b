"""One rank of the 2-process CPU/gloo FSDP2 test (tests/test_fsdp.py); launched by ``python -m torch.distributed.run``.

Usage: python -m torch.distributed.run --nproc_per_node=2 tests/_fsdp_worker.py OUT_DIR

A tiny random LLaMA with SparseGrad on its MLPs, ``fully_shard`` on every decoder block and on the root (no rank
holds a whole weight), trained in a plain loop with ``create_sparsegrad_optimizer`` on each rank's half of every
global batch. Every scenario also replays the global batches in ONE process on unsharded weights (the dense path), from
the same base model and bases, and rank 0 saves the adapter. Each rank writes ``OUT_DIR/rank{r}.pt``.
"""

from __future__ import annotations

import copy
import os
import sys
import warnings

import torch

warnings.filterwarnings("ignore")
torch.set_num_threads(1)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch.distributed as dist  # noqa: E402
from peft import PeftModel, get_peft_model  # noqa: E402
from torch.distributed.fsdp import fully_shard  # noqa: E402

from conftest import batch_stream, build_model, logits, sparsegrad_layers  # noqa: E402
import peft_sparsegrad  # noqa: E402
from peft_sparsegrad import SparseGradConfig, create_sparsegrad_optimizer  # noqa: E402
from peft_sparsegrad.sharded import clip_grad_norm_, is_sharded  # noqa: E402

SCENARIOS = {  # name: (SparseGradConfig options, step inside backward, micro-batches per step, weights dtype)
    "periodic": ({"selection": "periodic", "refresh_interval": 2}, True, 1, torch.float32),
    "dynamic": ({"selection": "dynamic"}, True, 1, torch.float32),
    "periodic-ga2": ({"selection": "periodic", "refresh_interval": 2}, True, 2, torch.float32),
    "dynamic-dense": ({"selection": "dynamic"}, False, 1, torch.float32),
    "periodic-bf16": ({"selection": "periodic", "refresh_interval": 2}, True, 1, torch.bfloat16),
}
STEPS, LR, CLIP = 4, 1e-2, 0.03


def global_batches(n: int) -> list[dict[str, torch.Tensor]]:
    """The same global batches (8 rows) on every rank."""
    gen = torch.Generator().manual_seed(7)
    out = []
    for _ in range(n):
        ids = torch.randint(2, 100, (8, 8), generator=gen)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return out


def shard(batch: dict, part: int, parts: int) -> dict:
    size = batch["input_ids"].shape[0] // parts
    return {k: v[part * size:(part + 1) * size] for k, v in batch.items()}


def build(options, dtype, bases):
    model = build_model("llama", dtype=dtype)
    return get_peft_model(model, SparseGradConfig(bases=bases, keep_ratio=0.05, **options))


def train(model, options, fused, micro, batches, rank, world, sharded):
    model.train()
    opt = create_sparsegrad_optimizer(model, lr=LR, step_in_backward=fused, accumulation_steps=micro if fused else 1)
    opt.norms = []
    for batch in batches:
        for m in range(micro):
            part = shard(batch, rank * micro + m, world * micro) if sharded else shard(batch, m, micro)
            (model(**part).loss / micro).backward()
        clip = clip_grad_norm_ if sharded else torch.nn.utils.clip_grad_norm_
        # with accumulation the adapted weights count ||Σ g[S]|| between refreshes: no clipping there, only the norm
        opt.norms.append(float(clip(model.parameters(), CLIP if micro == 1 else float("inf"))))
        opt.step()
        opt.zero_grad()
    return opt


def deltas(model):
    return {n: m.sparsegrad_delta["default"].to_dense() for n, m in sparsegrad_layers(model).items()}


def full_weights(model):
    out = {}
    for n, m in sparsegrad_layers(model).items():
        w = m.get_base_layer().weight
        out[n] = (w.full_tensor() if is_sharded(w) else w).detach().float().clone()
    return out


def main(out_dir: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    batches = global_batches(STEPS)
    bases_file = os.path.join(out_dir, "bases.safetensors")
    calibration = list(batch_stream("llama", seed=1, n=2))
    bases = peft_sparsegrad.calibrate(build_model("llama"), SparseGradConfig(calibration_steps=2), calibration,
                                      progress=False)
    if rank == 0:
        peft_sparsegrad.save_bases(bases, bases_file)
    dist.barrier()
    results = {}
    eval_batch = global_batches(STEPS + 1)[-1]
    for name, (options, fused, micro, dtype) in SCENARIOS.items():
        model = build(options, dtype, bases_file)
        for block in model.base_model.model.model.layers:
            fully_shard(block)
        fully_shard(model)
        layer = next(iter(sparsegrad_layers(model).values()))
        assert is_sharded(layer.get_base_layer().weight)
        local_shape = tuple(layer.get_base_layer().weight.to_local().shape)
        opt = train(model, options, fused, micro, batches, rank, world, sharded=True)
        reference = build(options, dtype, bases_file)
        ref_opt = train(reference, options, False, micro, batches, 0, 1, sharded=False)
        result = {"norms": opt.norms, "ref_norms": ref_opt.norms,
                  "deltas": deltas(model), "weights": full_weights(model), "ref_deltas": deltas(reference),
                  "ref_weights": full_weights(reference), "local_shape": local_shape,
                  "logits": logits(model, eval_batch), "ref_logits": logits(reference, eval_batch)}
        if name == "periodic":
            adapter = os.path.join(out_dir, "adapter")
            if rank == 0:  # the adapter once, from rank 0: ΔW' and the bases are replicated
                model.save_pretrained(adapter)
            dist.barrier()
            # resume: a fresh sharded model from the adapter after 2 steps + the optimizer state, then 2 more steps
            half = build(options, dtype, bases_file)
            for block in half.base_model.model.model.layers:
                fully_shard(block)
            fully_shard(half)
            opt_half = train(half, options, fused, micro, batches[:2], rank, world, sharded=True)
            state = copy.deepcopy(opt_half.state_dict())
            resume_dir = os.path.join(out_dir, f"resume{rank}")
            half.save_pretrained(resume_dir)
            opt_half.disable_step_in_backward()
            resumed = PeftModel.from_pretrained(build_model("llama", dtype=dtype), resume_dir, is_trainable=True)
            for block in resumed.base_model.model.model.layers:
                fully_shard(block)
            fully_shard(resumed)
            resumed.train()
            opt_resumed = create_sparsegrad_optimizer(resumed, lr=LR, step_in_backward=fused)
            opt_resumed.load_state_dict(state)
            for batch in batches[2:]:
                resumed(**shard(batch, rank, world)).loss.backward()
                clip_grad_norm_(resumed.parameters(), CLIP)
                opt_resumed.step()
                opt_resumed.zero_grad()
            opt_resumed.disable_step_in_backward()
            result.update(resumed_deltas=deltas(resumed), resumed_weights=full_weights(resumed), adapter=adapter,
                          eval_batch=eval_batch)
        opt.disable_step_in_backward()
        results[name] = result
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
