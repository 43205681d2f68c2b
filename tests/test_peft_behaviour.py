"""SparseGrad as a PEFT tuner: the behaviours PEFT's own tuner test matrix checks (targets, identity at init, save /
load formats and round trips, disable / merge / unmerge / unload, several adapters, modules_to_save, layer selection,
push_to_hub, bases reuse, dtypes), parametrized over BERT, LLaMA, GPT-2 (Conv1D) and T5 where it makes sense."""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch
from peft import PeftConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.pytorch_utils import Conv1D

from conftest import (ARCHS, MATRIX, adapter_snapshot, assert_same_adapter_snapshot, assert_same_snapshot,
                      base_weight_stored, batch_list, batch_stream, build_model, logits, snapshot, sparsegrad_layers)
from peft_sparsegrad import (SparseGradBases, SparseGradConfig, SparseGradLinear, SparseGradModel, calibrate,
                             create_sparsegrad_optimizer, load_bases, save_bases)
from peft_sparsegrad.registration import SPARSEGRAD

ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors", "README.md"}

#: Names (in the plain model) of the layers SparseGrad must adapt by default, as regexes.
EXPECTED_TARGETS = {
    "bert": r"bert\.encoder\.layer\.\d\.(intermediate|output)\.dense",
    "roberta": r"roberta\.encoder\.layer\.\d\.(intermediate|output)\.dense",
    "llama": r"model\.layers\.\d\.mlp\.(up_proj|down_proj)",
    "gpt2": r"transformer\.h\.\d\.mlp\.(c_fc|c_proj)",
    "t5": r"(encoder\.block\.\d\.layer\.1|decoder\.block\.\d\.layer\.2)\.DenseReluDense\.(wi|wo)",
}
#: Attention layers that share a suffix with an MLP layer and must stay untouched.
ATTENTION_LOOKALIKES = {
    "bert": r"bert\.encoder\.layer\.\d\.attention\.output\.dense",
    "llama": r"model\.layers\.\d\.self_attn\.o_proj",
    "gpt2": r"transformer\.h\.\d\.attn\.c_proj",
    "t5": r"(encoder|decoder)\.block\.\d\.layer\.0\.SelfAttention\.o",
}


def make_peft(arch: str, seed: int = 0, dtype=torch.float32, **kwargs):
    kwargs.setdefault("calibration_steps", 2)
    if "bases" not in kwargs and "precomputed_bases" not in kwargs:
        kwargs.setdefault("calibration_dataloader", batch_stream(arch, seed=21))
    kwargs.setdefault("task_type", ARCHS[arch].task_type)
    return get_peft_model(build_model(arch, seed, dtype), SparseGradConfig(**kwargs))


def train(model, arch: str, steps: int = 3, lr: float = 1e-2, mode: str | None = None, seed: int = 5):
    opt = create_sparsegrad_optimizer(model, lr=lr, mode=mode)
    for batch in batch_list(arch, steps, seed=seed):
        opt.zero_grad()
        model(**batch).loss.float().backward()
        opt.step()
    return opt


def eval_batch(arch: str):
    return next(batch_stream(arch, seed=99))


def raw_params(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's parameters as stored, under the plain model's names (wrapper copies dropped). An adapted layer's
    weight holds W₀ + Σ ΔW of its applied adapters (W is trained in place)."""
    if isinstance(model, PeftModel):
        model = model.base_model.model
    out = {}
    for name, p in model.named_parameters():
        if ".modules_to_save." in name:
            continue
        out[name.replace(".base_layer.", ".").replace(".original_module.", ".")] = p
    return out


def base_params(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base model's parameters under their original names: like ``raw_params``, but an adapted layer's weight is
    W₀ = ``layer.base_weight()`` (W minus the applied adapters' ΔW), in the base layer's own layout."""
    out = raw_params(model)
    inner = model.base_model.model if isinstance(model, PeftModel) else model
    for name, layer in sparsegrad_layers(inner).items():
        out[f"{name}.weight"] = base_weight_stored(layer)
    return out


def adapted_weight_names(model: nn.Module) -> set[str]:
    """Plain-model names of the adapted weights (``<layer>.weight``)."""
    return {n.removeprefix("base_model.model.") + ".weight" for n in sparsegrad_layers(model)}


def assert_base_params_close(model: nn.Module, original: dict[str, torch.Tensor], atol: float = 1e-6) -> None:
    """Every non-adapted parameter bit-identical to ``original``; W₀ of every adapted layer equal up to the float
    rounding of W₀ + ΔW − ΔW (W is adapted in place, so W₀ is recovered by a subtraction)."""
    params, adapted = base_params(model), adapted_weight_names(model)
    assert params.keys() == original.keys()
    for k, v in params.items():
        if k in adapted:
            torch.testing.assert_close(v, original[k], atol=atol, rtol=0, msg=lambda m: f"{k}: {m}")
        else:
            assert torch.equal(v, original[k]), f"base parameter {k} changed"


# ---- identity, targets --------------------------------------------------------------------------------------------


def test_peft_type_and_default_targets(arch):
    model = make_peft(arch, bases="identity")
    config = model.peft_config["default"]
    assert isinstance(config, SparseGradConfig)
    assert config.peft_type == "SPARSEGRAD" and config.peft_type is SPARSEGRAD
    assert isinstance(model.base_model, SparseGradModel)
    plain_names = [n for n, _ in build_model(arch).named_modules()]
    expected = {n for n in plain_names if re.fullmatch(EXPECTED_TARGETS[arch], n)}
    assert len(expected) == (8 if arch == "t5" else 4)
    adapted = {n.removeprefix("base_model.model.") for n in sparsegrad_layers(model)}
    assert adapted == expected
    modules = dict(model.base_model.model.named_modules())
    lookalikes = [n for n in plain_names if re.fullmatch(ATTENTION_LOOKALIKES[arch], n)]
    assert len(lookalikes) == (4 if arch == "t5" else 2)
    for name in lookalikes:
        assert type(modules[name]) in (nn.Linear, Conv1D), f"attention layer {name} was adapted"
    # only the adapted weights W (trained in place) and, for classification, the head are trainable; ΔW' is no
    # parameter (a SparseDelta) and not in the state dict
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    layers = sparsegrad_layers(model)
    assert {n for n in trainable if ".modules_to_save." not in n} == {f"{n}.base_layer.weight" for n in layers}
    assert all(".modules_to_save.default." in n for n in trainable if not n.endswith(".base_layer.weight"))
    assert not any("sparsegrad" in n for n, _ in model.named_parameters())
    assert not any("sparsegrad" in k for k in model.state_dict())
    for layer in layers.values():
        assert layer.trainable_adapter() == "default" and layer._applied == ["default"]


def test_outputs_equal_base_right_after_get_peft_model(arch):
    batch = eval_batch(arch)
    expected = logits(build_model(arch), batch)
    model = make_peft(arch)
    got = logits(model, batch)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


# ---- save / load --------------------------------------------------------------------------------------------------


def test_save_pretrained_files_and_sparse_format(arch, tmp_path):
    model = make_peft(arch, keep_ratio=0.05)
    train(model, arch, steps=3)
    model.save_pretrained(tmp_path)
    assert set(os.listdir(tmp_path)) == ADAPTER_FILES
    state = load_file(tmp_path / "adapter_model.safetensors")
    non_adapter = [k for k in state if "sparsegrad_" not in k]
    assert all(".classifier." in k or ".score." in k for k in non_adapter), non_adapter  # the SEQ_CLS head only

    layers = sparsegrad_layers(model)
    layer_types = {m.sparsegrad_type["default"] for m in layers.values()}
    bases_keys = [k for k in state if ".sparsegrad_bases." in k or k.startswith("sparsegrad_bases.")]
    assert len(bases_keys) == 2 * len(layer_types)  # U_out and U_in once per layer type, not per layer
    assert len(layer_types) == (4 if arch == "t5" else 2)
    for layer_type in layer_types:
        assert sum(k.endswith(f"sparsegrad_bases.{layer_type}.U_out") for k in bases_keys) == 1
        assert sum(k.endswith(f"sparsegrad_bases.{layer_type}.U_in") for k in bases_keys) == 1
    for name, layer in layers.items():
        indices = state[f"{name}.sparsegrad_indices"]
        values = state[f"{name}.sparsegrad_values"]
        sparse = layer.sparsegrad_delta["default"]
        delta = sparse.to_dense()
        assert indices.dtype == torch.int32 and values.dtype == torch.float32
        # the whole support is saved (entries that returned to 0 included: optimizer moments follow the support),
        # as flat int32 indices (4 bytes per entry)
        assert indices.shape == (sparse.nnz,) and values.shape == indices.shape
        assert int((delta != 0).sum()) <= sparse.nnz
        assert 0 < indices.shape[0] < delta.numel() // 2  # sparse
        assert torch.equal(indices, sparse.flat)
        assert torch.equal(values, sparse.values)
        dense = torch.zeros_like(delta).view(-1)
        dense[indices.long()] = values
        assert torch.equal(dense.view(delta.shape), delta)
        pair = layer.sparsegrad_bases["default"]
        t = layer.sparsegrad_type["default"]
        assert torch.equal(state[f"base_model.model.sparsegrad_bases.{t}.U_out"], pair.U_out)
        assert torch.equal(state[f"base_model.model.sparsegrad_bases.{t}.U_in"], pair.U_in)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "SPARSEGRAD" and config["bases"] == "checkpoint"
    assert "calibration_dataloader" not in config and "precomputed_bases" not in config


def test_round_trip_in_process_and_config(arch, tmp_path):
    model = make_peft(arch, keep_ratio=0.05)
    train(model, arch)
    batch = eval_batch(arch)
    expected = logits(model, batch)
    assert not torch.allclose(expected, logits(build_model(arch), batch), atol=1e-4)  # training did something
    model.save_pretrained(tmp_path)

    config = PeftConfig.from_pretrained(tmp_path)
    assert isinstance(config, SparseGradConfig) and config.bases == "checkpoint"
    assert config.keep_ratio == 0.05 and config.peft_type is SPARSEGRAD

    loaded = PeftModel.from_pretrained(build_model(arch), tmp_path)
    assert isinstance(loaded.base_model, SparseGradModel)
    torch.testing.assert_close(logits(loaded, batch), expected, atol=2e-6, rtol=0)  # float32: step by step vs at once
    assert not any(p.requires_grad for p in loaded.parameters())  # inference mode by default
    original = {k: v.detach().clone() for k, v in base_params(build_model(arch)).items()}
    for name, layer in sparsegrad_layers(loaded).items():
        ref = sparsegrad_layers(model)[name]
        a, b = layer.sparsegrad_delta["default"], ref.sparsegrad_delta["default"]
        assert torch.equal(a.flat, b.flat) and torch.equal(a.values, b.values) and a.flat.dtype == torch.int32
        # loading puts ΔW into W: the same weight as training built step by step, up to float rounding
        torch.testing.assert_close(layer.get_base_layer().weight, ref.get_base_layer().weight, atol=1e-6, rtol=0)
        assert layer._applied == ["default"] and layer.trainable_adapter() is None
        assert torch.equal(layer.sparsegrad_bases["default"].U_in, ref.sparsegrad_bases["default"].U_in)
        assert layer.sparsegrad_k["default"] == ref.sparsegrad_k["default"]

    # is_trainable=True: training continues from the loaded state
    assert_base_params_close(loaded, original)
    trainable = PeftModel.from_pretrained(build_model(arch), tmp_path, is_trainable=True)
    assert {n for n, p in trainable.named_parameters() if p.requires_grad and ".modules_to_save." not in n} == {
        f"{n}.base_layer.weight" for n in sparsegrad_layers(trainable)}
    train(trainable, arch, steps=1, seed=6)
    assert not torch.allclose(logits(trainable, batch), expected, atol=1e-6)


def test_untrained_adapter_saves_empty_indices_and_loads(tmp_path):
    arch = "gpt2"
    model = make_peft(arch)
    model.save_pretrained(tmp_path)
    state = load_file(tmp_path / "adapter_model.safetensors")
    indices = [v for k, v in state.items() if k.endswith("sparsegrad_indices")]
    assert len(indices) == 4 and all(v.shape == (0,) and v.dtype == torch.int32 for v in indices)
    loaded = PeftModel.from_pretrained(build_model(arch), tmp_path, is_trainable=True)
    batch = eval_batch(arch)
    torch.testing.assert_close(logits(loaded, batch), logits(build_model(arch), batch), atol=1e-6, rtol=0)
    assert all(m.sparsegrad_delta["default"].nnz == 0 for m in sparsegrad_layers(loaded).values())
    train(loaded, arch, steps=1)
    assert all(m.sparsegrad_delta["default"].values.abs().sum() > 0 for m in sparsegrad_layers(loaded).values())


def test_checkpoint_without_shape_keys_still_loads(tmp_path):
    """``<m>.sparsegrad_shape`` is optional on load (checkpoints written before it existed)."""
    from safetensors.torch import save_file

    arch = "bert"
    model = make_peft(arch, keep_ratio=0.05)
    train(model, arch)
    model.save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    state = load_file(path)
    shapes = {k: v for k, v in state.items() if k.endswith(".sparsegrad_shape")}
    assert len(shapes) == 4 and all(v.dtype == torch.int32 for v in shapes.values())
    for k, v in shapes.items():
        layer = sparsegrad_layers(model)[k.removesuffix(".sparsegrad_shape")]
        assert tuple(v.tolist()) == (layer.out_features, layer.in_features)
    save_file({k: v for k, v in state.items() if k not in shapes}, str(path), metadata={"format": "pt"})
    batch = eval_batch(arch)
    loaded = PeftModel.from_pretrained(build_model(arch), tmp_path)
    torch.testing.assert_close(logits(loaded, batch), logits(model, batch), atol=1e-6, rtol=0)


def test_round_trip_low_cpu_mem_usage(tmp_path):
    """low_cpu_mem_usage=True creates ΔW' on the meta device and assigns the loaded tensors."""
    arch = "gpt2"
    model = make_peft(arch, keep_ratio=0.05)
    train(model, arch)
    batch = eval_batch(arch)
    expected = logits(model, batch)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(build_model(arch), tmp_path, low_cpu_mem_usage=True, is_trainable=True)
    torch.testing.assert_close(logits(loaded, batch), expected, atol=1e-6, rtol=0)
    for name, layer in sparsegrad_layers(loaded).items():
        delta, ref = layer.sparsegrad_delta["default"], sparsegrad_layers(model)[name].sparsegrad_delta["default"]
        assert delta.device.type == "cpu" and delta.values.dtype == torch.float32 and delta.flat.dtype == torch.int32
        assert torch.equal(delta.flat, ref.flat) and torch.equal(delta.values, ref.values)
        assert layer.get_base_layer().weight.device.type == "cpu"
    train(loaded, arch, steps=1, seed=6)  # still routable to the sparse optimizer


SUBPROCESS_SCRIPT = textwrap.dedent("""
    import sys
    sys.path.insert(0, {tests!r})
    import torch
    import peft_sparsegrad  # registers SPARSEGRAD
    from peft import PeftModel
    from conftest import build_model, batch_stream, logits
    model = PeftModel.from_pretrained(build_model({arch!r}, seed=3), {adapter!r})
    batch = next(batch_stream({arch!r}, seed=99))
    torch.save(logits(model, batch), {out!r})
""")


@pytest.mark.slow
def test_round_trip_fresh_process(tmp_path):
    arch = "gpt2"
    model = make_peft(arch, seed=3, keep_ratio=0.05)
    train(model, arch)
    expected = logits(model, eval_batch(arch))
    model.save_pretrained(tmp_path / "adapter")
    script = SUBPROCESS_SCRIPT.format(tests=os.path.dirname(os.path.abspath(__file__)), arch=arch,
                                      adapter=str(tmp_path / "adapter"), out=str(tmp_path / "logits.pt"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    got = torch.load(tmp_path / "logits.pt")
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def test_gradient_checkpointing_gives_the_same_gradients(arch):
    # one set of bases for both runs: separate calibrations differ by float noise, which near-degenerate
    # eigenvalues amplify into visibly different bases
    bases = calibrate(build_model(arch), SparseGradConfig(calibration_steps=2), batch_stream(arch, seed=21),
                      progress=False)
    grads = {}
    for checkpointing in (False, True):
        base = build_model(arch)
        if checkpointing:
            base.gradient_checkpointing_enable()
        base.train()
        torch.manual_seed(0)  # same random ΔW' (init_weights=False) in both runs
        model = get_peft_model(base, SparseGradConfig(precomputed_bases=bases, init_weights=False))
        assert base.is_gradient_checkpointing == checkpointing
        create_sparsegrad_optimizer(model, lr=1e-2)
        model(**eval_batch(arch)).loss.backward()
        # W.grad is the ordinary weight gradient; the optimizer uses its rotation U_outᵀ G U_in
        grads[checkpointing] = {}
        for n, m in sparsegrad_layers(model).items():
            g = m.get_base_layer().weight.grad
            g = g.T if m.is_conv1d else g
            grads[checkpointing][n] = (g.clone(), m.pair("default").rotate(g.float()))
    for name, (g, rotated) in grads[True].items():
        ref, ref_rotated = grads[False][name]
        assert ref.abs().max() > 0
        torch.testing.assert_close(g, ref, atol=1e-6 * ref.abs().max().item(), rtol=1e-5)
        torch.testing.assert_close(rotated, ref_rotated, atol=1e-6 * ref_rotated.abs().max().item(), rtol=1e-5)


# ---- disable / merge / unload ---------------------------------------------------------------------------------


def test_disable_merge_unmerge_unload(arch):
    batch = eval_batch(arch)
    base_logits = logits(build_model(arch), batch)
    original = {k: v.detach().clone() for k, v in base_params(build_model(arch)).items()}
    model = make_peft(arch, init_weights=False)  # nonzero ΔW', already in W (trained in place)
    adapted = logits(model, batch)
    assert (adapted - base_logits).abs().max() > 1e-4
    adapted_names = adapted_weight_names(model)
    raw = {k: v.detach().clone() for k, v in raw_params(model).items()}  # W₀ + ΔW for adapted layers
    assert all(not torch.equal(raw[k], original[k]) for k in adapted_names)
    assert_base_params_close(model, original)  # W₀ = W − ΔW
    state = snapshot(model), adapter_snapshot(model)
    never_merged = copy.deepcopy(model)

    def assert_as_adapted():  # weights, flags, ΔW', W₀ and bookkeeping bit-identical to right after get_peft_model
        assert_same_snapshot(state[0], snapshot(model))
        assert_same_adapter_snapshot(state[1], adapter_snapshot(model))
        assert torch.equal(logits(model, batch), adapted)

    with model.disable_adapter():  # nothing in place: W₀ is computed on the fly
        torch.testing.assert_close(logits(model, batch), base_logits, atol=1e-6, rtol=0)
        for k in adapted_names:
            assert torch.equal(raw_params(model)[k], raw[k])
    assert_as_adapted()

    model.merge_adapter()  # the active adapter already is in W: merging only marks it
    layers = sparsegrad_layers(model)
    assert all(m.merged and m.merged_adapters == ["default"] for m in layers.values())
    assert torch.equal(logits(model, batch), adapted)
    changed = raw_params(model)
    assert all(torch.equal(changed[k], raw[k]) for k in changed)
    with model.disable_adapter():  # also a merged adapter is left out of the forward
        torch.testing.assert_close(logits(model, batch), base_logits, atol=1e-6, rtol=0)
    assert torch.equal(logits(model, batch), adapted) and all(m.merged for m in layers.values())
    model.merge_adapter()  # already merged: PEFT warns, nothing changes
    model.unmerge_adapter()
    assert not any(m.merged for m in layers.values())
    assert_as_adapted()  # unmerging an active adapter leaves it in W, exactly
    assert_base_params_close(model, original)

    merged = copy.deepcopy(model).merge_and_unload(safe_merge=True)
    assert not sparsegrad_layers(merged) and not any("sparsegrad" in n for n, _ in merged.named_parameters())
    assert torch.equal(logits(merged, batch), adapted)
    for k, v in raw_params(merged).items():  # W₀ + ΔW as trained, no float work on unloading
        assert torch.equal(v, raw[k]), k
    for name in sparsegrad_layers(model):
        plain = merged.get_submodule(name.removeprefix("base_model.model."))
        assert type(plain) in (nn.Linear, Conv1D)
        assert not plain.weight.requires_grad and not hasattr(plain.weight, "sparsegrad_owner")

    unloaded = never_merged.unload()
    assert not sparsegrad_layers(unloaded)
    torch.testing.assert_close(logits(unloaded, batch), base_logits, atol=1e-6, rtol=0)
    # unload subtracts ΔW from W (trained in place): W₀ comes back up to the rounding of (W₀ + ΔW) − ΔW, the rest
    # of the model bit-identical
    after = raw_params(unloaded)
    assert after.keys() == original.keys()
    for k, v in after.items():
        if k in adapted_names:
            torch.testing.assert_close(v, original[k], atol=1e-6, rtol=0)
            assert not v.requires_grad and not hasattr(v, "sparsegrad_owner")
        else:
            assert torch.equal(v, original[k]), k


def test_disable_adapter_in_the_middle_of_training(arch):
    """TRL's DPO reference pass: training, then a forward of the base model inside ``disable_adapter()``, then
    training on. Inside, outputs are the base model's and no gradient reaches W; leaving restores bit for bit."""
    batch = eval_batch(arch)
    base_logits = logits(build_model(arch), batch)
    original = {k: v.detach().clone() for k, v in base_params(build_model(arch)).items()}
    model = make_peft(arch, keep_ratio=0.05)
    opt = create_sparsegrad_optimizer(model, lr=1e-2)
    batches = batch_list(arch, 4, seed=5)
    for b in batches[:2]:
        opt.zero_grad()
        model(**b).loss.float().backward()
        opt.step()
    layers = sparsegrad_layers(model)
    weights = [m.get_base_layer().weight for m in layers.values()]
    opt.zero_grad()
    before_out = logits(model, batch)
    assert (before_out - base_logits).abs().max() > 1e-4  # training did something
    state = snapshot(model), adapter_snapshot(model)

    with model.disable_adapter():
        torch.testing.assert_close(logits(model, batch), base_logits, atol=1e-5, rtol=0)
        model.train()
        loss = model(**batches[2]).loss.float()  # with grad enabled, as a reference pass may be
        model.eval()
        if loss.requires_grad:  # a classification head (modules_to_save) may still be trainable
            loss.backward()
        assert all(w.grad is None for w in weights)  # nothing reached W (nor the routing guard)
        assert_base_params_close(model, original, atol=1e-5)
    opt.zero_grad()
    assert_same_snapshot(state[0], snapshot(model))
    assert_same_adapter_snapshot(state[1], adapter_snapshot(model))
    assert torch.equal(logits(model, batch), before_out)

    supports = {n: m.sparsegrad_delta["default"].values.clone() for n, m in layers.items()}
    opt.zero_grad()
    model(**batches[3]).loss.float().backward()
    assert all(w.grad is not None for w in weights)
    opt.step()
    after_out = logits(model, batch)
    assert torch.isfinite(after_out).all() and not torch.equal(after_out, before_out)
    for n, m in layers.items():
        values = m.sparsegrad_delta["default"].values
        assert values.shape != supports[n].shape or not torch.equal(values, supports[n]), n
    assert_base_params_close(model, original, atol=1e-5)  # W still is W₀ + U_out ΔW' U_inᵀ


def test_safe_merge_refuses_nan_adapter():
    from peft_sparsegrad.delta import SparseDelta

    model = make_peft("bert", bases="identity")
    # an inactive adapter (not in W yet) with a NaN in ΔW': safe_merge checks before adding it to W
    model.add_adapter("broken", SparseGradConfig(bases="identity"))
    layer = next(iter(sparsegrad_layers(model).values()))
    layer.sparsegrad_delta["broken"] = SparseDelta(torch.tensor([0], dtype=torch.int32),
                                                   torch.tensor([float("nan")]), (layer.out_features,
                                                                                  layer.in_features))
    state = snapshot(model), adapter_snapshot(model)
    with pytest.raises(ValueError, match="NaN.*broken"):
        model.merge_adapter(["broken"], safe_merge=True)
    assert_same_snapshot(state[0], snapshot(model))
    assert_same_adapter_snapshot(state[1], adapter_snapshot(model))
    assert not layer.merged and "broken" not in layer._applied

    # the active adapter is in W already (trained in place): a NaN in it shows in W, and safe_merge refuses it
    nan_delta = SparseDelta(torch.tensor([0], dtype=torch.int32), torch.tensor([float("nan")]),
                            (layer.out_features, layer.in_features))
    layer.set_delta("default", nan_delta)
    assert torch.isnan(layer.get_base_layer().weight[0, 0])
    state = snapshot(model), adapter_snapshot(model)
    with pytest.raises(ValueError, match="NaN.*default"):
        model.merge_adapter(safe_merge=True)
    assert not layer.merged
    assert_same_adapter_snapshot(state[1], adapter_snapshot(model))


def test_merge_and_unload_roberta_classification_head():
    """PEFT pitfall: RoBERTa's classifier is a RobertaClassificationHead (no .weight) inside ModulesToSaveWrapper."""
    arch = "roberta"
    batch = eval_batch(arch)
    base_logits = logits(build_model(arch), batch)
    model = get_peft_model(build_model(arch), SparseGradConfig(bases="identity", init_weights=False,
                                                               task_type="SEQ_CLS"))
    train(model, arch, steps=2)  # trains the head too (modules_to_save)
    adapted = logits(model, batch)
    merged = copy.deepcopy(model).merge_and_unload()
    assert type(merged.classifier).__name__ == "RobertaClassificationHead"
    torch.testing.assert_close(logits(merged, batch), adapted, atol=1e-5, rtol=0)
    unloaded = copy.deepcopy(model).unload()
    assert type(unloaded.classifier).__name__ == "RobertaClassificationHead"
    assert not sparsegrad_layers(unloaded)
    unloaded_logits = logits(unloaded, batch)
    # unload keeps the trained modules_to_save head but drops ΔW'; it differs from both other models
    assert not torch.allclose(unloaded_logits, adapted, atol=1e-6)
    assert not torch.allclose(unloaded_logits, base_logits, atol=1e-6)


# ---- several adapters -----------------------------------------------------------------------------------------


def test_two_adapters_switch_train_delete(arch):
    batch = eval_batch(arch)
    model = make_peft(arch, init_weights=False)
    out_a = logits(model, batch)
    model.add_adapter("second", SparseGradConfig(bases="identity", init_weights=False))
    assert model.active_adapters == ["default"]
    torch.testing.assert_close(logits(model, batch), out_a, atol=0, rtol=0)  # adding does not activate

    model.set_adapter("second")
    out_b = logits(model, batch)
    assert (out_b - out_a).abs().max() > 1e-5
    layers = sparsegrad_layers(model)
    # the trainable tensors are the adapted weights W, now for "second" (only its ΔW is in W)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad and ".modules_to_save." not in n]
    assert set(trainable) == {f"{n}.base_layer.weight" for n in layers}
    assert all(m.trainable_adapter() == "second" and m._applied == ["second"] for m in layers.values())
    first = {n: m.sparsegrad_delta["default"].to_dense() for n, m in layers.items()}
    second = {n: m.sparsegrad_delta["second"].to_dense() for n, m in layers.items()}
    train(model, arch, steps=2)
    for n, m in layers.items():
        assert torch.equal(m.sparsegrad_delta["default"].to_dense(), first[n])  # the inactive adapter did not move
        assert not torch.equal(m.sparsegrad_delta["second"].to_dense(), second[n])
        assert m.sparsegrad_bases["second"].is_identity and not m.sparsegrad_bases["default"].is_identity
    original = {k: v.detach().clone() for k, v in base_params(build_model(arch)).items()}
    assert_base_params_close(model, original)  # W = W₀ + ΔW of "second" only

    # two trainable adapters of one layer would share W.grad: a clear error, not a silent mix
    # (on the SparseGrad layers: PEFT's ModulesToSaveWrapper of a classification head takes one adapter only)
    for m in layers.values():
        m.set_adapter(["default", "second"])
    assert all(sorted(m._applied) == ["default", "second"] for m in layers.values())
    with pytest.raises(ValueError, match="one adapter per layer"):
        create_sparsegrad_optimizer(model, lr=1e-2)
    # both active for inference is fine: W holds both ΔW and trains nothing
    for m in layers.values():
        m.set_adapter(["default", "second"], inference_mode=True)
    assert all(m.trainable_adapter() is None and not m.get_base_layer().weight.requires_grad
               for m in layers.values())
    assert_base_params_close(model, original)

    model.set_adapter("default")
    # W went W₀ + A → + B − A → (trained B) → + A: equal to the start up to float rounding of those additions
    out_default = logits(model, batch)
    torch.testing.assert_close(out_default, out_a, atol=1e-5, rtol=0)
    assert all(m._applied == ["default"] and m.trainable_adapter() == "default" for m in layers.values())
    assert_base_params_close(model, original)
    model.delete_adapter("second")  # not applied: W does not change
    assert list(model.peft_config) == ["default"]
    assert not any(".second" in n for n, _ in model.named_parameters())
    assert all(set(m.sparsegrad_delta) == {"default"} and "second" not in m.sparsegrad_bases
               for m in layers.values())
    assert torch.equal(logits(model, batch), out_default)
    train(model, arch, steps=1)  # the remaining adapter still trains


def test_second_adapter_with_its_own_calibration(tmp_path):
    arch = "bert"
    model = make_peft(arch)
    model.add_adapter("calibrated", SparseGradConfig(calibration_dataloader=batch_stream(arch, seed=77),
                                                     calibration_steps=2))
    for layer in sparsegrad_layers(model).values():
        a, b = layer.sparsegrad_bases["default"], layer.sparsegrad_bases["calibrated"]
        assert a is not b and not torch.allclose(a.U_out.abs(), b.U_out.abs(), atol=1e-3)  # other data
        torch.testing.assert_close(b.U_out.T @ b.U_out, torch.eye(b.U_out.shape[0]), atol=1e-5, rtol=0)
    assert model.peft_config["calibrated"].calibration_dataloader is None  # data not kept alive

    # both adapters saved (the second in its own folder) and loadable back
    model.set_adapter("calibrated")
    train(model, arch, steps=2)
    batch = eval_batch(arch)
    expected = logits(model, batch)
    model.save_pretrained(tmp_path)
    assert set(os.listdir(tmp_path)) == ADAPTER_FILES | {"calibrated"}
    loaded = PeftModel.from_pretrained(build_model(arch), tmp_path)
    loaded.load_adapter(tmp_path / "calibrated", adapter_name="calibrated")
    loaded.set_adapter("calibrated")
    torch.testing.assert_close(logits(loaded, batch), expected, atol=1e-6, rtol=0)


# ---- modules_to_save, layer selection ---------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["bert", "llama_cls"])
def test_modules_to_save_trained_saved_and_nothing_else_changes(arch, tmp_path):
    head = "classifier" if arch == "bert" else "score"
    base = build_model(arch)
    original = {k: v.detach().clone() for k, v in base_params(base).items()}
    model = get_peft_model(base, SparseGradConfig(bases="identity", modules_to_save=[head], task_type="SEQ_CLS",
                                                  keep_ratio=0.05))
    layers = sparsegrad_layers(model)
    train(model, arch, steps=3, lr=1e-2)
    # everything but the adapted weights bit-identical (incl. the original head); the adapted weights W hold
    # W₀ + ΔW' (MeProp: U = I, so exactly the entries outside the support of ΔW' are untouched)
    assert_base_params_close(model, original)
    raw = raw_params(model)
    for name, layer in layers.items():
        key = name.removeprefix("base_model.model.") + ".weight"
        delta = layer.sparsegrad_delta["default"]
        outside = torch.ones(delta.shape, dtype=torch.bool)
        outside.view(-1)[delta.flat.long()] = False
        assert torch.equal(raw[key][outside], original[key][outside]), key
        assert not torch.equal(raw[key], original[key])
    assert all(m.sparsegrad_delta["default"].values.abs().sum() > 0 for m in layers.values())
    trained_head = model.base_model.model.get_submodule(head).modules_to_save["default"]
    assert not torch.equal(trained_head.weight, original[f"{head}.weight"])

    model.save_pretrained(tmp_path)
    state = load_file(tmp_path / "adapter_model.safetensors")
    assert torch.equal(state[f"base_model.model.{head}.weight"], trained_head.weight)
    batch = eval_batch(arch)
    loaded = PeftModel.from_pretrained(build_model(arch), tmp_path)
    torch.testing.assert_close(logits(loaded, batch), logits(model, batch), atol=1e-6, rtol=0)


def test_layers_to_transform_and_exclude_modules(arch):
    first_block = {"bert": ".layer.0.", "llama": ".layers.0.", "gpt2": ".h.0.", "t5": ".block.0."}[arch]
    model = make_peft(arch, bases="identity", layers_to_transform=[0])
    names = set(sparsegrad_layers(model))
    assert names and all(first_block in n for n in names)
    assert len(names) == (4 if arch == "t5" else 2)

    full = {n.removeprefix("base_model.model.") for n in sparsegrad_layers(make_peft(arch, bases="identity"))}
    victim = sorted(full)[-1]
    model = make_peft(arch, bases="identity", exclude_modules=[victim])
    names = {n.removeprefix("base_model.model.") for n in sparsegrad_layers(model)}
    assert names == full - {victim}


# ---- push_to_hub --------------------------------------------------------------------------------------------------


def test_push_to_hub_uploads_exactly_the_adapter_files(monkeypatch, tmp_path):
    """Intercepted at the network boundary: PeftModel.push_to_hub (transformers' PushToHubMixin) calls
    HfApi.create_repo, ModelCard.load (to find an existing card) and HfApi.create_commit."""
    import huggingface_hub
    import transformers.utils.hub as transformers_hub
    from huggingface_hub import HfApi
    from huggingface_hub.errors import EntryNotFoundError

    calls, uploaded = [], {}

    def create_repo(self, repo_id, **kwargs):
        calls.append(("create_repo", repo_id))
        return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

    def create_commit(self, repo_id, operations, **kwargs):
        calls.append(("create_commit", repo_id))
        for op in operations:
            src = op.path_or_fileobj
            uploaded[op.path_in_repo] = open(src, "rb").read() if isinstance(src, (str, os.PathLike)) else src
        return "fake-commit"

    def no_card(*args, **kwargs):
        raise EntryNotFoundError("no model card yet")

    def no_network(*args, **kwargs):
        raise AssertionError("unexpected network call")

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    monkeypatch.setattr(HfApi, "upload_folder", no_network)
    monkeypatch.setattr(HfApi, "upload_file", no_network)
    monkeypatch.setattr(transformers_hub.ModelCard, "load", staticmethod(no_card))

    arch = "bert"
    model = make_peft(arch, keep_ratio=0.05)
    train(model, arch, steps=2)
    model.push_to_hub("someone/sparsegrad-test")
    assert calls == [("create_repo", "someone/sparsegrad-test"), ("create_commit", "someone/sparsegrad-test")]
    assert set(uploaded) == ADAPTER_FILES
    for name, data in uploaded.items():
        (tmp_path / name).write_bytes(data)
    batch = eval_batch(arch)
    loaded = PeftModel.from_pretrained(build_model(arch), tmp_path)
    torch.testing.assert_close(logits(loaded, batch), logits(model, batch), atol=1e-6, rtol=0)


# ---- reusing bases --------------------------------------------------------------------------------------------------


def _assert_same_bases(model_a, model_b):
    layers_a, layers_b = sparsegrad_layers(model_a), sparsegrad_layers(model_b)
    assert layers_a.keys() == layers_b.keys()
    for name, layer in layers_a.items():
        pa, pb = layer.sparsegrad_bases["default"], layers_b[name].sparsegrad_bases["default"]
        assert torch.equal(pa.U_out, pb.U_out) and torch.equal(pa.U_in, pb.U_in), name


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_reusing_bases_file_adapter_dir_and_precomputed(arch, tmp_path):
    reference = make_peft(arch, calibration_dataloader=batch_stream(arch, seed=21), calibration_steps=2)
    bases = calibrate(build_model(arch), SparseGradConfig(calibration_steps=2), batch_stream(arch, seed=21),
                      progress=False)
    assert isinstance(bases, SparseGradBases)
    save_bases(bases, tmp_path / "bases.safetensors")
    reread = load_bases(tmp_path / "bases.safetensors")
    assert reread.members == bases.members

    from_file = make_peft(arch, bases=str(tmp_path / "bases.safetensors"))
    _assert_same_bases(reference, from_file)
    from_object = make_peft(arch, precomputed_bases=bases)
    _assert_same_bases(reference, from_object)

    train(reference, arch, steps=1)
    reference.save_pretrained(tmp_path / "adapter")
    from_adapter = make_peft(arch, bases=str(tmp_path / "adapter"))
    _assert_same_bases(reference, from_adapter)
    # reused bases start a *new* adapter: ΔW' = 0, outputs = base model
    batch = eval_batch(arch)
    torch.testing.assert_close(logits(from_adapter, batch), logits(build_model(arch), batch), atol=1e-6, rtol=0)
    # a config with a bases path saves "checkpoint" (the bases travel with the adapter)
    assert from_file.peft_config["default"].to_dict()["bases"] == "checkpoint"


# ---- dtypes ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_half_precision_base_models(arch, dtype):
    # task_type=None: no modules_to_save head. A half-precision head trained by (any) AdamW turns NaN in fp16
    # (eps=1e-8 underflows; torch.optim.AdamW does the same), which is not what this test is about.
    model = make_peft(arch, dtype=dtype, task_type=None)
    for layer in sparsegrad_layers(model).values():
        assert layer.get_base_layer().weight.dtype == dtype
        assert layer.sparsegrad_delta["default"].values.dtype == torch.float32
        assert layer.sparsegrad_bases["default"].U_out.dtype == torch.float32
    train(model, arch, steps=1, lr=1e-3)
    for layer in sparsegrad_layers(model).values():
        delta, weight = layer.sparsegrad_delta["default"], layer.get_base_layer().weight
        assert delta.values.dtype == torch.float32 and delta.flat.dtype == torch.int32
        assert delta.values.abs().sum() > 0 and torch.isfinite(delta.values).all()
        assert weight.dtype == dtype and torch.isfinite(weight).all()  # W keeps its dtype
        assert layer._residual is None  # stochastic rounding (the default) needs nothing of W's size
    out = logits(model, eval_batch(arch))
    assert torch.isfinite(out).all()


def test_index_data_stays_int32_through_bf16_cast_and_round_trip(tmp_path):
    arch = "llama"
    model = make_peft(arch, keep_ratio=0.05)
    train(model, arch, steps=2)
    model = model.to(torch.bfloat16)
    for layer in sparsegrad_layers(model).values():
        # bases are not module buffers: .to(bfloat16) left them in their float16 storage
        assert layer.sparsegrad_bases["default"].U_out.dtype == torch.float16
        delta = layer.sparsegrad_delta["default"]  # ΔW' is no module tensor either: not cast
        assert delta.flat.dtype == torch.int32 and delta.values.dtype == torch.float32
        assert layer.get_base_layer().weight.dtype == torch.bfloat16
    batch = eval_batch(arch)
    expected = logits(model, batch)
    model.save_pretrained(tmp_path)
    state = load_file(tmp_path / "adapter_model.safetensors")
    index_keys = [k for k in state if k.endswith("sparsegrad_indices")]
    assert len(index_keys) == 4 and all(state[k].dtype == torch.int32 for k in index_keys)
    assert all(state[k].dtype == torch.float32 for k in state if "sparsegrad_values" in k)
    assert all(state[k].dtype == torch.float16 for k in state if "sparsegrad_bases" in k)  # as stored and trained

    loaded = PeftModel.from_pretrained(build_model(arch, dtype=torch.bfloat16), tmp_path)
    for name, layer in sparsegrad_layers(loaded).items():
        ref = sparsegrad_layers(model)[name].sparsegrad_delta["default"]
        delta = layer.sparsegrad_delta["default"]
        assert delta.values.dtype == torch.float32 and delta.flat.dtype == torch.int32
        assert torch.equal(delta.flat, ref.flat) and torch.equal(delta.values, ref.values)
        # loading adds ΔW to the bf16 W₀ in float32 and rounds once: W = round(W₀ + U_out ΔW' U_inᵀ), where the
        # cast model rounded W₀ + ΔW of the float32 model
        w0 = build_model(arch, dtype=torch.bfloat16).get_submodule(name.removeprefix("base_model.model.")).weight
        expected_w = w0.float() + layer.pair("default").unrotate(delta.to_dense())
        assert layer._residual is None
        torch.testing.assert_close(layer.get_base_layer().weight, expected_w.to(torch.bfloat16), atol=0, rtol=0)
    # the two bf16 models differ by one bf16 rounding of W (W₀ rounded before or after adding ΔW)
    torch.testing.assert_close(logits(loaded, batch), expected, atol=1e-2, rtol=1e-2)


def test_adapter_with_row_column_indices_of_earlier_versions_loads(tmp_path):
    """Adapters written before flat indices hold ΔW''s support as 2 × nnz (row, column) int32: they load alike."""
    arch = "llama"
    model = make_peft(arch, keep_ratio=0.05)
    train(model, arch)
    batch = eval_batch(arch)
    expected = logits(model, batch)
    model.save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    state = load_file(path)
    for key in [k for k in state if k.endswith("sparsegrad_indices")]:
        shape = state[key.replace("sparsegrad_indices", "sparsegrad_shape")].tolist()
        flat = state[key].long()
        state[key] = torch.stack([flat // shape[1], flat % shape[1]]).to(torch.int32)
    save_file(state, path)
    loaded = PeftModel.from_pretrained(build_model(arch), tmp_path)
    torch.testing.assert_close(logits(loaded, batch), expected, atol=2e-6, rtol=0)


def test_print_trainable_parameters_states_what_sparsegrad_trains(capsys):
    """Not PEFT's dense count of requires_grad parameters (every adapted weight), but the per-step budget Σk, the
    support, the adapter's bytes and the other trainable parameters; LoRA models print as before."""
    from peft import LoraConfig

    arch = "bert"
    model = make_peft(arch, keep_ratio=0.05)
    summary = model.base_model.trainable_summary()
    layers = sparsegrad_layers(model)
    assert summary["adapted_layers"] == len(layers) == 4
    assert summary["budget_per_step"] == sum(m.sparsegrad_k["default"] for m in layers.values())
    assert summary["adapted_weights"] == sum(m.out_features * m.in_features for m in layers.values())
    assert summary["support"] == 0
    head = sum(p.numel() for p in model.base_model.model.classifier.modules_to_save["default"].parameters())
    assert summary["other_trainable"] == head
    model.print_trainable_parameters()
    out = capsys.readouterr().out
    assert f"{summary['budget_per_step']:,d} entries per step" in out and "support 0 entries" in out
    train(model, arch, steps=2)
    after = model.base_model.trainable_summary()
    assert after["support"] >= after["budget_per_step"]
    assert after["adapter_bytes"] == 8 * after["support"] + sum(
        (p.U_out.numel() + p.U_in.numel()) * 2 for p in {id(m.sparsegrad_bases["default"]): m.sparsegrad_bases["default"]
                                                        for m in layers.values()}.values())
    lora = get_peft_model(build_model(arch), LoraConfig(target_modules=["query"], r=2))
    lora.print_trainable_parameters()
    assert capsys.readouterr().out.startswith("trainable params:")
