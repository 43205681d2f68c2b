"""The math of SparseGrad: keep_ratio=1 ≡ full fine-tuning, top-k sparsity of one step, Gram vs tensorly bases,
exactness of the layer (outputs, input/bias gradients, rotated weight gradient), calibration side effects, basis
properties and dtypes, identity bases (MeProp)."""

from __future__ import annotations

import copy
import json
import math
import os

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from torch import nn
from transformers.pytorch_utils import Conv1D

from conftest import (assert_same_snapshot, batch_list, batch_stream, build_model, inputs_only, logits,
                      snapshot, sparsegrad_layers)
from peft_sparsegrad import (BasisPair, SparseGradBases, SparseGradConfig, SparseGradLinear, SparseGradOptimizer,
                             calibrate, create_sparsegrad_optimizer)
from peft_sparsegrad import rotation
from peft_sparsegrad.bases import Support
from peft_sparsegrad.delta import SparseDelta
from peft_sparsegrad.update import select_topk
from peft_sparsegrad.targets import layer_role


def rotated_grad(layer, adapter: str = "default", rotate: bool = True) -> torch.Tensor:
    """U_outᵀ G U_in for G = ∂L/∂W (out × in) of an adapted layer, from W.grad (what the optimizer computes)."""
    grad = layer.get_base_layer().weight.grad
    grad = (grad.T if layer.is_conv1d else grad).float()
    return layer.pair(adapter).rotate(grad) if rotate else grad


def _random_orthogonal(n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))  # a proper Haar sample; not symmetric, so Q != Qᵀ
    return q.float()


def _mlp_weight_names(arch: str, model: nn.Module) -> list[str]:
    """Names of the weights SparseGrad adapts by default (MLP only), in the plain model."""
    suffixes = {"bert": (".intermediate.dense.weight", ".output.dense.weight"),
                "gpt2": (".mlp.c_fc.weight", ".mlp.c_proj.weight")}[arch]
    names = [n for n, _ in model.named_parameters()
             if n.endswith(suffixes) and "attention" not in n]
    assert len(names) == 4, names  # 2 blocks × 2 MLP layers
    return names


# ---- 1. keep_ratio = 1 with SGD is exactly full fine-tuning of the same weights --------------------------------


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_keep_ratio_one_sgd_equals_full_finetuning(arch):
    """SparseGrad with keep_ratio=1 and mode='sgd' updates W' by -lr·U_outᵀ G U_in, i.e. W by -lr·G: plain SGD.

    Choice documented here: *only* the MLP weights train in both models. The SparseGrad model is a plain PeftModel
    (no task_type, modules_to_save=None, bias='none'), so the classifier / LM head stays frozen; the full-FT copy
    freezes everything except the same four MLP weights (biases frozen too). create_sparsegrad_optimizer then holds
    only ΔW' groups (a dense group would be AdamW, not SGD).
    """
    lr, steps = {"bert": 5.0, "gpt2": 0.5}[arch], 5  # BERT's classification gradients are small
    base = build_model(arch)
    full = copy.deepcopy(base)
    names = _mlp_weight_names(arch, full)
    for n, p in full.named_parameters():
        p.requires_grad_(n in names)
    sgd = torch.optim.SGD([p for p in full.parameters() if p.requires_grad], lr=lr)

    # float32 bases: exactly orthogonal, so the match is to float32 rounding (float16 ones: see
    # test_float16_bases_on_float32_weights_match_full_fine_tuning_to_their_precision)
    config = SparseGradConfig(keep_ratio=1.0, calibration_steps=3, modules_to_save=None, bases_dtype="float32",
                              calibration_dataloader=batch_stream(arch, seed=7))
    model = get_peft_model(base, config)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    # what trains is the adapted base weights themselves (in place), nothing else
    assert trainable and all(n.endswith(".base_layer.weight") for n in trainable), trainable
    assert len(trainable) == 4
    opt = create_sparsegrad_optimizer(model, lr=lr, mode="sgd")
    assert all("sparsegrad_k" in g for g in opt.param_groups)  # no dense (AdamW) group

    for batch in batch_list(arch, steps, seed=3):
        opt.zero_grad()
        model(**batch).loss.backward()
        opt.step()
        sgd.zero_grad()
        full(**batch).loss.backward()
        sgd.step()

    merged = model.merge_and_unload()
    assert not sparsegrad_layers(merged)
    merged_params = dict(merged.named_parameters())
    full_params = dict(full.named_parameters())
    assert merged_params.keys() == full_params.keys()
    initial = dict(build_model(arch).named_parameters())
    for n, p in full_params.items():
        if n in names:
            moved = (p - initial[n]).abs().max().item()
            assert moved > 1e-3, f"{n} barely trained ({moved}); the comparison would be vacuous"
            torch.testing.assert_close(merged_params[n], p, atol=1e-5, rtol=0, msg=f"{n} differs from full FT")
        else:
            assert torch.equal(merged_params[n], p), f"{n} changed although it is frozen"


# ---- 2. one step changes at most k entries of ΔW' ---------------------------------------------------------------


@pytest.mark.parametrize("mode", ["adamw", "sparse_adam", "sgd"])
@pytest.mark.parametrize("keep_ratio", [0.01, 0.1])
@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_one_step_changes_at_most_k_entries(arch, keep_ratio, mode):
    model = get_peft_model(build_model(arch), SparseGradConfig(keep_ratio=keep_ratio, calibration_steps=2,
                                                               calibration_dataloader=batch_stream(arch),
                                                               selection="dynamic"))
    layers = sparsegrad_layers(model)
    assert len(layers) == 4
    opt = create_sparsegrad_optimizer(model, lr=1e-2, mode=mode)
    before = {n: m.sparsegrad_delta["default"].to_dense() for n, m in layers.items()}
    w_before = {n: m.get_base_layer().weight.detach().clone() for n, m in layers.items()}
    model(**next(batch_stream(arch, seed=5))).loss.backward()
    grads = {n: rotated_grad(m) for n, m in layers.items()}
    opt.step()
    for n, m in layers.items():
        out_f, in_f = m.out_features, m.in_features
        k = math.ceil(keep_ratio * out_f * in_f)
        assert m.sparsegrad_k["default"] == k
        after = m.sparsegrad_delta["default"].to_dense()
        changed = (after != before[n]).sum().item()
        nonzero_grad = (grads[n] != 0).sum().item()
        assert changed <= k, f"{n}: {changed} entries changed, k={k}"
        assert changed == min(k, nonzero_grad), f"{n}: {changed} changed, k={k}, nnz(grad)={nonzero_grad}"
        assert m.sparsegrad_delta["default"].nnz == changed  # the support holds exactly what changed
        # W moved by exactly U_out δ U_inᵀ (in place)
        w_change = m.get_base_layer().weight.detach() - w_before[n]
        expected = m.get_delta_weight("default")  # ΔW' was 0 before this first step
        torch.testing.assert_close(w_change, expected, atol=1e-6, rtol=1e-4)
        # and the changed entries are the largest |g|
        idx = (after != before[n]).flatten().nonzero().flatten()
        kth = grads[n].abs().flatten().topk(k).values[-1]
        assert (grads[n].abs().flatten()[idx] >= kth).all()


# ---- 3. streaming Gram bases = tensorly HOSVD ------------------------------------------------------------------


def _separated_prefixes(eigs: torch.Tensor, max_r: int = 6, rel_gap: float = 0.02) -> list[int]:
    """r ≤ max_r such that λ_r − λ_{r+1} > rel_gap · λ_1 (the leading-r subspace is well defined)."""
    eigs = eigs.double()
    return [r for r in range(1, min(max_r, eigs.numel() - 1) + 1) if (eigs[r - 1] - eigs[r]) > rel_gap * eigs[0]]


@pytest.mark.parametrize("arch", ["bert", "gpt2", "llama", "t5"])
def test_gram_bases_match_tensorly(arch):
    model = build_model(arch)
    gram = calibrate(model, SparseGradConfig(calibration_steps=3, basis_method="gram"),
                     batch_stream(arch, seed=11), progress=False)
    ref = calibrate(model, SparseGradConfig(calibration_steps=3, basis_method="tensorly"),
                    batch_stream(arch, seed=11), progress=False)
    assert gram.pairs.keys() == ref.pairs.keys()
    assert len(gram.pairs) == (4 if arch == "t5" else 2)  # one type per MLP role (T5: encoder + decoder)
    for layer_type, pair in gram.pairs.items():
        rpair = ref.pairs[layer_type]
        for side, (u, ur, eig, eig_ref) in {
            "U_out": (pair.U_out, rpair.U_out, gram.eigenvalues[layer_type][0], ref.eigenvalues[layer_type][0]),
            "U_in": (pair.U_in, rpair.U_in, gram.eigenvalues[layer_type][1], ref.eigenvalues[layer_type][1]),
        }.items():
            assert u.shape == ur.shape
            n_ref = min(eig.numel(), eig_ref.numel(), 8)
            torch.testing.assert_close(eig[:n_ref].double(), eig_ref[:n_ref].double(),
                                       rtol=1e-4, atol=1e-6 * eig[0].item())
            prefixes = _separated_prefixes(eig)
            assert prefixes, f"{layer_type}.{side}: no eigengap among the leading eigenvalues {eig[:7]}"
            for r in prefixes:
                p = u[:, :r].double() @ u[:, :r].double().T
                p_ref = ur[:, :r].double() @ ur[:, :r].double().T
                dist = torch.linalg.matrix_norm(p - p_ref, ord=2).item()
                assert dist < 1e-3, f"{layer_type}.{side}: leading-{r} subspaces differ (‖ΔP‖₂={dist:.2e})"
            # columns individually separated on both sides: equal up to sign
            r = prefixes[0]
            if r == 1:
                assert abs(torch.dot(u[:, 0].double(), ur[:, 0].double()).item()) == pytest.approx(1.0, abs=1e-5)


# ---- 4. the layer is exact: outputs, input gradient, bias gradient, rotated weight gradient ---------------------


class _TwoLayers(nn.Module):
    """A Linear (24 -> 16) and a GPT-2 Conv1D (16 -> 24): SparseGrad's two supported layer kinds."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(24, 16)
        self.conv = Conv1D(24, 16)  # nf=24 outputs, nx=16 inputs; weight stored 16 × 24
        nn.init.normal_(self.conv.weight, std=0.2)
        nn.init.normal_(self.conv.bias, std=0.2)

    def forward(self, x):
        return self.conv(torch.tanh(self.fc(x)))


def _plain_layer_with(layer, delta: torch.Tensor) -> nn.Module:
    """A copy of the base layer whose weight is W + ΔW (in the base layer's own layout)."""
    plain = copy.deepcopy(layer.get_base_layer())
    with torch.no_grad():
        plain.weight.add_(delta)
    for p in plain.parameters():
        p.requires_grad_(True)
        p.grad = None
    return plain


@pytest.mark.parametrize("support", ["dense", "sparse"])
@pytest.mark.parametrize("which", ["fc", "conv"])
def test_layer_forward_and_gradients_exact(which, support):
    """The adapted layer is the plain layer with weight W₀ + ΔW, ΔW = U_out ΔW' U_inᵀ (dense ΔW', and ΔW' on a few
    rows/columns: the block sparse-by-dense product), and the optimizer sees U_outᵀ (∂L/∂W) U_in."""
    torch.manual_seed(0)
    net = _TwoLayers()
    w0 = {n: m.weight.detach().clone() for n, m in net.named_children()}
    bases = SparseGradBases({"fc": BasisPair(_random_orthogonal(16, 1), _random_orthogonal(24, 2)),
                             "conv": BasisPair(_random_orthogonal(24, 3), _random_orthogonal(16, 4))})
    config = SparseGradConfig(target_modules=["fc", "conv"], precomputed_bases=bases, init_weights=False,
                              bias="sparsegrad_only")
    model = get_peft_model(net, config)
    layer = sparsegrad_layers(model)[f"base_model.model.{which}"]
    pair = bases.pairs[which]
    if support == "sparse":
        rows, cols = torch.tensor([1, 5, 5, 9]), torch.tensor([2, 7, 11, 2])
        layer.set_delta("default", SparseDelta.from_indices(rows, cols, torch.randn(4), layer.sparsegrad_delta[
            "default"].shape))
        assert layer.sparsegrad_delta["default"].nnz == 4
    delta_prime = layer.sparsegrad_delta["default"].to_dense()
    assert delta_prime.abs().sum() > 0  # init_weights=False: a nonzero ΔW'
    assert layer.get_base_layer().bias.requires_grad  # bias="sparsegrad_only"
    assert layer.get_base_layer().weight.requires_grad  # W trains in place
    create_sparsegrad_optimizer(model, lr=0.1)  # routes W (otherwise backward refuses)

    delta = layer.get_delta_weight("default")
    u_out, u_in = layer.pair("default").float32()  # the calibrated pair as the layer stores it (float16)
    torch.testing.assert_close(u_out, pair.U_out, atol=1e-3, rtol=0)
    manual = u_out @ delta_prime @ u_in.T  # ΔW = U_out ΔW' U_inᵀ, out × in
    torch.testing.assert_close(delta, manual.T if which == "conv" else manual, atol=1e-6, rtol=1e-5)
    # W holds W₀ + ΔW, and base_weight() gives W₀ back
    torch.testing.assert_close(layer.get_base_layer().weight.detach(), w0[which] + delta, atol=1e-6, rtol=1e-5)
    w0_out_in = w0[which].T if which == "conv" else w0[which]
    torch.testing.assert_close(layer.base_weight(), w0_out_in, atol=1e-6, rtol=1e-5)
    plain = _plain_layer_with(layer, torch.zeros_like(delta))  # a copy of the current (adapted) weight

    in_features = 24 if which == "fc" else 16
    out_features = 16 if which == "fc" else 24
    x = torch.randn(3, 5, in_features, dtype=torch.float32)
    upstream = torch.randn(3, 5, out_features)
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y1 = layer(x1)
    y2 = plain(x2)
    torch.testing.assert_close(y1, y2, atol=1e-6, rtol=1e-6)
    (y1 * upstream).sum().backward()
    (y2 * upstream).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(layer.get_base_layer().bias.grad, plain.bias.grad, atol=1e-6, rtol=1e-6)

    # W.grad is ∂L/∂W; the optimizer rotates it: U_outᵀ (∂L/∂W) U_in
    grad_w = upstream.reshape(-1, out_features).T @ x.reshape(-1, in_features)
    torch.testing.assert_close(rotated_grad(layer, rotate=False), grad_w, atol=1e-4, rtol=1e-5)
    expected = u_out.T @ grad_w @ u_in
    torch.testing.assert_close(rotated_grad(layer), expected, atol=1e-4, rtol=1e-5)
    wrong = u_out.T @ grad_w @ u_in.T  # the authors' transposed input basis
    assert (rotated_grad(layer) - wrong).abs().max() > 1e-2


@pytest.mark.parametrize("dense_fill", [0, 32, 10**9])  # δ always sparse / the default threshold / always dense
@pytest.mark.parametrize("block_elements", [7, 1 << 17])  # many streamed blocks / one
def test_sparse_rotations_match_dense_products(monkeypatch, dense_fill, block_elements):
    """rotate_topk, rotate_at and the streamed unrotation (U_out δ U_inᵀ in row or column blocks, δ dense or sparse)
    equal the dense products, for supports that fill few or all rows/columns, both orders of the cheaper side."""
    monkeypatch.setattr(rotation, "DENSE_FILL", dense_fill)
    monkeypatch.setitem(rotation.BLOCK_ELEMENTS, "cpu", block_elements)
    torch.manual_seed(0)
    for n_out, n_in in ((12, 20), (20, 12)):
        pair = BasisPair(_random_orthogonal(n_out, 5), _random_orthogonal(n_in, 6))
        grad = torch.randn(n_out, n_in)
        full = pair.U_out.T @ grad @ pair.U_in
        for k in (1, 17, 240):
            sel, values = pair.rotate_topk(grad.clone(), k, inplace=True)
            assert sel.tolist() == select_topk(full, k).tolist()
            torch.testing.assert_close(values, full.reshape(-1)[sel], atol=1e-5, rtol=1e-5)
        for flat in (torch.tensor([3, 7, 45, 46, 199, 230]), torch.randperm(240)[:120].sort().values,
                     torch.arange(240)):
            support = Support(flat, (n_out, n_in), 0)
            torch.testing.assert_close(pair.rotate_at(grad, support), full.reshape(-1)[flat], atol=1e-5, rtol=1e-5)
            values = torch.randn(flat.numel())
            dense = torch.zeros(240).index_copy_(0, flat, values).view(n_out, n_in)
            expected = pair.U_out @ dense @ pair.U_in.T
            for on_support in (None, support):
                covered = torch.zeros(n_out, n_in, dtype=torch.int32)
                out = torch.zeros(n_out, n_in)
                for index, block in pair.unrotated_blocks(flat, values, (n_out, n_in), support=on_support):
                    out[index] += block
                    covered[index] += 1
                assert (covered == 1).all()  # the blocks tile W exactly once
                torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(pair.unrotate_sparse(flat, values, (n_out, n_in)), expected, atol=1e-5,
                                       rtol=1e-5)
            torch.testing.assert_close(pair.unrotate(dense), expected, atol=1e-5, rtol=1e-5)


def test_capped_top_k_takes_at_most_max_new_entries_outside_the_support():
    """TopK with a support and max_new: every support entry may be chosen, at most max_new others, and the result is
    the top-k of that candidate set (what a full support under SparseGradConfig.max_support selects from)."""
    torch.manual_seed(1)
    pair = BasisPair(_random_orthogonal(16, 2), _random_orthogonal(10, 3))
    grad = torch.randn(16, 10)
    full = (pair.U_out.T @ grad @ pair.U_in).reshape(-1)
    support = torch.randperm(160)[:30].sort().values.to(torch.int32)
    for max_new in (0, 3, 100):
        sel, values = pair.rotate_topk(grad, 12, support=support, max_new=max_new)
        outside = ~torch.isin(sel, support.long())
        assert outside.sum() <= max_new and sel.numel() == 12
        others = torch.ones(160, dtype=torch.bool)
        others[support.long()] = False
        best_new = others.nonzero().squeeze(1)[full[others].abs().topk(min(max_new, int(others.sum()))).indices]
        candidates = torch.cat([support.long(), best_new])
        expected = candidates[full[candidates].abs().topk(12).indices].sort().values
        assert sel.tolist() == expected.tolist()
        torch.testing.assert_close(values, full[sel], atol=1e-5, rtol=1e-5)


# ---- 5. calibration leaves the model exactly as it was --------------------------------------------------------


class _CountingStream:
    """An infinite batch generator that counts how many batches were taken from it."""

    def __init__(self, arch: str, seed: int = 1) -> None:
        self.taken = 0
        self._inner = batch_stream(arch, seed)

    def __iter__(self):
        return self

    def __next__(self):
        self.taken += 1
        return next(self._inner)


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_calibration_leaves_model_bit_identical(arch):
    model = build_model(arch)
    model.train()
    # a mixed state that must survive: some modules in eval, some params frozen, some with a stale .grad
    first_block = next(m for n, m in model.named_modules() if n.endswith(("layer.0", "h.0")))
    first_block.eval()
    mlp_weight = next(p for n, p in model.named_parameters() if n.endswith(("intermediate.dense.weight",
                                                                             "mlp.c_fc.weight")))
    mlp_weight.grad = torch.full_like(mlp_weight, 0.5)
    emb = model.get_input_embeddings().weight
    emb.requires_grad_(False)
    some_bias = next(p for n, p in model.named_parameters() if n.endswith("bias"))
    some_bias.grad = torch.ones_like(some_bias)
    modes = {n: m.training for n, m in model.named_modules()}
    before = snapshot(model)

    stream = _CountingStream(arch)
    bases = calibrate(model, SparseGradConfig(calibration_steps=3), stream, progress=False)
    assert stream.taken == 3, f"calibration consumed {stream.taken} batches for calibration_steps=3"
    assert bases.pairs
    assert_same_snapshot(before, snapshot(model))
    assert {n: m.training for n, m in model.named_modules()} == modes

    # the same through get_peft_model: the base weights are untouched, and exactly 3 batches are consumed
    stream = _CountingStream(arch)
    model.eval()
    ref = build_model(arch)
    peft_model = get_peft_model(model, SparseGradConfig(calibration_steps=3, calibration_dataloader=stream))
    assert stream.taken == 3
    base_state = {k.replace(".base_layer", ""): v for k, v in peft_model.base_model.model.state_dict().items()
                  if "sparsegrad_" not in k}
    for k, v in ref.state_dict().items():
        assert torch.equal(base_state[k], v), k


# ---- 6. basis properties and dtypes -----------------------------------------------------------------------------


def _hand_grams(model: nn.Module, arch: str, batches: list[dict]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Σ G Gᵀ and Σ Gᵀ G per layer type from ordinary backward passes of a copy of the model (float64)."""
    model = copy.deepcopy(model)
    targets = {"bert": ("intermediate.dense", "output.dense"), "gpt2": ("mlp.c_fc", "mlp.c_proj")}[arch]
    layers = {n: m for n, m in model.named_modules()
              if n.endswith(targets) and "attention" not in n}
    grams: dict[str, list[torch.Tensor]] = {}
    for batch in batches:
        model.zero_grad()
        model(**batch).loss.backward()
        for n, m in layers.items():
            g = m.weight.grad.double()
            g = g.T if isinstance(m, Conv1D) else g
            acc = grams.setdefault(layer_role(n), [0, 0])
            acc[0] = acc[0] + g @ g.T
            acc[1] = acc[1] + g.T @ g
    return {k: (v[0], v[1]) for k, v in grams.items()}


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_bases_orthogonal_float32_sorted_eigenvectors(arch):
    model = build_model(arch)
    bases = calibrate(model, SparseGradConfig(calibration_steps=3), batch_stream(arch, seed=2), progress=False)
    grams = _hand_grams(model, arch, batch_list(arch, 3, seed=2))
    assert grams.keys() == bases.pairs.keys()
    for layer_type, pair in bases.pairs.items():
        for u, eig, gram in ((pair.U_out, bases.eigenvalues[layer_type][0], grams[layer_type][0]),
                             (pair.U_in, bases.eigenvalues[layer_type][1], grams[layer_type][1])):
            assert u.dtype == torch.float32
            n = u.shape[0]
            torch.testing.assert_close(u.T @ u, torch.eye(n), atol=1e-5, rtol=0)
            assert (eig[:-1] >= eig[1:]).all(), "eigenvalues not sorted decreasingly"
            # the columns diagonalise the Gram matrix of the true gradients, with the reported eigenvalues
            rotated = u.double().T @ gram @ u.double()
            scale = gram.abs().max()
            torch.testing.assert_close(rotated, torch.diag(eig.double()), atol=1e-5 * scale.item(), rtol=0)
            torch.testing.assert_close(torch.linalg.eigvalsh(gram).flip(0), eig.double(),
                                       atol=1e-6 * scale.item(), rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_half_precision_base_models_keep_float32_adapter(arch, dtype):
    base = build_model(arch, dtype=dtype)
    batch = next(batch_stream(arch, seed=9))
    expected = logits(base, batch)
    model = get_peft_model(base, SparseGradConfig(calibration_steps=2, calibration_dataloader=batch_stream(arch)))
    for name, layer in sparsegrad_layers(model).items():
        assert layer.get_base_layer().weight.dtype == dtype
        assert layer.sparsegrad_delta["default"].values.dtype == torch.float32, name
        pair = layer.sparsegrad_bases["default"]
        assert pair.U_out.dtype == torch.float32 and pair.U_in.dtype == torch.float32
        torch.testing.assert_close(pair.U_in.T @ pair.U_in, torch.eye(pair.U_in.shape[0]), atol=1e-5, rtol=0)
    assert torch.equal(logits(model, batch), expected)  # ΔW' = 0: the plain layers, untouched
    # a training step keeps ΔW' float32, W in its dtype and nothing else of W's size (stochastic rounding)
    opt = create_sparsegrad_optimizer(model, lr=1e-2)
    model(**batch).loss.float().backward()
    opt.step()
    shared: dict[str, BasisPair] = {}
    for layer in sparsegrad_layers(model).values():
        assert layer.sparsegrad_delta["default"].values.dtype == torch.float32
        assert layer.get_base_layer().weight.dtype == dtype
        assert layer._residual is None
        # float16 bases by default (half the memory) whatever the weight's dtype, still one object per layer type
        pair = layer.sparsegrad_bases["default"]
        assert pair.U_out.dtype == pair.U_in.dtype == torch.float16
        assert shared.setdefault(layer.sparsegrad_type["default"], pair) is pair
        for u in (pair.U_out, pair.U_in):
            gram = u.double().T @ u.double()
            assert (gram - torch.eye(u.shape[0], dtype=torch.float64)).abs().max() < 1e-3
    assert not torch.equal(logits(model, batch), expected)


@pytest.mark.parametrize("rounding", ["compensated", "stochastic"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_adapter_round_trip_and_unload_use_its_float16_bases(dtype, rounding, tmp_path):
    """The float16 bases a half-precision model trained with are the adapter's: saved as they are, they give back
    the same W when loaded into a fresh model (to the residual's precision with compensated rounding, to W's own
    rounding with stochastic rounding, where the loaded W is round(W₀ + ΔW)), and unload() returns W₀ to the weight's
    own precision."""
    arch = "llama"
    base = build_model(arch, dtype=dtype)
    w0 = {n: m.weight.detach().clone() for n, m in base.named_modules() if isinstance(m, torch.nn.Linear)}
    model = get_peft_model(base, SparseGradConfig(calibration_steps=2, calibration_dataloader=batch_stream(arch),
                                                  rounding=rounding))
    opt = create_sparsegrad_optimizer(model, lr=1e-2)
    for batch in batch_stream(arch, seed=5, n=3):
        model(**batch).loss.float().backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(tmp_path)
    saved = load_file(os.path.join(tmp_path, "adapter_model.safetensors"))
    for layer in sparsegrad_layers(model).values():
        pair = layer.sparsegrad_bases["default"]
        key = f"base_model.model.sparsegrad_bases.{layer.sparsegrad_type['default']}.U_out"
        assert torch.equal(saved[key], pair.U_out.float())  # exactly the float16 values it trained with
    loaded = PeftModel.from_pretrained(build_model(arch, dtype=dtype), tmp_path)
    trained = sparsegrad_layers(model)
    for name, layer in sparsegrad_layers(loaded).items():
        pair = layer.sparsegrad_bases["default"]
        assert pair.U_out.dtype == torch.float16
        u_out, u_in = pair.float32()
        change = u_out @ layer.sparsegrad_delta["default"].to_dense() @ u_in.T
        w_0 = w0[name.removeprefix("base_model.model.")].float()
        ulp = torch.finfo(dtype).eps * (w_0 + change).abs().max().item()
        if rounding == "compensated":
            torch.testing.assert_close(layer._true_weight(), w_0 + change, atol=1e-6, rtol=0)
            # training added the same change step by step through bf16 GEMMs: equal up to their rounding
            torch.testing.assert_close(layer._true_weight(), trained[name]._true_weight(),
                                       atol=2e-2 * change.abs().max().item(), rtol=0)
        else:  # no residual: the loaded W is W₀ + ΔW rounded to nearest; training's W carries 3 steps of SR noise
            assert layer._residual is None and trained[name]._residual is None
            torch.testing.assert_close(layer._true_weight(), w_0 + change, atol=ulp / 2, rtol=0)
            torch.testing.assert_close(layer._true_weight(), trained[name]._true_weight(), atol=3 * ulp, rtol=0)
    plain = loaded.unload()
    adapted = [(m, w0[n]) for n, m in plain.named_modules() if n in w0 and n.endswith(("up_proj", "down_proj"))]
    assert len(adapted) == len(trained)
    for m, w in adapted:
        torch.testing.assert_close(m.weight, w, atol=torch.finfo(dtype).eps * w.abs().max().item(), rtol=0)


@pytest.mark.parametrize("dtype, choice, stored", [
    (torch.float32, "float16", torch.float16),
    (torch.float32, "auto", torch.float32),
    (torch.bfloat16, "float32", torch.float32),
])
def test_bases_dtype_sets_the_storage_and_w_follows_the_stored_bases(dtype, choice, stored, tmp_path):
    arch = "llama"
    base = build_model(arch, dtype=dtype)
    w0 = {"base_model.model." + n: m.weight.detach().float().clone() for n, m in base.named_modules()
          if isinstance(m, torch.nn.Linear)}
    config = SparseGradConfig(calibration_steps=2, calibration_dataloader=batch_stream(arch), bases_dtype=choice)
    model = get_peft_model(base, config)
    opt = create_sparsegrad_optimizer(model, lr=1e-2)
    for batch in batch_stream(arch, seed=5, n=2):
        model(**batch).loss.float().backward()
        opt.step()
        opt.zero_grad()
    for name, layer in sparsegrad_layers(model).items():
        pair = layer.sparsegrad_bases["default"]
        assert pair.U_out.dtype == pair.U_in.dtype == stored
        u_out, u_in = pair.float32()
        change = u_out @ layer.sparsegrad_delta["default"].to_dense() @ u_in.T
        # bf16: the steps' bf16 GEMMs, and two steps of stochastic rounding (each within one ulp of W)
        ulp = torch.finfo(dtype).eps * w0[name].abs().max().item()
        tol = 1e-6 if dtype == torch.float32 else 2e-2 * change.abs().max().item() + 2 * ulp
        torch.testing.assert_close(layer._true_weight(), w0[name] + change, atol=tol, rtol=0)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["bases_dtype"] == choice
    loaded = PeftModel.from_pretrained(build_model(arch, dtype=dtype), tmp_path)
    loaded(**next(batch_stream(arch, seed=6)))
    assert all(m.pair("default").U_out.dtype == stored for m in sparsegrad_layers(loaded).values())


def test_adapter_saved_with_float32_bases_loads_them_unrounded(tmp_path):
    """An adapter saved with float32 bases (bases_dtype='float32', or a version before float16 became the default,
    whose adapter_config.json has no bases_dtype) keeps them float32 on loading: rounding them to the default float16
    would move the merged W away from the trained one."""
    arch = "llama"
    config = SparseGradConfig(calibration_steps=2, calibration_dataloader=batch_stream(arch), bases_dtype="float32")
    model = get_peft_model(build_model(arch), config)
    opt = create_sparsegrad_optimizer(model, lr=1e-2)
    for batch in batch_stream(arch, seed=5, n=2):
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    trained = {n: m.get_base_layer().weight.detach().clone() for n, m in sparsegrad_layers(model).items()}
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    del saved["bases_dtype"]  # as an older version wrote it
    (tmp_path / "adapter_config.json").write_text(json.dumps(saved))
    loaded = PeftModel.from_pretrained(build_model(arch), tmp_path)
    assert loaded.peft_config["default"].bases_dtype == "float16"  # the config's default ...
    for name, layer in sparsegrad_layers(loaded).items():
        assert layer.pair("default").U_out.dtype == torch.float32  # ... but the saved bases stay what they were
        torch.testing.assert_close(layer.get_base_layer().weight, trained[name], atol=1e-6, rtol=0)
    # a float16-trained adapter's saved values are float16-exact, so its bases load in float16 (shared per type)
    model16 = get_peft_model(build_model(arch), SparseGradConfig(calibration_steps=2,
                                                                 calibration_dataloader=batch_stream(arch)))
    model16.save_pretrained(tmp_path / "f16")
    loaded16 = PeftModel.from_pretrained(build_model(arch), tmp_path / "f16")
    assert all(m.pair("default").U_out.dtype == torch.float16 for m in sparsegrad_layers(loaded16).values())


def test_float16_bases_on_float32_weights_match_full_fine_tuning_to_their_precision():
    """keep_ratio = 1 + SGD: one step changes W by U_out U_outᵀ G U_in U_inᵀ, = G for orthogonal bases. Float32
    bases give full fine-tuning to float32 rounding; float16 bases (the default) to their ~1e-3."""
    torch.manual_seed(0)
    n_out, n_in = 48, 32
    g = torch.randn(n_out, n_in)
    errors = {}
    for choice in ("float32", "float16"):
        lin = nn.Linear(n_in, n_out, bias=False)
        w_before = lin.weight.detach().clone()
        q_out, q_in = torch.linalg.qr(torch.randn(n_out, n_out))[0], torch.linalg.qr(torch.randn(n_in, n_in))[0]
        layer = SparseGradLinear(lin, "default", 1.0, BasisPair(q_out, q_in), "t", bases_dtype=choice)
        w = layer.get_base_layer().weight
        opt = SparseGradOptimizer([{"params": [w], "sparsegrad_k": n_out * n_in, "mode": "sgd"}], lr=1.0)
        w.grad = g.clone()
        opt.step()
        errors[choice] = ((w.detach() - w_before + g).norm() / g.norm()).item()
    assert errors["float32"] < 1e-5
    assert 1e-5 < errors["float16"] < 3e-3, errors


# ---- 7. identity bases: MeProp ----------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_identity_bases_give_plain_weight_gradient_and_save_no_bases(arch, tmp_path):
    base = build_model(arch)
    plain = copy.deepcopy(base)
    model = get_peft_model(base, SparseGradConfig(bases="identity"))
    create_sparsegrad_optimizer(model, lr=1e-2)
    batch = next(batch_stream(arch, seed=4))
    model(**batch).loss.backward()
    plain(**batch).loss.backward()
    plain_modules = dict(plain.named_modules())
    for name, layer in sparsegrad_layers(model).items():
        assert layer.sparsegrad_bases["default"].is_identity
        ref = plain_modules[name.removeprefix("base_model.model.")].weight.grad
        ref = ref.T if isinstance(layer.get_base_layer(), Conv1D) else ref
        torch.testing.assert_close(rotated_grad(layer), ref, atol=1e-6, rtol=1e-5)

    model.save_pretrained(tmp_path)
    keys = load_file(os.path.join(tmp_path, "adapter_model.safetensors")).keys()
    assert not [k for k in keys if "sparsegrad_bases" in k]
    import json

    assert json.load(open(tmp_path / "adapter_config.json"))["bases"] == "identity"
    # and it loads back as an identity adapter
    from peft import PeftModel

    loaded = PeftModel.from_pretrained(build_model(arch), tmp_path)
    assert all(m.sparsegrad_bases["default"].is_identity for m in sparsegrad_layers(loaded).values())
    torch.testing.assert_close(logits(loaded, batch), logits(model, batch), atol=0, rtol=0)


# ---- mixed precision ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_bf16_autocast_gradients_float32_and_close_to_fp32(arch):
    """Under torch.autocast the forward runs in bf16; W.grad stays float32 (W's dtype) and close to fp32's."""
    grads = {}
    for use_autocast in (False, True):
        torch.manual_seed(0)
        model = get_peft_model(build_model(arch), SparseGradConfig(calibration_steps=2, init_weights=False,
                                                                   calibration_dataloader=batch_stream(arch)))
        create_sparsegrad_optimizer(model, lr=1e-2)
        batch = next(batch_stream(arch, seed=4))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_autocast):
            out = model(**batch)
        assert out.logits.dtype == (torch.bfloat16 if use_autocast else torch.float32)
        out.loss.float().backward()
        grads[use_autocast] = {n: rotated_grad(m) for n, m in sparsegrad_layers(model).items()}
    for name, g in grads[True].items():
        ref = grads[False][name]
        assert g.dtype == torch.float32 and torch.isfinite(g).all()
        assert ((g - ref).norm() / ref.norm()).item() < 3e-2, name
