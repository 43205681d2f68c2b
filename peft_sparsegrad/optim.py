"""SparseGradOptimizer: one ``torch.optim.Optimizer`` for a SparseGrad model, for plain loops and the ``Trainer``.

Groups with ``"sparsegrad_k"`` hold one adapted weight W each and get the sparse update of ``peft_sparsegrad.update``
(top-k of the rotated gradient, AdamW / lazy Adam / SGD on ΔW''s support); every other trainable parameter (heads,
``modules_to_save``) is plain AdamW in the same object, so one LR scheduler and one checkpoint cover the model.

Two paths, logged once when the first step runs:

* **dense** (``step_in_backward=False``, the default of a plain loop): backward leaves G in ``W.grad`` as usual, and
  ``step()`` runs both halves of the update. Anything between ``backward()`` and ``step()`` — clipping, gradient
  inspection, accumulation over any number of micro-batches — works as for any optimizer.
* **inside backward** (``create_sparsegrad_optimizer(model, ..., step_in_backward=True)``): the rotation and top-k run
  in backward and free each ``W.grad`` at once (``peft_sparsegrad.fused``), so the peak memory has no dense gradients.
  Clip with ``torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)``: a one-element norm carrier parameter of
  the model holds the adapted weights' norm (filtering the parameters by ``requires_grad`` drops it, as it has
  none). With gradient accumulation, pass ``accumulation_steps``.
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Callable, Iterable
from itertools import chain
from typing import Any, Optional

import torch

from .fused import StepInBackward, fused_unavailable_reason
from .layer import OWNER_ATTR, ROUTED_ATTR, SparseGradLayer
from .update import (SPARSE_MODES, SparseState, adamw_update, apply_update, check_mode, scalar, select_topk,
                     sparse_update)

__all__ = [
    "SPARSE_MODES",
    "SparseState",
    "select_topk",
    "sparse_step",
    "SparseGradOptimizer",
    "build_param_groups",
    "sparsegrad_parameters",
    "create_sparsegrad_optimizer",
]

logger = logging.getLogger("peft_sparsegrad")


def _owner(param: torch.Tensor) -> tuple[SparseGradLayer, Optional[str]]:
    layer = getattr(param, OWNER_ATTR, None)
    if layer is None:
        raise ValueError("This parameter is not the weight of a trainable SparseGrad layer.")
    return layer, layer.trainable_adapter()


@torch.no_grad()
def sparse_step(
    param: torch.Tensor,
    grad: torch.Tensor,
    state: dict,
    *,
    k: int,
    lr: float,
    mode: str = "adamw",
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    refresh_interval: int = 0,
) -> dict[str, float]:
    """Apply one sparse update to the SparseGrad-adapted weight ``param`` (W, updated in place) from its dense
    gradient ``grad``, keeping only the top-k entries of the rotated gradient.

    ``refresh_interval`` > 0 selects ``selection="periodic"``. ``state`` is the weight's optimizer state dict
    (mutated in place; empty on the first call). Returns statistics (one host sync): ``kept_energy`` =
    ||g[sel]||² / ||g||² (1.0 if g == 0), ``overlap`` = |sel ∩ prev_sel| / k (0.0 on the first step), ``support`` =
    number of entries holding optimizer state.
    """
    layer, adapter = _owner(param)
    kept_energy, overlap, support = sparse_update(
        layer, adapter, grad, state, k=k, lr=lr, mode=mode, betas=betas, eps=eps, weight_decay=weight_decay,
        refresh_interval=refresh_interval,
    )
    ke, ov = torch.stack([kept_energy.float(), overlap.float()]).tolist()
    return {"kept_energy": ke, "overlap": ov, "support": float(support)}


def _adamw_dense(p: torch.Tensor, grad: torch.Tensor, state: dict, *, lr: float, betas: tuple[float, float],
                 eps: float, weight_decay: float) -> None:
    if not state:
        state["step"] = 0
        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    state["step"] = int(state["step"]) + 1
    adamw_update(p, grad, state["exp_avg"], state["exp_avg_sq"], state["step"], lr=lr, betas=betas, eps=eps,
                  weight_decay=weight_decay)


class SparseGradOptimizer(torch.optim.Optimizer):
    """One optimizer for a whole SparseGrad model, so one LR scheduler and one checkpoint cover it.

    Groups with key ``"sparsegrad_k"`` (int) hold exactly ONE adapted weight W each (k is per weight) and are
    updated with the sparse rule ``group["mode"]``. Every other group is plain AdamW (decoupled weight decay,
    identical to ``torch.optim.AdamW``). After each ``step()``, ``last_stats`` holds the mean ``kept_energy`` and mean
    ``overlap`` over the adapted weights that had a gradient, and the total ``support`` (for logging).
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        mode: str = "adamw",
    ) -> None:
        if not lr >= 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not eps >= 0.0:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"Invalid betas: {betas}")
        if not weight_decay >= 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        check_mode(mode)
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay, "mode": mode}
        self._fused: Optional[StepInBackward] = None
        self._path_logged = False
        super().__init__(params, defaults)
        self.last_stats: dict[str, float] = {}

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if "sparsegrad_k" not in param_group:
            # Groups built without SparseGrad in mind (Trainer's optimizer_cls_and_kwargs) may contain adapted
            # weights, recognisable by their owner attribute: give each its own sparse group, without the dense
            # group's weight decay (a decoupled decay of ΔW' is opt-in through "sparse_weight_decay").
            params = param_group["params"]
            params = [params] if isinstance(params, torch.Tensor) else list(params)
            sparse = [p for p in params if hasattr(p, OWNER_ATTR)]
            if sparse:
                options = {k: v for k, v in param_group.items() if k not in ("params", "weight_decay")}
                for p in sparse:
                    layer, adapter = _owner(p)
                    self.add_param_group({**options, "params": [p], "sparsegrad_k": layer.sparsegrad_k[adapter],
                                          "weight_decay": param_group.get("sparse_weight_decay", 0.0)})
                param_group = {**param_group, "params": [p for p in params if not hasattr(p, OWNER_ATTR)]}
                if not param_group["params"]:
                    return
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if "sparsegrad_k" not in group:
            return
        check_mode(group["mode"])
        if len(group["params"]) != 1:
            raise ValueError("a 'sparsegrad_k' group must hold exactly one parameter")
        k = group["sparsegrad_k"]
        try:
            if isinstance(k, bool):
                raise TypeError
            k = operator.index(k)  # accept numpy ints, store a plain int
        except TypeError:
            raise ValueError(f"'sparsegrad_k' must be an int, got {k!r}") from None
        if k < 0:
            raise ValueError(f"'sparsegrad_k' must be >= 0, got {k}")
        group["sparsegrad_k"] = k
        p = group["params"][0]
        layer, adapter = _owner(p)
        refresh = group.setdefault("refresh_interval", layer.sparsegrad_refresh_interval.get(adapter, 0))
        if isinstance(refresh, bool) or not isinstance(refresh, int) or refresh < 0:
            raise ValueError(f"'refresh_interval' must be an int >= 0 (0: dynamic selection), got {refresh!r}")
        if refresh > 0 and group["mode"] == "sparse_adam":
            raise ValueError("selection='periodic' (refresh_interval > 0) needs mode 'adamw' or 'sgd', "
                             "not 'sparse_adam'.")
        setattr(p, ROUTED_ATTR, True)  # this optimizer applies the top-k update

    # ---- the step inside backward ---------------------------------------------------------------------------------

    def enable_step_in_backward(self, model: torch.nn.Module, accumulation_steps: int = 1) -> None:
        """Run the rotation and top-k of every adapted weight inside backward (``peft_sparsegrad.fused``).

        ``model``: the model whose parameters clipping iterates (the norm carrier is registered on it);
        ``accumulation_steps``: backward passes per ``step()``. Under DDP, call ``peft_sparsegrad.exclude_from_ddp``
        before wrapping the model: then this optimizer reduces the adapted weights itself (ValueError otherwise, as
        the hooks would see the rank's own gradient before DDP's all-reduce)."""
        routes = [(g["params"][0], g["sparsegrad_k"], self._state_getter(g["params"][0]))
                  for g in self.param_groups if "sparsegrad_k" in g]
        reason = fused_unavailable_reason([p for p, _, _ in routes])
        if reason is not None:
            raise ValueError(f"step_in_backward=True is not available here: {reason}. Or use the dense path "
                             "(step_in_backward=False).")
        self.disable_step_in_backward()
        self._fused = StepInBackward(model, routes, accumulation_steps).install()

    def disable_step_in_backward(self) -> None:
        """Back to the dense path: hooks and the norm carrier are removed."""
        if self._fused is not None:
            self._fused.remove()
        self._fused = None

    @property
    def step_in_backward(self) -> bool:
        return self._fused is not None

    def _state_getter(self, p: torch.Tensor) -> Callable[[], dict]:
        return lambda: self.state[p]

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        if self._fused is not None:
            self._fused.discard()  # what the gradient half kept is a gradient too

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        # Validate everything first so a bad gradient never leaves a half-applied step.
        for p in chain.from_iterable(g["params"] for g in self.param_groups):
            if p.grad is not None and p.grad.is_sparse:
                raise TypeError("SparseGradOptimizer does not accept sparse gradients: W.grad must be dense "
                                "(top-k selection happens in the optimizer)")
        if not self._path_logged:
            self._path_logged = True
            logger.info("SparseGradOptimizer: %s", "rotation and top-k inside backward (step_in_backward=True)"
                        if self._fused is not None else "dense path: W.grad is kept until step() "
                        "(create_sparsegrad_optimizer(..., step_in_backward=True) moves the top-k into backward)")

        fused = self._fused
        scale = fused.clip_scale() if fused is not None else None
        energies: list[torch.Tensor] = []
        overlaps: list[torch.Tensor] = []
        support = 0
        for group in self.param_groups:
            lr = scalar(group["lr"])
            betas = tuple(group["betas"])
            if "sparsegrad_k" in group:
                p = group["params"][0]
                layer, adapter = _owner(p)
                pending = fused.take(p) if fused is not None else None
                if adapter is None or (pending is None and p.grad is None):
                    continue
                options = dict(lr=lr, mode=group["mode"], betas=betas, eps=group["eps"],
                               weight_decay=group["weight_decay"], refresh_interval=group["refresh_interval"])
                if pending is not None:
                    sup = apply_update(layer, adapter, pending, self.state[p], scale=scale, **options)
                    ke, ov = pending.kept_energy, pending.overlap
                else:
                    if fused is not None:
                        fused.reduce_dense(p)  # excluded from DDP: average over the ranks first
                    ke, ov, sup = sparse_update(layer, adapter, p.grad, self.state[p], k=group["sparsegrad_k"],
                                                **options)
                energies.append(ke.float())
                overlaps.append(ov.float())
                support += sup
            else:
                for p in group["params"]:
                    if p.grad is None:
                        continue
                    _adamw_dense(p, p.grad, self.state[p], lr=lr, betas=betas, eps=group["eps"],
                                 weight_decay=group["weight_decay"])

        if fused is not None:
            fused.discard()
        if energies:
            ke_mean, ov_mean = torch.stack([torch.stack(energies).mean(),
                                            torch.stack(overlaps).mean()]).tolist()  # one sync
            self.last_stats = {"kept_energy": ke_mean, "overlap": ov_mean, "support": float(support)}
        else:
            self.last_stats = {}
        return loss


def build_param_groups(
    sparse_params: list[tuple[torch.nn.Parameter, int]],
    dense_params: list[torch.nn.Parameter],
    *,
    lr: float,
    weight_decay: float = 0.0,
    sparse_lr: float | None = None,
    sparse_weight_decay: float = 0.0,
    mode: str = "adamw",
) -> list[dict]:
    """Param groups for :class:`SparseGradOptimizer`.

    One group per adapted weight (k is per weight):
    ``{"params": [W], "sparsegrad_k": k, "mode": mode, "lr": sparse_lr or lr, "weight_decay": sparse_weight_decay}``;
    then the dense params split as HF Trainer does: ``weight_decay`` for matrices, 0 for biases and other 1-D params
    (norm weights), since decaying those only hurts. Empty groups are omitted.
    """
    check_mode(mode)
    groups: list[dict] = []
    for p, k in sparse_params:
        layer, adapter = _owner(p)
        groups.append({
            "params": [p],
            "sparsegrad_k": int(k),
            "refresh_interval": int(layer.sparsegrad_refresh_interval.get(adapter, 0)),
            "mode": mode,
            "lr": sparse_lr if sparse_lr is not None else lr,
            "weight_decay": sparse_weight_decay,
        })
    decay = [p for p in dense_params if p.ndim >= 2]
    no_decay = [p for p in dense_params if p.ndim < 2]
    if decay:
        groups.append({"params": decay, "lr": lr, "weight_decay": weight_decay})
    if no_decay:
        groups.append({"params": no_decay, "lr": lr, "weight_decay": 0.0})
    return groups


def sparsegrad_parameters(model: torch.nn.Module) -> list[tuple[torch.nn.Parameter, int]]:
    """(W, k) of every adapted weight of ``model`` with a trainable SparseGrad adapter (found through the layers).

    Raises ValueError if a layer has several trainable adapters (they would share W.grad)."""
    found = []
    for module in model.modules():
        if isinstance(module, SparseGradLayer):
            adapter = module.trainable_adapter()
            if adapter is not None:
                module.update_trainability()  # the owner mark, also after a deep copy of the model
                found.append((module.get_base_layer().weight, module.sparsegrad_k[adapter]))
    return found


def create_sparsegrad_optimizer(
    model: torch.nn.Module,
    lr: float = 1e-4,
    weight_decay: float = 0.0,
    *,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    mode: str | None = None,
    sparse_lr: float | None = None,
    sparse_weight_decay: float = 0.0,
    step_in_backward: bool = False,
    accumulation_steps: int = 1,
) -> SparseGradOptimizer:
    """One optimizer for a SparseGrad PeftModel: top-k updates of every adapted weight, AdamW for all other trainable
    parameters (classifier heads, ``modules_to_save``). ``mode`` defaults to the config's ``sparse_optimizer``.

    ``step_in_backward=True`` runs the rotation and top-k inside backward and frees each ``W.grad`` at once (no dense
    gradients at the peak; clip with ``torch.nn.utils.clip_grad_norm_(model.parameters(), ...)``);
    ``accumulation_steps`` is then the number of ``backward()`` calls per ``step()``. See the module docstring.

    Use it in a plain loop, or with the Trainer as ``Trainer(..., optimizers=(opt, None))``.
    """
    if not isinstance(step_in_backward, bool):
        raise TypeError(f"step_in_backward must be True or False, got {step_in_backward!r}.")
    sparse = sparsegrad_parameters(model)
    if not sparse:
        raise ValueError("The model has no trainable SparseGrad parameters: build it with get_peft_model and a "
                         "SparseGradConfig (and don't load it with is_trainable=False).")
    if mode is None:
        configs = getattr(model, "peft_config", {})
        mode = next((c.sparse_optimizer for c in configs.values() if hasattr(c, "sparse_optimizer")), "adamw")
    sparse_ids = {id(p) for p, _ in sparse}
    dense = [p for p in model.parameters() if p.requires_grad and id(p) not in sparse_ids]
    groups = build_param_groups(sparse, dense, lr=lr, weight_decay=weight_decay, sparse_lr=sparse_lr,
                                sparse_weight_decay=sparse_weight_decay, mode=mode)
    optimizer = SparseGradOptimizer(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, mode=mode)
    if step_in_backward:
        optimizer.enable_step_in_backward(model, accumulation_steps)
    elif accumulation_steps != 1:
        raise ValueError("accumulation_steps only matters with step_in_backward=True: the dense path accumulates "
                         "W.grad over any number of backward passes.")
    return optimizer
