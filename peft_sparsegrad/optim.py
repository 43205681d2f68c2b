"""The sparse update of SparseGrad (Chekalina et al., EMNLP 2024) and an optimizer for plain training loops.

The trainable tensor of an adapted layer is its base weight W itself (``peft_sparsegrad.layer``): backward leaves
the ordinary dense gradient G = ∂L/∂W in ``W.grad``, so gradient accumulation, clipping and the DDP all-reduce are
untouched. Sparsity is imposed here, once per optimizer step: G is rotated, g = U_outᵀ G U_in, only the k entries of
g with the largest |g| are used (k = ⌈keep_ratio · out · in⌉); every other entry of g counts as 0. The update δ of
those entries of ΔW' goes back into W as U_out δ U_inᵀ (``SparseGradLayer.apply_change``).

Notation: g = rotated gradient, sel = the k selected flat indices, m / v = first / second moment, t = the step count,
β1, β2, ε, lr, wd as usual. Three update rules (``SPARSE_MODES``), all with state on the support only:

* ``"sparse_adam"`` (paper-faithful) - exactly ``torch.optim.SparseAdam`` fed the top-k sparse gradient, i.e. *lazy*
  Adam: m, v and ΔW' change only at sel; entries not selected this step keep their moments frozen and do not move.
  SparseAdam's moments are dense, but the moments of entries never selected are zero and never read, so they are kept
  only on the support of ΔW' (the entries ever selected): the same arithmetic at O(support) memory. Optional
  decoupled weight decay, also only at sel.
* ``"adamw"`` (lean, default) - *regular* AdamW restricted to the support S = all entries ever selected: every step
  all of S is updated with g = 0 off sel (moments decay, entries keep moving with momentum) and weight decay applies
  on all of S. With k = numel it is exactly ``torch.optim.AdamW`` on W'.
* ``"sgd"`` - ΔW'[sel] -= lr · (g[sel] + wd · ΔW'[sel]); no moments. With k = numel and U = I it is exactly
  ``torch.optim.SGD`` on W (used to check keep_ratio = 1 ≡ full fine-tuning).

Selection. By default (``refresh_interval`` 0, ``selection="dynamic"``) the top-k is re-selected from the full
rotated gradient every step. With ``refresh_interval`` N > 0 (``selection="periodic"``) the support S of k entries is
selected every N-th step and fixed in between, when only g[S] is computed (``BasisPair.rotate_at``) and "adamw" or
"sgd" runs on the k-vector ΔW'[S] (moments of length k).

State. ΔW' (values + int32 indices) lives in the layer: it is the adapter. Everything else of one weight is a
``SparseState`` stored under the key ``"sparsegrad"`` of that weight's optimizer state, next to ``"step"``. It is one
object rather than loose tensors because torch's ``Optimizer.load_state_dict`` casts every tensor of a parameter's
state to the parameter's dtype (bf16 for a bf16 model: indices and float32 moments would be destroyed); the class is
registered with ``torch.serialization.add_safe_globals`` so that ``weights_only`` loads (the Trainer's) accept it.

All other (dense) trainable parameters (classifier heads, ...) are plain AdamW in the same ``SparseGradOptimizer``
object, so a single optimizer / LR scheduler / checkpoint covers the model.
"""

from __future__ import annotations

import math
import operator
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from itertools import chain
from typing import Any, Optional

import numpy as np
import torch

from .bases import Support
from .layer import OWNER_ATTR, ROUTED_ATTR, SparseGradLayer

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

SPARSE_MODES = ("adamw", "sparse_adam", "sgd")
STATE_KEY = "sparsegrad"


def _check_mode(mode: str) -> None:
    if mode not in SPARSE_MODES:
        raise ValueError(f"unknown SparseGrad optimizer mode {mode!r}; expected one of {SPARSE_MODES}")


def _scalar(x: Any) -> float:
    # LR schedulers may store a 1-element tensor lr; the math below wants python floats.
    return float(x.item()) if isinstance(x, torch.Tensor) else float(x)


@dataclass
class SparseState:
    """Optimizer state of one adapted weight besides its step count (see the module docstring for why an object).

    ``indices`` are the sorted flat int32 entries the moments belong to: the support of ΔW' for the dynamic modes
    (the same tensor as the layer's ``SparseDelta.flat`` while they agree, so it is stored once), the fixed top-k
    support S for ``selection="periodic"``.
    """

    mode: str
    exp_avg: Optional[torch.Tensor] = None
    exp_avg_sq: Optional[torch.Tensor] = None
    indices: Optional[torch.Tensor] = None
    prev_selected: Optional[torch.Tensor] = None  # int32 flat, the last selection (for the overlap statistic)
    selected_at: int = -1  # periodic: the step count when S was selected

    def to(self, device: torch.device) -> "SparseState":
        for name in ("exp_avg", "exp_avg_sq", "indices", "prev_selected"):
            value = getattr(self, name)
            if value is not None and value.device != device:
                setattr(self, name, value.to(device))
        return self


torch.serialization.add_safe_globals([SparseState])


def select_topk(grad: torch.Tensor, k: int) -> torch.Tensor:
    """Flat indices (int64, sorted ascending) of the k entries of ``grad`` with the largest |grad|.

    k >= numel returns all indices (no topk needed); k <= 0 returns an empty tensor. Ties are broken arbitrarily.
    """
    n = grad.numel()
    if k >= n:
        return torch.arange(n, device=grad.device, dtype=torch.long)
    if k <= 0:
        return torch.empty(0, device=grad.device, dtype=torch.long)
    if grad.device.type == "cpu":
        # numpy's introselect is ~5x faster than torch.topk on CPU for k in the thousands (same set up to ties)
        magnitude = grad.detach().abs().reshape(-1).float().numpy()
        idx = torch.from_numpy(np.argpartition(magnitude, n - k)[n - k:].astype(np.int64))
    else:
        idx = grad.abs().flatten().topk(k, sorted=False).indices
    return idx.sort().values


def _energy_share(part: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """||part||² / total (1 if total == 0), as a 0-dim tensor."""
    kept = part.float().square().sum()
    return torch.where(total > 0, kept / total.clamp_min(torch.finfo(torch.float32).tiny), torch.ones_like(total))


def _overlap(sel: torch.Tensor, prev: Optional[torch.Tensor]) -> torch.Tensor:
    if prev is None or sel.numel() == 0:
        return torch.zeros((), device=sel.device)
    return torch.isin(sel, prev.to(sel.device).long()).sum().float() / sel.numel()


def _adamw_update(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, t: int, *, lr: float,
                  betas: tuple[float, float], eps: float, weight_decay: float) -> None:
    """One AdamW step in place, same formula and op order as torch.optim.AdamW (single-tensor path):
    p ← p(1 - lr wd);  m ← m + (1-β1)(g - m);  v ← β2 v + (1-β2) g²;  p ← p - lr/(1-β1ᵗ) · m / (√v / √(1-β2ᵗ) + ε)."""
    beta1, beta2 = betas
    if weight_decay != 0:
        p.mul_(1 - lr * weight_decay)
    m.lerp_(g, 1 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    denom = (v.sqrt() / (1 - beta2**t) ** 0.5).add_(eps)
    p.addcdiv_(m, denom, value=-lr / (1 - beta1**t))


def _follow(values: torch.Tensor, pos_old: torch.Tensor, n: int) -> torch.Tensor:
    """A support-aligned vector after the support grew: old entries moved to ``pos_old``, new ones 0."""
    return torch.zeros(n, dtype=values.dtype, device=values.device).index_copy_(0, pos_old, values)


def _align_to_delta(st: SparseState, flat: torch.Tensor) -> None:
    """Re-attach moments to ΔW''s support after the state was loaded or the adapter replaced (e.g. on resume)."""
    if st.indices is flat:
        return
    if st.indices is not None and torch.equal(st.indices, flat):
        st.indices = flat  # one storage again
        return
    # moments of entries still in the support follow them; others start at 0
    old = st.indices.long() if st.indices is not None else torch.empty(0, dtype=torch.long, device=flat.device)
    pos = torch.searchsorted(flat, old.to(torch.int32)).clamp_max(max(flat.numel() - 1, 0))
    keep = flat[pos].long() == old if flat.numel() else torch.zeros_like(old, dtype=torch.bool)
    for name in ("exp_avg", "exp_avg_sq"):
        out = torch.zeros(flat.numel(), dtype=torch.float32, device=flat.device)
        setattr(st, name, out.index_copy_(0, pos[keep], getattr(st, name)[keep]))
    st.indices = flat


def _sparse_step_impl(
    layer: SparseGradLayer,
    adapter: str,
    grad: torch.Tensor,
    state: dict,
    *,
    k: int,
    lr: float,
    mode: str,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    refresh_interval: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """One update of ``adapter`` of ``layer`` from the dense weight gradient ``grad`` (W.grad, W's layout).

    Returns (kept_energy, overlap) as 0-dim tensors, so that statistics over all layers need one host sync, and the
    number of entries holding state."""
    _check_mode(mode)
    if grad.is_sparse:
        raise TypeError("SparseGrad expects the dense weight gradient in W.grad (top-k is selected here).")
    if refresh_interval > 0 and mode == "sparse_adam":
        raise ValueError("selection='periodic' works with the 'adamw' or 'sgd' update, not lazy 'sparse_adam' "
                         "(on a fixed support lazy Adam is plain Adam).")
    g_w = grad.T if layer.is_conv1d else grad  # G: out × in
    if tuple(g_w.shape) != (layer.out_features, layer.in_features):
        raise ValueError(f"gradient shape {tuple(grad.shape)} does not fit the layer's weight")
    st = state.get(STATE_KEY)
    if st is None:
        st = state[STATE_KEY] = SparseState(mode)
    elif st.mode != mode:
        raise ValueError(f"optimizer state of this weight was created by mode {st.mode!r}, not {mode!r}")
    delta = layer.delta(adapter)
    pair = layer.pair(adapter)
    device = delta.device
    st.to(device)
    t = int(state.get("step", 0)) + 1
    state["step"] = torch.tensor(float(t))  # where torch's Adam(W) keeps it (the Trainer's optimizer may hold this)
    # ||g||² = ||G||² for orthogonal bases (to ~1e-3 for float16-stored ones): kept_energy's denominator for free
    total = torch.linalg.vector_norm(g_w, dtype=torch.float32).square()

    if refresh_interval > 0:
        return _periodic_step(layer, adapter, g_w, st, t, total, k=k, lr=lr, mode=mode, betas=betas, eps=eps,
                              weight_decay=weight_decay, refresh_interval=refresh_interval)

    g = pair.rotate(g_w, layer.compute_dtype())  # U_outᵀ G U_in, out × in, at the weight's precision
    sel = select_topk(g, k)
    g_sel = g.reshape(-1).index_select(0, sel).float()
    del g
    kept_energy = _energy_share(g_sel, total)
    overlap = _overlap(sel, st.prev_selected)
    st.prev_selected = sel.to(torch.int32)

    if mode == "sgd":
        # ΔW'[sel] ← ΔW'[sel] - lr (g[sel] + wd ΔW'[sel])   (same op order as torch.optim.SGD)
        delta.grow(sel)
        pos = delta.positions(sel)
        p_old = delta.values.index_select(0, pos)
        d_p = g_sel.add(p_old, alpha=weight_decay) if weight_decay != 0 else g_sel
        layer.apply_change(adapter, sel, d_p.mul(-lr), positions=pos)
        return kept_energy, overlap, 0

    if st.exp_avg is not None:
        _align_to_delta(st, delta.flat)  # before growing: e.g. the state was just loaded from a checkpoint
    pos_old = delta.grow(sel)
    if st.exp_avg is None:
        st.exp_avg = torch.zeros(delta.nnz, dtype=torch.float32, device=device)
        st.exp_avg_sq = torch.zeros_like(st.exp_avg)
    elif pos_old is not None:  # moments follow their entries into the grown support
        st.exp_avg = _follow(st.exp_avg, pos_old, delta.nnz)
        st.exp_avg_sq = _follow(st.exp_avg_sq, pos_old, delta.nnz)
    st.indices = delta.flat  # the same storage as ΔW''s indices
    pos = delta.positions(sel)
    m, v = st.exp_avg, st.exp_avg_sq
    beta1, beta2 = betas

    if mode == "sparse_adam":
        # Lazy Adam, the arithmetic of torch.optim._functional.sparse_adam at sel:
        #   m ← m + (1-β1)(g - m);  v ← v + (1-β2)(g² - v);  ΔW' ← ΔW' - lr √(1-β2ᵗ)/(1-β1ᵗ) · m / (√v + ε)
        # plus, if wd > 0, decoupled decay ΔW' ← ΔW'(1 - lr wd) before the Adam update (AdamW order).
        if sel.numel() == 0:  # SparseAdam skips empty gradients (but counts the step)
            return kept_energy, overlap, delta.nnz
        old_m = m.index_select(0, pos)
        numer = g_sel.sub(old_m).mul_(1 - beta1).add_(old_m)
        m.index_copy_(0, pos, numer)
        old_v = v.index_select(0, pos)
        new_v = g_sel.pow(2).sub_(old_v).mul_(1 - beta2).add_(old_v)
        v.index_copy_(0, pos, new_v)
        denom = new_v.sqrt_().add_(eps)
        step_size = lr * math.sqrt(1 - beta2**t) / (1 - beta1**t)
        p_old = delta.values.index_select(0, pos)
        p_new = p_old.clone()
        if weight_decay != 0:
            p_new.mul_(1 - lr * weight_decay)
        p_new.add_(-step_size * numer.div_(denom))
        layer.apply_change(adapter, sel, p_new.sub_(p_old), positions=pos)
        return kept_energy, overlap, delta.nnz

    # "adamw": AdamW on the whole support, g = 0 off sel
    g_support = torch.zeros_like(m).index_copy_(0, pos, g_sel)
    p_new = delta.values.clone()
    _adamw_update(p_new, g_support, m, v, t, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    change = p_new.sub_(delta.values)
    layer.apply_change(adapter, delta.flat.long(), change, positions=torch.arange(delta.nnz, device=device))
    return kept_energy, overlap, delta.nnz


def _periodic_step(layer: SparseGradLayer, adapter: str, g_w: torch.Tensor, st: SparseState, t: int,
                   total: torch.Tensor, *, k: int, lr: float, mode: str, betas: tuple[float, float], eps: float,
                   weight_decay: float, refresh_interval: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``selection="periodic"``: S (k entries) is the top-k of the full rotated gradient at every
    ``refresh_interval``-th step and fixed in between, when only g[S] is computed.

    "adamw" = torch.optim.AdamW on the k-vector ΔW'[S] (moments of length k); at a refresh, entries that stay in S
    keep their moments, new ones start at 0, and entries that leave S keep their value in ΔW' but stop moving.
    "sgd": ΔW'[S] -= lr (g[S] + wd ΔW'[S]).
    """
    pair, delta = layer.pair(adapter), layer.delta(adapter)
    shape = (layer.out_features, layer.in_features)
    refresh = st.indices is None or (t - 1) % refresh_interval == 0
    if refresh:
        g = pair.rotate(g_w, layer.compute_dtype())
        idx = select_topk(g, k)
        g_sel = g.reshape(-1).index_select(0, idx).float()
        del g
        overlap = _overlap(idx, st.indices)
        if mode == "adamw":
            m = torch.zeros(idx.numel(), dtype=torch.float32, device=idx.device)
            v = torch.zeros_like(m)
            if st.indices is not None:  # moments follow the entries that stay in S
                old = st.indices.long()
                stay = torch.isin(old, idx)
                where = torch.searchsorted(idx, old[stay])
                m.index_copy_(0, where, st.exp_avg[stay])
                v.index_copy_(0, where, st.exp_avg_sq[stay])
            st.exp_avg, st.exp_avg_sq = m, v
        st.indices, st.selected_at = idx.to(torch.int32), t - 1
        support = Support(st.indices, shape, t - 1)  # shares the int32 indices with the state
        layer.sparsegrad_support_cache[adapter] = support
    else:
        support = layer.sparsegrad_support_cache.get(adapter)
        if support is None or support.selected_at != st.selected_at or support.flat.device != g_w.device:
            support = Support(st.indices, shape, st.selected_at)  # e.g. after resume
            layer.sparsegrad_support_cache[adapter] = support
        idx = support.flat
        g_sel = pair.rotate_at(g_w, support, layer.compute_dtype())
        overlap = torch.ones((), device=idx.device)
    kept_energy = _energy_share(g_sel, total)
    if support.merged_into is None or support.merged_into() is not delta.flat:
        delta.grow(idx)  # at a refresh, or after ΔW' was replaced; between refreshes S is in ΔW''s support already
        support.merged_into = weakref.ref(delta.flat)
    pos = delta.positions(idx)  # recomputed (O(k log n)) rather than kept: 8 bytes per entry less between steps
    p_old = delta.values.index_select(0, pos)
    if mode == "sgd":
        d_p = g_sel.add(p_old, alpha=weight_decay) if weight_decay != 0 else g_sel
        change = d_p.mul(-lr)
    else:
        p_new = p_old.clone()
        _adamw_update(p_new, g_sel, st.exp_avg, st.exp_avg_sq, t, lr=lr, betas=betas, eps=eps,
                      weight_decay=weight_decay)
        change = p_new.sub_(p_old)
    layer.apply_change(adapter, idx, change, positions=pos, support=support)
    return kept_energy, overlap, idx.numel()


def release_step_caches(params: Iterable[torch.Tensor]) -> None:
    """Free what one step's layers shared (low-precision copies of the bases): nothing step-local stays alive."""
    for p in params:
        layer = getattr(p, OWNER_ATTR, None)
        if layer is not None:
            for pair in layer.sparsegrad_bases.values():
                if pair is not None:
                    pair.release_cast()


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
    kept_energy, overlap, support = _sparse_step_impl(
        layer, adapter, grad, state, k=k, lr=lr, mode=mode, betas=betas, eps=eps, weight_decay=weight_decay,
        refresh_interval=refresh_interval,
    )
    release_step_caches([param])  # nothing of this call stays alive (SparseGradOptimizer releases once per step)
    ke, ov = torch.stack([kept_energy.float(), overlap.float()]).tolist()
    return {"kept_energy": ke, "overlap": ov, "support": float(support)}


def _adamw_dense(p: torch.Tensor, grad: torch.Tensor, state: dict, *, lr: float, betas: tuple[float, float],
                 eps: float, weight_decay: float) -> None:
    if not state:
        state["step"] = 0
        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    state["step"] = int(state["step"]) + 1
    _adamw_update(p, grad, state["exp_avg"], state["exp_avg_sq"], state["step"], lr=lr, betas=betas, eps=eps,
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
        _check_mode(mode)
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay, "mode": mode}
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
        _check_mode(group["mode"])
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

        energies: list[torch.Tensor] = []
        overlaps: list[torch.Tensor] = []
        support = 0
        for group in self.param_groups:
            lr = _scalar(group["lr"])
            betas = tuple(group["betas"])
            if "sparsegrad_k" in group:
                p = group["params"][0]
                if p.grad is None:
                    continue
                layer, adapter = _owner(p)
                if adapter is None:
                    continue
                ke, ov, sup = _sparse_step_impl(
                    layer, adapter, p.grad, self.state[p], k=group["sparsegrad_k"], lr=lr, mode=group["mode"],
                    betas=betas, eps=group["eps"], weight_decay=group["weight_decay"],
                    refresh_interval=group["refresh_interval"],
                )
                energies.append(ke.float())
                overlaps.append(ov.float())
                support += sup
            else:
                for p in group["params"]:
                    if p.grad is None:
                        continue
                    _adamw_dense(p, p.grad, self.state[p], lr=lr, betas=betas, eps=group["eps"],
                                 weight_decay=group["weight_decay"])

        release_step_caches(g["params"][0] for g in self.param_groups if "sparsegrad_k" in g)
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
    _check_mode(mode)
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
) -> SparseGradOptimizer:
    """One optimizer for a SparseGrad PeftModel: top-k updates of every adapted weight, AdamW for all other trainable
    parameters (classifier heads, ``modules_to_save``). ``mode`` defaults to the config's ``sparse_optimizer``.

    Use it in a plain loop, or with the Trainer as ``Trainer(..., optimizers=(opt, None))``.
    """
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
    return SparseGradOptimizer(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, mode=mode)
