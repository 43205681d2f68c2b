"""Bad input gives a clear error, and the model is left exactly as it was: every parameter and buffer bit-identical,
the same requires_grad flags and .grad, the same module types, and no SparseGradLinear inserted."""

from __future__ import annotations

import contextlib
import math
import re

import pytest
import torch
from peft import PeftModel, get_peft_model
from torch import nn

from conftest import (adapter_snapshot, assert_same_adapter_snapshot, assert_same_snapshot, batch_list, batch_stream,
                      build_model, inputs_only, logits, snapshot, sparsegrad_layers)
from peft_sparsegrad import (SparseGradConfig, calibrate, create_sparsegrad_optimizer, save_bases)


def _structure(model: nn.Module) -> dict[str, type]:
    return {n: type(m) for n, m in model.named_modules()}


@contextlib.contextmanager
def model_left_untouched(model: nn.Module):
    """Snapshot before, compare after (also when the block raised, which is the point)."""
    before, structure, modes = snapshot(model), _structure(model), {n: m.training for n, m in model.named_modules()}
    attributes = {n: set(vars(m)) for n, m in model.named_modules()}  # e.g. no `peft_config` left on the model
    try:
        yield
    finally:
        assert not sparsegrad_layers(model), "a SparseGradLinear was inserted"
        assert _structure(model) == structure
        assert {n: set(vars(m)) for n, m in model.named_modules()} == attributes
        assert_same_snapshot(before, snapshot(model))
        assert {n: m.training for n, m in model.named_modules()} == modes


def _prepared_bert() -> nn.Module:
    """BERT in a state worth preserving: some params frozen, a stale .grad."""
    model = build_model("bert")
    model.get_input_embeddings().weight.requires_grad_(False)
    model.classifier.weight.grad = torch.full_like(model.classifier.weight, 0.25)
    return model


def _expect_failure(model, config, exc_type, match):
    with model_left_untouched(model):
        with pytest.raises(exc_type, match=match):
            get_peft_model(model, config)


# ---- targets --------------------------------------------------------------------------------------------------


def test_no_module_matched():
    _expect_failure(_prepared_bert(), SparseGradConfig(target_modules=["nope"], bases="identity"), ValueError,
                    r"No module matched target_modules.*nope")


def test_everything_excluded():
    config = SparseGradConfig(target_modules=["intermediate.dense"], exclude_modules=["intermediate.dense"],
                              bases="identity")
    _expect_failure(_prepared_bert(), config, ValueError, r"No module matched")


@pytest.mark.parametrize("target, kind", [("LayerNorm", "LayerNorm"), ("word_embeddings", "Embedding")])
def test_target_that_is_not_linear(target, kind):
    # Also with a valid target listed first: nothing is replaced before the bad one is found.
    config = SparseGradConfig(target_modules=["intermediate.dense", target], bases="identity")
    _expect_failure(_prepared_bert(), config, TypeError, rf"is a {kind}.*only torch\.nn\.Linear")


def test_unknown_architecture_without_target_modules():
    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(x)

    _expect_failure(Custom(), SparseGradConfig(bases="identity"), ValueError, r"target_modules")


# ---- config values ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value, exc", [(0, ValueError), (0.0, ValueError), (1.5, ValueError), (-0.1, ValueError),
                                        ("x", TypeError), (True, TypeError), (float("nan"), ValueError)])
def test_bad_keep_ratio(value, exc):
    with pytest.raises(exc, match="keep_ratio"):
        SparseGradConfig(keep_ratio=value, bases="identity")


@pytest.mark.parametrize("value", [0, 1.5, "x"])
def test_bad_keep_ratio_set_after_construction(value):
    """A config mutated after validation is still refused before the model changes."""
    config = SparseGradConfig(bases="identity")
    config.keep_ratio = value
    _expect_failure(_prepared_bert(), config, (ValueError, TypeError), "keep_ratio")


@pytest.mark.parametrize("value, exc", [(0, ValueError), (-3, ValueError), (2.5, TypeError)])
def test_bad_calibration_steps(value, exc):
    with pytest.raises(exc, match="calibration_steps"):
        SparseGradConfig(calibration_steps=value, calibration_dataloader=batch_stream("bert"))


@pytest.mark.parametrize("kwargs, match", [
    ({"basis_method": "svd"}, "basis_method"),
    ({"sparse_optimizer": "adam"}, "sparse_optimizer"),
    ({"bias": "lora_only"}, "bias"),
    ({"bases": 3}, "bases"),
    ({"bases_dtype": "bfloat16"}, r"bases_dtype must be one of \('float16', 'float32', 'auto'\)"),
    ({"compute_dtype": "float16"}, r"compute_dtype must be one of \('auto', 'float32', 'bfloat16'\)"),
])
def test_bad_config_fields(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        SparseGradConfig(**kwargs)


# ---- calibration data -------------------------------------------------------------------------------------------


def test_no_data_and_no_bases(tmp_path):
    """No data and no bases: the model is built with *pending* bases (SparseGradCallback calibrates them from the
    Trainer's dataloader). Nothing is touched until then; saving or a plain optimizer step says what is missing."""
    model = _prepared_bert()
    before = snapshot(model)
    batch = batch_list("bert", 1)[0]
    base_out = logits(build_model("bert"), batch)
    peft_model = get_peft_model(model, SparseGradConfig(calibration_steps=2))
    layers = sparsegrad_layers(peft_model)
    assert layers and all(m.sparsegrad_bases["default"] is None for m in layers.values())
    assert set(peft_model.base_model.pending_bases()) == {n.removeprefix("base_model.model.") for n in layers}
    # the weights are untouched (values; PEFT's usual freezing of the base model aside) and ΔW' is empty
    after = {k.replace("base_model.model.", "").replace(".base_layer.", ".").replace(".original_module.", "."): p
             for k, p in peft_model.named_parameters() if ".modules_to_save." not in k}
    for name, (value, _, _) in before.items():
        if not name.startswith("buffer:"):
            assert torch.equal(after[name], value), name
    assert all(m.sparsegrad_delta["default"].nnz == 0 for m in layers.values())
    torch.testing.assert_close(logits(peft_model, batch), base_out, atol=0, rtol=0)

    untouched = snapshot(peft_model), adapter_snapshot(peft_model)
    with pytest.raises(ValueError, match="calibration") as info:
        peft_model.save_pretrained(tmp_path)
    assert "no bases" in str(info.value)
    assert not (tmp_path / "adapter_model.safetensors").exists()
    assert_same_snapshot(untouched[0], snapshot(peft_model))
    assert_same_adapter_snapshot(untouched[1], adapter_snapshot(peft_model))

    opt = create_sparsegrad_optimizer(peft_model, lr=1e-2)
    opt.zero_grad()
    peft_model(**batch).loss.backward()
    untouched = snapshot(peft_model), adapter_snapshot(peft_model)
    with pytest.raises(ValueError) as info:
        opt.step()
    assert "SparseGradCallback" in str(info.value) and "calibration_dataloader" in str(info.value)
    assert_same_snapshot(untouched[0], snapshot(peft_model))  # no half-applied step (W and .grad as they were)
    assert_same_adapter_snapshot(untouched[1], adapter_snapshot(peft_model))


def test_empty_dataloader():
    _expect_failure(_prepared_bert(), SparseGradConfig(calibration_dataloader=[]), ValueError, "no batches")


def test_batches_without_labels():
    loader = [inputs_only(b) for b in batch_list("bert", 2)]
    _expect_failure(_prepared_bert(), SparseGradConfig(calibration_dataloader=loader), ValueError,
                    r"no scalar loss.*labels")


@pytest.mark.parametrize("bad", [{"foo": torch.ones(2)}, "not a batch",
                                 {"input_ids": torch.full((2, 4), 1000), "labels": torch.zeros(2).long()}])
def test_batches_the_model_cannot_run(bad):
    # the first batch is fine: calibration already ran a backward pass when the second one fails
    loader = [batch_list("bert", 1)[0], bad]
    _expect_failure(_prepared_bert(), SparseGradConfig(calibration_dataloader=loader, calibration_steps=3),
                    ValueError, r"Calibration batch 1 could not be run")


def test_nan_loss_during_calibration():
    good = batch_list("bert", 1)[0]
    model = _prepared_bert()
    embeds = torch.full((4, 8, 32), float("nan"))
    loader = [good, {"inputs_embeds": embeds, "labels": good["labels"]}]
    _expect_failure(model, SparseGradConfig(calibration_dataloader=loader, calibration_steps=2), ValueError,
                    r"batch 1 produced a non-finite loss")


def test_nan_gradients_during_calibration():
    """Finite loss, NaN gradients (a tensor hook poisons the backward of the last block)."""
    model = _prepared_bert()
    poison = {"on": False}

    def forward_hook(module, args, output):
        if poison["on"] and output.requires_grad:
            output.register_hook(lambda g: g * float("nan"))

    handle = model.bert.encoder.layer[1].output.LayerNorm.register_forward_hook(forward_hook)

    class Loader:
        def __iter__(self):
            for i, batch in enumerate(batch_list("bert", 3)):
                poison["on"] = i == 1
                yield batch

    try:
        with model_left_untouched(model):
            with pytest.raises(ValueError, match=r"batch 1 gave NaN/Inf gradients"):
                get_peft_model(model, SparseGradConfig(calibration_dataloader=Loader(), calibration_steps=3))
    finally:
        handle.remove()


def test_short_dataloader_warns_and_still_calibrates():
    with pytest.warns(UserWarning, match=r"ran out after 2 of calibration_steps=5"):
        model = get_peft_model(build_model("bert"), SparseGradConfig(calibration_dataloader=batch_list("bert", 2),
                                                                     calibration_steps=5))
    assert all(not m.sparsegrad_bases["default"].is_identity for m in sparsegrad_layers(model).values())


def test_checkpoint_config_without_weights_fails_clearly_at_the_first_step(tmp_path):
    """A saved config (bases='checkpoint', e.g. from PeftConfig.from_pretrained) passed to get_peft_model has no
    bases until adapter weights are loaded. The forward is the plain base model's (W is trained in place, ΔW' = 0);
    the first optimizer step and save_pretrained say how to load it, and leave the model as it was."""
    batch = batch_list("bert", 1)[0]
    model = get_peft_model(build_model("bert"), SparseGradConfig(bases="checkpoint"))
    torch.testing.assert_close(logits(model, batch), logits(build_model("bert"), batch), atol=0, rtol=0)
    opt = create_sparsegrad_optimizer(model, lr=1e-2)
    model(**batch).loss.backward()
    before, adapters = snapshot(model), adapter_snapshot(model)
    with pytest.raises(ValueError, match=r"no bases.*PeftModel\.from_pretrained"):
        opt.step()
    with pytest.raises(ValueError, match=r"no bases"):
        model.save_pretrained(tmp_path)
    assert_same_snapshot(before, snapshot(model))
    assert_same_adapter_snapshot(adapters, adapter_snapshot(model))


def test_calibrate_function_errors_leave_model_untouched():
    model = _prepared_bert()
    with model_left_untouched(model):
        with pytest.raises(ValueError, match="no batches"):
            calibrate(model, SparseGradConfig(), [], progress=False)
        with pytest.raises(ValueError, match="calibration_dataloader"):
            calibrate(model, SparseGradConfig(), None, progress=False)


# ---- bases from elsewhere ---------------------------------------------------------------------------------------


def _bert_with_intermediate(size: int) -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=size, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                         max_position_embeddings=64, num_labels=2, attn_implementation="eager")
        return BertForSequenceClassification(cfg).eval()


def test_bases_file_of_another_architecture(tmp_path):
    bases = calibrate(build_model("gpt2"), SparseGradConfig(calibration_steps=1), batch_stream("gpt2"),
                      progress=False)
    save_bases(bases, tmp_path / "gpt2.safetensors")
    _expect_failure(_prepared_bert(), SparseGradConfig(bases=str(tmp_path / "gpt2.safetensors")), ValueError,
                    r"no entry for layer type 'bert\.encoder\.layer\.\*\.(intermediate|output)\.dense'")


def test_bases_of_the_wrong_shape(tmp_path):
    small = _bert_with_intermediate(48)
    bases = calibrate(small, SparseGradConfig(calibration_steps=1), batch_stream("bert"), progress=False)
    save_bases(bases, tmp_path / "small.safetensors")
    _expect_failure(_prepared_bert(), SparseGradConfig(bases=str(tmp_path / "small.safetensors")), ValueError,
                    r"computed for another model")
    _expect_failure(_prepared_bert(), SparseGradConfig(precomputed_bases=bases), ValueError,
                    r"computed for another model")
    # a saved adapter directory of the small model, used as a bases source
    adapter = get_peft_model(_bert_with_intermediate(48), SparseGradConfig(precomputed_bases=bases))
    adapter.save_pretrained(tmp_path / "small_adapter")
    _expect_failure(_prepared_bert(), SparseGradConfig(bases=str(tmp_path / "small_adapter")), ValueError,
                    r"computed for another model")


@pytest.mark.parametrize("what", ["missing", "not_bases", "dir_without_adapter"])
def test_bad_bases_paths(tmp_path, what):
    if what == "missing":
        path, match = tmp_path / "nope.safetensors", "does not exist"
    elif what == "not_bases":
        from safetensors.torch import save_file

        path, match = tmp_path / "other.safetensors", "not a SparseGrad bases file"
        save_file({"x": torch.zeros(2)}, str(path))
    else:
        path, match = tmp_path, "not a saved adapter"
    _expect_failure(_prepared_bert(), SparseGradConfig(bases=str(path)), ValueError, match)


def test_precomputed_bases_of_the_wrong_type():
    _expect_failure(_prepared_bert(), SparseGradConfig(precomputed_bases={"a": 1}), TypeError, "SparseGradBases")


# ---- add_adapter, training routing ----------------------------------------------------------------------------


def test_failing_add_adapter_leaves_peft_model_as_it_was():
    model = get_peft_model(build_model("bert"), SparseGradConfig(bases="identity", init_weights=False))
    # (SparseGradConfig() without data no longer fails: it adds an adapter with pending bases, see
    # test_no_data_and_no_bases; failing calibration data does)
    with model_left_untouched_peft(model):
        with pytest.raises(ValueError, match="no batches"):
            model.add_adapter("second", SparseGradConfig(calibration_dataloader=[]))
        with pytest.raises(ValueError, match=r"Calibration batch 1 could not be run"):
            model.add_adapter("second", SparseGradConfig(calibration_dataloader=[batch_list("bert", 1)[0], "bad"],
                                                         calibration_steps=2))
        with pytest.raises(ValueError, match="No module matched"):
            model.add_adapter("third", SparseGradConfig(target_modules=["nope"], bases="identity"))
    assert list(model.peft_config) == ["default"]
    assert all(set(m.sparsegrad_delta) == {"default"} for m in sparsegrad_layers(model).values())


@contextlib.contextmanager
def model_left_untouched_peft(model):
    """Parameters (an adapted layer's W holds W₀ + ΔW in place), requires_grad, .grad, module types, and for every
    adapted layer ΔW' (support and values), bases, bookkeeping and W₀."""
    before, structure, adapters = snapshot(model), _structure(model), adapter_snapshot(model)
    yield
    assert _structure(model) == structure
    assert_same_snapshot(before, snapshot(model))
    assert_same_adapter_snapshot(adapters, adapter_snapshot(model))


def test_backward_without_sparse_optimizer_is_refused():
    model = get_peft_model(build_model("bert"), SparseGradConfig(bases="identity"))
    torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])  # an ordinary optimizer: not routed
    before, adapters = snapshot(model), adapter_snapshot(model)
    with pytest.raises(RuntimeError, match="create_sparsegrad_optimizer"):
        model(**batch_list("bert", 1)[0]).loss.backward()
    layers = sparsegrad_layers(model).values()
    assert all(m.get_base_layer().weight.grad is None for m in layers)  # refused before W.grad was written
    assert_same_adapter_snapshot(adapters, adapter_snapshot(model))
    for name, (value, flag, _) in before.items():  # the values and flags (the head may have got its .grad)
        if not name.startswith("buffer:"):
            p = model.get_parameter(name)
            assert torch.equal(p, value) and p.requires_grad == flag, name
    opt = create_sparsegrad_optimizer(model, lr=1e-3)
    model(**batch_list("bert", 1)[0]).loss.backward()  # routed: fine
    assert all(m.get_base_layer().weight.grad is not None for m in layers)
    opt.step()
    assert all(m.sparsegrad_delta["default"].nnz > 0 for m in layers)


# ---- loading onto another model ---------------------------------------------------------------------------------


@pytest.fixture
def small_adapter_dir(tmp_path):
    model = get_peft_model(_bert_with_intermediate(48), SparseGradConfig(
        calibration_dataloader=batch_stream("bert"), calibration_steps=1, init_weights=False))
    model.save_pretrained(tmp_path)
    return tmp_path


def test_loading_adapter_onto_other_shapes_raises_clear_error(small_adapter_dir):
    model = _prepared_bert()
    originals = {k: v.detach().clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"trained on a base model with other shapes"):
        PeftModel.from_pretrained(model, small_adapter_dir)
    # the base weights' *values* are untouched (under their wrapped names if PEFT injected before loading)
    state = {k.replace(".base_layer.", "."): v for k, v in model.state_dict().items() if "sparsegrad_" not in k}
    for k, v in originals.items():
        assert torch.equal(state[k], v), k


def test_loading_meprop_adapter_onto_other_shapes_raises(tmp_path):
    """Identity (MeProp) adapters save no bases, so only the saved ΔW' shape can reveal the mismatch: indices of a
    48-wide layer fit inside a 64-wide one."""
    get_peft_model(_bert_with_intermediate(48), SparseGradConfig(bases="identity", init_weights=False)
                   ).save_pretrained(tmp_path)
    model = _prepared_bert()
    originals = {k: v.detach().clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"is \(48, 32\) but the module's weight is 64 × 32.*other shapes"):
        PeftModel.from_pretrained(model, tmp_path)
    state = {k.replace(".base_layer.", "."): v for k, v in model.state_dict().items() if "sparsegrad_" not in k}
    assert all(torch.equal(state[k], v) for k, v in originals.items())


def test_loading_adapter_onto_other_shapes_leaves_model_exactly_as_it_was(small_adapter_dir):
    model = _prepared_bert()
    with model_left_untouched(model):
        with pytest.raises(ValueError, match=r"other shapes"):
            PeftModel.from_pretrained(model, small_adapter_dir)
