"""The sparse update of one adapted weight, in two halves: the gradient half and the optimizer half.

The trainable tensor of an adapted layer is its base weight W itself (``peft_sparsegrad.layer``): backward leaves the
ordinary dense gradient G = ∂L/∂W in ``W.grad``. A SparseGrad step

1. **the gradient half** (``gradient_of``): rotates G, g = U_outᵀ G U_in, and keeps only the k entries the update
   uses — the top-k of |g| (dynamic selection, or a refresh of periodic selection), or g on the fixed support S
   (periodic selection between refreshes). The result is a ``SparseGradient``: k values, their flat indices and
   ||G||² for clipping. With gradient accumulation, g[S] of several micro-batches adds up exactly (``accumulate``).
2. **the optimizer half** (``apply_update``): the update δ of those entries of ΔW' (AdamW, lazy Adam or SGD on the
   support), written into W as U_out δ U_inᵀ (``SparseGradLayer.apply_change``), scaled first by the clipping
   coefficient if gradients are clipped.

Both halves can run back to back at the optimizer step on ``W.grad`` (the dense path), or the gradient half can run
inside backward, the moment W's gradient is complete, and free ``W.grad`` at once (``peft_sparsegrad.fused``).

Notation: g = rotated gradient, sel = the k selected flat indices, m / v = first / second moment, t = the step count,
β1, β2, ε, lr, wd as usual. Three update rules (``SPARSE_MODES``), all with state on the support only:

* ``"sparse_adam"`` (paper-faithful) - exactly ``torch.optim.SparseAdam`` fed the top-k sparse gradient, i.e. *lazy*
  Adam: m, v and ΔW' change only at sel. SparseAdam's moments are dense, but those of entries never selected are zero
  and never read, so they are kept only on ΔW''s support: the same arithmetic at O(support) memory. Optional decoupled
  weight decay, also only at sel.
* ``"adamw"`` (lean, default) - *regular* AdamW restricted to the support S = all entries ever selected: every step
  all of S is updated with g = 0 off sel (moments decay, entries keep moving with momentum) and weight decay applies
  on all of S. With k = numel it is exactly ``torch.optim.AdamW`` on W'.
* ``"sgd"`` - ΔW'[sel] -= lr · (g[sel] + wd · ΔW'[sel]); no moments. With k = numel and U = I it is exactly
  ``torch.optim.SGD`` on W (used to check keep_ratio = 1 ≡ full fine-tuning).

Selection. ``refresh_interval`` 0 (``selection="dynamic"``): the top-k is re-selected from the full rotated gradient
every step. ``refresh_interval`` N > 0 (``selection="periodic"``): the support S of k entries is selected every N-th
step and fixed in between, when only g[S] is computed and "adamw" or "sgd" runs on the k-vector ΔW'[S]. A capped
support (``SparseGradConfig.max_support``): once ΔW' holds its maximum number of entries, selections pick the top-k
among them.

State. ΔW' (values + int32 indices) lives in the layer: it is the adapter. Everything else of one weight is a
``SparseState`` stored under the key ``"sparsegrad"`` of that weight's optimizer state, next to ``"step"``. It is one
object rather than loose tensors because torch's ``Optimizer.load_state_dict`` casts every tensor of a parameter's
state to the parameter's dtype (bf16 for a bf16 model: indices and float32 moments would be destroyed); the class is
registered with ``torch.serialization.add_safe_globals`` so that ``weights_only`` loads (the Trainer's) accept it.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch

from .layer import SparseGradLayer
from .rotation import BasisPair, Support
from .rounding import mix_seed
from .sharded import all_reduce_, is_sharded, local_rows

SPARSE_MODES = ("adamw", "sparse_adam", "sgd")
STATE_KEY = "sparsegrad"


def check_mode(mode: str) -> None:
    if mode not in SPARSE_MODES:
        raise ValueError(f"unknown SparseGrad optimizer mode {mode!r}; expected one of {SPARSE_MODES}")


def check_update(mode: str, refresh_interval: int, state: dict) -> None:
    """Everything ``apply_update`` would refuse, checked before any work (a refused step changes nothing)."""
    check_mode(mode)
    if refresh_interval > 0 and mode == "sparse_adam":
        raise ValueError("selection='periodic' works with the 'adamw' or 'sgd' update, not lazy 'sparse_adam' "
                         "(on a fixed support lazy Adam is plain Adam).")
    st = state.get(STATE_KEY)
    if st is not None and st.mode != mode:
        raise ValueError(f"optimizer state of this weight was created by mode {st.mode!r}, not {mode!r}")


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
    seed: Optional[int] = None  # of stochastic rounding: torch's initial seed when this state was created

    def to(self, device: torch.device) -> "SparseState":
        for name in ("exp_avg", "exp_avg_sq", "indices", "prev_selected"):
            value = getattr(self, name)
            if value is not None and value.device != device:
                setattr(self, name, value.to(device))
        return self


torch.serialization.add_safe_globals([SparseState])


@dataclass
class SparseGradient:
    """What the update of one weight uses of its gradient: g at ``flat`` (and what clipping and the logs need).

    ``flat``: sorted flat indices (int64: a new selection; the periodic support's int32 vector between refreshes).
    ``sq_norm``: ||G||² of the dense gradient the selection saw; after ``accumulate`` (several micro-batches between
    refreshes) ||g[S]||² of the accumulated values, as the dense sum is never formed (``exact_norm`` False).
    """

    flat: torch.Tensor
    values: torch.Tensor  # float32, aligned with flat
    sq_norm: torch.Tensor  # 0-dim float32
    kept_energy: torch.Tensor  # 0-dim: ||g[sel]||² / ||G||² (mean over accumulated micro-batches)
    overlap: torch.Tensor  # 0-dim: |sel ∩ previous selection| / k (1 between refreshes)
    refresh: bool = False  # periodic selection: a new support was selected
    support: Optional[Support] = None  # periodic selection between refreshes: the fixed support
    micro_batches: int = 1
    exact_norm: bool = True


def select_topk(grad: torch.Tensor, k: int) -> torch.Tensor:
    """Flat indices (int64, sorted ascending) of the k entries of ``grad`` with the largest |grad| (reference for
    tests; the step uses ``BasisPair.rotate_topk``, which never forms the rotated gradient).

    k >= numel returns all indices; k <= 0 an empty tensor. Ties are broken arbitrarily.
    """
    n = grad.numel()
    if k >= n:
        return torch.arange(n, device=grad.device, dtype=torch.long)
    if k <= 0:
        return torch.empty(0, device=grad.device, dtype=torch.long)
    if grad.device.type == "cpu":
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


def _as_out_in(layer: SparseGradLayer, grad: torch.Tensor) -> torch.Tensor:
    if grad.is_sparse:
        raise TypeError("SparseGrad expects the dense weight gradient in W.grad (top-k is selected here).")
    g_w = grad.T if layer.is_conv1d else grad  # G: out × in
    if tuple(g_w.shape) != (layer.out_features, layer.in_features):
        raise ValueError(f"gradient shape {tuple(grad.shape)} does not fit the layer's weight")
    return g_w


def fixed_support(layer: SparseGradLayer, adapter: str, state: dict, refresh_interval: int) -> Optional[Support]:
    """The periodic support the coming step trains on, or None if that step selects (dynamic, or a refresh)."""
    st = state.get(STATE_KEY)
    t = int(state.get("step", 0)) + 1
    if refresh_interval <= 0 or st is None or st.indices is None or (t - 1) % refresh_interval == 0:
        return None
    shape = (layer.out_features, layer.in_features)
    support = layer.sparsegrad_support_cache.get(adapter)
    device = layer.get_base_layer().weight.device
    if support is None or support.selected_at != st.selected_at or support.flat.device != device:
        st.to(device)
        support = Support(st.indices, shape, st.selected_at)  # e.g. after resume
        layer.sparsegrad_support_cache[adapter] = support
    return support


@torch.no_grad()
def gradient_of(layer: SparseGradLayer, adapter: str, grad: torch.Tensor, state: dict, *, k: int,
                refresh_interval: int = 0, inplace: bool = False) -> SparseGradient:
    """The gradient half of a step: what the update uses of the dense weight gradient ``grad`` (W.grad's layout).

    ``state`` is the weight's optimizer state (read only here). With ``inplace`` the caller gives up ``grad``: the
    full rotation then overwrites it instead of allocating its own out × in product.
    """
    if is_sharded(grad):
        return _sharded_gradient_of(layer, adapter, grad, state, k=k, refresh_interval=refresh_interval)
    g_w = _as_out_in(layer, grad)
    pair = layer.pair(adapter)
    # ||g||² = ||G||² for orthogonal bases (to ~1e-3 for float16-stored ones): kept_energy's denominator for free
    total = torch.linalg.vector_norm(g_w, dtype=torch.float32).square()
    support = fixed_support(layer, adapter, state, refresh_interval)
    if support is not None:
        values = pair.rotate_at(g_w, support, layer.compute_dtype())
        return SparseGradient(support.flat, values, total, _energy_share(values, total),
                              torch.ones((), device=values.device), support=support)
    sel, values = pair.rotate_topk(g_w, k, layer.compute_dtype(), inplace=inplace and not layer.is_conv1d,
                                   **_capped(layer, adapter, k))
    st = state.get(STATE_KEY)
    previous = None if st is None else (st.indices if refresh_interval > 0 else st.prev_selected)
    return SparseGradient(sel, values, total, _energy_share(values, total), _overlap(sel, previous),
                          refresh=refresh_interval > 0)


def _capped(layer: SparseGradLayer, adapter: str, k: int) -> dict:
    """rotate_topk's restriction under max_support: with the support near full, at most cap − nnz new entries."""
    delta = layer.delta(adapter)
    cap = layer.sparsegrad_max_support.get(adapter)
    if cap is not None and delta.nnz + k > cap:
        return {"support": delta.flat, "max_new": max(0, cap - delta.nnz)}
    return {}


def _sharded_values(layer: SparseGradLayer, adapter: str, grad: torch.Tensor, support: Support) -> torch.Tensor:
    """g[S] from this rank's rows of a sharded gradient: its partial product, summed over the ranks."""
    first, end = local_rows(layer.get_base_layer().weight)
    g_r, pair = grad.to_local(), layer.pair(adapter)
    if pair.is_identity:  # the entries of S in this rank's rows, zero elsewhere
        flat = support.flat.long()
        mine = (flat >= first * layer.in_features) & (flat < end * layer.in_features)
        values = torch.zeros(flat.numel(), dtype=torch.float32, device=g_r.device)
        values[mine] = g_r.reshape(-1)[flat[mine] - first * layer.in_features].float()
    else:
        values = pair.row_block(first, end).rotate_at(g_r, support, layer.compute_dtype())
    return all_reduce_(values, grad)


def _sharded_gradient_of(layer: SparseGradLayer, adapter: str, grad: torch.Tensor, state: dict, *, k: int,
                         refresh_interval: int) -> SparseGradient:
    """``gradient_of`` for a weight sharded by rows (FSDP2, ``peft_sparsegrad.sharded``): every rank ends with the
    same SparseGradient."""
    if layer.is_conv1d:
        raise ValueError("SparseGrad does not support sharded Conv1D (GPT-2) weights; shard Linear layers.")
    g_r = grad.to_local()
    total = all_reduce_(torch.linalg.vector_norm(g_r, dtype=torch.float32).square(), grad)  # ||G||² = Σ ||G_r||²
    support = fixed_support(layer, adapter, state, refresh_interval)
    if support is not None:
        values = _sharded_values(layer, adapter, grad, support)
        return SparseGradient(support.flat, values, total, _energy_share(values, total),
                              torch.ones((), device=values.device), support=support)
    first, end = local_rows(layer.get_base_layer().weight)
    pair = layer.pair(adapter)
    if pair.is_identity:
        g = torch.zeros(layer.out_features, layer.in_features, dtype=torch.float32, device=g_r.device)
        g[first:end] = g_r
    else:  # this rank's partial U_out[rows]ᵀ G_r U_in, out × in
        g = pair.row_block(first, end).rotate(g_r, torch.float32)
    all_reduce_(g, grad)
    sel, values = BasisPair(None, None).rotate_topk(g, k, torch.float32, inplace=True, **_capped(layer, adapter, k))
    st = state.get(STATE_KEY)
    previous = None if st is None else (st.indices if refresh_interval > 0 else st.prev_selected)
    return SparseGradient(sel, values, total, _energy_share(values, total), _overlap(sel, previous),
                          refresh=refresh_interval > 0)


@torch.no_grad()
def accumulate(layer: SparseGradLayer, adapter: str, sparse: SparseGradient, grad: torch.Tensor) -> None:
    """Add one more micro-batch's gradient to ``sparse`` (periodic selection between refreshes: g[S] is linear in G,
    so the sum of the micro-batches' g[S] is exactly g[S] of the accumulated gradient)."""
    if sparse.support is None:
        raise ValueError("only g on a fixed support (periodic selection between refreshes) accumulates sparsely")
    if is_sharded(grad):
        values = _sharded_values(layer, adapter, grad, sparse.support)
        total = all_reduce_(torch.linalg.vector_norm(grad.to_local(), dtype=torch.float32).square(), grad)
    else:
        g_w = _as_out_in(layer, grad)
        values = layer.pair(adapter).rotate_at(g_w, sparse.support, layer.compute_dtype())
        total = torch.linalg.vector_norm(g_w, dtype=torch.float32).square()
    n = sparse.micro_batches
    sparse.kept_energy = (sparse.kept_energy * n + _energy_share(values, total)) / (n + 1)
    sparse.values.add_(values)
    sparse.sq_norm = sparse.values.square().sum()
    sparse.micro_batches, sparse.exact_norm = n + 1, False


def adamw_update(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, t: int, *, lr: float,
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


@torch.no_grad()
def apply_update(layer: SparseGradLayer, adapter: str, sparse: SparseGradient, state: dict, *, lr: float, mode: str,
                 betas: tuple[float, float], eps: float, weight_decay: float, refresh_interval: int = 0,
                 scale: Optional[torch.Tensor] = None) -> int:
    """The optimizer half of a step: update ΔW' (and W) from ``sparse``, whose values are first multiplied by
    ``scale`` (the clipping coefficient) if given. Returns the number of entries holding optimizer state."""
    check_update(mode, refresh_interval, state)
    st = state.get(STATE_KEY)
    if st is None:
        st = state[STATE_KEY] = SparseState(mode, seed=torch.initial_seed())
    delta = layer.delta(adapter)
    device = delta.device
    st.to(device)
    t = int(state.get("step", 0)) + 1
    state["step"] = torch.tensor(float(t))  # where torch's Adam(W) keeps it (the Trainer's optimizer may hold this)
    seed = mix_seed(st.seed if st.seed is not None else 0, layer.sparsegrad_rounding_key, t)  # stochastic rounding
    g_sel = sparse.values if scale is None else sparse.values * scale.to(sparse.values.device)
    if refresh_interval > 0:
        return _periodic_update(layer, adapter, sparse, g_sel, st, t, lr=lr, mode=mode, betas=betas, eps=eps,
                                weight_decay=weight_decay, seed=seed)
    sel = sparse.flat
    st.prev_selected = sel.to(torch.int32)

    if mode == "sgd":
        # ΔW'[sel] ← ΔW'[sel] - lr (g[sel] + wd ΔW'[sel])   (same op order as torch.optim.SGD)
        delta.grow(sel)
        pos = delta.positions(sel)
        p_old = delta.values.index_select(0, pos)
        d_p = g_sel.add(p_old, alpha=weight_decay) if weight_decay != 0 else g_sel
        layer.apply_change(adapter, sel, d_p.mul(-lr), positions=pos, rounding_seed=seed)
        return 0

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
            return delta.nnz
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
        layer.apply_change(adapter, sel, p_new.sub_(p_old), positions=pos, rounding_seed=seed)
        return delta.nnz

    # "adamw": AdamW on the whole support, g = 0 off sel
    g_support = torch.zeros_like(m).index_copy_(0, pos, g_sel)
    p_new = delta.values.clone()
    adamw_update(p_new, g_support, m, v, t, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    change = p_new.sub_(delta.values)
    layer.apply_change(adapter, delta.flat, change, positions=torch.arange(delta.nnz, device=device),
                       rounding_seed=seed)
    return delta.nnz


def _periodic_update(layer: SparseGradLayer, adapter: str, sparse: SparseGradient, g_sel: torch.Tensor,
                     st: SparseState, t: int, *, lr: float, mode: str, betas: tuple[float, float], eps: float,
                     weight_decay: float, seed: Optional[int] = None) -> int:
    """``selection="periodic"``: "adamw" = torch.optim.AdamW on the k-vector ΔW'[S] (moments of length k); at a
    refresh, entries that stay in S keep their moments, new ones start at 0, and entries that leave S keep their
    value in ΔW' but stop moving. "sgd": ΔW'[S] -= lr (g[S] + wd ΔW'[S])."""
    delta = layer.delta(adapter)
    shape = (layer.out_features, layer.in_features)
    if sparse.refresh:
        idx = sparse.flat
        if mode == "adamw":
            m = torch.zeros(idx.numel(), dtype=torch.float32, device=idx.device)
            v = torch.zeros_like(m)
            if st.indices is not None and st.exp_avg is not None:  # moments follow the entries that stay in S
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
        support = sparse.support
    idx = support.flat
    if support.merged_into is None or support.merged_into() is not delta.flat:
        delta.grow(idx.long())  # at a refresh, or after ΔW' was replaced; between refreshes S is in ΔW' already
        support.merged_into = weakref.ref(delta.flat)
    pos = delta.positions(idx)  # recomputed (O(k log n)) rather than kept: 8 bytes per entry less between steps
    p_old = delta.values.index_select(0, pos)
    if mode == "sgd":
        d_p = g_sel.add(p_old, alpha=weight_decay) if weight_decay != 0 else g_sel
        change = d_p.mul(-lr)
    else:
        p_new = p_old.clone()
        adamw_update(p_new, g_sel, st.exp_avg, st.exp_avg_sq, t, lr=lr, betas=betas, eps=eps,
                      weight_decay=weight_decay)
        change = p_new.sub_(p_old)
    layer.apply_change(adapter, idx, change, positions=pos, support=support, rounding_seed=seed)
    return idx.numel()


def sparse_update(layer: SparseGradLayer, adapter: str, grad: torch.Tensor, state: dict, *, k: int, lr: float,
                  mode: str, betas: tuple[float, float], eps: float, weight_decay: float, refresh_interval: int = 0,
                  inplace: bool = False, scale: Optional[torch.Tensor] = None,
                  ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Both halves back to back on a dense gradient (the dense path). Returns (kept_energy, overlap) as 0-dim tensors
    (statistics over all layers need one host sync) and the number of entries holding state."""
    check_update(mode, refresh_interval, state)
    sparse = gradient_of(layer, adapter, grad, state, k=k, refresh_interval=refresh_interval, inplace=inplace)
    n_state = apply_update(layer, adapter, sparse, state, lr=lr, mode=mode, betas=betas, eps=eps,
                           weight_decay=weight_decay, refresh_interval=refresh_interval, scale=scale)
    return sparse.kept_energy, sparse.overlap, n_state


def scalar(x: Any) -> float:
    """LR schedulers may store a 1-element tensor lr; the math wants python floats."""
    return float(x.item()) if isinstance(x, torch.Tensor) else float(x)
