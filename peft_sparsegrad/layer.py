"""SparseGradLinear: a Linear/Conv1D layer trained in the rotated basis W' = U_outᵀ W U_in.

Conventions (README notation): W is out × in (for transformers' Conv1D the stored weight is in × out and is viewed as
Wᵀ here); x is (..., in); y = x Wᵀ + b. The paper writes weights as in × out (y = x W), so its Table 2 maps as
``paper U_in  <-> our U_in`` (rows of the paper's W = input features) and ``paper U_out <-> our U_out``; the paper's
rotated weight U_inᵀ W_paper U_out is our (U_outᵀ W U_in)ᵀ. The authors' scripts use the transpose of U_in on the input
side and rotate the bias gradient: both are bugs and not reproduced here.

The trainable tensor is ΔW' (out × in, float32), the change of W' since injection. Forward needs one matmul:
y = x (W + ΔW)ᵀ + b with ΔW = U_out ΔW' U_inᵀ (cached until ΔW' changes), so outputs and input gradients are exactly
those of the original layer with weight W + ΔW. Backward writes the dense rotated gradient U_outᵀ (∂L/∂W) U_in into
ΔW'.grad; the top-k selection happens once per optimizer step (peft_sparsegrad.optim), after gradient accumulation and
after the data-parallel all-reduce, so every rank selects the same entries. The bias stays in the original basis and
gets the ordinary bias gradient.

With ``selection="periodic"`` the optimizer leaves the fixed support S on ΔW' (``sparsegrad_support``) between
refreshes, and backward computes only (U_outᵀ (∂L/∂W) U_in)[S] (``BasisPair.rotate_at``), the rest of ΔW'.grad being 0.
After a step the optimizer also leaves what it changed (``sparsegrad_last_change``), which updates the cached W_eff in
place by U_out δ U_inᵀ (``BasisPair.unrotate_sparse``) instead of rebuilding it.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from .bases import BasisPair
from .targets import base_weight_as_out_in, is_conv1d, weight_shape

ROUTING_ERROR = (
    "SparseGrad parameters must be updated by the sparse optimizer, otherwise an ordinary optimizer would apply dense "
    "(and weight-decayed) updates to the rotated weights. With the Hugging Face Trainer pass "
    "callbacks=[peft_sparsegrad.SparseGradCallback()]; in a plain loop build the optimizer with "
    "peft_sparsegrad.create_sparsegrad_optimizer(model, lr=...)."
)


#: Incremental W_eff updates between two full rebuilds (bounds float32 drift; a rebuild costs about one dense step).
FULL_REBUILD_EVERY = 200


@dataclass
class _WeightCache:
    key: tuple  # which adapters, ΔW' storages, W version/storage/device
    versions: tuple[int, ...]  # ΔW' version counters W_eff reflects
    w_eff: torch.Tensor
    updates: int  # incremental updates since the last full rebuild


class _SparseGradLinearFunction(torch.autograd.Function):
    """y = x W_effᵀ + b with W_eff = W + Σ_a ΔW_a; gradients: x and b as for a Linear layer, W gets ∂L/∂W if it is
    trainable, and each ΔW'_a gets U_out,aᵀ (∂L/∂W) U_in,a.

    Autocast is handled explicitly instead of with ``custom_fwd``/``custom_bwd`` (which need a fixed device type):
    forward runs under the caller's autocast like any op, backward computes in the dtype of the incoming gradient.
    """

    @staticmethod
    def forward(ctx, x, weight, w_eff, bias, pairs, *deltas):
        ctx.save_for_backward(x, w_eff)
        ctx.pairs, ctx.deltas = pairs, deltas
        ctx.weight_dtype = weight.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return F.linear(x, w_eff, bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, w_eff = ctx.saved_tensors
        need_x, need_w, _, need_b = ctx.needs_input_grad[:4]
        need_deltas = ctx.needs_input_grad[5:]
        dtype = grad_out.dtype
        grad_x = grad_w = grad_b = grad_weight = None
        if need_x:
            grad_x = (grad_out @ w_eff.to(dtype)).to(x.dtype)
        g2 = grad_out.reshape(-1, grad_out.shape[-1])  # (tokens, out)
        x2 = x.reshape(-1, x.shape[-1])  # (tokens, in)
        if any(need and not getattr(d, "sparsegrad_routed", False) for d, need in zip(ctx.deltas, need_deltas)):
            raise RuntimeError(ROUTING_ERROR)

        def dense_grad() -> torch.Tensor:  # ∂L/∂W: out × in, computed at most once
            nonlocal grad_weight
            if grad_weight is None:
                grad_weight = g2.T @ x2.to(dtype)
            return grad_weight

        if need_w:
            grad_w = dense_grad().to(ctx.weight_dtype)
        if need_b:
            grad_b = g2.sum(0).to(ctx.bias_dtype)
        grad_deltas = []
        for pair, need, delta in zip(ctx.pairs, need_deltas, ctx.deltas):
            support = getattr(delta, "sparsegrad_support", None) if need else None
            if need:
                delta.sparsegrad_grad_support = support  # lets the optimizer check which support this grad covers
            if not need:
                grad_deltas.append(None)
            elif support is not None:
                # selection="periodic" between refreshes: the optimizer reads ΔW'.grad only at the fixed support S,
                # so only (U_outᵀ (∂L/∂W) U_in)[S] is computed; the rest of the dense grad stays 0.
                values = pair.rotate_at(dense_grad(), support)
                grad = torch.zeros(delta.numel(), dtype=delta.dtype, device=delta.device)
                grad_deltas.append(grad.index_copy_(0, support.flat, values.to(delta.dtype)).view_as(delta))
            elif grad_weight is None and pair.prefers_activations(g2.shape[0]):
                grad_deltas.append(pair.rotate_from_activations(g2, x2).to(delta.dtype))
            else:
                grad_deltas.append(pair.rotate(dense_grad().float()).to(delta.dtype))
        return (grad_x, grad_w, None, grad_b, None, *grad_deltas)


class SparseGradLayer(BaseTunerLayer):
    """Adapter state of one layer; ``SparseGradLinear`` adds forward/merge."""

    adapter_layer_names = ("sparsegrad_delta",)
    other_param_names = ("sparsegrad_k", "sparsegrad_keep_ratio", "sparsegrad_bases", "sparsegrad_type",
                         "sparsegrad_refresh_interval")

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.sparsegrad_delta = nn.ParameterDict({})  # adapter -> ΔW' (out × in, float32)
        self.sparsegrad_k: dict[str, int] = {}  # adapter -> k = ⌈keep_ratio · out · in⌉
        self.sparsegrad_keep_ratio: dict[str, float] = {}
        self.sparsegrad_bases: dict[str, Optional[BasisPair]] = {}  # None until loaded from a checkpoint
        self.sparsegrad_type: dict[str, str] = {}  # adapter -> layer type key (shares bases)
        self.sparsegrad_refresh_interval: dict[str, int] = {}  # adapter -> steps between support refreshes, 0: dynamic
        self._weight_cache: Optional[_WeightCache] = None
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        base = self.get_base_layer()
        self.out_features, self.in_features = weight_shape(base)
        self.is_conv1d = is_conv1d(base)
        self.kwargs = kwargs

    def update_layer(
        self,
        adapter_name: str,
        keep_ratio: float,
        bases: Optional[BasisPair],
        layer_type: str,
        init_weights: bool = True,
        inference_mode: bool = False,
        refresh_interval: int = 0,
    ) -> None:
        if not 0.0 < keep_ratio <= 1.0:
            raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio}.")
        weight = self.get_base_layer().weight
        shape = (self.out_features, self.in_features)
        if init_weights:
            delta = torch.zeros(shape, dtype=torch.float32, device=weight.device)
        else:  # tests only: a non-trivial adapter without training
            delta = torch.randn(shape, dtype=torch.float32, device=weight.device) * 0.02
        self.sparsegrad_k[adapter_name] = max(1, math.ceil(keep_ratio * shape[0] * shape[1]))
        self.sparsegrad_refresh_interval[adapter_name] = int(refresh_interval)
        self._register_delta(adapter_name, delta)
        self.sparsegrad_keep_ratio[adapter_name] = keep_ratio
        self.sparsegrad_bases[adapter_name] = bases
        self.sparsegrad_type[adapter_name] = layer_type
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device: Optional[torch.device] = None) -> None:
        """Device only: ΔW' stays float32 on bf16/fp16 base models (small updates would vanish in half precision)."""
        if device is None:
            device = self.get_base_layer().weight.device
        delta = self.sparsegrad_delta[adapter_name] if adapter_name in self.sparsegrad_delta else None
        if delta is None:
            return
        if delta.device != device and delta.device.type != "meta":
            self._register_delta(adapter_name, delta.data.to(device), delta.requires_grad)
        else:  # e.g. after load_state_dict(assign=True) replaced the Parameter object
            self._mark_delta(adapter_name)

    def _register_delta(self, adapter_name: str, data: torch.Tensor, requires_grad: bool = True) -> None:
        self.sparsegrad_delta[adapter_name] = nn.Parameter(data, requires_grad=requires_grad)
        # Marks ΔW' for the sparse optimizer. ``sparsegrad_routed`` is set by whatever will apply the top-k update
        # (SparseGradOptimizer, SparseGradCallback); backward refuses to produce ΔW' gradients without it.
        # Set on the *registered* object, after registration: PEFT's init_empty_weights (low_cpu_mem_usage=True)
        # re-creates the Parameter on the meta device passing its __dict__ as keyword arguments to nn.Parameter.
        self._mark_delta(adapter_name)

    def _mark_delta(self, adapter_name: str) -> None:
        """What the optimizer reads off ΔW': its k and its refresh interval (0 = dynamic selection)."""
        delta = self.sparsegrad_delta[adapter_name]
        delta.sparsegrad_k = self.sparsegrad_k[adapter_name]
        delta.sparsegrad_refresh_interval = self.sparsegrad_refresh_interval.get(adapter_name, 0)

    def pair(self, adapter_name: str, device: torch.device) -> BasisPair:
        pair = self.sparsegrad_bases[adapter_name]
        if pair is None:
            raise ValueError(
                f"Adapter '{adapter_name}' has no bases: they come from the saved adapter weights. Load it with "
                "PeftModel.from_pretrained (after `import peft_sparsegrad`) or create it with calibration data."
            )
        return pair.to(device)

    @torch.no_grad()
    def effective_weight(self, adapter_names: list[str], weight: torch.Tensor) -> torch.Tensor:
        """W_eff = W + Σ_a U_out ΔW'_a U_inᵀ (out × in, W's dtype), recomputed only when W or a ΔW' changed.

        The optimizer changes ΔW' in place, which bumps its version counter; that is the cache key. While every ΔW'
        is zero this is W itself (no copy). After an optimizer step that changed only some entries of ΔW' (it leaves a
        ``ChangeRecord`` on ΔW'), a float32 W_eff is updated in place by U_out δ U_inᵀ for that sparse δ
        (``BasisPair.unrotate_sparse``) instead of being rebuilt from the whole ΔW', whose support keeps growing;
        every ``FULL_REBUILD_EVERY`` updates it is rebuilt from scratch so float32 rounding cannot accumulate.
        """
        deltas = [self.sparsegrad_delta[a] for a in adapter_names]
        versions = tuple(d._version for d in deltas)
        key = (tuple(adapter_names), tuple(d.data_ptr() for d in deltas), weight._version, weight.data_ptr(),
               weight.device)
        cache = self._weight_cache
        if cache is not None and cache.key == key:
            if cache.versions == versions:
                return cache.w_eff
            if self._update_incrementally(cache, adapter_names, deltas, versions, weight):
                return cache.w_eff
        w_eff = weight
        for name, delta in zip(adapter_names, deltas):
            if delta.any():
                change = self.pair(name, weight.device).unrotate(delta.detach().to(weight.device, torch.float32))
                w_eff = (w_eff.float() + change).to(weight.dtype)
        self._weight_cache = _WeightCache(key, versions, w_eff, 0)
        return w_eff

    def _update_incrementally(self, cache: "_WeightCache", adapter_names: list[str], deltas: list[torch.Tensor],
                              versions: tuple[int, ...], weight: torch.Tensor) -> bool:
        """W_eff += U_out δ U_inᵀ for every ΔW' whose only change since the cache is its last ``ChangeRecord``."""
        w_eff = cache.w_eff
        # W_eff shares W's storage while every ΔW' was zero (a fresh view each call for Conv1D, hence the pointer
        # test): never update the base weight in place
        if w_eff.data_ptr() == weight.data_ptr() or w_eff.dtype != torch.float32 or cache.updates >= FULL_REBUILD_EVERY:
            return False
        records = []  # (adapter, record) of every ΔW' that changed
        for name, delta, old, new in zip(adapter_names, deltas, cache.versions, versions):
            if old == new:
                continue
            record = getattr(delta, "sparsegrad_last_change", None)
            if record is None or record.version_before != old or record.version_after != new:
                return False
            records.append((name, record))
        for name, record in records:
            pair = self.pair(name, w_eff.device)
            w_eff.add_(pair.unrotate_sparse(record.flat.to(w_eff.device), record.change.to(w_eff.device),
                                            tuple(w_eff.shape)))
        cache.versions = versions
        cache.updates += 1
        return True

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """ΔW in the base layer's own layout (in × out for Conv1D) and dtype: what merge adds."""
        weight = self.get_base_layer().weight
        delta = self.pair(adapter_name, weight.device).unrotate(self.sparsegrad_delta[adapter_name].detach().float())
        return (delta.T if self.is_conv1d else delta).to(weight.dtype)


class SparseGradLinear(nn.Module, SparseGradLayer):
    """A torch.nn.Linear or transformers Conv1D trained with SparseGrad."""

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        keep_ratio: float,
        bases: Optional[BasisPair],
        layer_type: str,
        init_weights: bool = True,
        refresh_interval: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        SparseGradLayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, keep_ratio, bases, layer_type, init_weights, refresh_interval=refresh_interval)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """W += U_out ΔW' U_inᵀ for each adapter (computed in float32, stored in the base weight's dtype)."""
        adapter_names = check_adapters_to_merge(self, adapter_names)
        weight = self.get_base_layer().weight
        for name in adapter_names:
            if name not in self.sparsegrad_delta:
                continue
            merged = weight.data.float() + self.get_delta_weight(name).float()
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(f"NaNs detected in the merged weights. The adapter {name} seems to be broken")
            weight.data.copy_(merged.to(weight.dtype))
            self.merged_adapters.append(name)
            self._weight_cache = None  # writes through .data don't bump the version counter the cache is keyed on

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        weight = self.get_base_layer().weight
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name in self.sparsegrad_delta:
                weight.data.copy_((weight.data.float() - self.get_delta_weight(name).float()).to(weight.dtype))
        self._weight_cache = None

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        active = [a for a in self.active_adapters if a in self.sparsegrad_delta]
        if not active:
            return self.base_layer(x, *args, **kwargs)
        base = self.get_base_layer()
        weight = base_weight_as_out_in(base)  # out × in
        w_eff = self.effective_weight(active, weight)
        pairs = [self.pair(name, weight.device) for name in active]
        deltas = [self.sparsegrad_delta[name] for name in active]
        return _SparseGradLinearFunction.apply(x, weight, w_eff, base.bias, pairs, *deltas)

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        return False

    def __repr__(self) -> str:
        return "sparsegrad." + super().__repr__()
