"""Tests for peft_sparsegrad.optim (top-k selection, the three sparse modes, dense AdamW groups,
checkpoint round trip, LR schedulers)."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch

from peft_sparsegrad.optim import (
    SPARSE_MODES,
    SparseGradOptimizer,
    build_param_groups,
    select_topk,
    sparse_step,
    state_indices,
)

SHAPE = (12, 10)
N = SHAPE[0] * SHAPE[1]


def _grads(n_steps: int, shape=SHAPE, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen) for _ in range(n_steps)]


def _param(shape=SHAPE, seed: int = 1) -> torch.nn.Parameter:
    gen = torch.Generator().manual_seed(seed)
    return torch.nn.Parameter(torch.randn(shape, generator=gen))


def _topk_sparse(g: torch.Tensor, k: int) -> torch.Tensor:
    """Reference top-k sparse COO gradient, built independently of select_topk."""
    idx = g.abs().flatten().argsort(descending=True)[:k].sort().values
    rows, cols = idx // g.shape[1], idx % g.shape[1]
    return torch.sparse_coo_tensor(
        torch.stack([rows, cols]), g.flatten()[idx], g.shape, check_invariants=True
    )


def _assert_tracks(ref, opt, p_ref, p, grads, ref_grad=torch.Tensor.clone, schedulers=()) -> None:
    """Step ``ref`` (fed ``ref_grad(g)``) and ``opt`` (fed the dense g) in lockstep; p must follow p_ref each step."""
    for g in grads:
        p_ref.grad = ref_grad(g)
        p.grad = g.clone()
        ref.step()
        opt.step()
        for scheduler in schedulers:
            scheduler.step()
        torch.testing.assert_close(p, p_ref, rtol=0, atol=1e-6)


def _sparse_opt(p, k, mode, lr=1e-2, wd=0.0, **kw) -> SparseGradOptimizer:
    return SparseGradOptimizer(
        [{"params": [p], "sparsegrad_k": k, "mode": mode, "weight_decay": wd}], lr=lr, **kw
    )


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


@pytest.mark.parametrize("k", [7, 40])
def test_sparse_adam_matches_torch_sparse_adam(k):
    p_ref = _param()
    p = _param()
    ref = torch.optim.SparseAdam([p_ref], lr=1e-2, betas=(0.8, 0.99), eps=1e-8)
    opt = _sparse_opt(p, k, "sparse_adam", lr=1e-2, betas=(0.8, 0.99), eps=1e-8)
    _assert_tracks(ref, opt, p_ref, p, _grads(6), ref_grad=lambda g: _topk_sparse(g, k))
    st, st_ref = opt.state[p], ref.state[p_ref]
    torch.testing.assert_close(st["exp_avg"], st_ref["exp_avg"], rtol=0, atol=1e-6)
    torch.testing.assert_close(st["exp_avg_sq"], st_ref["exp_avg_sq"], rtol=0, atol=1e-6)
    assert int(st["step"]) == 6
    assert st["prev_selected"].dtype == torch.int32


def test_sparse_adam_weight_decay_only_at_selected():
    p = _param()
    p0 = p.detach().clone()
    g = torch.zeros(SHAPE)
    g.view(-1)[[3, 50]] = torch.tensor([1.0, -2.0])
    state: dict = {}
    sparse_step(p, g, state, k=2, lr=0.1, mode="sparse_adam", weight_decay=0.5)
    changed = (p.detach() != p0).view(-1).nonzero().flatten().tolist()
    assert changed == [3, 50]


# ---------------------------------------------------------------- adamw (lean)


def test_adamw_mode_first_step_changes_exactly_k_entries_and_state_is_lean():
    k = 9
    p = _param()
    p0 = p.detach().clone()
    grads = _grads(4)
    state: dict = {}
    sparse_step(p, grads[0], state, k=k, lr=1e-2, mode="adamw", weight_decay=0.1)
    changed = (p.detach() != p0).view(-1).nonzero().flatten()
    assert changed.tolist() == select_topk(grads[0], k).tolist()
    for t, g in enumerate(grads[1:], start=2):
        stats = sparse_step(p, g, state, k=k, lr=1e-2, mode="adamw")
        flat = state_indices(state, p)
        n_sup = flat.numel()
        assert k <= n_sup <= t * k
        assert stats["support"] == n_sup
        assert state["indices"].dtype == torch.int32
        assert state["prev_selected"].dtype == torch.int32
        assert state["exp_avg"].shape == (n_sup,) and state["exp_avg_sq"].shape == (n_sup,)
        assert state["indices"].shape == (2, n_sup)  # (row, column) pairs, exact through a float32 cast
        assert torch.all(flat[1:] > flat[:-1])
        # the union contains every selection made so far
        assert torch.isin(select_topk(g, k), flat).all()
    assert state["step"] == 4


def test_adamw_mode_union_keeps_old_moments():
    """Hand-checked merge: the moment of an entry selected only at step 1 keeps decaying."""
    p = torch.nn.Parameter(torch.zeros(2, 3))
    st: dict = {}
    g1 = torch.tensor([[0.0, 5.0, 0.0], [0.0, 0.0, 0.0]])
    g2 = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, -3.0]])
    b1, b2 = 0.9, 0.999
    sparse_step(p, g1, st, k=1, lr=0.1, mode="adamw", betas=(b1, b2))
    sparse_step(p, g2, st, k=1, lr=0.1, mode="adamw", betas=(b1, b2))
    assert state_indices(st, p).tolist() == [1, 5]
    torch.testing.assert_close(st["exp_avg"], torch.tensor([b1 * (1 - b1) * 5.0, (1 - b1) * -3.0]))
    torch.testing.assert_close(
        st["exp_avg_sq"], torch.tensor([b2 * (1 - b2) * 25.0, (1 - b2) * 9.0])
    )


@pytest.mark.parametrize("wd", [0.0, 0.05])
def test_adamw_mode_full_k_equals_torch_adamw(wd):
    p_ref, p = _param(), _param()
    ref = torch.optim.AdamW([p_ref], lr=1e-2, betas=(0.85, 0.98), eps=1e-8, weight_decay=wd, foreach=False)
    opt = _sparse_opt(p, N, "adamw", lr=1e-2, wd=wd, betas=(0.85, 0.98), eps=1e-8)
    _assert_tracks(ref, opt, p_ref, p, _grads(6))
    assert state_indices(opt.state[p], p).numel() == N


# ---------------------------------------------------------------- sgd


@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_sgd_mode_full_k_equals_torch_sgd(wd):
    p_ref, p = _param(), _param()
    ref = torch.optim.SGD([p_ref], lr=0.05, weight_decay=wd)
    opt = _sparse_opt(p, N, "sgd", lr=0.05, wd=wd)
    _assert_tracks(ref, opt, p_ref, p, _grads(5))
    assert opt.last_stats["kept_energy"] == pytest.approx(1.0)


def test_sgd_mode_topk_only_touches_selected():
    p = _param()
    p0 = p.detach().clone()
    g = _grads(1)[0]
    st: dict = {}
    sparse_step(p, g, st, k=5, lr=0.1, mode="sgd")
    sel = select_topk(g, 5)
    expected = p0.clone().view(-1)
    expected[sel] -= 0.1 * g.view(-1)[sel]
    torch.testing.assert_close(p.detach().view(-1), expected)


# ---------------------------------------------------------------- stats / edge cases


@pytest.mark.parametrize("mode", SPARSE_MODES)
def test_stats_and_zero_gradient(mode):
    p = _param()
    st: dict = {}
    g = _grads(1)[0]
    s1 = sparse_step(p, g, st, k=10, lr=1e-2, mode=mode)
    sel = select_topk(g, 10)
    assert s1["overlap"] == 0.0
    assert s1["kept_energy"] == pytest.approx(float(g.view(-1)[sel].square().sum() / g.square().sum()), rel=1e-5)
    s2 = sparse_step(p, g, st, k=10, lr=1e-2, mode=mode)  # same gradient -> same selection
    assert s2["overlap"] == pytest.approx(1.0)
    s3 = sparse_step(p, torch.zeros(SHAPE), st, k=10, lr=1e-2, mode=mode)
    assert s3["kept_energy"] == 1.0
    assert torch.isfinite(p).all()
    for v in st.values():
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            assert torch.isfinite(v).all()


def test_optimizer_zero_grad_first_step_no_nan():
    p = _param()
    opt = _sparse_opt(p, 10, "sparse_adam")
    p.grad = torch.zeros(SHAPE)
    opt.step()
    assert torch.isfinite(p).all()
    assert opt.last_stats["kept_energy"] == 1.0


def test_unknown_mode_raises_value_error():
    p = _param()
    with pytest.raises(ValueError, match="sparse_adam"):
        sparse_step(p, torch.ones(SHAPE), {}, k=3, lr=0.1, mode="adam")
    with pytest.raises(ValueError):
        _sparse_opt(p, 3, "lion")
    with pytest.raises(ValueError):
        SparseGradOptimizer([p], mode="nope")
    with pytest.raises(ValueError):
        build_param_groups([(p, 3)], [], lr=0.1, mode="nope")


def test_sparse_grad_raises_type_error():
    p = _param()
    dense = torch.nn.Parameter(torch.randn(3))
    opt = SparseGradOptimizer(
        [{"params": [p], "sparsegrad_k": 3, "mode": "adamw"}, {"params": [dense]}], lr=0.1
    )
    p.grad = torch.randn(SHAPE)
    dense.grad = torch.randn(3).to_sparse()
    p0 = p.detach().clone()
    with pytest.raises(TypeError):
        opt.step()
    assert torch.equal(p.detach(), p0)  # nothing applied
    dense.grad = None
    p.grad = torch.randn(SHAPE).to_sparse()
    with pytest.raises(TypeError):
        opt.step()


def test_none_grad_is_skipped():
    p = _param()
    opt = _sparse_opt(p, 3, "adamw")
    p0 = p.detach().clone()
    opt.step()
    assert torch.equal(p.detach(), p0)
    assert len(opt.state[p]) == 0
    assert opt.last_stats == {}


def test_sparse_group_must_have_one_param():
    with pytest.raises(ValueError):
        SparseGradOptimizer([{"params": [_param(), _param()], "sparsegrad_k": 3}])


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
    p1, p2 = _param(), _param((4, 5))
    w, b = torch.nn.Parameter(torch.randn(3, 3)), torch.nn.Parameter(torch.randn(3))
    groups = build_param_groups([(p1, 5), (p2, 2)], [w, b], lr=1e-3, weight_decay=0.01,
                                sparse_lr=1e-2, sparse_weight_decay=0.001, mode="sgd")
    assert len(groups) == 4
    assert groups[0]["params"] == [p1] and groups[0]["sparsegrad_k"] == 5
    assert groups[1]["params"] == [p2] and groups[1]["sparsegrad_k"] == 2
    for g in groups[:2]:
        assert g["mode"] == "sgd" and g["lr"] == 1e-2 and g["weight_decay"] == 0.001
    assert groups[2]["params"] == [w] and groups[2]["weight_decay"] == 0.01 and groups[2]["lr"] == 1e-3
    assert groups[3]["params"] == [b] and groups[3]["weight_decay"] == 0.0
    assert build_param_groups([(p1, 5)], [], lr=1e-3)[0]["lr"] == 1e-3  # sparse_lr defaults to lr
    SparseGradOptimizer(groups)  # accepted by the optimizer


# ---------------------------------------------------------------- checkpoint / schedulers


def _make_model_opt(mode: str, k: int = 15):
    p = _param(seed=7)
    w = torch.nn.Parameter(torch.randn(4, 3, generator=torch.Generator().manual_seed(8)))
    b = torch.nn.Parameter(torch.randn(4, generator=torch.Generator().manual_seed(9)))
    groups = build_param_groups([(p, k)], [w, b], lr=1e-2, weight_decay=0.05,
                                sparse_weight_decay=0.01, mode=mode)
    return (p, w, b), SparseGradOptimizer(groups)


def _set_grads(params, t: int) -> None:
    gen = torch.Generator().manual_seed(100 + t)
    for q in params:
        q.grad = torch.randn(q.shape, generator=gen)


@pytest.mark.parametrize("mode", SPARSE_MODES)
def test_state_dict_round_trip_continues_identically(mode):
    params_a, opt_a = _make_model_opt(mode)
    for t in range(3):
        _set_grads(params_a, t)
        opt_a.step()

    buf = io.BytesIO()
    torch.save({"params": [q.detach() for q in params_a], "opt": opt_a.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)

    params_b, opt_b = _make_model_opt(mode)
    with torch.no_grad():
        for q, saved in zip(params_b, ckpt["params"]):
            q.copy_(saved)
    opt_b.load_state_dict(ckpt["opt"])

    st_b = opt_b.state[params_b[0]]
    for key in ("indices", "prev_selected"):
        if key in opt_a.state[params_a[0]]:
            assert st_b[key].dtype == torch.int32
            assert torch.equal(st_b[key], opt_a.state[params_a[0]][key])
    assert int(st_b["step"]) == 3

    for t in range(3, 7):
        _set_grads(params_a, t)
        _set_grads(params_b, t)
        opt_a.step()
        opt_b.step()
        for qa, qb in zip(params_a, params_b):
            assert torch.equal(qa, qb)
    if mode == "adamw":
        assert opt_b.state[params_b[0]]["indices"].dtype == torch.int32


def test_get_linear_schedule_with_warmup_applies_to_sparse_groups():
    transformers = pytest.importorskip("transformers")
    (p, w, b), opt = _make_model_opt("sgd", k=N)
    sched = transformers.get_linear_schedule_with_warmup(opt, num_warmup_steps=2, num_training_steps=10)
    expected_factors = [0.0, 0.5, 1.0, 7 / 8]
    for t, factor in enumerate(expected_factors):
        assert opt.param_groups[0]["lr"] == pytest.approx(1e-2 * factor)
        before = p.detach().clone()
        _set_grads((p, w, b), t)
        g = p.grad.clone()
        opt.step()
        sched.step()
        # sgd with k = numel: p ← p - lr (g + wd p), so the effective lr is observable
        expected = before - 1e-2 * factor * (g + 0.01 * before)
        torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-6)


def test_lambda_lr_with_sparse_adam():
    p_ref, p = _param(), _param()
    k = 20
    ref = torch.optim.SparseAdam([p_ref], lr=1e-2)
    opt = _sparse_opt(p, k, "sparse_adam", lr=1e-2)
    lam = lambda step: 1.0 / (1 + step)  # noqa: E731
    s_ref = torch.optim.lr_scheduler.LambdaLR(ref, lam)
    s = torch.optim.lr_scheduler.LambdaLR(opt, lam)
    _assert_tracks(ref, opt, p_ref, p, _grads(4, seed=5), ref_grad=lambda g: _topk_sparse(g, k), schedulers=(s_ref, s))
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-2 / 5)
    assert math.isfinite(opt.last_stats["overlap"])


def test_index_state_survives_a_float32_cast_of_a_large_layer():
    """The Trainer's own optimizer casts state tensors to the param dtype on resume; indices must stay exact."""
    p = torch.nn.Parameter(torch.zeros(5000, 4000))  # 2e7 entries > 2**24: flat indices would not survive float32
    g = torch.zeros_like(p)
    g[4999, 3999] = 1.0
    g[4321, 17] = -2.0
    state: dict = {}
    sparse_step(p, g, state, k=2, lr=0.1, mode="adamw")
    expected = state_indices(state, p).tolist()
    state["indices"] = state["indices"].float()  # what torch's Optimizer.load_state_dict does
    state["prev_selected"] = state["prev_selected"].float()
    assert state_indices(state, p).tolist() == expected == [4321 * 4000 + 17, 4999 * 4000 + 3999]
    assert state["indices"].dtype == torch.int32
