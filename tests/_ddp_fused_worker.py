"""One rank of the 2-process CPU/gloo test of the step inside backward under DDP (tests/test_ddp.py).

Usage: python -m torch.distributed.run --nproc_per_node=2 tests/_ddp_fused_worker.py OUT_DIR

Each scenario trains with the Trainer + SparseGradCallback under DDP (the callback takes the adapted weights out of
DDP's buckets and reduces them itself), records the batches every rank trained on, and then — on every rank, without
communication — replays the same global batches in ONE process on the dense path (plain loop: clip over all trainable
parameters, the sparse step, torch's AdamW for the head), from the same base model and bases. Each rank writes
``OUT_DIR/fused_rank{r}.pt`` with both results.
"""

from __future__ import annotations

import os
import sys
import tempfile
import warnings

import torch

warnings.filterwarnings("ignore")
torch.set_num_threads(1)

import torch.distributed as dist  # noqa: E402
from datasets import Dataset  # noqa: E402
from peft import get_peft_model  # noqa: E402
from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402

import peft_sparsegrad  # noqa: E402
from peft_sparsegrad import SparseGradCallback, SparseGradConfig, create_sparsegrad_optimizer  # noqa: E402
from peft_sparsegrad.optim import sparse_step, sparsegrad_parameters  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _ddp_worker import VOCAB, base_model, deltas_of, layers, tensors, weights_of  # noqa: E402

SCENARIOS = {  # name: (SparseGradConfig options, per-device batch, accumulation steps, max_grad_norm, weights dtype)
    "dynamic-clipped": ({"selection": "dynamic"}, 4, 1, 0.05, torch.float32),
    "periodic": ({"selection": "periodic", "refresh_interval": 2}, 4, 1, 0.0, torch.float32),
    "periodic-ga2": ({"selection": "periodic", "refresh_interval": 2}, 2, 2, 0.0, torch.float32),
    "dynamic-ga2": ({"selection": "dynamic"}, 2, 2, 0.0, torch.float32),
    "periodic-bf16": ({"selection": "periodic", "refresh_interval": 2}, 4, 1, 0.0, torch.bfloat16),
}
STEPS, LR = 4, 1e-2


def build(options, dtype, bases=None):
    base = base_model().to(dtype)
    common = dict(task_type="SEQ_CLS", modules_to_save=["classifier"], keep_ratio=0.05, **options)
    if bases is None:
        data = tensors(8, 1234)
        calibration = [{k: v[i * 4:(i + 1) * 4] for k, v in data.items()} for i in range(2)]
        config = SparseGradConfig(calibration_dataloader=calibration, calibration_steps=2, **common)
    else:
        config = SparseGradConfig(bases=bases, **common)
    return get_peft_model(base, config)


class Recording(Trainer):
    def training_step(self, model, inputs, num_items_in_batch=None):
        self.seen.append(inputs["input_ids"].detach().cpu().clone())
        return super().training_step(model, inputs, num_items_in_batch)


class Bytes(TrainerCallback):
    def __init__(self, callback):
        self.callback, self.per_step, self.last = callback, [], 0

    def on_step_end(self, args, state, control, **kwargs):
        now = self.callback._fused.bytes_reduced
        self.per_step.append(now - self.last)
        self.last = now


def reference(options, dtype, bases_file, global_batches, max_grad_norm):
    """One process, the dense path, the global batches in order."""
    model = build(options, dtype, bases=bases_file)
    model.train()
    for p, _ in sparsegrad_parameters(model):
        p.sparsegrad_routed = True
    head = list(model.base_model.model.classifier.modules_to_save["default"].parameters())
    adamw = torch.optim.AdamW(head, lr=LR, weight_decay=0.0, fused=True)  # the Trainer's default optimizer
    states = {id(p): {} for p, _ in sparsegrad_parameters(model)}
    for ids in global_batches:
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": (ids[:, 0] < VOCAB // 2).long()}
        model(**batch).loss.backward()
        if max_grad_norm:
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], max_grad_norm)
        for p, k in sparsegrad_parameters(model):
            layer = p.sparsegrad_owner
            sparse_step(p, p.grad, states[id(p)], k=k, lr=LR, mode="adamw",
                        refresh_interval=layer.sparsegrad_refresh_interval["default"])
            p.grad = None
        adamw.step()
        model.zero_grad()
    return model


def main(out_dir: str) -> None:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    results = {}
    for name, (options, batch, ga, max_norm, dtype) in SCENARIOS.items():
        args = TrainingArguments(output_dir=os.path.join(out_dir, "t"), report_to=[], use_cpu=True, seed=0,
                                 disable_tqdm=True, save_strategy="no", logging_steps=1,
                                 per_device_train_batch_size=batch, gradient_accumulation_steps=ga, max_steps=STEPS,
                                 learning_rate=LR, lr_scheduler_type="constant", ddp_backend="gloo",
                                 dataloader_num_workers=0, max_grad_norm=max_norm, weight_decay=0.0)
        model = build(options, dtype)
        callback = SparseGradCallback()
        data = Dataset.from_dict({k: v.tolist() for k, v in tensors(64, seed=0).items()})
        trainer = Recording(model=model, args=args, train_dataset=data, callbacks=[callback])
        trainer.seen = []
        counter = Bytes(callback)
        trainer.add_callback(counter)
        trainer.loss_is_scaled_for_ga = False  # BERT returns a plain mean (see test_training's accumulation test)
        trainer.train()
        seen = [None] * world
        dist.all_gather_object(seen, trainer.seen)
        global_batches = [torch.cat([seen[r][s * ga + m] for r in range(world) for m in range(ga)])
                          for s in range(STEPS)]
        with tempfile.TemporaryDirectory() as tmp:
            bases = peft_sparsegrad.SparseGradBases({m.sparsegrad_type["default"]: m.pair("default", torch.device("cpu"))
                                                     for m in layers(model).values()})
            peft_sparsegrad.save_bases(bases, os.path.join(tmp, "bases.safetensors"))
            ref = reference(options, dtype, os.path.join(tmp, "bases.safetensors"), global_batches, max_norm)
        head = model.base_model.model.classifier.modules_to_save["default"]
        ref_head = ref.base_model.model.classifier.modules_to_save["default"]
        results[name] = {
            "path": callback.path, "excluded": all(getattr(p, "_ddp_ignored", False)
                                                   for p, _ in sparsegrad_parameters(model)),
            "wrapped": type(trainer.model_wrapped).__name__, "bytes_per_step": counter.per_step,
            "k": {n: m.sparsegrad_k["default"] for n, m in layers(model).items()},
            "numel": {n: m.out_features * m.in_features for n, m in layers(model).items()},
            "deltas": deltas_of(model), "weights": weights_of(model),
            "head": [head.weight.detach().clone(), head.bias.detach().clone()],
            "ref_deltas": deltas_of(ref), "ref_weights": weights_of(ref),
            "ref_head": [ref_head.weight.detach().clone(), ref_head.bias.detach().clone()],
            "grad_norms": [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h],
        }
    torch.save(results, os.path.join(out_dir, f"fused_rank{rank}.pt"))
    dist.barrier()


if __name__ == "__main__":
    main(sys.argv[1])
