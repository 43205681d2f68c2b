"""selection="periodic" and the in-place weight: the rotated gradient on a fixed support (computed in the optimizer
from the full W.grad), the sparse unrotation, the support's life cycle, equivalences with the dynamic mode, W always
equal to W₀ + U_out ΔW' U_inᵀ, and the errors around it."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model

from conftest import batch_list, batch_stream, build_model, inputs_only, sparsegrad_layers
from peft_sparsegrad import BasisPair, SparseGradConfig, create_sparsegrad_optimizer
from peft_sparsegrad.bases import Support
from peft_sparsegrad.optim import SparseGradOptimizer, build_param_groups, select_topk, sparse_step, \
    sparsegrad_parameters

PEFT_PREFIX = "base_model.model."


def _orthogonal(n: int, gen: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).float()


def _base_weights(base) -> dict[str, torch.Tensor]:
    """Copies of every Linear/Conv1D weight of the base model, before any adapter, out × in, keyed like the PEFT model's
    modules."""
    out = {}
    for name, module in base.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.ndim == 2:
            w = weight.detach().clone()
            out[PEFT_PREFIX + name] = w.T if type(module).__name__ == "Conv1D" else w
    return out


def _model(arch: str = "bert", keep_ratio: float = 0.05, with_w0: bool = False, **kwargs):
    config = SparseGradConfig(keep_ratio=keep_ratio, calibration_steps=2, calibration_dataloader=batch_stream(arch),
                              **kwargs)
    base = build_model(arch)
    w0 = _base_weights(base)
    model = get_peft_model(base, config)
    return (model, w0) if with_w0 else model


def _deltas(model, adapter: str = "default") -> dict[str, torch.Tensor]:
    """Dense copies of every ΔW' of ``adapter``."""
    return {n: m.sparsegrad_delta[adapter].to_dense() for n, m in sparsegrad_layers(model).items()}


def _train(model, batches, lr: float = 1e-2) -> dict[str, torch.Tensor]:
    """Plain loop with create_sparsegrad_optimizer; returns copies of the trained ΔW'."""
    opt = create_sparsegrad_optimizer(model, lr=lr)
    for batch in batches:
        opt.zero_grad()
        model(**batch).loss.backward()
        opt.step()
    return _deltas(model)


def _sparse_groups(opt):
    """(layer, W, k, state) of every sparse group."""
    for group in opt.param_groups:
        if "sparsegrad_k" in group:
            p = group["params"][0]
            yield p.sparsegrad_owner, p, group["sparsegrad_k"], opt.state[p]


def _weight(layer) -> torch.Tensor:
    """W out × in, float32."""
    w = layer.get_base_layer().weight.detach()
    return (w.T if layer.is_conv1d else w).float()


def _assert_weights_consistent(model, w0: dict[str, torch.Tensor], adapters=("default",), atol=1e-5) -> None:
    """W == W₀ + Σ U_out ΔW' U_inᵀ with W₀ copied before injection and U, ΔW' of each adapter."""
    for name, layer in sparsegrad_layers(model).items():
        expected = w0[name].float().clone()
        for adapter in adapters:
            pair = layer.sparsegrad_bases[adapter]
            delta = layer.sparsegrad_delta[adapter].to_dense()
            if pair.is_identity:
                expected += delta
            else:
                u_out, u_in = pair.float32()  # as stored (float16 by default): what the updates used
                expected += u_out @ delta @ u_in.T
        torch.testing.assert_close(_weight(layer), expected, atol=atol, rtol=0, msg=name)


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
        torch.testing.assert_close(pair.unrotate(delta), u_out @ delta @ u_in.T, atol=1e-5, rtol=0)


# ---- periodic selection ------------------------------------------------------------------------------------------


def test_periodic_step_between_refreshes_uses_the_rotated_gradient_on_the_support():
    """Between refreshes W.grad is the ordinary full gradient; the optimizer rotates it only at the fixed support S
    (``rotate_at``), which must equal the full rotation at S: with SGD, ΔW'[S] -= lr · (U_outᵀ G U_in)[S] exactly
    there, and nothing else moves."""
    lr = 0.1
    model = _model(selection="periodic", refresh_interval=5, sparse_optimizer="sgd")
    opt = create_sparsegrad_optimizer(model, lr=lr)
    batches = batch_list("bert", 2, seed=3)
    model(**batches[0]).loss.backward()  # step 1: refresh from the full rotated gradient
    grads = {layer: p.grad.clone() for layer, p, _, _ in _sparse_groups(opt)}
    opt.step()
    opt.zero_grad()
    supports = {}
    for layer, p, k, state in _sparse_groups(opt):
        st = state["sparsegrad"]
        assert st.indices.dtype == torch.int32 and st.indices.numel() == k and st.selected_at == 0
        u_out, u_in = layer.sparsegrad_bases["default"].float32()
        g1 = u_out.T @ grads[layer].float() @ u_in
        assert st.indices.long().tolist() == select_topk(g1, k).tolist()  # S = top-k of step 1's gradient
        assert torch.equal(layer.sparsegrad_support_cache["default"].flat, st.indices.long())
        supports[layer] = st.indices.long().clone()

    before = {layer: layer.sparsegrad_delta["default"].to_dense().reshape(-1) for layer in supports}
    model(**batches[1]).loss.backward()
    grads = {layer: p.grad.clone() for layer, p, _, _ in _sparse_groups(opt)}
    opt.step()
    for layer, flat in supports.items():
        assert layer.sparsegrad_delta["default"].flat.long().tolist() == flat.tolist()  # support unchanged
        u_out, u_in = layer.sparsegrad_bases["default"].float32()
        full = (u_out.T @ grads[layer].float() @ u_in).reshape(-1)
        off = torch.ones(full.numel(), dtype=torch.bool)
        off[flat] = False
        assert full[off].abs().max() > 0  # W.grad is the full gradient, not restricted to S
        after = layer.sparsegrad_delta["default"].to_dense().reshape(-1)
        assert full[flat].abs().max() > 0
        torch.testing.assert_close(after[flat] - before[layer][flat], -lr * full[flat], atol=1e-7, rtol=1e-5)
        assert torch.equal(after[off], before[layer][off])


def test_periodic_support_is_fixed_between_refreshes_and_state_is_k_values():
    interval, steps = 3, 7
    model, w0 = _model(selection="periodic", refresh_interval=interval, with_w0=True)
    opt = create_sparsegrad_optimizer(model, lr=1e-2)
    layers = sparsegrad_layers(model)
    names = {id(layer): name for name, layer in layers.items()}
    supports: list[dict[str, torch.Tensor]] = []
    for step, batch in enumerate(batch_list("bert", steps, seed=4)):
        before = _deltas(model)
        opt.zero_grad()
        model(**batch).loss.backward()
        opt.step()
        current = {}
        for layer, p, k, state in _sparse_groups(opt):
            st = state["sparsegrad"]
            name = names[id(layer)]
            assert st.exp_avg.numel() == st.exp_avg_sq.numel() == k  # O(k) AdamW state
            assert st.exp_avg.dtype == torch.float32
            assert st.indices.dtype == torch.int32 and st.indices.shape == (k,)
            flat = st.indices.long()
            current[name] = flat
            changed = (layer.sparsegrad_delta["default"].to_dense() != before[name]).reshape(-1).nonzero().squeeze(1)
            assert changed.numel() > 0
            assert torch.isin(changed, flat).all(), "an entry outside the support moved"
            assert st.selected_at == (step // interval) * interval
            assert int(state["step"]) == step + 1
            # ΔW' holds every entry ever in a support (values kept when an entry leaves S): at most one k per refresh
            assert layer.sparsegrad_delta["default"].nnz <= (step // interval + 1) * k
        supports.append(current)
        _assert_weights_consistent(model, w0)
    for step in range(1, steps):
        same = all(torch.equal(supports[step][n], supports[step - 1][n]) for n in layers)
        if step % interval:
            assert same, f"support changed at step {step} between refreshes"
    assert not all(torch.equal(supports[interval][n], supports[0][n]) for n in layers), \
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
    results, weights = [], []
    for selection in ("dynamic", "periodic"):
        model = _model("gpt2", selection=selection, refresh_interval=1, sparse_optimizer="sgd")
        results.append(_train(model, batches, lr=0.5))
        weights.append({n: _weight(layer) for n, layer in sparsegrad_layers(model).items()})
    for n in results[0]:
        assert torch.count_nonzero(results[0][n]) > 0
        assert torch.equal(results[1][n], results[0][n])
        assert torch.equal(weights[1][n], weights[0][n])


# ---- the in-place weight ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
@pytest.mark.parametrize("mode,selection", [("adamw", "dynamic"), ("sparse_adam", "dynamic"), ("sgd", "dynamic"),
                                            ("adamw", "periodic"), ("sgd", "periodic")])
def test_weight_equals_base_plus_unrotated_delta_after_training(arch, mode, selection):
    """After N steps in every mode, W == W₀ + U_out ΔW' U_inᵀ (W₀ copied before injection), and the adapted model's
    output equals the plain base model's with exactly those weights loaded."""
    model, w0 = _model(arch, keep_ratio=0.02, sparse_optimizer=mode, selection=selection, refresh_interval=2,
                       with_w0=True)
    batches = batch_list(arch, 5, seed=9)
    deltas = _train(model, batches)
    assert all(torch.count_nonzero(d) > 0 for d in deltas.values()), "an adapter never moved"
    _assert_weights_consistent(model, w0)

    reference = build_model(arch)  # same seed: W₀; load W₀ + ΔW (and the trained nothing else: only W trains)
    layers = sparsegrad_layers(model)
    with torch.no_grad():
        for name, module in reference.named_modules():
            layer = layers.get(PEFT_PREFIX + name)
            if layer is not None:
                u_out, u_in = layer.sparsegrad_bases["default"].float32()
                delta = layer.sparsegrad_delta["default"].to_dense()
                change = u_out @ delta @ u_in.T
                module.weight.add_(change.T if layer.is_conv1d else change)
    model.eval()
    torch.testing.assert_close(model(**inputs_only(batches[0])).logits, reference(**inputs_only(batches[0])).logits,
                               atol=1e-5, rtol=1e-5)


def test_weight_with_two_active_adapters():
    """Both adapters active in the forward (both in W), only the second one trains: its change must be unrotated with
    its own bases (identity here), not with the first adapter's, and the first adapter must stay as it was."""
    model, w0 = _model(keep_ratio=0.05, init_weights=False, with_w0=True)
    model.add_adapter("second", SparseGradConfig(bases="identity", keep_ratio=0.05))
    first = _deltas(model)
    for layer in sparsegrad_layers(model).values():
        layer.set_adapter(["default", "second"])
        layer._trainable = ["second"]  # "default" active for the forward only
        layer.update_trainability()
    _assert_weights_consistent(model, w0, adapters=("default", "second"))
    assert all(torch.count_nonzero(d) > 0 for d in first.values())
    batches = batch_list("bert", 3, seed=12)
    trained = _train(model, batches)
    # _train returns "default": unchanged; "second" moved
    for n, d in trained.items():
        assert torch.equal(d, first[n])
    for n, d in _deltas(model, "second").items():
        assert torch.count_nonzero(d) > 0, n
    _assert_weights_consistent(model, w0, adapters=("default", "second"))


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
    w, k = sparse[0]
    with pytest.raises(ValueError, match="not lazy 'sparse_adam'"):
        sparse_step(w, torch.zeros_like(w), {}, k=k, lr=1e-3, mode="sparse_adam", refresh_interval=2)
    groups = build_param_groups(sparse, [], lr=1e-3)
    groups[0]["refresh_interval"] = -1
    with pytest.raises(ValueError, match="refresh_interval"):
        SparseGradOptimizer(groups)


def test_fresh_optimizer_between_refreshes_selects_its_own_support():
    """A new optimizer (empty state) taking over between two refreshes of another one refreshes at its first step:
    its support is the top-k of the current full rotated gradient (W.grad is always the full gradient, so there is
    nothing stale to reject), and W stays W₀ + U_out ΔW' U_inᵀ."""
    model, w0 = _model(selection="periodic", refresh_interval=4, with_w0=True)
    sparse = sparsegrad_parameters(model)
    first = create_sparsegrad_optimizer(model, lr=1e-2)
    batches = batch_list("bert", 2, seed=2)
    model(**batches[0]).loss.backward()
    first.step()
    first.zero_grad()
    old = {id(p): first.state[p]["sparsegrad"].indices.clone() for p, _ in sparse}
    model(**batches[1]).loss.backward()
    other = SparseGradOptimizer(build_param_groups(sparse, [], lr=1e-2))
    grads = {id(p): p.grad.clone() for p, _ in sparse}
    other.step()
    assert "kept_energy" in other.last_stats and other.last_stats["overlap"] == 0.0  # a refresh, nothing before it
    changed_any = False
    for p, k in sparse:
        st = other.state[p]["sparsegrad"]
        layer = p.sparsegrad_owner
        u_out, u_in = layer.sparsegrad_bases["default"].float32()
        g = grads[id(p)].T if layer.is_conv1d else grads[id(p)]
        assert st.selected_at == 0 and int(other.state[p]["step"]) == 1
        assert st.indices.long().tolist() == select_topk(u_out.T @ g.float() @ u_in, k).tolist()
        assert torch.equal(layer.sparsegrad_support_cache["default"].flat, st.indices.long())
        changed_any |= not torch.equal(st.indices, old[id(p)])
    assert changed_any
    _assert_weights_consistent(model, w0)


def test_periodic_statistics():
    """kept_energy is ||g[S]||² / ||g||² every step (W.grad is the full gradient, so ||g||² = ||G||² is known also
    between refreshes): at a refresh the top-k share, in between the share of the fixed support, never above the
    top-k share of that gradient. overlap is 1 between refreshes. (||g||² = ||G||² needs exactly orthogonal, i.e.
    float32, bases; float16 ones hold it to ~1e-3.)"""
    model = _model(selection="periodic", refresh_interval=2, bases_dtype="float32")
    opt = create_sparsegrad_optimizer(model, lr=1e-2)
    seen = []
    for batch in batch_list("bert", 3, seed=1):
        opt.zero_grad()
        model(**batch).loss.backward()
        expected, best = [], []
        for layer, p, k, state in _sparse_groups(opt):
            u_out, u_in = layer.sparsegrad_bases["default"].float32()
            g = (u_out.T @ p.grad.float() @ u_in).reshape(-1)
            total = g.square().sum()
            best.append(g[select_topk(g, k)].square().sum() / total)
            st = state.get("sparsegrad")
            expected.append(g[st.indices.long()].square().sum() / total if st is not None else None)
        opt.step()
        seen.append(dict(opt.last_stats))
        if expected[0] is not None and len(seen) == 2:  # between refreshes
            assert seen[1]["kept_energy"] == pytest.approx(float(torch.stack(expected).mean()), rel=1e-4)
            assert seen[1]["kept_energy"] <= float(torch.stack(best).mean()) + 1e-6
        else:
            assert seen[-1]["kept_energy"] == pytest.approx(float(torch.stack(best).mean()), rel=1e-4)
    assert 0 < seen[0]["kept_energy"] <= 1 and seen[0]["overlap"] == 0.0
    assert seen[1]["overlap"] == 1.0 and 0 < seen[1]["kept_energy"] <= 1
    assert 0 < seen[2]["kept_energy"] <= 1 and 0 <= seen[2]["overlap"] <= 1
