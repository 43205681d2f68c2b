"""peft_sparsegrad.sft on a tiny random LLaMA with a byte-level BPE tokenizer and a ChatML template: data loading,
assistant-only labels (exact), truncation/dropping, padding, token-weighted evaluation, every method trains, and TRL's
SFTTrainer trains a SparseGrad adapter."""

from __future__ import annotations

import json
import math

import pytest
import transformers
import torch
from safetensors import safe_open

from peft_sparsegrad import sft
from sft_helpers import chat_rows, save_tiny_model, tiny_llama, tiny_tokenizer, write_jsonl

IGNORE = sft.IGNORE_INDEX


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _assistant_text(tok, example) -> list[str]:
    """Decoded runs of consecutive label tokens."""
    runs, current = [], []
    for t, lab in zip(example["input_ids"], example["labels"]):
        if lab != IGNORE:
            assert lab == t  # labels are the input ids (the model shifts them)
            current.append(t)
        elif current:
            runs.append(tok.decode(current))
            current = []
    if current:
        runs.append(tok.decode(current))
    return runs


def test_labels_are_exactly_the_assistant_turns(tok):
    conv = [{"role": "user", "content": "What colour is the sky?"},
            {"role": "assistant", "content": "The sky is blue."},
            {"role": "user", "content": "And the grass?"},
            {"role": "assistant", "content": "The grass is green."}]
    ex = sft.tokenize_conversation(tok, conv, max_seq_length=512)
    text = tok.apply_chat_template(conv, tokenize=False)
    assert tok.decode(ex["input_ids"]) == text  # the whole rendered conversation, nothing added
    assert _assistant_text(tok, ex) == ["The sky is blue.<|im_end|>", "The grass is green.<|im_end|>"]
    assert ex["attention_mask"] == [1] * len(ex["input_ids"])
    # the role header and the newline after <|im_end|> are not trained on
    first = ex["labels"].index(next(t for t in ex["labels"] if t != IGNORE))
    assert tok.decode(ex["input_ids"][:first]).endswith("<|im_start|>assistant\n")


def test_truncation_and_dropped_count(tok):
    long_prompt = [{"role": "user", "content": "What colour is the sky? " * 20},
                   {"role": "assistant", "content": "The sky is blue."}]
    short = chat_rows(3)
    data = sft.build_sft_data([r["messages"] for r in short] + [long_prompt], tok, max_seq_length=24)
    assert data.dropped == 1 and len(data) == 3
    assert all(len(e["input_ids"]) <= 24 for e in data.examples)
    # truncation inside an assistant turn keeps the tokens before the cut
    full = sft.tokenize_conversation(tok, short[0]["messages"], 512)
    cut = sft.tokenize_conversation(tok, short[0]["messages"], len(full["input_ids"]) - 3)
    assert cut["labels"] == full["labels"][:-3] and sum(t != IGNORE for t in cut["labels"]) > 0
    nothing = sft.build_sft_data([r["messages"] for r in short], tok, 4)  # 4 tokens: still inside the user turn
    assert len(nothing) == 0 and nothing.dropped == 3


def test_loading_formats(tmp_path):
    rows = [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
            {"prompt": "c", "response": "d"},
            {"instruction": "e", "input": "f", "output": "g"},
            {"instruction": "h", "context": "", "response": "i"},
            {"unrelated": 1}]
    path = write_jsonl(tmp_path / "mixed.jsonl", rows)
    convs = sft.load_conversations(path)
    assert convs == [
        [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
        [{"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}],
        [{"role": "user", "content": "e\n\nf"}, {"role": "assistant", "content": "g"}],
        [{"role": "user", "content": "h"}, {"role": "assistant", "content": "i"}],
    ]
    (tmp_path / "list.json").write_text(json.dumps(rows[:2]))
    assert sft.load_conversations(str(tmp_path / "list.json")) == convs[:2]
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "x", "label": 1}])
    with pytest.raises(sft.SFTDataError, match="no usable rows.*found columns \\['label', 'text'\\]"):
        sft.load_conversations(bad)
    with pytest.raises(sft.SFTDataError, match="does not exist"):
        sft.load_conversations(str(tmp_path / "missing.jsonl"))


def test_collator_pads(tok):
    data = sft.build_sft_data([r["messages"] for r in chat_rows(2)] + [[
        {"role": "user", "content": "What colour is the snow? Tell me."},
        {"role": "assistant", "content": "The snow is white."}]], tok, 64)
    batch = sft.make_collator(tok)(data.examples)
    lengths = [len(e["input_ids"]) for e in data.examples]
    assert batch["input_ids"].shape == (3, max(lengths))
    for i, n in enumerate(lengths):
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (max(lengths) - n)
        assert batch["labels"][i, n:].tolist() == [IGNORE] * (max(lengths) - n)
        assert batch["input_ids"][i, n:].tolist() == [tok.pad_token_id] * (max(lengths) - n)


def test_evaluate_is_token_weighted_and_batch_independent(tok):
    model = tiny_llama(len(tok))
    data = sft.build_sft_data([r["messages"] for r in chat_rows(5)], tok, 64)
    collator = sft.make_collator(tok)
    one, many = sft.evaluate(model, data, collator, 1), sft.evaluate(model, data, collator, 8)
    assert one["tokens"] == many["tokens"] == data.assistant_tokens - 0  # every label is predicted from its prefix
    assert math.isclose(one["loss"], many["loss"], rel_tol=1e-5)
    assert one["token_accuracy"] == many["token_accuracy"]
    # by hand: sum of per-token cross-entropies / number of assistant tokens
    total = n = 0
    with torch.no_grad():
        for e in data.examples:
            ids = torch.tensor([e["input_ids"]])
            logits = model(input_ids=ids).logits[0, :-1]
            labels = torch.tensor(e["labels"][1:])
            keep = labels != IGNORE
            total += torch.nn.functional.cross_entropy(logits[keep], labels[keep], reduction="sum").item()
            n += int(keep.sum())
    assert n == one["tokens"] and math.isclose(one["loss"], total / n, rel_tol=1e-5)


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny_llama"), layers=4)


def test_sft_budget_and_lora_rank(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert sft.block_indices(model, 3) == [0, 3]
    budget = sft.sft_budget(model, 0.01, layers=[0, 3])
    # up_proj 64×32, down_proj 32×64, two blocks: k = ceil(0.01·2048) = 21 each
    assert budget["sparsegrad_k"] == 4 * 21 and budget["layers"] == 4
    assert budget["lora_rank"] == max(1, round(84 / (4 * 96)))


@pytest.mark.parametrize("method,lr", [("sparsegrad", 3e-2), ("meprop", 3e-2), ("lora", 3e-2), ("full", 1e-2)])
def test_train_sft_lowers_eval_loss(tiny_model_dir, method, lr):
    train = [r["messages"] for r in chat_rows(24)]
    evals = [r["messages"] for r in chat_rows(6, 3)]
    r = sft.train_sft(tiny_model_dir, train, evals, method=method, lr=lr, epochs=3, batch_size=8,
                      max_seq_length=64, calibration_steps=2, num_samples=2, max_new_tokens=6)
    assert r["layers"] == [0, 3] and r["steps"] == 9
    assert r["eval_loss_after"] < r["eval_loss_before"] - 0.05, (r["eval_loss_before"], r["eval_loss_after"])
    assert r["train_dropped"] == r["eval_dropped"] == 0 and r["eval_samples"] == 6
    assert len(r["samples"]) == 2 and all({"prompt", "before", "after"} <= set(s) for s in r["samples"])
    if method in ("sparsegrad", "meprop"):
        assert r["trainable_params"] == 84 and 0 < r["stored_params"]
    if method == "full":  # only the adapted layers changed
        names = {n for n, p in r["model"].named_parameters() if p.requires_grad}
        assert names == {f"model.layers.{b}.mlp.{m}.weight" for b in (0, 3) for m in ("up_proj", "down_proj")}


def test_trl_sft_trainer_trains_a_sparsegrad_adapter(tok, tmp_path):
    import datasets
    from peft import get_peft_model, get_peft_model_state_dict
    from trl import SFTConfig, SFTTrainer

    from peft_sparsegrad import SparseGradCallback, SparseGradConfig

    torch.manual_seed(0)
    model = tiny_llama(len(tok))
    data = sft.build_sft_data([r["messages"] for r in chat_rows(16)], tok, 64)
    calibration = sft.batches(data.examples, sft.make_collator(tok), 4, seed=0, n_batches=2)
    config = SparseGradConfig(task_type="CAUSAL_LM", target_modules=["up_proj", "down_proj"], keep_ratio=0.05,
                              calibration_dataloader=calibration, calibration_steps=2)
    peft_model = get_peft_model(model, config)
    before = {k: v.clone() for k, v in get_peft_model_state_dict(peft_model).items()}
    train_ds = datasets.Dataset.from_list([{"messages": r["messages"]} for r in chat_rows(16)])
    args = SFTConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=4, max_steps=4,
                     learning_rate=1e-2, max_length=64, report_to=[], save_strategy="no", logging_steps=1,
                     use_cpu=True, disable_tqdm=True, seed=0)
    trainer = SFTTrainer(model=peft_model, train_dataset=train_ds, args=args, processing_class=tok,
                         callbacks=[SparseGradCallback()])
    trainer.train()
    assert trainer.state.global_step == 4
    after = get_peft_model_state_dict(peft_model)
    nnz = sum(v.numel() for k, v in after.items() if k.endswith("sparsegrad_values"))
    assert nnz > 0 and nnz != sum(v.numel() for k, v in before.items() if k.endswith("sparsegrad_values"))
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "SPARSEGRAD" and saved["task_type"] == "CAUSAL_LM"
    with safe_open(str(tmp_path / "adapter" / "adapter_model.safetensors"), framework="pt") as f:
        assert sum(f.get_slice(k).get_shape()[0] for k in f.keys() if k.endswith("sparsegrad_values")) == nnz


def test_trl_sft_trainer_calibrates_on_its_own_batches(tok, tmp_path):
    """Neither calibration_dataloader nor bases: SparseGradCallback calibrates on the SFTTrainer's first batches
    (its own tokenization, collator and label masking) when training begins; the model is untouched until then."""
    import datasets
    from peft import get_peft_model
    from trl import SFTConfig, SFTTrainer

    from peft_sparsegrad import SparseGradCallback, SparseGradConfig

    torch.manual_seed(0)
    model = tiny_llama(len(tok))
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    config = SparseGradConfig(task_type="CAUSAL_LM", target_modules=["up_proj", "down_proj"], keep_ratio=0.05,
                              calibration_steps=2)
    peft_model = get_peft_model(model, config)
    layers = {n: m for n, m in peft_model.named_modules() if hasattr(m, "sparsegrad_bases")}
    assert layers and all(m.sparsegrad_bases["default"] is None for m in layers.values())  # pending
    seen = []

    class Spy(transformers.TrainerCallback):  # records the bases and weights the first training step starts from
        def on_step_begin(self, args, state, control, model=None, **kwargs):
            if not seen:
                seen.append({n: m.get_base_layer().weight.detach().clone() for n, m in layers.items()})

    train_ds = datasets.Dataset.from_list([{"messages": r["messages"]} for r in chat_rows(16)])
    args = SFTConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=4, max_steps=3,
                     learning_rate=1e-2, max_length=64, report_to=[], save_strategy="no", use_cpu=True,
                     disable_tqdm=True, seed=0)
    trainer = SFTTrainer(model=peft_model, train_dataset=train_ds, args=args, processing_class=tok,
                         callbacks=[SparseGradCallback(), Spy()])
    trainer.train()
    assert trainer.state.global_step == 3
    for name, layer in layers.items():
        pair = layer.sparsegrad_bases["default"]
        assert pair is not None and not pair.is_identity, name
        u_out = pair.U_out.float()  # float16-stored (the default): orthogonal to its rounding
        torch.testing.assert_close(u_out.T @ u_out, torch.eye(u_out.shape[0]), atol=2e-3, rtol=0)
        # calibration changed no weight: the first step started from the base model's weights
        key = name.removeprefix("base_model.model.") + ".weight"
        assert torch.equal(seen[0][name], weights[key]), name
        assert layer.sparsegrad_delta["default"].nnz > 0, name  # and training moved ΔW'
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    with safe_open(str(tmp_path / "adapter" / "adapter_model.safetensors"), framework="pt") as f:
        assert any(".U_out" in k for k in f.keys())  # the calibrated bases are saved with the adapter
