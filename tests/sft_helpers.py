"""Tiny causal-LM fixtures for the SFT/CLI tests: a byte-level BPE tokenizer with a ChatML template and a random
2-block LLaMA, saved as a local checkpoint directory, plus small chat JSONL files. Everything is deterministic."""

from __future__ import annotations

import json
import os

CHAT_TEMPLATE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
                 "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
                 "{% endif %}")

_COLOURS = ["red", "blue", "green", "yellow", "black", "white"]
_THINGS = ["apple", "sky", "grass", "sun", "night", "snow"]


def chat_rows(n: int, offset: int = 0) -> list[dict]:
    """``messages`` rows of a learnable toy task: 'What colour is the X?' -> 'The X is C.'"""
    rows = []
    for i in range(n):
        j = (i + offset) % len(_THINGS)
        rows.append({"messages": [{"role": "user", "content": f"What colour is the {_THINGS[j]}?"},
                                  {"role": "assistant", "content": f"The {_THINGS[j]} is {_COLOURS[j]}."}]})
    return rows


def write_jsonl(path, rows) -> str:
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(path)


def tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [f"{m['role']}\n{m['content']}" for r in chat_rows(12) for m in r["messages"]] * 4
    corpus += ["system user assistant The is What colour the ?"]
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|im_end|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_llama(vocab_size: int, seed: int = 0, layers: int = 2):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=vocab_size, max_position_embeddings=256,
                      tie_word_embeddings=False, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    model = LlamaForCausalLM(cfg)
    model.generation_config.pad_token_id = 1
    return model.eval()


def save_tiny_model(path, seed: int = 0, layers: int = 2) -> str:
    """A tiny LLaMA + tokenizer checkpoint at ``path`` (what ``--model`` accepts)."""
    tok = tiny_tokenizer()
    model = tiny_llama(len(tok), seed, layers)
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)
