"""Tests for peft_sparsegrad.optim (top-k selection, the three sparse modes, dense AdamW groups, checkpoint round trip,
LR schedulers, half-precision base weights).

The trainable tensor is the base weight W of a ``SparseGradLinear`` (trained in place); the adapter is
ΔW' = ``layer.sparsegrad_delta[adapter]`` (a ``SparseDelta``). Every equivalence is checked on ΔW' against a reference
optimizer run densely on a ΔW' (or W') parameter fed the rotated gradient g = U_outᵀ G U_in, and on W against
W₀ + U_out ΔW'_ref U_inᵀ with W₀ copied before the layer was built (not ``layer.base_weight()``: that is derived from W
and ΔW' themselves)."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch

from peft_sparsegrad import BasisPair, SparseGradLinear
from peft_sparsegrad.delta import SparseDelta
from peft_sparsegrad.rounding import stochastic_round
from peft_sparsegrad.optim import (
    SPARSE_MODES,
    SparseGradOptimizer,
    SparseState,
    build_param_groups,
    select_topk,
    sparse_step,
)

SHAPE = (12, 10)
N = SHAPE[0] * SHAPE[1]
BASES = ["rotated", "identity"]


def _grads(n_steps: int, shape=SHAPE, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen) for _ in range(n_steps)]


def _orthogonal(n: int, gen: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).float()


class Adapted:
    """A Linear (out × in = ``shape``) adapted by a SparseGradLinear, with W₀ copied before the adapter existed.
    Half-precision W use the exact compensated update unless ``rounding`` says otherwise (the arithmetic is what these
    tests check; stochastic rounding has tests of its own)."""

    def __init__(self, shape=SHAPE, seed: int = 1, bases: str = "rotated", dtype: torch.dtype = torch.float32,
                 keep_ratio: float = 1.0, bases_dtype: str = "float16", rounding: str = "compensated"):
        gen = torch.Generator().manual_seed(seed)
        lin = torch.nn.Linear(shape[1], shape[0], bias=False)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(shape, generator=gen))
        lin.to(dtype)
        self.w0 = lin.weight.detach().clone()
        if bases == "identity":
            self.u_out, self.u_in = torch.eye(shape[0]), torch.eye(shape[1])
            pair = BasisPair(None, None)
        else:
            self.u_out, self.u_in = _orthogonal(shape[0], gen), _orthogonal(shape[1], gen)
            pair = BasisPair(self.u_out.clone(), self.u_in.clone())
        self.layer = SparseGradLinear(lin, "default", keep_ratio, pair, "t", bases_dtype=bases_dtype,
                                      rounding=rounding)
        if bases != "identity":  # the references use the bases as the layer stores them (float16 by default)
            self.u_out, self.u_in = self.layer.pair("default").float32()
        self.W = self.layer.get_base_layer().weight
        assert self.W.requires_grad and getattr(self.W, "sparsegrad_owner") is self.layer

    @property
    def delta(self) -> SparseDelta:
        return self.layer.sparsegrad_delta["default"]

    def dense_delta(self) -> torch.Tensor:
        return self.delta.to_dense()

    def rotate(self, g: torch.Tensor) -> torch.Tensor:
        return self.u_out.T @ g.float() @ self.u_in

    def expected_weight(self, delta: torch.Tensor) -> torch.Tensor:
        """W₀ + U_out ΔW' U_inᵀ in float32 (W₀ from before the adapter)."""
        return self.w0.float() + self.u_out @ delta.float() @ self.u_in.T

    def true_weight(self) -> torch.Tensor:
        """What W represents: W, plus the compensated-summation residual for half precision."""
        return self.layer._true_weight()

    def tolerance(self, expected: torch.Tensor) -> float:
        """How closely W (+ residual) represents W₀ + ΔW: float32 rounding for a float32 W. For bf16/fp16 W the
        compensated sum keeps ~16 bits of W, but each update U_out δ U_inᵀ is unrotated at W's own precision (bf16
        GEMMs, ~8 bits of the *change*): a bound proportional to the accumulated change, far below one update."""
        if self.W.dtype == torch.float32:
            return 1e-5
        return 2**-14 * self.w0.float().abs().max().item() + 2**-7 * (expected - self.w0.float()).abs().max().item()

    def assert_consistent(self, atol: float | None = None) -> None:
        expected = self.expected_weight(self.dense_delta())
        atol = self.tolerance(expected) if atol is None else atol
        torch.testing.assert_close(self.true_weight(), expected, rtol=0, atol=atol)


def _topk_sparse(g: torch.Tensor, k: int) -> torch.Tensor:
    """Reference top-k sparse COO gradient, built independently of select_topk."""
    idx = g.abs().flatten().argsort(descending=True)[:k].sort().values
    rows, cols = idx // g.shape[1], idx % g.shape[1]
    return torch.sparse_coo_tensor(torch.stack([rows, cols]), g.flatten()[idx], g.shape, check_invariants=True)


def _assert_tracks(ref, opt, p_ref, a: Adapted, grads, ref_grad=None, schedulers=(), atol=1e-6) -> None:
    """Step ``ref`` on the dense ΔW' reference ``p_ref`` (fed ``ref_grad(g')``, g' the rotated gradient) and ``opt`` on
    W (fed the dense G) in lockstep; ΔW' must follow p_ref, and W must follow W₀ + U_out p_ref U_inᵀ, every step."""
    for g in grads:
        g_rot = a.rotate(g)
        p_ref.grad = g_rot.clone() if ref_grad is None else ref_grad(g_rot)
        a.W.grad = g.clone()
        ref.step()
        opt.step()
        for scheduler in schedulers:
            scheduler.step()
        torch.testing.assert_close(a.dense_delta(), p_ref.detach(), rtol=0, atol=atol)
        torch.testing.assert_close(a.W.detach(), a.expected_weight(p_ref.detach()), rtol=0, atol=1e-5)


def _sparse_opt(p, k, mode, lr=1e-2, wd=0.0, **kw) -> SparseGradOptimizer:
    return SparseGradOptimizer([{"params": [p], "sparsegrad_k": k, "mode": mode, "weight_decay": wd}], lr=lr, **kw)


def _zeros_param(shape=SHAPE) -> torch.nn.Parameter:
    return torch.nn.Parameter(torch.zeros(shape))


# ---------------------------------------------------------------- select_topk


def test_select_topk_picks_largest_abs_including_negative():
    g = torch.tensor([[0.1, -5.0, 0.3], [2.0, -0.2, 4.0]])
    idx = select_topk(g, 3)
    assert idx.dtype == torch.int64
    assert idx.tolist() == [1, 3, 5]  # -5, 2, 4 ; sorted ascending
    assert select_topk(g, 1).tolist() == [1]  # the large negative wins
    assert select_topk(g, 6).tolist() == list(range(6))
    assert select_topk(g, 100).tolist() == list(range(6))


def test_select_topk_random_matches_reference():
    g = _grads(1, (30, 20), seed=3)[0]
    k = 37
    ref = set(g.abs().flatten().argsort(descending=True)[:k].tolist())
    idx = select_topk(g, k)
    assert set(idx.tolist()) == ref
    assert torch.all(idx[1:] > idx[:-1])


# ---------------------------------------------------------------- sparse_adam


@pytest.mark.parametrize("bases", BASES)
@pytest.mark.parametrize("k", [7, 40])
def test_sparse_adam_matches_torch_sparse_adam(k, bases):
    """ΔW' == torch.optim.SparseAdam on a dense ΔW' fed the top-k sparse rotated gradient; its dense moments equal
    ours on the support and are 0 elsewhere (so keeping them only on the support is the same arithmetic)."""
    a = Adapted(bases=bases)
    p_ref = _zeros_param()
    ref = torch.optim.SparseAdam([p_ref], lr=1e-2, betas=(0.8, 0.99), eps=1e-8)
    opt = _sparse_opt(a.W, k, "sparse_adam", lr=1e-2, betas=(0.8, 0.99), eps=1e-8)
    _assert_tracks(ref, opt, p_ref, a, _grads(6), ref_grad=lambda g: _topk_sparse(g, k))
    state, st_ref = opt.state[a.W], ref.state[p_ref]
    st = state["sparsegrad"]
    assert isinstance(st, SparseState) and st.mode == "sparse_adam"
    assert st.indices is a.delta.flat  # the moments live on ΔW''s support, one index tensor for both
    assert st.indices.dtype == torch.int32 and st.exp_avg.dtype == torch.float32
    support = st.indices.long()
    assert k <= support.numel() <= 6 * k and st.exp_avg.shape == st.exp_avg_sq.shape == (support.numel(),)
    for ours, theirs in ((st.exp_avg, st_ref["exp_avg"]), (st.exp_avg_sq, st_ref["exp_avg_sq"])):
        theirs = theirs.reshape(-1)
        torch.testing.assert_close(ours, theirs[support], rtol=0, atol=1e-6)
        off = torch.ones(N, dtype=torch.bool)
        off[support] = False
        assert torch.count_nonzero(theirs[off]) == 0
    assert int(state["step"]) == 6 and state["step"].ndim == 0
    assert st.prev_selected.dtype == torch.int32


def test_sparse_adam_weight_decay_only_at_selected():
    """Decoupled decay acts only where the update acts: an entry of ΔW' not selected this step keeps its value."""
    a = Adapted()
    state: dict = {}

    def grad_at(entries: dict[int, float]) -> torch.Tensor:
        e = torch.zeros(N)
        for i, v in entries.items():
            e[i] = v
        return a.u_out @ e.view(SHAPE) @ a.u_in.T  # rotated gradient = e (up to float rounding)

    sparse_step(a.W, grad_at({3: 1.0, 50: -2.0}), state, k=2, lr=0.1, mode="sparse_adam", weight_decay=0.5)
    first = a.dense_delta().view(-1).clone()
    assert (first != 0).nonzero().flatten().tolist() == [3, 50]
    sparse_step(a.W, grad_at({3: 1.0, 77: 4.0}), state, k=2, lr=0.1, mode="sparse_adam", weight_decay=0.5)
    second = a.dense_delta().view(-1)
    assert (second != first).nonzero().flatten().tolist() == [3, 77]
    assert second[50] == first[50]  # not selected: neither decayed nor moved
    a.assert_consistent()


# ---------------------------------------------------------------- adamw (lean)


@pytest.mark.parametrize("bases", BASES)
def test_adamw_mode_first_step_changes_exactly_k_entries_and_state_is_lean(bases):
    k = 9
    a = Adapted(bases=bases)
    grads = _grads(4)
    state: dict = {}
    sparse_step(a.W, grads[0], state, k=k, lr=1e-2, mode="adamw", weight_decay=0.1)
    changed = (a.dense_delta() != 0).view(-1).nonzero().flatten()
    assert changed.tolist() == select_topk(a.rotate(grads[0]), k).tolist()  # in the rotated basis
    a.assert_consistent()
    for t, g in enumerate(grads[1:], start=2):
        before = a.dense_delta()
        stats = sparse_step(a.W, g, state, k=k, lr=1e-2, mode="adamw")
        st = state["sparsegrad"]
        flat = st.indices
        n_sup = flat.numel()
        assert k <= n_sup <= t * k
        assert stats["support"] == n_sup
        assert flat is a.delta.flat and flat.dtype == torch.int32
        assert st.prev_selected.dtype == torch.int32
        assert st.exp_avg.shape == (n_sup,) and st.exp_avg_sq.shape == (n_sup,)
        assert a.delta.values.shape == (n_sup,) and a.delta.values.dtype == torch.float32
        assert torch.all(flat[1:] > flat[:-1])
        # the union contains every selection made so far, and nothing off it moves
        assert torch.isin(select_topk(a.rotate(g), k), flat.long()).all()
        moved = (a.dense_delta() != before).view(-1).nonzero().flatten()
        assert torch.isin(moved, flat.long()).all()
        a.assert_consistent()
    assert state["step"] == 4


def test_adamw_mode_union_keeps_old_moments():
    """Hand-checked merge: the moment of an entry selected only at step 1 keeps decaying."""
    a = Adapted(shape=(2, 3), bases="identity")
    st: dict = {}
    g1 = torch.tensor([[0.0, 5.0, 0.0], [0.0, 0.0, 0.0]])
    g2 = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, -3.0]])
    b1, b2 = 0.9, 0.999
    sparse_step(a.W, g1, st, k=1, lr=0.1, mode="adamw", betas=(b1, b2))
    sparse_step(a.W, g2, st, k=1, lr=0.1, mode="adamw", betas=(b1, b2))
    s = st["sparsegrad"]
    assert s.indices.tolist() == [1, 5]
    torch.testing.assert_close(s.exp_avg, torch.tensor([b1 * (1 - b1) * 5.0, (1 - b1) * -3.0]))
    torch.testing.assert_close(s.exp_avg_sq, torch.tensor([b2 * (1 - b2) * 25.0, (1 - b2) * 9.0]))


@pytest.mark.parametrize("bases", BASES)
@pytest.mark.parametrize("wd", [0.0, 0.05])
def test_adamw_mode_full_k_equals_torch_adamw(wd, bases):
    """k = numel: torch.optim.AdamW on ΔW' (decoupled decay of ΔW'); with wd = 0 that is AdamW on W' itself (which
    needs exactly orthogonal, i.e. float32, bases)."""
    a = Adapted(bases=bases, bases_dtype="float32")
    p_ref = _zeros_param()
    ref = torch.optim.AdamW([p_ref], lr=1e-2, betas=(0.85, 0.98), eps=1e-8, weight_decay=wd, foreach=False)
    opt = _sparse_opt(a.W, N, "adamw", lr=1e-2, wd=wd, betas=(0.85, 0.98), eps=1e-8)
    if wd == 0:
        w_prime = torch.nn.Parameter(a.rotate(a.w0))  # W'₀ = U_outᵀ W₀ U_in
        ref_w = torch.optim.AdamW([w_prime], lr=1e-2, betas=(0.85, 0.98), eps=1e-8, weight_decay=0.0, foreach=False)
    for g in _grads(6):
        if wd == 0:
            w_prime.grad = a.rotate(g)
            ref_w.step()
        _assert_tracks(ref, opt, p_ref, a, [g])
        if wd == 0:
            torch.testing.assert_close(a.W.detach(), a.u_out @ w_prime.detach() @ a.u_in.T, rtol=0, atol=1e-5)
    assert opt.state[a.W]["sparsegrad"].indices.numel() == N


# ---------------------------------------------------------------- sgd


@pytest.mark.parametrize("bases_dtype", ["float32", "float16"])
@pytest.mark.parametrize("bases", BASES)
def test_sgd_mode_full_k_equals_full_fine_tuning(bases, bases_dtype):
    """keep_ratio = 1 + SGD is torch.optim.SGD on W itself (the bases are orthogonal): to float32 rounding with
    float32 bases, to the ~1e-3 orthogonality of float16-stored ones (relative to the change of W) with those."""
    a = Adapted(bases=bases, bases_dtype=bases_dtype)
    p_ref = torch.nn.Parameter(a.w0.clone())
    ref = torch.optim.SGD([p_ref], lr=0.05)
    opt = _sparse_opt(a.W, N, "sgd", lr=0.05)
    for g in _grads(5):
        p_ref.grad = g.clone()
        a.W.grad = g.clone()
        ref.step()
        opt.step()
        if bases == "identity":
            atol = 1e-6
        elif bases_dtype == "float32":
            atol = 1e-5
        else:
            atol = 3e-3 * (p_ref.detach() - a.w0).abs().max().item()
        torch.testing.assert_close(a.W.detach(), p_ref.detach(), rtol=0, atol=atol)
    assert opt.last_stats["kept_energy"] == pytest.approx(1.0, abs=1e-5 if bases_dtype == "float32" else 3e-3)
    a.assert_consistent()


@pytest.mark.parametrize("bases", BASES)
@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_sgd_mode_full_k_equals_torch_sgd_on_delta(wd, bases):
    a = Adapted(bases=bases)
    p_ref = _zeros_param()
    ref = torch.optim.SGD([p_ref], lr=0.05, weight_decay=wd)
    opt = _sparse_opt(a.W, N, "sgd", lr=0.05, wd=wd)
    _assert_tracks(ref, opt, p_ref, a, _grads(5))
    st = opt.state[a.W]["sparsegrad"]
    assert st.mode == "sgd" and st.exp_avg is None and st.exp_avg_sq is None  # no moments


@pytest.mark.parametrize("bases", BASES)
def test_sgd_mode_topk_only_touches_selected(bases):
    a = Adapted(bases=bases)
    g = _grads(1)[0]
    st: dict = {}
    sparse_step(a.W, g, st, k=5, lr=0.1, mode="sgd")
    g_rot = a.rotate(g)
    sel = select_topk(g_rot, 5)
    expected = torch.zeros(N)
    expected[sel] = -0.1 * g_rot.view(-1)[sel]
    torch.testing.assert_close(a.dense_delta().view(-1), expected, rtol=0, atol=1e-6)
    assert a.delta.flat.tolist() == sel.tolist()
    a.assert_consistent()


@pytest.mark.parametrize("bases", BASES)
@pytest.mark.parametrize("mode", SPARSE_MODES)
def test_at_most_k_entries_of_delta_change_per_step(mode, bases):
    """sparse_adam / sgd: exactly the selected entries change; adamw: entries of the support keep moving with
    momentum, but the support grows by at most k per step."""
    k = 6
    a = Adapted(bases=bases)
    opt = _sparse_opt(a.W, k, mode, lr=1e-2, wd=0.01)
    n_support = 0
    for g in _grads(6, seed=4):
        before = a.dense_delta()
        a.W.grad = g.clone()
        opt.step()
        moved = int((a.dense_delta() != before).sum())
        if mode == "adamw":
            assert a.delta.nnz - n_support <= k
        else:
            assert moved <= k
        n_support = a.delta.nnz
        assert n_support <= 6 * k
        a.assert_consistent()


# ---------------------------------------------------------------- the in-place weight


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bases", BASES)
@pytest.mark.parametrize("mode", SPARSE_MODES)
def test_weight_equals_base_plus_unrotated_delta_after_many_steps(mode, bases, dtype):
    """W (+ residual) == W₀ + U_out ΔW' U_inᵀ after every step, W₀ copied before the adapter was created."""
    a = Adapted(shape=(24, 16), bases=bases, dtype=dtype)
    opt = _sparse_opt(a.W, 20, mode, lr=3e-2, wd=0.01)
    for step, g in enumerate(_grads(12, shape=(24, 16), seed=5)):
        a.W.grad = g.to(dtype)
        opt.step()
        assert a.W.dtype == dtype
        a.assert_consistent()
    assert a.delta.nnz > 20


@pytest.mark.parametrize("bases", BASES)
def test_bf16_weight_keeps_small_updates_with_the_residual(bases):
    """bf16 W, keep_ratio = 1, SGD, lr so small that each update is far below W's rounding step: W + residual tracks
    the float32 run of the same updates, where plain bf16 accumulation loses them (W would not move at all)."""
    shape, lr, steps = (16, 12), 1e-4, 20
    a = Adapted(shape=shape, bases=bases, dtype=torch.bfloat16)
    opt = _sparse_opt(a.W, shape[0] * shape[1], "sgd", lr=lr)
    ref = a.w0.float().clone()  # float32 reference of the same updates
    plain = a.w0.clone()  # bf16 accumulation without compensation
    for g in _grads(steps, shape=shape, seed=11):
        g = g.bfloat16()
        a.W.grad = g.clone()
        opt.step()
        ref -= lr * g.float()
        plain -= lr * g
    assert a.layer._residual is not None and a.layer._residual.dtype == torch.bfloat16
    err = (a.true_weight() - ref).abs().max().item()
    err_plain = (plain.float() - ref).abs().max().item()
    moved = (ref - a.w0.float()).abs().max().item()
    assert err_plain > 0.3 * moved  # plain bf16 really loses (most of) the updates
    assert err < 0.02 * err_plain, (err, err_plain)
    # the high part W itself is the bf16 rounding of the tracked value
    ulp = torch.finfo(torch.bfloat16).eps * ref.abs().max().item()
    assert (a.W.detach().float() - ref).abs().max().item() <= ulp
    # ΔW' itself is float32: the sum of the rotated updates
    torch.testing.assert_close(a.true_weight(), a.expected_weight(a.dense_delta()), rtol=0, atol=1e-4)


# ---------------------------------------------------------------- stats / edge cases


@pytest.mark.parametrize("mode", SPARSE_MODES)
def test_stats_and_zero_gradient(mode):
    a = Adapted()
    st: dict = {}
    g = _grads(1)[0]
    s1 = sparse_step(a.W, g, st, k=10, lr=1e-2, mode=mode)
    g_rot = a.rotate(g)
    sel = select_topk(g_rot, 10)
    assert s1["overlap"] == 0.0
    assert s1["kept_energy"] == pytest.approx(float(g_rot.view(-1)[sel].square().sum() / g.square().sum()), rel=1e-4)
    s2 = sparse_step(a.W, g, st, k=10, lr=1e-2, mode=mode)  # same gradient -> same selection
    assert s2["overlap"] == pytest.approx(1.0)
    s3 = sparse_step(a.W, torch.zeros(SHAPE), st, k=10, lr=1e-2, mode=mode)
    assert s3["kept_energy"] == 1.0
    assert torch.isfinite(a.W).all() and torch.isfinite(a.delta.values).all()
    s = st["sparsegrad"]
    for v in (s.exp_avg, s.exp_avg_sq):
        if v is not None:
            assert torch.isfinite(v).all()


def test_optimizer_zero_grad_first_step_no_nan():
    a = Adapted()
    opt = _sparse_opt(a.W, 10, "sparse_adam")
    a.W.grad = torch.zeros(SHAPE)
    opt.step()
    assert torch.isfinite(a.W).all() and torch.isfinite(a.delta.values).all()
    assert opt.last_stats["kept_energy"] == 1.0


def test_unknown_mode_raises_value_error():
    a = Adapted()
    with pytest.raises(ValueError, match="sparse_adam"):
        sparse_step(a.W, torch.ones(SHAPE), {}, k=3, lr=0.1, mode="adam")
    with pytest.raises(ValueError):
        _sparse_opt(a.W, 3, "lion")
    with pytest.raises(ValueError):
        SparseGradOptimizer([a.W], mode="nope")
    with pytest.raises(ValueError):
        build_param_groups([(a.W, 3)], [], lr=0.1, mode="nope")


def test_step_errors():
    a = Adapted()
    state: dict = {}
    sparse_step(a.W, torch.ones(SHAPE), state, k=3, lr=0.1, mode="adamw")
    with pytest.raises(ValueError, match="created by mode 'adamw'"):
        sparse_step(a.W, torch.ones(SHAPE), state, k=3, lr=0.1, mode="sgd")
    with pytest.raises(ValueError, match="does not fit"):
        sparse_step(a.W, torch.ones(SHAPE[1], SHAPE[0]), {}, k=3, lr=0.1)
    with pytest.raises(ValueError, match="not the weight of a trainable SparseGrad layer"):
        sparse_step(torch.nn.Parameter(torch.zeros(SHAPE)), torch.ones(SHAPE), {}, k=3, lr=0.1)
    with pytest.raises(ValueError, match="not the weight of a trainable SparseGrad layer"):
        _sparse_opt(torch.nn.Parameter(torch.zeros(SHAPE)), 3, "adamw")


def test_sparse_grad_raises_type_error():
    a = Adapted()
    dense = torch.nn.Parameter(torch.randn(3))
    opt = SparseGradOptimizer([{"params": [a.W], "sparsegrad_k": 3, "mode": "adamw"}, {"params": [dense]}], lr=0.1)
    a.W.grad = torch.randn(SHAPE)
    dense.grad = torch.randn(3).to_sparse()
    w_before = a.W.detach().clone()
    with pytest.raises(TypeError):
        opt.step()
    assert torch.equal(a.W.detach(), w_before) and a.delta.nnz == 0  # nothing applied
    dense.grad = None
    a.W.grad = torch.randn(SHAPE).to_sparse()
    with pytest.raises(TypeError):
        opt.step()


def test_none_grad_is_skipped():
    a = Adapted()
    opt = _sparse_opt(a.W, 3, "adamw")
    w_before = a.W.detach().clone()
    opt.step()
    assert torch.equal(a.W.detach(), w_before) and a.delta.nnz == 0
    assert len(opt.state[a.W]) == 0
    assert opt.last_stats == {}


def test_sparse_group_must_have_one_param():
    with pytest.raises(ValueError):
        SparseGradOptimizer([{"params": [Adapted().W, Adapted(seed=2).W], "sparsegrad_k": 3}])


# ---------------------------------------------------------------- dense groups


def test_dense_groups_equal_torch_adamw_with_weight_decay():
    torch.manual_seed(0)
    lin_ref = torch.nn.Linear(6, 4)
    lin = copy.deepcopy(lin_ref)
    ref = torch.optim.AdamW(
        [{"params": [lin_ref.weight], "weight_decay": 0.1}, {"params": [lin_ref.bias], "weight_decay": 0.0}],
        lr=3e-3, betas=(0.9, 0.99), eps=1e-7, foreach=False,
    )
    groups = build_param_groups([], [lin.weight, lin.bias], lr=3e-3, weight_decay=0.1)
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    opt = SparseGradOptimizer(groups, lr=3e-3, betas=(0.9, 0.99), eps=1e-7)
    x = torch.randn(5, 6)
    for _ in range(5):
        for m, o in ((lin_ref, ref), (lin, opt)):
            o.zero_grad()
            m(x).square().sum().backward()
            o.step()
        torch.testing.assert_close(lin.weight, lin_ref.weight, rtol=0, atol=1e-6)
        torch.testing.assert_close(lin.bias, lin_ref.bias, rtol=0, atol=1e-6)


def test_build_param_groups_layout():
    p1, p2 = Adapted().W, Adapted(shape=(4, 5), seed=3).W
    w, b = torch.nn.Parameter(torch.randn(3, 3)), torch.nn.Parameter(torch.randn(3))
    groups = build_param_groups([(p1, 5), (p2, 2)], [w, b], lr=1e-3, weight_decay=0.01,
                                sparse_lr=1e-2, sparse_weight_decay=0.001, mode="sgd")
    assert len(groups) == 4
    assert groups[0]["params"] == [p1] and groups[0]["sparsegrad_k"] == 5
    assert groups[1]["params"] == [p2] and groups[1]["sparsegrad_k"] == 2
    for g in groups[:2]:
        assert g["mode"] == "sgd" and g["lr"] == 1e-2 and g["weight_decay"] == 0.001
        assert g["refresh_interval"] == 0  # dynamic selection (the layers' setting)
    assert groups[2]["params"] == [w] and groups[2]["weight_decay"] == 0.01 and groups[2]["lr"] == 1e-3
    assert groups[3]["params"] == [b] and groups[3]["weight_decay"] == 0.0
    assert build_param_groups([(p1, 5)], [], lr=1e-3)[0]["lr"] == 1e-3  # sparse_lr defaults to lr
    SparseGradOptimizer(groups)  # accepted by the optimizer


# ---------------------------------------------------------------- checkpoint / schedulers

RT_SHAPE = (40, 30)  # 1200 entries: flat indices above 256 are not representable in bf16


def _make_model_opt(mode: str, k: int = 60, dtype: torch.dtype = torch.float32, refresh_interval: int = 0):
    a = Adapted(shape=RT_SHAPE, seed=7, dtype=dtype)
    w = torch.nn.Parameter(torch.randn(4, 3, generator=torch.Generator().manual_seed(8)).to(dtype))
    b = torch.nn.Parameter(torch.randn(4, generator=torch.Generator().manual_seed(9)).to(dtype))
    groups = build_param_groups([(a.W, k)], [w, b], lr=1e-2, weight_decay=0.05, sparse_weight_decay=0.01, mode=mode)
    groups[0]["refresh_interval"] = refresh_interval
    return a, (a.W, w, b), SparseGradOptimizer(groups)


def _set_grads(params, t: int) -> None:
    gen = torch.Generator().manual_seed(100 + t)
    for q in params:
        q.grad = torch.randn(q.shape, generator=gen).to(q.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", [*SPARSE_MODES, "periodic"])
def test_state_dict_round_trip_continues_identically(mode, dtype):
    """Save ΔW' (as the adapter file does) and the optimizer state; a fresh layer + optimizer loaded from them
    continue exactly: torch's load_state_dict casts state tensors to W's dtype (bf16), which must not reach the
    int32 indices and float32 moments inside the SparseState."""
    update, refresh = ("adamw", 2) if mode == "periodic" else (mode, 0)
    a, params_a, opt_a = _make_model_opt(update, dtype=dtype, refresh_interval=refresh)
    for t in range(3):
        _set_grads(params_a, t)
        opt_a.step()

    buf = io.BytesIO()
    torch.save({"delta": (a.delta.flat, a.delta.values), "dense": [q.detach() for q in params_a[1:]],
                "opt": opt_a.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)  # what the Trainer does: SparseState is a registered safe global

    b, params_b, opt_b = _make_model_opt(update, dtype=dtype, refresh_interval=refresh)
    b.layer.set_delta("default", SparseDelta(ckpt["delta"][0].clone(), ckpt["delta"][1].clone(), RT_SHAPE))
    with torch.no_grad():
        for q, saved in zip(params_b[1:], ckpt["dense"]):
            q.copy_(saved)
    opt_b.load_state_dict(ckpt["opt"])
    b.assert_consistent()

    st_a, st_b = opt_a.state[params_a[0]]["sparsegrad"], opt_b.state[params_b[0]]["sparsegrad"]
    assert isinstance(st_b, SparseState) and st_b.mode == update
    for name in ("indices", "prev_selected"):
        if getattr(st_a, name) is not None:
            assert getattr(st_b, name).dtype == torch.int32
            assert torch.equal(getattr(st_b, name), getattr(st_a, name))
    if update != "sgd":
        assert st_b.indices.max() > 256  # a bf16 cast would have destroyed them
        for name in ("exp_avg", "exp_avg_sq"):
            assert getattr(st_b, name).dtype == torch.float32
            assert torch.equal(getattr(st_b, name), getattr(st_a, name))
    assert st_b.selected_at == st_a.selected_at
    assert int(opt_b.state[params_b[0]]["step"]) == 3

    for t in range(3, 7):
        _set_grads(params_a, t)
        _set_grads(params_b, t)
        opt_a.step()
        opt_b.step()
        # ΔW' depends only on the gradients and the state: bit-identical
        assert torch.equal(b.delta.flat, a.delta.flat) and torch.equal(b.delta.values, a.delta.values)
        # W: rebuilt once from ΔW' vs updated incrementally, equal to rounding
        torch.testing.assert_close(b.true_weight(), a.true_weight(), rtol=0,
                                   atol=1e-6 if dtype == torch.float32 else 2 * a.tolerance(a.true_weight()))
        for qa, qb in zip(params_a[1:], params_b[1:]):
            assert torch.equal(qa, qb)
    st_b = opt_b.state[params_b[0]]["sparsegrad"]
    if update != "sgd":
        assert st_b.indices.dtype == torch.int32 and st_b.exp_avg.dtype == torch.float32
    if mode != "periodic" and update != "sgd":
        assert st_b.indices is b.delta.flat  # re-attached to ΔW''s support after the load


def test_get_linear_schedule_with_warmup_applies_to_sparse_groups():
    transformers = pytest.importorskip("transformers")
    a, (p, w, b), opt = _make_model_opt("sgd", k=RT_SHAPE[0] * RT_SHAPE[1])
    sched = transformers.get_linear_schedule_with_warmup(opt, num_warmup_steps=2, num_training_steps=10)
    expected_factors = [0.0, 0.5, 1.0, 7 / 8]
    for t, factor in enumerate(expected_factors):
        assert opt.param_groups[0]["lr"] == pytest.approx(1e-2 * factor)
        before = a.dense_delta()
        _set_grads((p, w, b), t)
        g_rot = a.rotate(p.grad)
        opt.step()
        sched.step()
        # sgd with k = numel: ΔW' ← ΔW' - lr (g' + wd ΔW'), so the effective lr is observable
        expected = before - 1e-2 * factor * (g_rot + 0.01 * before)
        torch.testing.assert_close(a.dense_delta(), expected, rtol=0, atol=1e-6)
        a.assert_consistent()


def test_lambda_lr_with_sparse_adam():
    a = Adapted()
    p_ref = _zeros_param()
    k = 20
    ref = torch.optim.SparseAdam([p_ref], lr=1e-2)
    opt = _sparse_opt(a.W, k, "sparse_adam", lr=1e-2)
    lam = lambda step: 1.0 / (1 + step)  # noqa: E731
    s_ref = torch.optim.lr_scheduler.LambdaLR(ref, lam)
    s = torch.optim.lr_scheduler.LambdaLR(opt, lam)
    _assert_tracks(ref, opt, p_ref, a, _grads(4, seed=5), ref_grad=lambda g: _topk_sparse(g, k),
                   schedulers=(s_ref, s))
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-2 / 5)
    assert math.isfinite(opt.last_stats["overlap"])


def test_sparse_state_is_not_cast_by_load_state_dict_of_a_large_bf16_layer():
    """The Trainer's own optimizer casts state tensors to the param dtype on resume; indices beyond 2**24 (not exact
    in float32, let alone bf16) must stay exact because they sit inside the SparseState object."""
    shape = (5000, 4000)
    lin = torch.nn.Linear(shape[1], shape[0], bias=False, dtype=torch.bfloat16)
    with torch.no_grad():
        lin.weight.zero_()
    layer = SparseGradLinear(lin, "default", 1e-6, BasisPair(None, None), "t")
    W = layer.get_base_layer().weight
    g = torch.zeros(shape, dtype=torch.bfloat16)
    g[4999, 3999] = 1.0
    g[4321, 17] = -2.0
    opt = _sparse_opt(W, 2, "adamw", lr=0.1)
    W.grad = g
    opt.step()
    expected = [4321 * 4000 + 17, 4999 * 4000 + 3999]
    sd = copy.deepcopy(opt.state_dict())
    opt2 = _sparse_opt(W, 2, "adamw", lr=0.1)
    opt2.load_state_dict(sd)
    st = opt2.state[W]["sparsegrad"]
    assert st.indices.dtype == torch.int32 and st.indices.tolist() == expected
    assert st.prev_selected.tolist() == expected and st.exp_avg.dtype == torch.float32
    assert layer.sparsegrad_delta["default"].flat.tolist() == expected
    assert W.detach().view(-1)[expected].float().tolist() == pytest.approx([0.1, -0.1], rel=1e-2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_compensated_update_in_row_blocks_equals_one_pass(dtype, monkeypatch):
    """The half-precision weight update runs in row blocks (cache-sized float32 temporaries on CPU): any block size,
    including ones that do not divide the rows, gives bit-identically the whole-matrix compensated sum."""
    from peft_sparsegrad import rotation

    gen = torch.Generator().manual_seed(3)
    changes = [torch.randn(SHAPE, generator=gen) * 1e-3 for _ in range(3)]
    results = []
    for block in (SHAPE[0] * SHAPE[1], 5 * SHAPE[1], 7, 1):  # one pass, 5 rows, < 1 row (one row per block)
        monkeypatch.setitem(rotation.BLOCK_ELEMENTS, "cpu", block)
        a = Adapted(dtype=dtype)
        for change in changes:
            a.layer._add_dense_to_weight(change)
        results.append((a.W.detach().clone(), a.layer._residual.clone()))
        ref = a.w0.float() + sum(changes)
        # W + residual (both half precision) hold ~twice the mantissa: error ~eps², far below W's own rounding eps
        eps = torch.finfo(dtype).eps
        assert (a.true_weight() - ref).abs().max() <= 2 * eps**2 * ref.abs().max()
    for w, r in results[1:]:
        assert torch.equal(w, results[0][0]) and torch.equal(r, results[0][1])


# ---------------------------------------------------------------- stochastic rounding


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_stochastic_rounding_is_unbiased_and_picks_a_neighbour(dtype):
    """SR(x) is one of the two representable neighbours of x, and E[SR(x)] = x (mean of many draws)."""
    torch.manual_seed(0)
    x = torch.randn(64) * 3
    x[0], x[1] = 1.0, -2.5  # exactly representable: always themselves
    draws = torch.stack([stochastic_round(x.clone(), dtype).float() for _ in range(4000)])
    lower = torch.where(x.to(dtype).float() <= x, x.to(dtype).float(),
                        torch.nextafter(x.to(dtype), torch.tensor(-torch.inf, dtype=dtype)).float())
    upper = torch.nextafter(lower.to(dtype), torch.tensor(torch.inf, dtype=dtype)).float()
    assert ((draws == lower) | (draws == upper)).all()
    assert (draws[:, :2] == x[:2]).all()
    gap = upper - lower
    # 4000 Bernoulli draws per entry: the mean is within 5 standard errors (≤ gap / (2 √4000)) of x
    assert ((draws.mean(0) - x).abs() <= 5 * gap / (2 * 4000**0.5)).all()


@pytest.mark.parametrize("bases", BASES)
def test_bf16_weight_keeps_small_updates_with_stochastic_rounding(bases):
    """bf16 W, keep_ratio = 1, SGD, updates far below W's rounding step: with stochastic rounding (no residual) W
    tracks the float32 run in expectation — the mean error over all entries stays near zero and far below plain
    bf16's, which loses the updates — while each entry carries zero-mean rounding noise of a few ulps."""
    torch.manual_seed(0)
    shape, lr, steps = (96, 64), 1e-3, 20
    a = Adapted(shape=shape, bases=bases, dtype=torch.bfloat16, rounding="stochastic")
    opt = _sparse_opt(a.W, shape[0] * shape[1], "sgd", lr=lr)
    ref = a.w0.float().clone()
    plain = a.w0.clone()
    for g in _grads(steps, shape=shape, seed=11):
        g = g.bfloat16()
        a.W.grad = g.clone()
        opt.step()
        ref -= lr * g.float()
        plain -= lr * g
    assert a.layer._residual is None
    moved = ref - a.w0.float()
    err = a.W.detach().float() - ref
    # the signal: SR keeps the updates (projection of W's change on the true change ≈ 1), plain bf16 loses them
    gain = ((a.W.detach().float() - a.w0.float()) * moved).sum() / moved.square().sum()
    gain_plain = ((plain.float() - a.w0.float()) * moved).sum() / moved.square().sum()
    assert abs(gain - 1) < 0.1 and gain_plain < 0.7, (gain, gain_plain)
    # the noise: zero mean, per entry within a few ulps of W
    ulp = torch.finfo(torch.bfloat16).eps * ref.abs().max().item()
    assert abs(err.mean().item()) < 0.05 * ulp and err.abs().max().item() < 4 * ulp
    # ΔW' itself is float32: the sum of the rotated updates (rotated at bf16 precision), whatever W's rounding did
    expected = -lr * sum(a.rotate(g.bfloat16().float()) for g in _grads(steps, shape=shape, seed=11))
    torch.testing.assert_close(a.dense_delta(), expected, rtol=0, atol=2**-7 * expected.abs().max().item())
