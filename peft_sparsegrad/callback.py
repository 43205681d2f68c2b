"""SparseGradCallback: SparseGrad training with the plain Hugging Face ``Trainer``.

The Trainer builds its own optimizer (AdamW) over all trainable parameters, the adapted weights W included. The
callback routes:

* ``on_train_begin``: if the adapter was created with ``calibration_steps`` but without calibration data or bases,
  the bases are computed now from the first ``calibration_steps`` batches of the Trainer's own training dataloader
  (its collator, label masking and DDP sharding; Gram sums all-reduced, so every rank gets the same bases).
* By default the gradient half of the step runs **inside backward** (``peft_sparsegrad.fused``): the moment an
  adapted weight's gradient is complete it is rotated, its k kept values are stored and ``W.grad`` is freed, so at
  most one dense gradient is alive at a time. A norm carrier parameter makes the Trainer's ``max_grad_norm`` clipping
  and its logged ``grad_norm`` count the adapted weights exactly as on the dense path. Under DDP or fp16 loss
  scaling (where the hook would see unreduced or scaled gradients) and with ``step_in_backward=False`` the dense
  path runs instead: ``W.grad`` stays until the step. Which path runs is logged once.
* ``on_pre_optimizer_step`` fires after gradient accumulation, after the DDP all-reduce and after ``max_grad_norm``
  clipping. There every adapted weight gets its update (``peft_sparsegrad.update``), with the learning rate of its
  group in the Trainer's optimizer (so the Trainer's schedule and warmup apply); a dense ``W.grad`` left for the step
  is set to None, so the Trainer's AdamW never sees an adapted weight's gradient: no dense moments and no dense weight
  decay on them. Every other trainable parameter (classifier head, ``modules_to_save``) stays on the Trainer's
  optimizer.
* The sparse optimizer state is kept in the Trainer optimizer's own ``state`` dict (entries its AdamW never touches,
  because those weights never have a gradient when it steps), so it is written to ``optimizer.pt`` with every
  checkpoint and restored by ``resume_from_checkpoint`` with no extra machinery.

If the Trainer was given a ``SparseGradOptimizer`` (``optimizers=(create_sparsegrad_optimizer(...), None)`` or
``optimizer_cls_and_kwargs``), the optimizer already does all of this and the callback only calibrates and logs.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import torch
from transformers import TrainerCallback

from .distributed import adapted_weight_names, exclude_from_ddp
from .fused import StepInBackward, distributed_world_size, fused_unavailable_reason
from .layer import OWNER_ATTR, ROUTED_ATTR
from .optim import SparseGradOptimizer, sparsegrad_parameters
from .update import SPARSE_MODES, apply_update, sparse_update

logger = logging.getLogger("peft_sparsegrad")


SUPPORTED_ENGINES = "one process, DDP, or FSDP2 (fully_shard; Trainer: fsdp_version 2) without CPU offload"


def check_engine(args, model) -> None:
    """SparseGrad never trains densely behind the user's back: refuse the engines it cannot serve, naming the ones it
    can. DeepSpeed ZeRO and FSDP1 flatten or partition the weights and their gradients (and keep their own optimizer
    state), CPU offload moves them off the device the step runs on."""
    if getattr(args, "deepspeed", None):
        raise ValueError(f"SparseGrad does not support DeepSpeed; it supports {SUPPORTED_ENGINES}.")
    fsdp_config = getattr(args, "fsdp_config", None) or {}
    fsdp = [str(o) for o in (getattr(args, "fsdp", None) or [])]
    if fsdp and any("offload" in o for o in fsdp) or fsdp_config.get("offload_params") or \
            fsdp_config.get("fsdp_offload_params"):
        raise ValueError(f"SparseGrad does not support FSDP's CPU offload; it supports {SUPPORTED_ENGINES}.")
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP1
    except ImportError:  # pragma: no cover - torch without FSDP
        FSDP1 = ()
    if model is not None and any(isinstance(m, FSDP1) for m in model.modules()):
        raise ValueError(f"SparseGrad does not support FSDP1 (FullyShardedDataParallel, flat parameters); it "
                         f"supports {SUPPORTED_ENGINES}: set fsdp_config={{'fsdp_version': 2, ...}}.")


def _trainer_sync_flag() -> bool:
    """Whether the running backward ends the Trainer's accumulation window (it sets accelerate's GradientState
    before each micro-batch, also for a shortened last window of an epoch)."""
    from accelerate.state import GradientState

    return GradientState().sync_gradients


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
        log_statistics: add to the Trainer's logs ``sparsegrad/kept_energy`` (share of the rotated gradient's energy
            in the kept entries), ``sparsegrad/overlap`` (share of kept entries also kept in the previous step) and
            ``sparsegrad/support`` (ΔW''s support over Σk, which dynamic selection grows).
        step_in_backward: run the rotation and top-k inside backward (True, default, where possible: not under DDP
            or fp16 loss scaling, which fall back to the dense path) or always at the optimizer step (False).
    """

    def __init__(self, mode: Optional[str] = None, weight_decay: float = 0.0, log_statistics: bool = True,
                 step_in_backward: bool = True) -> None:
        if mode is not None and mode not in SPARSE_MODES:
            raise ValueError(f"mode must be one of {SPARSE_MODES}, got {mode!r}.")
        if not isinstance(step_in_backward, bool):
            raise TypeError(f"step_in_backward must be True or False, got {step_in_backward!r}.")
        self.mode = mode
        self.weight_decay = weight_decay
        self.log_statistics = log_statistics
        self.step_in_backward = step_in_backward
        self.path: Optional[str] = None  # "step-in-backward" or "dense", once training began
        self._fused: Optional[StepInBackward] = None
        self._routes: list[tuple[torch.nn.Parameter, int, dict]] = []
        self._delegated: Optional[SparseGradOptimizer] = None
        self._stats: list[torch.Tensor] = []
        self._layers: list[tuple[Any, int]] = []  # (layer, k) of every adapted weight, for the support statistic

    def on_init_end(self, args, state, control, model=None, **kwargs):
        # Data parallel: the Trainer wraps the model in DDP when training starts, after this; taking the adapted weights
        # out of DDP's buckets now lets the step inside backward reduce them (k values between refreshes)
        if (self.step_in_backward and model is not None and distributed_world_size() > 1
                and not getattr(args, "fp16", False) and adapted_weight_names(model)):
            exclude_from_ddp(model)

    def on_train_begin(self, args, state, control, model=None, optimizer=None, train_dataloader=None, **kwargs):
        check_engine(args, model)
        calibrate_pending = getattr(getattr(model, "base_model", None), "calibrate_pending", None)
        if calibrate_pending is not None:
            calibrate_pending(train_dataloader, progress=not args.disable_tqdm)
        sparse = sparsegrad_parameters(model)
        if not sparse:
            raise ValueError("SparseGradCallback: the model has no trainable SparseGrad parameters. Build it with "
                             "peft.get_peft_model(model, SparseGradConfig(...)).")
        inner = _unwrap(optimizer)
        if self._fused is not None:  # a previous run of this callback ended without on_train_end
            self._fused.remove()
            self._fused = None
        self._routes, self._delegated, self._stats = [], None, []
        self._layers = [(getattr(param, OWNER_ATTR), k) for param, k in sparse]
        if isinstance(inner, SparseGradOptimizer):
            self._delegated = inner  # it applies the sparse update itself, on the path it was built for
            self.path = "step-in-backward" if inner.step_in_backward else "dense"
            return
        if self.mode is None:
            configs = getattr(model, "peft_config", {})
            self.mode = next((c.sparse_optimizer for c in configs.values() if hasattr(c, "sparse_optimizer")), "adamw")
        group_of = {id(p): group for group in inner.param_groups for p in group["params"]}
        for param, k in sparse:
            group = group_of.get(id(param))
            if group is None:
                raise ValueError("A SparseGrad-adapted weight is not in the Trainer's optimizer, so its learning rate "
                                 "schedule is unknown. Let the Trainer build the optimizer from model.parameters().")
            setattr(param, ROUTED_ATTR, True)
            self._routes.append((param, k, group))
        self._choose_path(args, model, inner)

    def _choose_path(self, args, model, inner) -> None:
        params = [param for param, _, _ in self._routes]
        reason = "step_in_backward=False" if not self.step_in_backward else fused_unavailable_reason(
            params, fp16_scaler=bool(getattr(args, "fp16", False)))
        if reason is None:
            routes = [(param, k, (lambda p=param: inner.state[p])) for param, k, _ in self._routes]
            self._fused = StepInBackward(model, routes, max(1, int(args.gradient_accumulation_steps)),
                                         sync_gradients=_trainer_sync_flag).install()
            self.path = "step-in-backward"
            logger.info("SparseGradCallback: rotation and top-k of %d adapted weights run inside backward",
                        len(self._routes))
        else:
            self.path = "dense"
            log = logger.info if not self.step_in_backward else logger.warning
            log("SparseGradCallback: dense path (W.grad kept until the optimizer step): %s", reason)

    def on_train_end(self, args, state, control, **kwargs):
        # The routing mark holds only while this callback drives a Trainer: training the same model later with a
        # Trainer that lacks the callback must fail loudly again, not update W densely with that Trainer's AdamW.
        for param, _, _ in self._routes:
            if hasattr(param, ROUTED_ATTR):
                delattr(param, ROUTED_ATTR)
        self._routes = []
        if self._fused is not None:
            self._fused.remove()
            self._fused = None

    @torch.no_grad()
    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        if self._delegated is not None:
            return
        inner = _unwrap(optimizer)
        fused = self._fused
        scale = fused.clip_scale() if fused is not None else None
        for param, k, group in self._routes:
            pending = fused.take(param) if fused is not None else None
            if pending is None and param.grad is None:
                continue
            layer = getattr(param, OWNER_ATTR)
            adapter = layer.trainable_adapter()
            options = dict(lr=float(group["lr"]), mode=self.mode, betas=tuple(group.get("betas", (0.9, 0.999))),
                           eps=group.get("eps", 1e-8), weight_decay=self.weight_decay,
                           refresh_interval=layer.sparsegrad_refresh_interval.get(adapter, 0))
            if pending is not None:
                apply_update(layer, adapter, pending, inner.state[param], scale=scale, **options)
                kept_energy, overlap = pending.kept_energy, pending.overlap
            else:  # the dense path (or a window that ended before the accumulation count)
                if fused is not None:
                    fused.reduce_dense(param)  # excluded from DDP: average over the ranks first
                kept_energy, overlap, _ = sparse_update(layer, adapter, param.grad, inner.state[param], k=k,
                                                        inplace=True, **options)
                param.grad = None  # the Trainer's optimizer skips parameters without a gradient
            if self.log_statistics:
                self._stats.append(torch.stack([kept_energy.float(), overlap.float()]))
        if fused is not None:
            fused.discard()

    def on_optimizer_step(self, args, state, control, **kwargs):
        if self._delegated is not None and self.log_statistics and self._delegated.last_stats:
            s = self._delegated.last_stats
            self._stats.append(torch.tensor([s["kept_energy"], s["overlap"]]))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not self.log_statistics or not self._stats or logs is None:
            return
        kept_energy, overlap = torch.stack([s.cpu() for s in self._stats]).mean(0).tolist()  # one sync per log
        self._stats = []
        extra = {"sparsegrad/kept_energy": round(kept_energy, 4), "sparsegrad/overlap": round(overlap, 4)}
        total_k = sum(k for _, k in self._layers)
        if total_k:  # ΔW''s support over Σk: 1 for periodic between refreshes, growing with dynamic selection
            nnz = sum(layer.sparsegrad_delta[a].nnz for layer, _ in self._layers
                      if (a := layer.trainable_adapter()) is not None)
            extra["sparsegrad/support"] = round(nnz / total_k, 3)
        logs.update(extra)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(extra)  # the copy the Trainer keeps in trainer_state.json
