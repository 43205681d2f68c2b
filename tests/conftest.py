"""Shared fixtures for the SparseGrad PEFT tests: tiny random transformers models and seeded batch generators.

Every model is built from a transformers config (no hub download): hidden size 32, 2 layers, vocabulary 100, all
dropout 0, eager attention, fp32, eval mode. ``build_model(arch, seed)`` is deterministic, so two calls with the same
seed give bit-identical weights (the subprocess round-trip test relies on this).

The helpers are plain functions (importable as ``from conftest import ...`` and by a subprocess that puts this
directory on ``sys.path``) and are also exposed as fixtures.
"""

from __future__ import annotations

import itertools
import os
import sys
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import peft_sparsegrad  # noqa: E402,F401  (registers SPARSEGRAD with PEFT)

# Tiny models: one thread is as fast and keeps results independent of the machine's core count and load.
torch.set_num_threads(1)

VOCAB = 100
HIDDEN = 32
INTERMEDIATE = 64
SEQ = 8
BATCH = 4
NUM_LABELS = 2


@dataclass(frozen=True)
class Arch:
    name: str
    factory: Callable[[], torch.nn.Module]
    kind: str  # "seq_cls", "causal_lm", "seq2seq"
    task_type: str
    default_targets: tuple[str, ...]  # module-name suffixes adapted by default (for checks)


def _bert():
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=INTERMEDIATE, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                     max_position_embeddings=64, num_labels=NUM_LABELS, attn_implementation="eager")
    return BertForSequenceClassification(cfg)


def _roberta():
    from transformers import RobertaConfig, RobertaForSequenceClassification

    cfg = RobertaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=INTERMEDIATE, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                        max_position_embeddings=72, num_labels=NUM_LABELS, pad_token_id=1,
                        attn_implementation="eager")
    return RobertaForSequenceClassification(cfg)


def _llama_cfg():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, intermediate_size=INTERMEDIATE, max_position_embeddings=64,
                       attention_dropout=0.0, num_labels=NUM_LABELS, pad_token_id=0, attn_implementation="eager")


def _llama():
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM(_llama_cfg())


def _llama_cls():
    from transformers import LlamaForSequenceClassification

    return LlamaForSequenceClassification(_llama_cfg())


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=2, n_head=2, n_positions=64, n_inner=INTERMEDIATE,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
                     attn_implementation="eager")
    return GPT2LMHeadModel(cfg)


def _t5():
    from transformers import T5Config, T5ForConditionalGeneration

    cfg = T5Config(vocab_size=VOCAB, d_model=HIDDEN, d_ff=INTERMEDIATE, d_kv=8, num_heads=4, num_layers=2,
                   dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
                   attn_implementation="eager")
    return T5ForConditionalGeneration(cfg)


ARCHS: dict[str, Arch] = {
    "bert": Arch("bert", _bert, "seq_cls", "SEQ_CLS", ("intermediate.dense", "output.dense")),
    "roberta": Arch("roberta", _roberta, "seq_cls", "SEQ_CLS", ("intermediate.dense", "output.dense")),
    "llama": Arch("llama", _llama, "causal_lm", "CAUSAL_LM", ("up_proj", "down_proj")),
    "llama_cls": Arch("llama_cls", _llama_cls, "seq_cls", "SEQ_CLS", ("up_proj", "down_proj")),
    "gpt2": Arch("gpt2", _gpt2, "causal_lm", "CAUSAL_LM", ("mlp.c_fc", "mlp.c_proj")),
    "t5": Arch("t5", _t5, "seq2seq", "SEQ_2_SEQ_LM", ("wi", "wo")),
}

#: The architectures the PEFT behaviour matrix is parametrized over.
MATRIX = ["bert", "llama", "gpt2", "t5"]


def build_model(arch: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A tiny random model, bit-identical for equal (arch, seed, dtype); eval mode; global RNG left untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ARCHS[arch].factory()
    return model.to(dtype).eval()


def make_batch(arch: str, gen: torch.Generator, batch: int = BATCH, seq: int = SEQ) -> dict[str, torch.Tensor]:
    """One batch with labels, so the model returns a loss."""
    kind = ARCHS[arch].kind
    ids = torch.randint(2, VOCAB, (batch, seq), generator=gen)
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if kind == "seq_cls":
        out["labels"] = torch.randint(0, NUM_LABELS, (batch,), generator=gen)
    elif kind == "causal_lm":
        out["labels"] = ids.clone()
    else:  # seq2seq: explicit decoder inputs and labels
        labels = torch.randint(2, VOCAB, (batch, seq // 2), generator=gen)
        dec = torch.cat([torch.zeros(batch, 1, dtype=labels.dtype), labels[:, :-1]], dim=1)  # shift right, start 0
        out["decoder_input_ids"] = dec
        out["labels"] = labels
    return out


def batch_stream(arch: str, seed: int = 1, n: Optional[int] = None) -> Iterator[dict[str, torch.Tensor]]:
    """Seeded batches: infinite if ``n`` is None, else ``n`` of them."""
    gen = torch.Generator().manual_seed(seed)
    counter = itertools.count() if n is None else range(n)
    for _ in counter:
        yield make_batch(arch, gen)


def batch_list(arch: str, n: int, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    return list(batch_stream(arch, seed, n))


def inputs_only(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The batch without labels (for comparing logits)."""
    return {k: v for k, v in batch.items() if k != "labels"}


def logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs_only(batch)).logits.float()


def snapshot(model: torch.nn.Module) -> dict[str, tuple[torch.Tensor, bool, Optional[torch.Tensor]]]:
    """name -> (value copy, requires_grad, grad copy) of every parameter; buffers too (requires_grad False)."""
    snap = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        snap[name] = (p.detach().clone(), p.requires_grad, None if p.grad is None else p.grad.detach().clone())
    for name, b in model.named_buffers(remove_duplicate=False):
        snap["buffer:" + name] = (b.detach().clone(), False, None)
    return snap


def assert_same_snapshot(before: dict, after: dict) -> None:
    """Bit-identical values, dtypes, requires_grad flags and .grad of every parameter and buffer."""
    assert before.keys() == after.keys(), (sorted(set(before) ^ set(after)))[:10]
    for name, (value, flag, grad) in before.items():
        value2, flag2, grad2 = after[name]
        assert value.dtype == value2.dtype, name
        assert torch.equal(value, value2), f"{name} changed"
        assert flag == flag2, f"{name}.requires_grad changed {flag} -> {flag2}"
        assert (grad is None) == (grad2 is None), f"{name}.grad presence changed"
        if grad is not None:
            assert torch.equal(grad, grad2), f"{name}.grad changed"


def sparsegrad_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    from peft_sparsegrad import SparseGradLinear

    return {n: m for n, m in model.named_modules() if isinstance(m, SparseGradLinear)}


def base_weight_stored(layer: torch.nn.Module) -> torch.Tensor:
    """W₀ of a SparseGradLinear (``layer.base_weight()``, out × in) in the base layer's own layout (in × out for
    GPT-2's Conv1D), comparable with the plain model's ``.weight``."""
    w0 = layer.base_weight()
    return w0.T if layer.is_conv1d else w0


def adapter_snapshot(model: torch.nn.Module) -> dict[str, dict]:
    """Per SparseGradLinear: ΔW' of every adapter (flat indices, values, shape), the bookkeeping lists (applied,
    trainable, merged, active), the bases objects, and W₀ = ``base_weight()``. The parameters themselves (W, its
    requires_grad and .grad) are covered by ``snapshot``: an adapted layer's W holds W₀ + Σ ΔW in place."""
    snap = {}
    for name, layer in sparsegrad_layers(model).items():
        snap[name] = {
            "deltas": {a: (d.flat.clone(), d.values.clone(), tuple(d.shape)) for a, d in layer.sparsegrad_delta.items()},
            "bases": dict(layer.sparsegrad_bases),
            "applied": list(layer._applied),
            "trainable": list(layer._trainable),
            "merged": list(layer.merged_adapters),
            "active": list(layer.active_adapters),
            "w0": layer.base_weight().clone(),
        }
    return snap


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-identical (dtype, shape, every bit: unlike torch.equal also for NaN entries)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    a, b = a.detach().contiguous(), b.detach().contiguous()
    return a.numel() == 0 or torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def assert_same_adapter_snapshot(before: dict, after: dict) -> None:
    """Bit-identical ΔW' (support and values), the same bases objects, bookkeeping and W₀ of every adapted layer."""
    assert before.keys() == after.keys()
    for name, b in before.items():
        a = after[name]
        assert b["deltas"].keys() == a["deltas"].keys(), name
        for adapter, (flat, values, shape) in b["deltas"].items():
            flat2, values2, shape2 = a["deltas"][adapter]
            assert shape == shape2 and _same_bits(flat, flat2) and _same_bits(values, values2), \
                f"ΔW' of {name}/{adapter} changed"
        assert b["bases"].keys() == a["bases"].keys() and all(
            b["bases"][k] is a["bases"][k] for k in b["bases"]), f"bases of {name} changed"
        for key in ("applied", "trainable", "merged", "active"):
            assert b[key] == a[key], f"{name}: {key} {b[key]} -> {a[key]}"
        assert _same_bits(b["w0"], a["w0"]), f"W₀ of {name} changed"


# ---- fixtures ---------------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _seed_everything():
    """Every test starts from the same global RNG state (init_weights=False, torch.randn in tests)."""
    torch.manual_seed(1234)
    yield


@pytest.fixture
def model_factory():
    return build_model


@pytest.fixture
def batches():
    """``batches(arch, seed=1, n=None)``: a seeded (infinite by default) generator of batches with labels."""
    return batch_stream


@pytest.fixture(params=MATRIX)
def arch(request) -> str:
    return request.param
