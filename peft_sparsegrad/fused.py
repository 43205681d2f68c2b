"""The step inside backward: each adapted weight's gradient half runs the moment its W.grad is complete.

On the dense path every adapted weight keeps its dense gradient G in ``W.grad`` from backward to the optimizer step,
and the step's rotations then run for all layers at once: a peak above full fine-tuning's. Here a
``Tensor.register_post_accumulate_grad_hook`` on every adapted W (the hook PyTorch's "optimizer step in backward"
recipe uses) runs ``update.gradient_of`` as soon as backward has finished W's gradient: it rotates G (in place), keeps
the k values the update will use and frees ``W.grad``. At most one layer's dense gradient is alive at a time.

The *update* still waits for the optimizer step, for two reasons peers that step per layer get wrong:

* **Clipping.** Global-norm clipping scales every gradient by one coefficient and does not change which entries are
  the top-k, so it can be applied to the kept values later — if the global norm counts the adapted weights. A
  one-element *norm carrier* parameter (``requires_grad=False``, so no optimizer and no DDP bucket takes it) is
  registered on the model while the path is active; its ``.grad`` holds √(Σ ||G||²) over the adapted weights, so
  ``torch.nn.utils.clip_grad_norm_(model.parameters(), ...)`` — what the ``Trainer`` calls — computes exactly the norm
  of the dense path and scales the carrier by the clipping coefficient, which the step reads back (``clip_scale``).
* **Gradient accumulation** keeps its meaning: one update per accumulation boundary. Between refreshes of periodic
  selection, g[S] (k values) of each micro-batch adds up exactly; the clipping norm then counts ||Σ g[S]|| for those
  weights, as the dense sum is never formed. Dynamic selection and refresh steps need the top-k of the *accumulated*
  gradient: their W.grad accumulates densely until the last micro-batch (``accumulation_steps``), whose hook then
  selects. A window that ends early (the Trainer's last one of an epoch) leaves W.grad to the step's dense path.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from .layer import CALIBRATING_ATTR, SparseGradLayer
from .update import SparseGradient, accumulate, fixed_support, gradient_of

logger = logging.getLogger("peft_sparsegrad")

#: Name of the norm carrier parameter on the model while the step runs inside backward.
NORM_CARRIER = "sparsegrad_grad_norm_carrier"


def distributed_world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


@dataclass
class _Route:
    param: nn.Parameter
    layer: SparseGradLayer
    k: int
    state: Callable[[], dict]  # the weight's optimizer state dict (read by the gradient half)


class StepInBackward:
    """Runs the gradient half of every routed weight's step inside backward (see the module docstring).

    ``routes``: (W, k, getter of W's optimizer state dict). ``accumulation_steps``: backward passes per optimizer
    step. ``install`` registers the hooks and the norm carrier on ``model``, ``remove`` takes both away again.
    """

    def __init__(self, model: nn.Module, routes: list[tuple[nn.Parameter, int, Callable[[], dict]]],
                 accumulation_steps: int = 1) -> None:
        if isinstance(accumulation_steps, bool) or not isinstance(accumulation_steps, int) or accumulation_steps < 1:
            raise ValueError(f"accumulation_steps must be an int >= 1, got {accumulation_steps!r}.")
        self.model = model
        self.accumulation_steps = accumulation_steps
        self._routes = {id(p): _Route(p, getattr(p, "sparsegrad_owner"), k, state) for p, k, state in routes}
        self._pending: dict[int, SparseGradient] = {}
        self._micro: dict[int, int] = {}
        self._sq_norms: dict[int, torch.Tensor] = {}
        self._total: Optional[torch.Tensor] = None  # Σ ||G||² over the weights with a result (float64, 0-dim)
        self._norm: Optional[torch.Tensor] = None
        self._handles: list = []
        self.carrier: Optional[nn.Parameter] = None

    # ---- life cycle -----------------------------------------------------------------------------------------------

    def install(self) -> "StepInBackward":
        if self._handles:
            return self
        if hasattr(self.model, NORM_CARRIER):
            raise ValueError("The model already has a SparseGrad step running inside backward (another optimizer or "
                             "callback installed it): build one SparseGrad optimizer per model.")
        device = next(iter(self._routes.values())).param.device
        self.carrier = nn.Parameter(torch.zeros((), device=device), requires_grad=False)
        self.model.register_parameter(NORM_CARRIER, self.carrier)
        self._handles = [r.param.register_post_accumulate_grad_hook(self._hook) for r in self._routes.values()]
        return self

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self.carrier is not None and getattr(self.model, NORM_CARRIER, None) is self.carrier:
            delattr(self.model, NORM_CARRIER)
        self.carrier = None
        self.discard()

    @property
    def installed(self) -> bool:
        return bool(self._handles)

    # ---- backward -------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def _hook(self, param: torch.Tensor) -> None:
        route = self._routes.get(id(param))
        if route is None or param.grad is None or getattr(param, CALIBRATING_ATTR, False):
            return
        layer = route.layer
        adapter = layer.trainable_adapter()
        if adapter is None:
            return
        key = id(param)
        state = route.state()
        refresh_interval = layer.sparsegrad_refresh_interval.get(adapter, 0)
        count = self._micro[key] = self._micro.get(key, 0) + 1
        pending = self._pending.get(key)
        if pending is not None and pending.support is not None:
            accumulate(layer, adapter, pending, param.grad)  # periodic, between refreshes: g[S] adds up exactly
        elif pending is not None:
            raise RuntimeError(
                f"SparseGrad: backward ran {count} times since the last optimizer step, but the step inside backward "
                f"was set up for {self.accumulation_steps} backward pass(es) per step, and this step's top-k "
                "selection has already used the gradient so far. Pass the number of micro-batches per step "
                "(create_sparsegrad_optimizer(..., accumulation_steps=N)) or use step_in_backward=False."
            )
        elif fixed_support(layer, adapter, state, refresh_interval) is not None:
            pending = gradient_of(layer, adapter, param.grad, state, k=route.k, refresh_interval=refresh_interval,
                                  inplace=True)
        elif count < self.accumulation_steps:
            return  # dynamic selection or a refresh: the top-k needs the accumulated gradient; W.grad keeps it
        else:
            pending = gradient_of(layer, adapter, param.grad, state, k=route.k, refresh_interval=refresh_interval,
                                  inplace=True)
        param.grad = None  # the dense gradient is consumed
        self._pending[key] = pending
        previous = self._sq_norms.get(key)
        self._sq_norms[key] = pending.sq_norm.double()
        total = self._sq_norms[key] if self._total is None else self._total + self._sq_norms[key]
        self._total = total if previous is None else (total - previous).clamp_min(0)
        self._norm = self._total.sqrt().float().to(self.carrier.device)
        self.carrier.grad = self._norm.clone()  # clip_grad_norm_ scales this copy; _norm keeps the original

    # ---- the optimizer step ---------------------------------------------------------------------------------------

    def take(self, param: torch.Tensor) -> Optional[SparseGradient]:
        """The gradient half's result for ``param`` since the last step (None: none ran; W.grad, if any, is dense)."""
        return self._pending.pop(id(param), None)

    def clip_scale(self) -> Optional[torch.Tensor]:
        """The coefficient ``clip_grad_norm_`` applied to the carrier (0-dim tensor), or None if nothing ran."""
        if self._norm is None or self.carrier is None or self.carrier.grad is None:
            return None
        norm = self._norm
        return torch.where(norm > 0, self.carrier.grad / norm.clamp_min(torch.finfo(norm.dtype).tiny),
                           torch.ones_like(norm))

    def discard(self) -> None:
        """Forget everything since the last step (called after each step, and by ``zero_grad``)."""
        self._pending.clear()
        self._micro.clear()
        self._sq_norms.clear()
        self._total = self._norm = None
        if self.carrier is not None:
            self.carrier.grad = None


def fused_unavailable_reason(fp16_scaler: bool = False) -> Optional[str]:
    """Why the step cannot run inside backward here (None: it can)."""
    if distributed_world_size() > 1:
        return ("under data parallelism the post-accumulate hook sees the rank's own gradient before DDP's "
                "all-reduce")
    if fp16_scaler:
        return "fp16 mixed precision scales the gradients (GradScaler) until the optimizer step"
    return None
