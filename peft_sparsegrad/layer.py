"""SparseGradLinear: a Linear/Conv1D layer trained in the rotated basis W' = U_outᵀ W U_in, in place.

Conventions (README notation): W is out × in (for transformers' Conv1D the stored weight is in × out and is viewed as
Wᵀ here); x is (..., in); y = x Wᵀ + b. The paper writes weights as in × out (y = x W), so its Table 2 maps as
``paper U_in  <-> our U_in`` (rows of the paper's W = input features) and ``paper U_out <-> our U_out``; the paper's
rotated weight U_inᵀ W_paper U_out is our (U_outᵀ W U_in)ᵀ. The authors' scripts use the transpose of U_in on the input
side and rotate the bias gradient: both are bugs and not reproduced here.

Training happens *in place*: the base weight W holds W₀ + U_out ΔW' U_inᵀ at all times while the adapter is active, so
forward and backward are exactly the plain layer's (no custom autograd function, no copy of W), ``W.grad`` is the
ordinary weight gradient ∂L/∂W, and gradient accumulation, clipping (its norm equals the rotated gradient's: the bases
are orthogonal), autocast, activation checkpointing and the DDP all-reduce work unchanged. The sparse optimizer
(``peft_sparsegrad.optim``) rotates ``W.grad``, keeps its top-k entries, updates those entries of ΔW' and calls
``apply_change``, which adds U_out δ U_inᵀ for the changed entries δ to W.

The adapter itself is ΔW' on its support (``SparseDelta``: int32 flat indices + float32 values), never dense. For
bf16/fp16 base weights, updates far below W's rounding step must not vanish: by default they are rounded
stochastically (unbiased, no memory), or with ``rounding="compensated"`` a residual of W's dtype keeps what rounding
loses (W + residual carries ~16 significant bits for bf16), see ``peft_sparsegrad.rounding``.

Bookkeeping: ``_applied`` lists the adapters whose ΔW is currently in W. It always equals the active adapters plus the
merged ones: ``set_adapter``, ``merge``, ``unmerge`` and ``delete_adapter`` add or subtract ΔW = U_out ΔW' U_inᵀ in
place. ``disable_adapter()`` changes nothing in place; the forward then computes W₀ = W − Σ ΔW on the fly (one dense
temporary per layer, freed after the forward), so leaving the context restores the adapted model exactly, also in the
middle of training (TRL's DPO reference pass). Unloading subtracts what is not merged.
"""

from __future__ import annotations

import math
import warnings
import weakref
from typing import Any, Optional

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from .delta import SparseDelta
from .rotation import BasisPair, block_rows
from .rounding import add_to_half_, mix_seed
from .sharded import is_sharded, local, local_rows
from .targets import base_weight_as_out_in, is_conv1d, weight_shape

ROUTING_ERROR = (
    "SparseGrad parameters must be updated by the sparse optimizer, otherwise an ordinary optimizer would apply dense "
    "(and weight-decayed) updates to the adapted weights. With the Hugging Face Trainer pass "
    "callbacks=[peft_sparsegrad.SparseGradCallback()]; in a plain loop build the optimizer with "
    "peft_sparsegrad.create_sparsegrad_optimizer(model, lr=...)."
)

#: Attribute names set on a trainable adapted weight W (a ``torch.nn.Parameter`` of the base layer).
OWNER_ATTR = "sparsegrad_owner"  # the SparseGradLayer whose trainable adapter W is
ROUTED_ATTR = "sparsegrad_routed"  # set by whatever applies the sparse update (optimizer / callback)
CALIBRATING_ATTR = "sparsegrad_calibrating"  # set by the calibration pass, which consumes W.grad itself


class SparseGradLayer(BaseTunerLayer):
    """Adapter state of one layer; ``SparseGradLinear`` adds forward/merge."""

    adapter_layer_names = ("sparsegrad_delta",)
    other_param_names = ("sparsegrad_k", "sparsegrad_keep_ratio", "sparsegrad_bases", "sparsegrad_type",
                         "sparsegrad_refresh_interval", "sparsegrad_bases_dtype", "sparsegrad_rounding",
                         "sparsegrad_compute_dtype",
                         "sparsegrad_max_support")

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.sparsegrad_delta: dict[str, SparseDelta] = {}  # adapter -> ΔW' on its support
        self.sparsegrad_k: dict[str, int] = {}  # adapter -> k = ⌈keep_ratio · out · in⌉
        self.sparsegrad_keep_ratio: dict[str, float] = {}
        self.sparsegrad_bases: dict[str, Optional[BasisPair]] = {}  # None until loaded from a checkpoint / calibrated
        self.sparsegrad_type: dict[str, str] = {}  # adapter -> layer type key (shares bases)
        self.sparsegrad_refresh_interval: dict[str, int] = {}  # adapter -> steps between support refreshes, 0: dynamic
        self.sparsegrad_bases_dtype: dict[str, str] = {}  # adapter -> SparseGradConfig.bases_dtype
        self.sparsegrad_rounding: dict[str, str] = {}  # adapter -> SparseGradConfig.rounding
        self.sparsegrad_compute_dtype: dict[str, str] = {}  # adapter -> SparseGradConfig.compute_dtype
        self.sparsegrad_max_support: dict[str, Optional[int]] = {}  # adapter -> most entries ΔW' may hold (None: any)
        self._applied: list[str] = []  # adapters whose ΔW is in the base weight right now
        self._trainable: list[str] = []  # active adapters that train (not inference mode)
        self._residual: Optional[torch.Tensor] = None  # low part of W (rounding="compensated", half precision)
        self._routing_hook = None
        self.sparsegrad_support_cache: dict[str, Any] = {}  # adapter -> periodic Support (its block pattern)
        #: a number from the module's name (set by the tuner): part of the seed of its stochastic rounding
        self.sparsegrad_rounding_key: int = 0
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        base = self.get_base_layer()
        self.out_features, self.in_features = weight_shape(base)
        self.is_conv1d = is_conv1d(base)
        self.kwargs = kwargs

    # ---- adapters -------------------------------------------------------------------------------------------------

    def update_layer(
        self,
        adapter_name: str,
        keep_ratio: float,
        bases: Optional[BasisPair],
        layer_type: str,
        init_weights: bool = True,
        inference_mode: bool = False,
        refresh_interval: int = 0,
        bases_dtype: str = "float16",
        rounding: str = "stochastic",
        max_support: Optional[float] = None,
        compute_dtype: str = "auto",
    ) -> None:
        if not 0.0 < keep_ratio <= 1.0:
            raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio}.")
        weight = self.get_base_layer().weight
        shape = (self.out_features, self.in_features)
        if init_weights or bases is None:
            delta = SparseDelta.empty(shape, weight.device)
        else:  # tests only: a non-trivial adapter without training
            delta = SparseDelta.from_dense(torch.randn(shape, device=weight.device) * 0.02)
        k = self.sparsegrad_k[adapter_name] = max(1, math.ceil(keep_ratio * shape[0] * shape[1]))
        self.sparsegrad_max_support[adapter_name] = None if max_support is None else max(k, math.ceil(max_support * k))
        self.sparsegrad_rounding[adapter_name] = rounding
        self.sparsegrad_compute_dtype[adapter_name] = compute_dtype
        self.sparsegrad_refresh_interval[adapter_name] = int(refresh_interval)
        self.sparsegrad_delta[adapter_name] = delta
        self.sparsegrad_keep_ratio[adapter_name] = keep_ratio
        self.sparsegrad_bases[adapter_name] = bases
        self.sparsegrad_type[adapter_name] = layer_type
        self.sparsegrad_bases_dtype[adapter_name] = bases_dtype
        if adapter_name in self.active_adapters:
            self.set_adapter(self.active_adapters, inference_mode=inference_mode)
        # an added, inactive adapter changes nothing: the active one keeps W and its trainability

    def set_adapter(self, adapter_names: str | list[str], inference_mode: bool = False) -> None:
        """Activate adapters: their ΔW goes into W (others' comes out); the active ones train unless inference_mode."""
        if isinstance(adapter_names, str):
            adapter_names = [adapter_names]
        self._active_adapter = list(adapter_names)
        self._trainable = [] if inference_mode else [a for a in adapter_names if a in self.sparsegrad_delta]
        self._sync_applied()
        self.update_trainability()

    def enable_adapters(self, enabled: bool) -> None:
        """Disabling changes nothing in place (the forward computes W₀ on the fly), so enabling restores exactly."""
        self._disable_adapters = not enabled

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name in self._applied:
            self._add_adapter(adapter_name, -1.0)
            self._applied.remove(adapter_name)
        if adapter_name in self._trainable:
            self._trainable.remove(adapter_name)
        if adapter_name in self.merged_adapters:
            self.merged_adapters.remove(adapter_name)
        self.sparsegrad_support_cache.pop(adapter_name, None)
        super().delete_adapter(adapter_name)
        self.update_trainability()

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device: Optional[torch.device] = None) -> None:
        """Device only: ΔW' stays float32 on bf16/fp16 base models (small updates would vanish in half precision)."""
        device = device if device is not None else self.get_base_layer().weight.device
        if adapter_name in self.sparsegrad_delta and device.type != "meta":
            self.sparsegrad_delta[adapter_name].to(device)

    def delta(self, adapter_name: str) -> SparseDelta:
        """ΔW' of ``adapter_name``, on the base weight's device."""
        return self.sparsegrad_delta[adapter_name].to(self.get_base_layer().weight.device)

    def pair(self, adapter_name: str, device: Optional[torch.device] = None) -> BasisPair:
        pair = self.sparsegrad_bases[adapter_name]
        if pair is None:
            raise ValueError(
                f"Adapter '{adapter_name}' has no bases yet: they come from the saved adapter weights "
                "(PeftModel.from_pretrained after `import peft_sparsegrad`), from calibration_dataloader, or — with "
                "calibration_steps and no data — from the Trainer's first batches (needs SparseGradCallback)."
            )
        storage = self._bases_storage_dtype(adapter_name)
        if not pair.is_identity and pair.U_out.dtype != storage:
            # stored as config.bases_dtype says (float16 for half-precision weights by default), shared per type
            pair = self.sparsegrad_bases[adapter_name] = pair.stored_as(storage)
        return pair.to(device if device is not None else self.get_base_layer().weight.device)

    # ---- training -------------------------------------------------------------------------------------------------

    def trainable_adapter(self) -> Optional[str]:
        """The adapter W.grad trains, or None. Two trainable adapters of one layer would share one W.grad."""
        if len(self._trainable) > 1:
            raise ValueError(
                f"Adapters {self._trainable} of this layer are all active and trainable, but SparseGrad trains one "
                "adapter per layer at a time (they share the base weight's gradient). Train one "
                "(model.set_adapter(name)) and load the others with is_trainable=False, or activate them only for "
                "inference."
            )
        return self._trainable[0] if self._trainable else None

    def update_trainability(self) -> None:
        """W requires grad iff an adapter of this layer trains; mark W for the optimizer and guard its gradient."""
        weight = self.get_base_layer().weight
        trainable = bool(self._trainable)
        weight.requires_grad_(trainable)
        if trainable:
            setattr(weight, OWNER_ATTR, self)
            if self._routing_hook is None or self._routing_hook[0]() is not weight:  # new: e.g. FSDP2 replaced W
                self._routing_hook = (weakref.ref(weight), weight.register_hook(_check_routed(weight)))
        else:
            self._release_weight()

    def _release_weight(self) -> None:
        weight = self.get_base_layer().weight
        for attr in (OWNER_ATTR, ROUTED_ATTR):
            if hasattr(weight, attr):
                delattr(weight, attr)
        if self._routing_hook is not None:
            self._routing_hook[1].remove()
            self._routing_hook = None

    @torch.no_grad()
    def apply_change(self, adapter_name: str, flat: torch.Tensor, change: torch.Tensor,
                     positions: Optional[torch.Tensor] = None, support: Optional[Any] = None,
                     rounding_seed: Optional[int] = None) -> None:
        """ΔW'[flat] += change (flat: sorted int64 indices already in the support, at ``positions`` of it if known)
        and W += U_out δ U_inᵀ (``support``: δ is on this periodic Support, in its order).

        What every optimizer update ends with: δ is sparse (k entries, or the support), so U_out δ U_inᵀ touches only
        the rows/columns of U that δ occupies, and it reaches W in blocks (``BasisPair.unrotated_blocks``), rounded
        as ``rounding`` says (``rounding_seed``: the seed of this step's stochastic rounding); with U = I (MeProp)
        only those entries of W change.
        """
        delta = self.delta(adapter_name)
        delta.values.index_add_(0, delta.positions(flat) if positions is None else positions, change.float())
        if adapter_name in self._applied:
            pair = self.pair(adapter_name)
            mode = self._update_mode(training=True)
            if pair.is_identity:
                self._add_sparse_to_weight(flat, change.float(), mode, rounding_seed)
            else:
                self._add_blocks_to_weight(pair.unrotated_blocks(flat, change, (self.out_features, self.in_features),
                                                                 self.compute_dtype(), support=support,
                                                                 rows=self._local_rows()), mode, rounding_seed)

    @torch.no_grad()
    def set_delta(self, adapter_name: str, new: SparseDelta) -> None:
        """Replace ΔW' (e.g. from a checkpoint); W follows by the difference if the adapter is applied."""
        old = self.sparsegrad_delta[adapter_name]
        device = self.get_base_layer().weight.device
        new.to(device)
        if adapter_name in self._applied and (old.nnz or new.nnz):
            pair = self.pair(adapter_name)
            self._add_dense_to_weight(pair.unrotate(new.to_dense() - old.to(device).to_dense()))
        self.sparsegrad_delta[adapter_name] = new

    # ---- the base weight ------------------------------------------------------------------------------------------

    def _weight_out_in(self) -> torch.Tensor:
        """W (out × in); for a weight sharded by FSDP2, the rows this rank holds (a view of the local shard)."""
        return local(base_weight_as_out_in(self.get_base_layer()))

    def _local_rows(self) -> Optional[tuple[int, int]]:
        """(first, end) rows of W this rank holds under FSDP2, None for a whole W."""
        weight = self.get_base_layer().weight
        return local_rows(weight) if is_sharded(weight) else None

    def _is_half(self) -> bool:
        return self.get_base_layer().weight.dtype in (torch.float16, torch.bfloat16)

    def _bases_storage_dtype(self, adapter_name: str) -> torch.dtype:
        choice = self.sparsegrad_bases_dtype.get(adapter_name, "float16")
        half = choice == "float16" or (choice == "auto" and self._is_half())
        return torch.float16 if half else torch.float32

    def compute_dtype(self) -> torch.dtype:
        """Precision of the training step's dense products (``SparseGradConfig.compute_dtype`` of the active adapter).
        "auto": bf16 for bf16/fp16 weights on an accelerator (their gradient has that precision anyway), float32 on
        CPU, where bf16 GEMMs buffer float32 copies of their operands, and for float32 weights. ΔW', moments and the
        weight update stay float32 (the bases are stored as ``bases_dtype`` says, see ``BasisPair``)."""
        choice = next((self.sparsegrad_compute_dtype[a] for a in self.active_adapters
                       if a in self.sparsegrad_compute_dtype), "auto")
        if choice == "auto":
            weight = self.get_base_layer().weight
            return torch.bfloat16 if self._is_half() and weight.device.type != "cpu" else torch.float32
        return getattr(torch, choice)

    def _update_mode(self, training: bool) -> Optional[str]:
        """How a change reaches W: None (float32 W: plain addition), "compensated" (a residual exists or an adapter
        of this layer asks for one), "stochastic" (training steps of the default), "nearest" (merges, loading)."""
        if not self._is_half():
            return None
        if self._residual is not None or "compensated" in self.sparsegrad_rounding.values():
            return "compensated"
        return "stochastic" if training else "nearest"

    def _true_weight(self) -> torch.Tensor:
        """W (+ residual) in float32, out × in: what W represents (always a new tensor)."""
        w = self._weight_out_in().detach().to(torch.float32, copy=True)
        return w if self._residual is None else w.add_(self._residual)  # promotes in the kernel: no temporary

    @torch.no_grad()
    def _add_blocks_to_weight(self, blocks, mode: Optional[str], seed: Optional[int] = None) -> None:
        """W[index] += block for every (index, block) of ``blocks`` (blocks of one change of W, out × in layout);
        block i of a stochastically rounded change draws from ``mix_seed(seed, i)``."""
        w = self._weight_out_in()
        if mode == "compensated" and self._residual is None:
            self._residual = torch.zeros_like(w)  # same strides as W's view: its storage is laid out like W's
        for i, (index, block) in enumerate(blocks):
            if mode is None:
                w[index].add_(block)
            else:
                add_to_half_(w[index], block, mode, None if self._residual is None else self._residual[index],
                             None if seed is None else mix_seed(seed, i))

    @torch.no_grad()
    def _add_dense_to_weight(self, change: torch.Tensor, training: bool = False) -> None:
        """W += change (out × in, float32 or the compute dtype), in row blocks whose float32 temporaries stay small."""
        rows = self._local_rows()
        if rows is not None:  # sharded: this rank's rows of the change
            change = change[rows[0]:rows[1]]
        w = self._weight_out_in()
        step = block_rows(w.shape[0], w.shape[1], w.device)
        rows = (slice(r, r + step) for r in range(0, w.shape[0], step))
        self._add_blocks_to_weight((((r, slice(None)), change[r]) for r in rows), self._update_mode(training))

    @torch.no_grad()
    def _add_sparse_to_weight(self, flat: torch.Tensor, change: torch.Tensor, mode: Optional[str],
                              seed: Optional[int] = None) -> None:
        """MeProp: δ is in the original basis, only entries ``flat`` of W change."""
        flat = flat.long()
        w = self._weight_out_in()
        if self.is_conv1d:  # storage is in × out: entry (r, c) of W sits at c · out + r
            rows, cols = flat.div(self.in_features, rounding_mode="floor"), flat.remainder(self.in_features)
            flat = cols * self.out_features + rows
        shard = self._local_rows()
        if shard is not None:  # sharded rows first:end: the entries there, indexed in the local shard
            mine = (flat >= shard[0] * self.in_features) & (flat < shard[1] * self.in_features)
            flat, change = flat[mine] - shard[0] * self.in_features, change[mine]
        storage = local(self.get_base_layer().weight).view(-1)
        if mode is None:
            storage.index_add_(0, flat, change.to(storage.dtype))
            return
        if mode == "compensated" and self._residual is None:
            self._residual = torch.zeros_like(w)  # same strides as W's view: its storage is laid out like W's
        w_sel = storage.index_select(0, flat)
        residual = None
        if self._residual is not None:
            residual_flat = self._residual.T.reshape(-1) if self.is_conv1d else self._residual.view(-1)  # views
            residual = residual_flat.index_select(0, flat)
        add_to_half_(w_sel, change, mode, residual, seed)
        storage.index_copy_(0, flat, w_sel)
        if residual is not None:
            residual_flat.index_copy_(0, flat, residual)

    @torch.no_grad()
    def _add_adapter(self, adapter_name: str, sign: float) -> None:
        """W += sign · U_out ΔW' U_inᵀ for one adapter."""
        delta = self.delta(adapter_name)
        if delta.nnz == 0:
            return
        pair = self.pair(adapter_name)
        values, mode = delta.values * sign, self._update_mode(training=False)
        if pair.is_identity:
            self._add_sparse_to_weight(delta.flat, values, mode)
        else:
            self._add_blocks_to_weight(pair.unrotated_blocks(delta.flat, values, delta.shape), mode)

    @torch.no_grad()
    def _sync_applied(self) -> None:
        """Make W hold W₀ + Σ ΔW over the active and the merged adapters (in place)."""
        wanted = [a for a in dict.fromkeys(self.merged_adapters + list(self.active_adapters))
                  if a in self.sparsegrad_delta]
        for name in [a for a in self._applied if a not in wanted]:
            self._add_adapter(name, -1.0)
            self._applied.remove(name)
        for name in [a for a in wanted if a not in self._applied]:
            self._add_adapter(name, 1.0)
            self._applied.append(name)
        if not self._applied and self._residual is not None:
            self._drop_residual()

    def _drop_residual(self) -> None:
        """Fold the residual into W (rounded) and free it: W is a plain weight again."""
        w = self._weight_out_in()
        with torch.no_grad():
            w.copy_(self._true_weight())
        self._residual = None

    @torch.no_grad()
    def base_weight(self) -> torch.Tensor:
        """W₀ = W − Σ ΔW over the applied adapters (out × in, W's dtype; a new tensor): the weight without adapters."""
        w = self._weight_out_in()
        if not any(self.sparsegrad_delta[a].nnz for a in self._applied):
            return w.detach()
        total = self._true_weight()
        for name in self._applied:
            delta = self.delta(name)
            if delta.nnz:
                total.sub_(self.pair(name).unrotate(delta.to_dense()))
        return total.to(w.dtype)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """ΔW in the base layer's own layout (in × out for Conv1D) and dtype: what merging adds."""
        weight = self.get_base_layer().weight
        delta = self.pair(adapter_name).unrotate(self.delta(adapter_name).to_dense())
        return (delta.T if self.is_conv1d else delta).to(weight.dtype)

    def unload_weight(self) -> None:
        """Before the base layer replaces this one: W keeps only the merged adapters, no hooks, frozen."""
        with torch.no_grad():
            for name in [a for a in self._applied if a not in self.merged_adapters]:
                self._add_adapter(name, -1.0)
                self._applied.remove(name)
            if self._residual is not None:
                self._drop_residual()
        self._trainable = []
        self._release_weight()
        self.get_base_layer().weight.requires_grad_(False)


def _check_routed(weight: torch.Tensor):
    def hook(grad: torch.Tensor) -> None:
        if not (getattr(weight, ROUTED_ATTR, False) or getattr(weight, CALIBRATING_ATTR, False)):
            raise RuntimeError(ROUTING_ERROR)

    return hook


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
        bases_dtype: str = "float16",
        rounding: str = "stochastic",
        max_support: Optional[float] = None,
        compute_dtype: str = "auto",
        **kwargs: Any,
    ) -> None:
        super().__init__()
        SparseGradLayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, keep_ratio, bases, layer_type, init_weights, refresh_interval=refresh_interval,
                          bases_dtype=bases_dtype, rounding=rounding, max_support=max_support,
                          compute_dtype=compute_dtype)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Mark adapters as merged; ΔW of an adapter that is not active yet is added to W (float32 arithmetic)."""
        adapter_names = check_adapters_to_merge(self, adapter_names)
        for name in adapter_names:
            if name not in self.sparsegrad_delta:
                continue
            if name not in self._applied:
                if safe_merge:
                    change = self.pair(name).unrotate(self.delta(name).to_dense())
                    if not torch.isfinite(self._true_weight() + change).all():
                        raise ValueError(f"NaNs detected in the merged weights. The adapter {name} seems to be broken")
                with torch.no_grad():
                    self._add_adapter(name, 1.0)
                self._applied.append(name)
            elif safe_merge and not torch.isfinite(self._weight_out_in()).all():
                raise ValueError(f"NaNs detected in the merged weights. The adapter {name} seems to be broken")
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        self.merged_adapters = []
        self._sync_applied()  # the active adapters stay in W, the others come out

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if not self.disable_adapters:
            return self.base_layer(x, *args, **kwargs)  # W already is W₀ + Σ ΔW: the plain layer
        # disabled: the base model's output, W₀ computed on the fly; no gradient reaches W (or the adapter)
        base = self.get_base_layer()
        with torch.no_grad():
            w0 = self.base_weight()
        return F.linear(x, w0, base.bias)

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        return False

    def __repr__(self) -> str:
        return "sparsegrad." + super().__repr__()
