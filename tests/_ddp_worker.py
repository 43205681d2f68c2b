"""One rank of the 2-process CPU/gloo DDP test (tests/test_ddp.py); launched by ``python -m torch.distributed.run``.

Usage: python -m torch.distributed.run --nproc_per_node=2 tests/_ddp_worker.py OUT_DIR

Every rank builds the same random base model and calibrates on its OWN batches: the bases can only agree across ranks
because ``GramAccumulator.all_reduce`` sums the Gram matrices. For comparison each rank first computes the bases of its
own data alone (before the process group exists). Then the Trainer + SparseGradCallback trains with DDP on disjoint
data shards, and each rank writes ``OUT_DIR/rank{r}.pt``.
"""

from __future__ import annotations

import os
import sys
import warnings

import torch

warnings.filterwarnings("ignore")
torch.set_num_threads(1)

import torch.distributed as dist  # noqa: E402
from datasets import Dataset  # noqa: E402
from peft import get_peft_model  # noqa: E402
from transformers import (BertConfig, BertForSequenceClassification, Trainer, TrainerCallback,  # noqa: E402
                          TrainingArguments)

import peft_sparsegrad  # noqa: E402
from peft_sparsegrad import SparseGradCallback, SparseGradConfig  # noqa: E402

VOCAB, SEQ = 64, 8


def tensors(n: int, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (n, SEQ), generator=gen)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": (ids[:, 0] < VOCAB // 2).long()}


def base_model() -> BertForSequenceClassification:
    torch.manual_seed(0)  # identical base model on every rank
    config = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=SEQ, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, num_labels=2)
    return BertForSequenceClassification(config)


def base_weights() -> dict[str, torch.Tensor]:
    """W₀ of every Linear of the base model, keyed like the PEFT model's modules (built apart from any adapter)."""
    return {"base_model.model." + name: m.weight.detach().clone() for name, m in base_model().named_modules()
            if isinstance(m, torch.nn.Linear)}


def build(calibration_seed: int, **sparsegrad_options):
    base = base_model()
    data = tensors(8, calibration_seed)
    calibration = [{k: v[i * 4:(i + 1) * 4] for k, v in data.items()} for i in range(2)]
    return get_peft_model(base, SparseGradConfig(calibration_dataloader=calibration, calibration_steps=2,
                                                 task_type="SEQ_CLS", modules_to_save=["classifier"],
                                                 keep_ratio=0.05, **sparsegrad_options))


def layers(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, peft_sparsegrad.SparseGradLayer)}


def deltas_of(model):
    """Dense ΔW' of every adapted layer."""
    return {name: m.sparsegrad_delta["default"].to_dense() for name, m in layers(model).items()}


def weights_of(model):
    """The adapted base weights W (trained in place), out × in."""
    return {name: m.get_base_layer().weight.detach().clone() for name, m in layers(model).items()}


def _float32_pair(m):
    """(U_out, U_in) of a layer in float32 (stored float16 by default), copies."""
    pair = m.sparsegrad_bases["default"]
    return pair.U_out.float().clone(), pair.U_in.float().clone()


def bases_of(model):
    return {m.sparsegrad_type["default"]: _float32_pair(m) for m in layers(model).values()}


class RecordingTrainer(Trainer):
    """Remembers which examples this rank trained on (the first token identifies an example well enough)."""

    seen: list = []

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.seen.append(inputs["input_ids"].detach().cpu().clone())
        return super().training_step(model, inputs, num_items_in_batch)


def main(out_dir: str) -> None:
    rank = int(os.environ["RANK"])
    world_size = int(os.environ["WORLD_SIZE"])

    # 1. this rank's data alone (no process group yet, so nothing is all-reduced)
    assert not dist.is_initialized()
    local_bases = bases_of(build(calibration_seed=100 + rank))

    # 2. TrainingArguments sets up the gloo process group (torchrun's env vars)
    args = TrainingArguments(output_dir=os.path.join(out_dir, "trainer"), report_to=[], use_cpu=True, seed=0,
                             disable_tqdm=True, save_strategy="no", logging_steps=1, per_device_train_batch_size=4,
                             max_steps=4, learning_rate=1e-2, lr_scheduler_type="constant", ddp_backend="gloo",
                             dataloader_num_workers=0)
    assert args.world_size == world_size == 2 and dist.is_initialized(), (args.world_size, world_size)

    model = build(calibration_seed=100 + rank)  # calibration all-reduces the Gram matrices over both ranks
    initial = deltas_of(model)
    buffer_shapes = [tuple(b.shape) for b in model.buffers()]

    trainer = RecordingTrainer(model=model, args=args, train_dataset=Dataset.from_dict(
        {k: v.tolist() for k, v in tensors(32, seed=0).items()}), callbacks=[SparseGradCallback()])
    trainer.train()
    head = model.base_model.model.classifier.modules_to_save["default"]

    # 3. selection="periodic": between refreshes each rank computes gradients only on its fixed supports, which must
    # be the same on both ranks (chosen from the all-reduced gradient at the refresh)
    periodic = build(calibration_seed=100 + rank, selection="periodic", refresh_interval=2)
    supports = []  # per step: {layer: (S as int32 flat indices, the step that selected it)}

    class RecordSupports(TrainerCallback):
        def on_step_end(self, args, state, control, optimizer=None, **kwargs):
            inner = peft_sparsegrad.callback._unwrap(optimizer)
            supports.append({name: (inner.state[m.get_base_layer().weight]["sparsegrad"].indices.clone(),
                                    inner.state[m.get_base_layer().weight]["sparsegrad"].selected_at)
                             for name, m in layers(periodic).items()})

    data = Dataset.from_dict({k: v.tolist() for k, v in tensors(32, seed=0).items()})
    Trainer(model=periodic, args=args, train_dataset=data, callbacks=[RecordSupports(), SparseGradCallback()]).train()
    # 4. no calibration data and no bases: SparseGradCallback calibrates on each rank's shard of the Trainer's own
    # dataloader when training begins; the all-reduced Gram sums must give both ranks the same bases
    pending = get_peft_model(base_model(), SparseGradConfig(calibration_steps=2, task_type="SEQ_CLS",
                                                            modules_to_save=["classifier"], keep_ratio=0.05))
    assert all(m.sparsegrad_bases["default"] is None for m in layers(pending).values())
    Trainer(model=pending, args=args, train_dataset=data, callbacks=[SparseGradCallback()]).train()
    torch.save({
        "pending_bases": bases_of(pending),
        "pending_deltas": deltas_of(pending),
        "periodic_deltas": deltas_of(periodic),
        "periodic_weights": weights_of(periodic),
        "periodic_bases": {name: _float32_pair(m) for name, m in layers(periodic).items()},
        "periodic_supports": supports,
        "base_weights": base_weights(),
        "rank": rank,
        "world_size": args.world_size,
        "wrapped": type(trainer.model_wrapped).__name__,
        "initial": initial,
        "deltas": deltas_of(model),
        "weights": weights_of(model),
        "layer_bases": {name: _float32_pair(m) for name, m in layers(model).items()},
        "classifier": [head.weight.detach().clone(), head.bias.detach().clone()],
        "bases": bases_of(model),
        "local_bases": local_bases,
        "buffer_shapes": buffer_shapes,
        "seen": torch.cat(RecordingTrainer.seen),
        "log_history": trainer.state.log_history,
    }, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()


if __name__ == "__main__":
    main(sys.argv[1])
