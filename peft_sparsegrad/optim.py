"""Optimizer for SparseGrad (Chekalina et al., EMNLP 2024).

Each adapted MLP layer owns a trainable dense tensor ΔW' (out × in, the weight change in the
rotated basis W' = U_outᵀ W U_in). Backward writes the *dense* rotated gradient g into
``ΔW'.grad`` so that gradient accumulation and DDP all-reduce work unchanged. Sparsity is
imposed here, once per optimizer step: only the k entries of g with the largest |g| are used
(k = ceil(keep_ratio · out · in), an int per parameter); every other entry of g counts as 0.

Notation: g = gradient of ΔW', sel = the k selected flat indices, m / v = first / second moment,
t = per-parameter step count, β1, β2, ε, lr, wd as usual.

Three update modes for the sparse parameters (``SPARSE_MODES``):

* ``"sparse_adam"`` (paper-faithful) - exactly ``torch.optim.SparseAdam`` fed the top-k sparse
  gradient, i.e. *lazy* Adam: dense m, v buffers of the parameter's shape, but m, v and the
  parameter are touched only at ``sel``; entries that were not selected this step keep their
  moments frozen (no decay) and do not move. Optional decoupled weight decay, also only at sel.
* ``"adamw"`` (lean) - *regular* AdamW restricted to the support S = union of all entries ever
  selected. State is proportional to |S| (sorted int32 flat indices + aligned m, v vectors), not
  to the parameter size. Every step, all entries of S are updated as in AdamW with
  g = 0 off ``sel``: their moments decay (m ← β1 m, v ← β2 v) and they keep moving with the
  remaining momentum, and weight decay applies on all of S. This is the difference to the lazy
  semantics of ``sparse_adam``, where unselected entries are frozen. With k = numel it is exactly
  ``torch.optim.AdamW``. Worst case (S grows to the whole tensor) it costs 3 × param size
  (m, v, int32 indices) versus 2 × for ``sparse_adam``.
* ``"sgd"`` - p[sel] -= lr · (g[sel] + wd · p[sel]); no moments. With k = numel it is exactly
  ``torch.optim.SGD`` (used to check keep_ratio = 1 ≡ full fine-tuning).

Selection. By default (``refresh_interval`` 0, ``selection="dynamic"``) the top-k is re-selected from the full
rotated gradient every step. With ``refresh_interval`` N > 0 (``selection="periodic"``) the support S is selected
every N-th step and fixed in between; the optimizer hands S to the layer (``attach_support``) so that backward only
computes g[S], and runs "adamw" (AdamW on the k-vector ΔW'[S], O(k) state) or "sgd" on S.

Every update leaves a ``ChangeRecord`` (which entries changed, by how much) on ΔW', from which the layer updates its
cached forward weight instead of rebuilding it.

All other (dense) trainable parameters (classifier heads, ...) are plain AdamW in the same
``SparseGradOptimizer`` object, so a single optimizer / LR scheduler / checkpoint covers the model.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from itertools import chain
from typing import Any

import torch

from .bases import Support

__all__ = [
    "SPARSE_MODES",
    "select_topk",
    "sparse_step",
    "SparseGradOptimizer",
    "build_param_groups",
    "state_indices",
    "sparsegrad_parameters",
    "create_sparsegrad_optimizer",
]

SPARSE_MODES = ("adamw", "sparse_adam", "sgd")

# State keys that hold integer index tensors. torch's Optimizer.load_state_dict casts every
# tensor in the state of a floating-point param to the param dtype, which would turn these into
# float32 (and silently corrupt indices >= 2**24); SparseGradOptimizer.load_state_dict restores them.
_INDEX_KEYS = ("indices", "prev_selected")


def _check_mode(mode: str) -> None:
    if mode not in SPARSE_MODES:
        raise ValueError(f"unknown SparseGrad optimizer mode {mode!r}; expected one of {SPARSE_MODES}")


def _scalar(x: Any) -> float:
    # LR schedulers may store a 1-element tensor lr; the math below wants python floats.
    return float(x.item()) if isinstance(x, torch.Tensor) else float(x)


def select_topk(grad: torch.Tensor, k: int) -> torch.Tensor:
    """Flat indices (int64, sorted ascending) of the k entries of ``grad`` with the largest |grad|.

    Sorted output lets callers merge selections with searchsorted and keeps index_* ops cache
    friendly. k >= numel returns all indices (no topk needed); k <= 0 returns an empty tensor.
    Ties are broken arbitrarily (topk is not deterministic on ties).
    """
    n = grad.numel()
    if k >= n:
        return torch.arange(n, device=grad.device, dtype=torch.long)
    if k <= 0:
        return torch.empty(0, device=grad.device, dtype=torch.long)
    # One |g| temporary of the grad's size is unavoidable; topk(sorted=False) avoids a full sort.
    idx = grad.abs().flatten().topk(k, sorted=False).indices
    return idx.sort().values


def _store_index(state: dict, key: str, flat: torch.Tensor, ncols: int) -> None:
    """Keep flat indices as int32 (row, column) pairs, shape (2, n).

    When the state lives in another optimizer (the Trainer's AdamW, via SparseGradCallback), torch's
    ``load_state_dict`` casts every state tensor to the parameter's float dtype. Rows and columns are each < 2**24,
    so they survive a float32 round trip exactly, which flat indices of a large layer (out · in >= 2**24) would not.
    """
    state[key] = torch.stack([flat.div(ncols, rounding_mode="floor"), flat.remainder(ncols)]).to(torch.int32)


def state_indices(state: dict, param: torch.Tensor, key: str = "indices") -> torch.Tensor | None:
    """Flat int64 indices of the support ("indices") or last selection ("prev_selected") of ``param``'s state."""
    return _load_index(state, key, param.shape[-1] if param.dim() > 0 else 1)


def _load_index(state: dict, key: str, ncols: int) -> torch.Tensor | None:
    """Flat int64 indices from ``_store_index``'s layout (also after a float cast by torch)."""
    pairs = state.get(key)
    if pairs is None:
        return None
    if pairs.is_floating_point():
        pairs = pairs.round().to(torch.int32)
        state[key] = pairs
    pairs = pairs.long()
    return pairs[0] * ncols + pairs[1]


def _flat_view(param: torch.Tensor) -> torch.Tensor:
    # ΔW' is created contiguous; a non-contiguous param would make view(-1) copy and lose the update.
    if not param.is_contiguous():
        raise ValueError("SparseGrad parameters must be contiguous")
    return param.view(-1)


@dataclass
class ChangeRecord:
    """What one optimizer step changed in ΔW': ``change`` at the sorted flat indices ``flat``.

    Left on ΔW' as ``sparsegrad_last_change``; the layer uses it to update its cached forward weight
    W + U_out ΔW' U_inᵀ by U_out δ U_inᵀ for this sparse δ instead of rebuilding it, but only if ΔW'
    went from ``version_before`` to ``version_after`` through this step and nothing else.
    """

    version_before: int
    version_after: int
    flat: torch.Tensor  # (n,) int64
    change: torch.Tensor  # (n,) float32


# Record changes only while they are this sparse (the record holds 12 bytes per entry until the next step; the lean
# "adamw" mode changes its whole support S every step, which grows over training).
_MAX_RECORDED_FRACTION = 0.5


def _write_back(param: torch.Tensor, p_flat: torch.Tensor, idx: torch.Tensor, new: torch.Tensor,
                old: torch.Tensor) -> None:
    """p[idx] ← new, leaving a ChangeRecord (new - old at idx) for the layer's forward-weight cache."""
    before = param._version
    p_flat.index_copy_(0, idx, new)
    if idx.numel() <= _MAX_RECORDED_FRACTION * p_flat.numel():
        param.sparsegrad_last_change = ChangeRecord(before, param._version, idx, (new - old).float())
    elif hasattr(param, "sparsegrad_last_change"):
        del param.sparsegrad_last_change


def attach_support(param: torch.Tensor, state: dict, refresh_interval: int) -> None:
    """Tell ΔW''s layer which entries the next backward must produce (``sparsegrad_support``).

    With ``selection="periodic"`` and a refresh not due next step, that is the fixed support S from ``state``;
    otherwise None, i.e. the full rotated gradient (dynamic selection, or a refresh that selects a new S).
    The hint only saves work: the optimizer reads the gradient at S from its own state either way.
    """
    support = None
    idx_pairs = state.get("indices")
    if refresh_interval > 0 and idx_pairs is not None and int(state.get("step", 0)) % refresh_interval != 0:
        current = getattr(param, "sparsegrad_support", None)
        selected_at = int(state.get("selected_at", -1))
        if current is not None and current.selected_at == selected_at and current.flat.device == param.device:
            support = current
        else:
            flat = _load_index(state, "indices", param.shape[-1])
            support = Support(flat.to(param.device), tuple(param.shape), selected_at)
    param.sparsegrad_support = support


def _sparse_step_impl(
    param: torch.Tensor,
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
    """The update itself; returns (kept_energy, overlap) as 0-dim tensors so that the optimizer
    can aggregate statistics over all layers with a single host sync."""
    _check_mode(mode)
    if refresh_interval > 0:
        return _periodic_step(param, grad, state, k=k, lr=lr, mode=mode, betas=betas, eps=eps,
                              weight_decay=weight_decay, refresh_interval=refresh_interval)
    if getattr(param, "sparsegrad_grad_support", None) is not None:
        raise RuntimeError("ΔW'.grad was computed only on a fixed support (selection='periodic' hint), but this "
                           "update selects the top-k of the full gradient: use one SparseGrad optimizer per model.")
    if grad.is_sparse:
        raise TypeError("SparseGrad expects a dense gradient in ΔW'.grad (top-k is selected here)")
    if grad.shape != param.shape:
        raise ValueError(f"grad shape {tuple(grad.shape)} != param shape {tuple(param.shape)}")
    # Refuse state written by another mode (keys differ) instead of silently misusing it.
    if state:
        has_idx, has_m = "indices" in state, "exp_avg" in state
        layout_ok = {"adamw": has_idx and has_m, "sparse_adam": has_m and not has_idx,
                     "sgd": not has_m}[mode]
        if not layout_ok:
            raise ValueError(f"optimizer state of this parameter was not created by mode {mode!r}")

    beta1, beta2 = betas
    p_flat = _flat_view(param)
    g_flat = grad.reshape(-1)
    n = p_flat.numel()

    sel = select_topk(grad, k)  # int64, sorted
    n_sel = sel.numel()
    g_sel = g_flat.index_select(0, sel).to(param.dtype)  # g[sel]

    # kept_energy = ||g[sel]||² / ||g||²  (1 if g == 0); vector_norm avoids a dense g² temporary.
    total = torch.linalg.vector_norm(g_flat, dtype=torch.float32).square()
    kept = g_sel.float().square().sum()
    kept_energy = torch.where(total > 0, kept / total.clamp_min(torch.finfo(torch.float32).tiny),
                              torch.ones_like(total))

    # overlap = |sel ∩ prev_sel| / k  (0 on the first step)
    ncols = param.shape[-1] if param.dim() > 0 else 1
    prev = _load_index(state, "prev_selected", ncols)
    if prev is None or n_sel == 0:
        overlap = torch.zeros((), device=param.device)
    else:
        overlap = torch.isin(sel, prev).sum().float() / n_sel

    state["step"] = int(state.get("step", 0)) + 1
    t = state["step"]

    if mode == "sgd":
        # p[sel] ← p[sel] - lr (g[sel] + wd p[sel])   (same op order as torch.optim.SGD)
        p_old = p_flat.index_select(0, sel)
        d_p = g_sel.add(p_old, alpha=weight_decay) if weight_decay != 0 else g_sel
        _write_back(param, p_flat, sel, p_old.add(d_p, alpha=-lr), p_old)
        support = 0

    elif mode == "sparse_adam":
        # Lazy Adam, bit-for-bit the arithmetic of torch.optim._functional.sparse_adam:
        #   m[sel] ← m[sel] + (1-β1)(g[sel] - m[sel]);  v[sel] ← v[sel] + (1-β2)(g[sel]² - v[sel])
        #   p[sel] ← p[sel] - lr √(1-β2ᵗ)/(1-β1ᵗ) · m[sel] / (√v[sel] + ε)
        # plus, if wd > 0, decoupled decay p[sel] ← p[sel](1 - lr wd) before the Adam update
        # (AdamW order). Entries outside sel: m, v, p unchanged.
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(param, memory_format=torch.contiguous_format)
            state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.contiguous_format)
        m_flat = state["exp_avg"].view(-1)
        v_flat = state["exp_avg_sq"].view(-1)
        if n_sel > 0:  # SparseAdam skips empty gradients (but still counts the step)
            old_m = m_flat.index_select(0, sel)
            numer = g_sel.sub(old_m).mul_(1 - beta1).add_(old_m)
            m_flat.index_copy_(0, sel, numer)
            old_v = v_flat.index_select(0, sel)
            new_v = g_sel.pow(2).sub_(old_v).mul_(1 - beta2).add_(old_v)
            v_flat.index_copy_(0, sel, new_v)
            denom = new_v.sqrt_().add_(eps)  # new_v already stored; safe to reuse in place
            step_size = lr * math.sqrt(1 - beta2**t) / (1 - beta1**t)
            p_old = p_flat.index_select(0, sel)
            p_sel = p_old.clone()
            if weight_decay != 0:
                p_sel.mul_(1 - lr * weight_decay)
            p_sel.add_(-step_size * numer.div_(denom))
            _write_back(param, p_flat, sel, p_sel, p_old)
        support = n

    else:  # "adamw"
        # Support S = sorted union of all entries ever selected (int32 flat indices).
        # Merge: S_new = unique(S ∪ sel); old moments are scattered to their new positions,
        # new entries start at m = v = 0.
        old_idx = _load_index(state, "indices", ncols)
        if old_idx is None:
            idx = sel
            m = torch.zeros(n_sel, dtype=param.dtype, device=param.device)
            v = torch.zeros_like(m)
        else:
            old_long = old_idx
            idx = torch.cat([old_long, sel]).unique(sorted=True)
            if idx.numel() == old_long.numel():  # no new entries: keep buffers as they are
                m, v = state["exp_avg"], state["exp_avg_sq"]
            else:
                pos_old = torch.searchsorted(idx, old_long)
                m = torch.zeros(idx.numel(), dtype=param.dtype, device=param.device)
                v = torch.zeros_like(m)
                m.index_copy_(0, pos_old, state["exp_avg"])
                v.index_copy_(0, pos_old, state["exp_avg_sq"])
        _store_index(state, "indices", idx, ncols)
        state["exp_avg"], state["exp_avg_sq"] = m, v

        # g_S: g at sel, 0 at the other entries of S.
        g_u = torch.zeros_like(m)
        g_u.index_copy_(0, torch.searchsorted(idx, sel), g_sel)

        # AdamW on S with the same op order as torch.optim.AdamW (single-tensor path):
        #   p ← p(1 - lr wd);  m ← m + (1-β1)(g - m);  v ← β2 v + (1-β2) g²
        #   p ← p - lr/(1-β1ᵗ) · m / (√v / √(1-β2ᵗ) + ε)
        p_old = p_flat.index_select(0, idx)
        p_u = p_old.clone()
        _adamw_update(p_u, g_u, m, v, t, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        _write_back(param, p_flat, idx, p_u, p_old)
        support = idx.numel()

    _store_index(state, "prev_selected", sel, ncols)
    return kept_energy, overlap, support


def _periodic_step(
    param: torch.Tensor,
    grad: torch.Tensor,
    state: dict,
    *,
    k: int,
    lr: float,
    mode: str,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    refresh_interval: int,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``selection="periodic"``: the support S (k entries) is the top-k of the full rotated gradient at every
    ``refresh_interval``-th step and fixed in between, where only g[S] is read (and the layer computed only that).

    Update rule on S: "adamw" = torch.optim.AdamW on the k-vector ΔW'[S] (state: m, v of length k and S as int32
    (row, col) pairs); at a refresh, entries that stay in S keep their moments, new ones start at 0, and entries that
    leave S keep their value in ΔW' but stop moving. "sgd": p[S] -= lr (g[S] + wd p[S]).
    """
    if mode == "sparse_adam":
        raise ValueError("selection='periodic' works with the 'adamw' or 'sgd' update, not lazy 'sparse_adam' "
                         "(on a fixed support lazy Adam is plain Adam with dense-sized buffers).")
    if grad.is_sparse:
        raise TypeError("SparseGrad expects a dense gradient in ΔW'.grad (top-k is selected here)")
    if grad.shape != param.shape:
        raise ValueError(f"grad shape {tuple(grad.shape)} != param shape {tuple(param.shape)}")
    if state and ("exp_avg" in state) != (mode == "adamw"):
        raise ValueError(f"optimizer state of this parameter was not created by mode {mode!r}")
    ncols = param.shape[-1] if param.dim() > 0 else 1
    p_flat, g_flat = _flat_view(param), grad.reshape(-1)
    t_done = int(state.get("step", 0))
    old_idx = _load_index(state, "indices", ncols)
    refresh = old_idx is None or t_done % refresh_interval == 0
    used = getattr(param, "sparsegrad_grad_support", None)  # the support the layer computed this grad on
    if used is not None and (refresh or used.selected_at != int(state.get("selected_at", -1))):
        raise RuntimeError(
            "ΔW'.grad was computed on a stale support (the sparsegrad_support hint of another optimizer or run). "
            "Use one SparseGrad optimizer/callback per model, and call peft_sparsegrad.optim.attach_support after "
            "loading optimizer state by hand."
        )

    if refresh:
        idx = select_topk(grad, k)
        total = torch.linalg.vector_norm(g_flat, dtype=torch.float32).square()
        kept = g_flat.index_select(0, idx).float().square().sum()
        kept_energy = torch.where(total > 0, kept / total.clamp_min(torch.finfo(torch.float32).tiny),
                                  torch.ones_like(total))
        if old_idx is None or idx.numel() == 0:
            overlap = torch.zeros((), device=param.device)
        else:
            overlap = torch.isin(idx, old_idx).sum().float() / idx.numel()
        _store_index(state, "indices", idx, ncols)
        state["selected_at"] = t_done
        if mode == "adamw":
            m = torch.zeros(idx.numel(), dtype=param.dtype, device=param.device)
            v = torch.zeros_like(m)
            if old_idx is not None:  # moments follow the entries that stay in S
                stay = torch.isin(old_idx, idx)
                pos = torch.searchsorted(idx, old_idx[stay])
                m.index_copy_(0, pos, state["exp_avg"][stay])
                v.index_copy_(0, pos, state["exp_avg_sq"][stay])
            state["exp_avg"], state["exp_avg_sq"] = m, v
    else:
        idx = old_idx
        kept_energy = torch.full((), float("nan"), device=param.device)  # only g[S] exists between refreshes
        overlap = torch.ones((), device=param.device)

    state["step"] = t = t_done + 1
    g_sel = g_flat.index_select(0, idx).to(param.dtype)
    p_old = p_flat.index_select(0, idx)
    if mode == "sgd":
        d_p = g_sel.add(p_old, alpha=weight_decay) if weight_decay != 0 else g_sel
        p_new = p_old.add(d_p, alpha=-lr)
    else:
        p_new = p_old.clone()
        _adamw_update(p_new, g_sel, state["exp_avg"], state["exp_avg_sq"], t, lr=lr, betas=betas, eps=eps,
                      weight_decay=weight_decay)
    _write_back(param, p_flat, idx, p_new, p_old)
    attach_support(param, state, refresh_interval)
    return kept_energy, overlap, idx.numel()


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
    """Apply one update to ``param`` (in place) from the dense ``grad``, keeping only its top-k entries.

    ``refresh_interval`` > 0 selects ``selection="periodic"``: the top-k support is re-selected every that many
    steps and fixed in between (``kept_energy`` is then NaN between refreshes: only g[S] is known).

    ``state`` is the per-parameter optimizer state dict (mutated in place; empty on the first call).
    Returns cheap statistics (this forces one host sync; the optimizer batches them instead):
    ``kept_energy`` = ||g[sel]||² / ||g||² (1.0 if g == 0), ``overlap`` = |sel ∩ prev_sel| / k
    (0.0 on the first step), ``support`` = number of entries holding optimizer state
    (|S| for "adamw", numel for "sparse_adam" whose buffers are dense, 0 for "sgd").
    """
    kept_energy, overlap, support = _sparse_step_impl(
        param, grad, state, k=k, lr=lr, mode=mode, betas=betas, eps=eps, weight_decay=weight_decay,
        refresh_interval=refresh_interval,
    )
    ke, ov = torch.stack([kept_energy.float(), overlap.float()]).tolist()
    return {"kept_energy": ke, "overlap": ov, "support": float(support)}


def _adamw_dense(
    p: torch.Tensor,
    grad: torch.Tensor,
    state: dict,
    *,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
) -> None:
    if not state:
        state["step"] = 0
        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    state["step"] = int(state["step"]) + 1
    t = state["step"]
    _adamw_update(p, grad, state["exp_avg"], state["exp_avg_sq"], t, lr=lr, betas=betas, eps=eps,
                  weight_decay=weight_decay)


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


class SparseGradOptimizer(torch.optim.Optimizer):
    """One optimizer for a whole SparseGrad model, so one LR scheduler and one checkpoint cover it.

    Groups with key ``"sparsegrad_k"`` (int) hold exactly ONE ΔW' parameter each (k is per
    parameter) and are updated with :func:`sparse_step` using ``group["mode"]``. Every other group
    is plain AdamW (decoupled weight decay, identical to ``torch.optim.AdamW``).
    After each ``step()``, ``last_stats`` holds the mean ``kept_energy`` and mean ``overlap`` over
    the sparse params that had a gradient, and the total ``support`` (for logging).
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
            # Groups built without SparseGrad in mind (Trainer's optimizer_cls_and_kwargs) may contain ΔW'
            # parameters, recognisable by their ``sparsegrad_k`` attribute: give each its own sparse group, without
            # the dense group's weight decay (a decoupled decay of ΔW' is opt-in through "sparse_weight_decay").
            params = param_group["params"]
            params = [params] if isinstance(params, torch.Tensor) else list(params)
            sparse = [p for p in params if hasattr(p, "sparsegrad_k")]
            if sparse:
                options = {k: v for k, v in param_group.items() if k not in ("params", "weight_decay")}
                for p in sparse:
                    self.add_param_group({**options, "params": [p], "sparsegrad_k": p.sparsegrad_k,
                                          "weight_decay": param_group.get("sparse_weight_decay", 0.0)})
                param_group = {**param_group, "params": [p for p in params if not hasattr(p, "sparsegrad_k")]}
                if not param_group["params"]:
                    return
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if "sparsegrad_k" in group:
            group["params"][0].sparsegrad_routed = True  # this optimizer applies the top-k update
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
            refresh = group.setdefault("refresh_interval", getattr(p, "sparsegrad_refresh_interval", 0))
            if isinstance(refresh, bool) or not isinstance(refresh, int) or refresh < 0:
                raise ValueError(f"'refresh_interval' must be an int >= 0 (0: dynamic selection), got {refresh!r}")
            if refresh > 0 and group["mode"] == "sparse_adam":
                raise ValueError("selection='periodic' (refresh_interval > 0) needs mode 'adamw' or 'sgd', "
                                 "not 'sparse_adam'.")
            attach_support(p, self.state.get(p, {}), refresh)  # drop a hint another optimizer may have left

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        # Validate everything first so a bad gradient never leaves a half-applied step.
        for p in chain.from_iterable(g["params"] for g in self.param_groups):
            if p.grad is not None and p.grad.is_sparse:
                raise TypeError(
                    "SparseGradOptimizer does not accept sparse gradients: ΔW'.grad must be dense "
                    "(top-k selection happens in the optimizer)"
                )

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
                ke, ov, sup = _sparse_step_impl(
                    p, p.grad, self.state[p], k=group["sparsegrad_k"], lr=lr, mode=group["mode"],
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

        if energies:
            ke_mean, ov_mean = torch.stack([torch.stack(energies).nanmean(),
                                            torch.stack(overlaps).mean()]).tolist()  # one sync
            self.last_stats = {"kept_energy": ke_mean, "overlap": ov_mean, "support": float(support)}
            if math.isnan(ke_mean):  # periodic selection between refreshes: no full gradient to compare with
                del self.last_stats["kept_energy"]
        else:
            self.last_stats = {}
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Standard load, then restore the integer index tensors that torch casts to the param's
        float dtype (which would also corrupt indices >= 2**24)."""
        saved_ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        cur_params = chain.from_iterable(g["params"] for g in self.param_groups)
        id_map = dict(zip(saved_ids, cur_params))  # super() checks the lengths
        saved_state = state_dict["state"]
        super().load_state_dict(state_dict)
        for pid, p in id_map.items():
            entry = saved_state.get(pid)
            if not entry:
                continue
            for key in _INDEX_KEYS:
                val = entry.get(key)
                if isinstance(val, torch.Tensor):
                    self.state[p][key] = val.to(device=p.device, dtype=torch.int32)
        for group in self.param_groups:
            if "sparsegrad_k" in group:
                p = group["params"][0]
                attach_support(p, self.state.get(p, {}), group["refresh_interval"])


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

    One group per sparse param (k is per parameter):
    ``{"params": [p], "sparsegrad_k": k, "mode": mode, "lr": sparse_lr or lr, "weight_decay": sparse_weight_decay}``;
    then the dense params split as HF Trainer does: ``weight_decay`` for matrices, 0 for biases
    and other 1-D params (norm weights), since decaying those only hurts. Empty groups are omitted.
    """
    _check_mode(mode)
    groups: list[dict] = []
    for p, k in sparse_params:
        groups.append({
            "params": [p],
            "sparsegrad_k": int(k),
            "refresh_interval": int(getattr(p, "sparsegrad_refresh_interval", 0)),
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
    """(ΔW', k) of every trainable SparseGrad adapter tensor of ``model`` (found through the layers, not names)."""
    from .layer import SparseGradLayer

    found = []
    for module in model.modules():
        if isinstance(module, SparseGradLayer):
            for name, param in module.sparsegrad_delta.items():
                if param.requires_grad:
                    module._mark_delta(name)  # k and refresh interval, also after the Parameter was replaced
                    found.append((param, module.sparsegrad_k[name]))
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
    """One optimizer for a SparseGrad PeftModel: top-k updates of every ΔW', AdamW for all other trainable
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
