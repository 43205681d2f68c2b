"""SparseGradCallback: SparseGrad training with the plain Hugging Face ``Trainer``.

The Trainer builds its own optimizer (AdamW) over all trainable parameters, ΔW' included. The callback routes:

* ``on_pre_optimizer_step`` fires after gradient accumulation, after the DDP all-reduce and after ``max_grad_norm``
  clipping. There every ΔW' gets the top-k update (``peft_sparsegrad.optim.sparse_step``) with the learning rate of its
  group in the Trainer's optimizer (so the Trainer's schedule and warmup apply), then its ``.grad`` is set to None so
  the Trainer's AdamW skips it: no dense moments and no dense weight decay on rotated weights. Every other trainable
  parameter (classifier head, ``modules_to_save``) stays on the Trainer's optimizer.
* Clipping therefore sees the *unmasked* rotated gradient. Its norm equals the norm of the ordinary weight gradient
  (the bases are orthogonal), so the one global norm the Trainer computes is the same as for full fine-tuning.
* The sparse optimizer state is kept in the Trainer optimizer's own ``state`` dict (entries its AdamW never touches,
  because those parameters never have a gradient when it steps), so it is written to ``optimizer.pt`` with every
  checkpoint and restored by ``resume_from_checkpoint`` with no extra machinery.

If the Trainer was given a ``SparseGradOptimizer`` (``optimizers=(create_sparsegrad_optimizer(...), None)`` or
``optimizer_cls_and_kwargs``), the optimizer already does all of this and the callback only logs its statistics.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from transformers import TrainerCallback

from .optim import SPARSE_MODES, SparseGradOptimizer, _sparse_step_impl, attach_support, sparsegrad_parameters


def _unwrap(optimizer: Any) -> Any:
    """accelerate's AcceleratedOptimizer wraps the real optimizer in ``.optimizer``. It is itself a
    ``torch.optim.Optimizer`` subclass, so unwrap while the wrapped object is an optimizer."""
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


class SparseGradCallback(TrainerCallback):
    """Route SparseGrad parameters to the top-k sparse update inside a plain ``Trainer``.

    Args:
        mode: "adamw" (lean), "sparse_adam" (paper-faithful) or "sgd"; default: the adapter config's
            ``sparse_optimizer``.
        weight_decay: decoupled weight decay for ΔW' (applied only where the sparse update acts). The Trainer's
            ``weight_decay`` is deliberately *not* used for ΔW'.
        log_statistics: add ``sparsegrad/kept_energy`` (share of the rotated gradient's energy in the kept entries)
            and ``sparsegrad/overlap`` (share of kept entries also kept in the previous step) to the Trainer's logs.
    """

    def __init__(self, mode: Optional[str] = None, weight_decay: float = 0.0, log_statistics: bool = True) -> None:
        if mode is not None and mode not in SPARSE_MODES:
            raise ValueError(f"mode must be one of {SPARSE_MODES}, got {mode!r}.")
        self.mode = mode
        self.weight_decay = weight_decay
        self.log_statistics = log_statistics
        self._routes: list[tuple[torch.nn.Parameter, int, dict]] = []
        self._delegated: Optional[SparseGradOptimizer] = None
        self._stats: list[torch.Tensor] = []
        self._supports_attached = False

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        sparse = sparsegrad_parameters(model)
        if not sparse:
            raise ValueError("SparseGradCallback: the model has no trainable SparseGrad parameters. Build it with "
                             "peft.get_peft_model(model, SparseGradConfig(...)).")
        inner = _unwrap(optimizer)
        self._routes, self._delegated, self._stats = [], None, []
        self._supports_attached = False
        if isinstance(inner, SparseGradOptimizer):
            self._delegated = inner  # it applies the sparse update itself
            return
        if self.mode is None:
            configs = getattr(model, "peft_config", {})
            self.mode = next((c.sparse_optimizer for c in configs.values() if hasattr(c, "sparse_optimizer")), "adamw")
        group_of = {id(p): group for group in inner.param_groups for p in group["params"]}
        for param, k in sparse:
            group = group_of.get(id(param))
            if group is None:
                raise ValueError("A SparseGrad parameter is not in the Trainer's optimizer, so its learning rate "
                                 "schedule is unknown. Let the Trainer build the optimizer from model.parameters().")
            param.sparsegrad_routed = True
            self._routes.append((param, k, group))
            attach_support(param, inner.state.get(param, {}), self._refresh(param))  # drop stale hints

    @staticmethod
    def _refresh(param: torch.nn.Parameter) -> int:
        return int(getattr(param, "sparsegrad_refresh_interval", 0))

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        # Tell the layers the restored fixed supports (selection="periodic") before the first backward, also where
        # resume_from_checkpoint loads the optimizer state after on_train_begin (transformers 5.24 loads it before).
        if self._supports_attached or self._delegated is not None or optimizer is None:
            return
        inner = _unwrap(optimizer)
        for param, _, _ in self._routes:
            attach_support(param, inner.state.get(param, {}), self._refresh(param))
        self._supports_attached = True

    def on_train_end(self, args, state, control, **kwargs):
        # The routing mark holds only while this callback drives a Trainer: training the same model later with a
        # Trainer that lacks the callback must fail loudly again, not update ΔW' densely with that Trainer's AdamW.
        for param, _, _ in self._routes:
            if hasattr(param, "sparsegrad_routed"):
                del param.sparsegrad_routed
        self._routes = []

    @torch.no_grad()
    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        if self._delegated is not None:
            return
        inner = _unwrap(optimizer)
        for param, k, group in self._routes:
            if param.grad is None:
                continue
            kept_energy, overlap, _ = _sparse_step_impl(
                param, param.grad, inner.state[param], k=k, lr=float(group["lr"]), mode=self.mode,
                betas=tuple(group.get("betas", (0.9, 0.999))), eps=group.get("eps", 1e-8),
                weight_decay=self.weight_decay, refresh_interval=self._refresh(param),
            )
            param.grad = None  # the Trainer's optimizer skips parameters without a gradient
            if self.log_statistics:
                self._stats.append(torch.stack([kept_energy.float(), overlap.float()]))

    def on_optimizer_step(self, args, state, control, **kwargs):
        if self._delegated is not None and self.log_statistics and self._delegated.last_stats:
            s = self._delegated.last_stats
            self._stats.append(torch.tensor([s.get("kept_energy", float("nan")), s["overlap"]]))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not self.log_statistics or not self._stats or logs is None:
            return
        kept_energy, overlap = torch.stack([s.cpu() for s in self._stats]).nanmean(0).tolist()  # one sync per log
        self._stats = []
        extra = {"sparsegrad/kept_energy": round(kept_energy, 4), "sparsegrad/overlap": round(overlap, 4)}
        if math.isnan(kept_energy):  # selection="periodic" logs it only at refresh steps
            del extra["sparsegrad/kept_energy"]
        logs.update(extra)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(extra)  # the copy the Trainer keeps in trainer_state.json
