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
from typing import Any, Callable, Optional

import torch
from torch import nn

from .layer import CALIBRATING_ATTR, SparseGradLayer
from .sharded import is_sharded
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
    step; ``sync_gradients``: optional callable telling whether the running backward ends an accumulation window (the
    Trainer's, which also knows a shortened last window of an epoch); without it the count of backward passes does.
    ``install`` registers the hooks and the norm carrier on ``model``, ``remove`` takes both away again.

    Data parallel (``distributed.exclude_from_ddp``): with more than one rank the adapted weights are not in DDP's
    buckets and this class reduces them, when a window ends: g[S] (k values, in W's dtype) between refreshes,
    averaged like DDP's gradients, and the dense G for dynamic selection and refresh steps (asynchronously, at most
    two layers' gradients in flight); the selection then runs on the reduced values, so it is identical on every rank.
    Everything is reduced when backward finishes (an autograd-engine callback, as DDP's own), before any clipping.
    """

    def __init__(self, model: nn.Module, routes: list[tuple[nn.Parameter, int, Callable[[], dict]]],
                 accumulation_steps: int = 1, sync_gradients: Optional[Callable[[], bool]] = None) -> None:
        if isinstance(accumulation_steps, bool) or not isinstance(accumulation_steps, int) or accumulation_steps < 1:
            raise ValueError(f"accumulation_steps must be an int >= 1, got {accumulation_steps!r}.")
        self.model = model
        self.accumulation_steps = accumulation_steps
        self.sync_gradients = sync_gradients
        self._routes = {id(p): _Route(p, getattr(p, "sparsegrad_owner"), k, state) for p, k, state in routes}
        self.world_size = distributed_world_size()
        self.sharded = all(is_sharded(r.param) for r in self._routes.values())  # FSDP2: gradient_of reduces
        self.reducing = self.world_size > 1 and not self.sharded
        if self.reducing and not all(getattr(r.param, "_ddp_ignored", False) for r in self._routes.values()):
            raise ValueError(
                "The step inside backward under data parallelism needs the adapted weights out of DDP's gradient "
                "buckets: call peft_sparsegrad.exclude_from_ddp(model) before wrapping the model in "
                "DistributedDataParallel (SparseGradCallback does it when the Trainer is built), or use the dense "
                "path (step_in_backward=False)."
            )
        self._pending: dict[int, SparseGradient] = {}
        self._micro: dict[int, int] = {}
        self._handles: list = []
        self._in_flight: list[tuple[int, Any]] = []  # (key, all-reduce work) of dense gradients, oldest first
        self._reducing_values: list[tuple[int, torch.Tensor, Any]] = []  # (key, g[S] being reduced, work)
        self._finalize_queued = False
        self._norm: Optional[torch.Tensor] = None
        self.carrier: Optional[nn.Parameter] = None
        #: bytes this rank put into all-reduces for the adapted weights (the communication benchmark reads it)
        self.bytes_reduced = 0

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

    def _window_ends(self, count: int) -> bool:
        return self.sync_gradients() if self.sync_gradients is not None else count >= self.accumulation_steps

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
        ends = self._window_ends(count)
        if self.reducing and ends and not self._finalize_queued:
            torch.autograd.Variable._execution_engine.queue_callback(self._finalize)
            self._finalize_queued = True
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
        elif not ends:
            return  # dynamic selection or a refresh: the top-k needs the accumulated gradient; W.grad keeps it
        elif self.reducing:  # the reduced dense gradient first: all-reduce it now, select when it has arrived
            self.bytes_reduced += param.grad.numel() * param.grad.element_size()
            self._in_flight.append((key, dist_all_reduce(param.grad)))
            while len(self._in_flight) > 2:  # bounded: at most two dense gradients in flight
                self._select_reduced(*self._in_flight.pop(0))
            return
        else:
            pending = gradient_of(layer, adapter, param.grad, state, k=route.k, refresh_interval=refresh_interval,
                                  inplace=True)
        param.grad = None  # the dense gradient is consumed
        self._pending[key] = pending
        if self.reducing:
            if ends:  # g[S] of the whole window, averaged over the ranks like DDP's gradients
                values = pending.values.to(param.dtype)
                self.bytes_reduced += values.numel() * values.element_size()
                self._reducing_values.append((key, values, dist_all_reduce(values)))
            return
        self._update_norm()

    def _select_reduced(self, key: int, work: Any) -> None:
        """The dense gradient of ``key`` has been all-reduced: average it and run the gradient half on it."""
        work.wait()
        route = self._routes[key]
        param, layer = route.param, route.layer
        adapter = layer.trainable_adapter()
        param.grad.div_(self.world_size)
        self._pending[key] = gradient_of(layer, adapter, param.grad, route.state(), k=route.k,
                                         refresh_interval=layer.sparsegrad_refresh_interval.get(adapter, 0),
                                         inplace=True)
        param.grad = None

    @torch.no_grad()
    def _finalize(self) -> None:
        """End of a backward pass that closed an accumulation window (data parallel): every reduction is complete
        before the norm carrier is set, hence before any clipping."""
        self._finalize_queued = False
        while self._in_flight:
            self._select_reduced(*self._in_flight.pop(0))
        for key, values, work in self._reducing_values:
            work.wait()
            pending = self._pending[key]
            pending.values = values.float().div_(self.world_size)
            pending.sq_norm, pending.exact_norm = pending.values.square().sum(), False  # the dense sum is not formed
        self._reducing_values = []
        self._update_norm()

    def _update_norm(self) -> None:
        """carrier.grad = √(Σ ||G||²) over the weights with a result (clip_grad_norm_ scales this copy)."""
        if not self._pending:
            return
        total = torch.stack([p.sq_norm.double() for p in self._pending.values()]).sum()
        self._norm = total.sqrt().float().to(self.carrier.device)
        self.carrier.grad = self._norm.clone()

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

    def reduce_dense(self, param: torch.Tensor) -> None:
        """A dense W.grad left for the step (a window that ended without the hooks knowing): average it over the
        ranks, as DDP would have, before the step uses it."""
        if self.reducing and param.grad is not None:
            self.bytes_reduced += param.grad.numel() * param.grad.element_size()
            dist_all_reduce(param.grad).wait()
            param.grad.div_(self.world_size)

    def discard(self) -> None:
        """Forget everything since the last step (called after each step, and by ``zero_grad``)."""
        for _, work in self._in_flight:
            work.wait()
        for _, _, work in self._reducing_values:
            work.wait()
        self._in_flight, self._reducing_values = [], []
        self._pending.clear()
        self._micro.clear()
        self._norm = None
        if self.carrier is not None:
            self.carrier.grad = None


def dist_all_reduce(tensor: torch.Tensor) -> Any:
    """An asynchronous SUM all-reduce over the default process group (its work handle)."""
    import torch.distributed as dist

    return dist.all_reduce(tensor, op=dist.ReduceOp.SUM, async_op=True)


def fused_unavailable_reason(params: list[torch.Tensor] = (), fp16_scaler: bool = False) -> Optional[str]:
    """Why the step cannot run inside backward here (None: it can)."""
    params = list(params)
    if params and all(is_sharded(p) for p in params):
        return None  # FSDP2: the gradient half reduces the sharded partial products itself
    if any(is_sharded(p) for p in params):
        return "some adapted weights are sharded (FSDP2) and others are not: shard all of them or none"
    if distributed_world_size() > 1 and not all(getattr(p, "_ddp_ignored", False) for p in params):
        return ("DDP all-reduces the adapted weights' gradients itself (call peft_sparsegrad.exclude_from_ddp(model) "
                "before wrapping; SparseGradCallback does it when it is given to the Trainer)")
    if fp16_scaler:
        return "fp16 mixed precision scales the gradients (GradScaler) until the optimizer step"
    return None
