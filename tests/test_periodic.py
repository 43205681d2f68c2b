"""selection="periodic" and the incremental forward weight: the cheap rotated gradient on a fixed support, the sparse
unrotation, the support's life cycle, equivalences with the dynamic mode, and the errors around it."""

from __future__ import annotations

import math

import pytest
import torch
from peft import get_peft_model

from conftest import batch_list, batch_stream, build_model, sparsegrad_layers
from peft_sparsegrad import BasisPair, SparseGradConfig, create_sparsegrad_optimizer
from peft_sparsegrad.bases import Support
from peft_sparsegrad.optim import SparseGradOptimizer, build_param_groups, sparsegrad_parameters


def _orthogonal(n: int, gen: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).float()


def _model(arch: str = "bert", keep_ratio: float = 0.05, **kwargs):
    config = SparseGradConfig(keep_ratio=keep_ratio, calibration_steps=2, calibration_dataloader=batch_stream(arch),
                              **kwargs)
    return get_peft_model(build_model(arch), config)


def _deltas(model) -> dict[str, torch.Tensor]:
    return {n: m.sparsegrad_delta["default"] for n, m in sparsegrad_layers(model).items()}


def _train(model, batches, lr: float = 1e-2) -> dict[str, torch.Tensor]:
    """Plain loop with create_sparsegrad_optimizer; returns copies of the trained ΔW'."""
    opt = create_sparsegrad_optimizer(model, lr=lr)
    for batch in batches:
        opt.zero_grad()
        model(**batch).loss.backward()
        opt.step()
    return {n: d.detach().clone() for n, d in _deltas(model).items()}


# ---- the two sparse products --------------------------------------------------------------------------------------


@pytest.mark.parametrize("identity", [False, True])
@pytest.mark.parametrize("shape", [(48, 20), (20, 48)])
def test_rotate_at_and_unrotate_sparse_match_dense_products(shape, identity):
    gen = torch.Generator().manual_seed(0)
    n_out, n_in = shape
    pair = BasisPair(None, None) if identity else BasisPair(_orthogonal(n_out, gen), _orthogonal(n_in, gen))
    if not identity:  # stored column-major: the sparse products read columns of U
        assert pair.U_out.mT.is_contiguous() and pair.U_in.mT.is_contiguous()
    u_out = torch.eye(n_out) if identity else pair.U_out
    u_in = torch.eye(n_in) if identity else pair.U_in
    for k in (1, 37, n_out * n_in):
        flat = torch.randperm(n_out * n_in, generator=gen)[:k].sort().values
        grad = torch.randn(shape, generator=gen)
        expected = (u_out.T @ grad @ u_in).reshape(-1)[flat]
        torch.testing.assert_close(pair.rotate_at(grad, Support(flat, shape, 0)), expected, atol=1e-5, rtol=0)
        values = torch.randn(k, generator=gen)
        delta = torch.zeros(n_out * n_in).index_copy_(0, flat, values).view(shape)
        torch.testing.assert_close(pair.unrotate_sparse(flat, values, shape), u_out @ delta @ u_in.T,
                                   atol=1e-5, rtol=0)


# ---- periodic selection ------------------------------------------------------------------------------------------


def test_periodic_backward_computes_the_rotated_gradient_on_the_support_only():
    model = _model(selection="periodic", refresh_interval=5)
    opt = create_sparsegrad_optimizer(model, lr=1e-2)
    batches = batch_list("bert", 2, seed=3)
    model(**batches[0]).loss.backward()  # step 1: refresh, full rotated gradient
    assert all(getattr(d, "sparsegrad_grad_support", None) is None for d in _deltas(model).values())
    opt.step()
    opt.zero_grad()
    deltas = _deltas(model)
    supports = {n: d.sparsegrad_support for n, d in deltas.items()}
    assert all(s is not None and s.flat.numel() == d.sparsegrad_k for s, d in zip(supports.values(), deltas.values()))

    model(**batches[1]).loss.backward()  # on the support only
    partial = {n: d.grad.clone() for n, d in deltas.items()}
    opt.zero_grad()
    for d in deltas.values():
        d.sparsegrad_support = None
    model(**batches[1]).loss.backward()  # the same batch, full rotated gradient
    for n, d in deltas.items():
        flat = supports[n].flat
        full = d.grad.reshape(-1)
        assert full.index_select(0, flat).abs().max() > 0
        torch.testing.assert_close(partial[n].reshape(-1).index_select(0, flat), full.index_select(0, flat),
                                   atol=1e-6, rtol=1e-5)
        off = torch.ones(full.numel(), dtype=torch.bool)
        off[flat] = False
        assert torch.count_nonzero(partial[n].reshape(-1)[off]) == 0


def test_periodic_support_is_fixed_between_refreshes_and_state_is_k_values():
    interval, steps = 3, 7
    model = _model(selection="periodic", refresh_interval=interval)
    opt = create_sparsegrad_optimizer(model, lr=1e-2)
    deltas = _deltas(model)
    supports: list[dict[str, torch.Tensor]] = []
    for step, batch in enumerate(batch_list("bert", steps, seed=4)):
        before = {n: d.detach().clone() for n, d in deltas.items()}
        opt.zero_grad()
        model(**batch).loss.backward()
        opt.step()
        current = {}
        for group in opt.param_groups:
            if "sparsegrad_k" not in group:
                continue
            p = group["params"][0]
            state = opt.state[p]
            name = next(n for n, d in deltas.items() if d is p)
            k = group["sparsegrad_k"]
            assert state["exp_avg"].numel() == state["exp_avg_sq"].numel() == k  # O(k) AdamW state
            assert state["indices"].dtype == torch.int32 and state["indices"].shape == (2, k)
            flat = state["indices"][0].long() * p.shape[1] + state["indices"][1].long()
            current[name] = flat
            changed = (p.detach() != before[name]).reshape(-1).nonzero().squeeze(1)
            assert torch.isin(changed, flat).all(), "an entry outside the support moved"
            assert state["selected_at"] == (step // interval) * interval
            next_is_refresh = (step + 1) % interval == 0
            assert (p.sparsegrad_support is None) == next_is_refresh
        supports.append(current)
    for step in range(1, steps):
        same = all(torch.equal(supports[step][n], supports[step - 1][n]) for n in deltas)
        if step % interval:
            assert same, f"support changed at step {step} between refreshes"
    assert not all(torch.equal(supports[interval][n], supports[0][n]) for n in deltas), \
        "the refresh never changed any support: the refresh path is not exercised"


def test_periodic_keep_ratio_one_equals_dynamic_adamw():
    """With k = out · in the support is everything: periodic AdamW is dense AdamW on W', as dynamic lean AdamW is."""
    batches = batch_list("bert", 4, seed=6)
    results = []
    for selection in ("dynamic", "periodic"):
        torch.manual_seed(0)
        results.append(_train(_model(keep_ratio=1.0, selection=selection, refresh_interval=2), batches))
    for n in results[0]:
        assert results[0][n].abs().max() > 1e-3
        torch.testing.assert_close(results[1][n], results[0][n], atol=1e-5, rtol=1e-4)


def test_periodic_interval_one_sgd_equals_dynamic_sgd():
    """Re-selecting every step is the dynamic top-k: with SGD (no state) the two runs are bit-identical."""
    batches = batch_list("gpt2", 4, seed=8)
    results = []
    for selection in ("dynamic", "periodic"):
        model = _model("gpt2", selection=selection, refresh_interval=1, sparse_optimizer="sgd")
        results.append(_train(model, batches, lr=0.5))
    for n in results[0]:
        assert torch.count_nonzero(results[0][n]) > 0
        assert torch.equal(results[1][n], results[0][n])


# ---- the incremental forward weight ----------------------------------------------------------------------------


@pytest.mark.parametrize("mode,selection", [("adamw", "dynamic"), ("sparse_adam", "dynamic"), ("sgd", "dynamic"),
                                            ("adamw", "periodic")])
def test_incremental_forward_weight_equals_rebuild(mode, selection):
    model = _model(keep_ratio=0.02, sparse_optimizer=mode, selection=selection, refresh_interval=2)
    batches = batch_list("bert", 5, seed=9)
    _train(model, batches)
    model(**batches[-1])  # brings every cached forward weight up to date
    layers = sparsegrad_layers(model)
    assert any(layer._weight_cache.updates > 0 for layer in layers.values()), "incremental path never taken"
    for name, layer in layers.items():
        cached = layer._weight_cache.w_eff.clone()
        layer._weight_cache = None
        rebuilt = layer.effective_weight(["default"], layer.get_base_layer().weight)
        assert not torch.equal(rebuilt, layer.get_base_layer().weight), f"{name}: adapter never moved"
        torch.testing.assert_close(cached, rebuilt, atol=1e-6, rtol=1e-5, msg=name)


# ---- errors ------------------------------------------------------------------------------------------------------


def test_periodic_config_errors():
    with pytest.raises(ValueError, match="sparse_optimizer='adamw'"):
        SparseGradConfig(bases="identity", selection="periodic", sparse_optimizer="sparse_adam")
    with pytest.raises(ValueError, match="selection must be one of"):
        SparseGradConfig(bases="identity", selection="sometimes")
    with pytest.raises(ValueError, match="refresh_interval must be >= 1"):
        SparseGradConfig(bases="identity", selection="periodic", refresh_interval=0)
    with pytest.raises(TypeError, match="refresh_interval must be an int"):
        SparseGradConfig(bases="identity", refresh_interval=2.5)


def test_periodic_optimizer_errors():
    model = _model(selection="periodic", refresh_interval=4)
    sparse = sparsegrad_parameters(model)
    with pytest.raises(ValueError, match="needs mode 'adamw' or 'sgd'"):
        SparseGradOptimizer(build_param_groups(sparse, [], lr=1e-3, mode="sparse_adam"), mode="sparse_adam")
    first = create_sparsegrad_optimizer(model, lr=1e-2)
    batches = batch_list("bert", 2, seed=2)
    model(**batches[0]).loss.backward()
    first.step()
    first.zero_grad()
    model(**batches[1]).loss.backward()  # computed on first's supports
    other = SparseGradOptimizer(build_param_groups(sparse, [], lr=1e-2))  # fresh state: would refresh now
    for d in _deltas(model).values():
        d.sparsegrad_support = None  # the new optimizer's own hint; the grads were still computed on the old one
    with pytest.raises(RuntimeError, match="stale support"):
        other.step()


def test_periodic_statistics_report_energy_only_at_refreshes():
    model = _model(selection="periodic", refresh_interval=2)
    opt = create_sparsegrad_optimizer(model, lr=1e-2)
    seen = []
    for batch in batch_list("bert", 3, seed=1):
        opt.zero_grad()
        model(**batch).loss.backward()
        opt.step()
        seen.append(dict(opt.last_stats))
    assert "kept_energy" in seen[0] and 0 < seen[0]["kept_energy"] <= 1
    assert "kept_energy" not in seen[1] and seen[1]["overlap"] == 1.0
    assert "kept_energy" in seen[2] and math.isfinite(seen[2]["kept_energy"])


def test_incremental_forward_weight_with_two_active_adapters():
    """Both adapters active in the forward, only the second one trains: its change must be unrotated with its own
    bases (identity here), not with the first adapter's."""
    model = _model(keep_ratio=0.05, init_weights=False)
    model.add_adapter("second", SparseGradConfig(bases="identity", keep_ratio=0.05))
    for layer in sparsegrad_layers(model).values():
        layer.set_adapter(["default", "second"])
        layer.sparsegrad_delta["default"].requires_grad_(False)
        layer.sparsegrad_delta["second"].requires_grad_(True)
    batches = batch_list("bert", 3, seed=12)
    _train(model, batches)
    model(**batches[-1])
    layers = sparsegrad_layers(model)
    assert any(layer._weight_cache.updates > 0 for layer in layers.values()), "incremental path never taken"
    for name, layer in layers.items():
        assert torch.count_nonzero(layer.sparsegrad_delta["second"]) > 0
        cached = layer._weight_cache.w_eff.clone()
        layer._weight_cache = None
        rebuilt = layer.effective_weight(["default", "second"], layer.get_base_layer().weight)
        torch.testing.assert_close(cached, rebuilt, atol=1e-6, rtol=1e-5, msg=name)
