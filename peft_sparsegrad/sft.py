"""Supervised fine-tuning (SFT) of a causal LM on chat data with SparseGrad, LoRA, MeProp or full fine-tuning: the
code shared by ``sparsegrad sft`` and ``benchmarks/sft.py``.

* Data: ``.jsonl``/``.json`` files (or a hub dataset name, online) with a ``messages`` list of ``{role, content}``
  turns, or ``prompt``/``response``, or ``instruction``/[``input`` | ``context``]/[``output`` | ``response``] columns.
* Formatting: the tokenizer's chat template. Labels are ``-100`` everywhere except the assistant turns' tokens
  (their content and the template's end-of-turn token; not the role header, not the newline after the end token):
  the assistant spans are located in the rendered text by rendering the conversation prefix before each assistant turn
  (``add_generation_prompt=True``) and the prefix ending with it, then mapped to tokens with the fast tokenizer's
  offsets. Sequences are truncated to ``max_seq_length`` tokens; examples left without any assistant token are
  dropped and counted.
* Evaluation: token-weighted mean cross-entropy over all assistant tokens of the eval set and token accuracy (argmax of
  the previous position's logits == label) on those tokens; greedy generation for a few prompts.
* Methods adapt ``up_proj``/``down_proj`` of every ``blocks_every``-th block (0, 3, 6, ... for 3): ``sparsegrad``
  (top-``keep_ratio`` of the rotated gradient, calibrated bases), ``meprop`` (identity bases), ``lora`` (same layers,
  rank matching SparseGrad's per-step budget Σk), ``full`` (only those layers' weights trainable, dense AdamW).
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional, Sequence

METHODS = ("sparsegrad", "lora", "meprop", "full")
DEFAULT_TARGETS = ("up_proj", "down_proj")
IGNORE_INDEX = -100
# ChatML, used when a tokenizer has no chat template of its own (SmolLM2's template without its default system turn).
CHATML_TEMPLATE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
                   "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
                   "{% endif %}")

Conversation = list[dict[str, str]]


class SFTDataError(ValueError):
    """Unusable SFT data (missing file, no known columns, nothing left after truncation, ...)."""


# --------------------------------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------------------------------


def _read_records(path: str) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if path.endswith(".jsonl") or not text.lstrip().startswith("["):
        records = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise SFTDataError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
        return records
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SFTDataError(f"{path}: not valid JSON ({exc.msg})") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise SFTDataError(f"{path}: expected a JSON list of records (or JSON lines)")
    return data


def _str(value: Any) -> str:
    return "" if value is None else str(value)


def record_to_messages(record: dict[str, Any]) -> Optional[Conversation]:
    """One record as a list of ``{role, content}`` turns, or None if it has none of the known column layouts."""
    if not isinstance(record, dict):
        return None
    messages = record.get("messages", record.get("conversations"))
    if isinstance(messages, list):
        out = []
        for m in messages:
            if not isinstance(m, dict):
                return None
            role = m.get("role", m.get("from"))
            content = m.get("content", m.get("value"))
            role = {"human": "user", "gpt": "assistant"}.get(role, role)
            if not isinstance(role, str) or content is None:
                return None
            out.append({"role": role, "content": _str(content)})
        return out
    if "prompt" in record and ("response" in record or "completion" in record):
        answer = record.get("response", record.get("completion"))
        return [{"role": "user", "content": _str(record["prompt"])}, {"role": "assistant", "content": _str(answer)}]
    if "instruction" in record and ("output" in record or "response" in record):
        extra = _str(record.get("input", record.get("context")))
        user = _str(record["instruction"]) + (f"\n\n{extra}" if extra.strip() else "")
        answer = record.get("output", record.get("response"))
        return [{"role": "user", "content": user}, {"role": "assistant", "content": _str(answer)}]
    return None


def load_conversations(source: str, split: str = "train") -> list[Conversation]:
    """Conversations from a ``.jsonl``/``.json`` file, or (when ``source`` is not a path) a hub dataset's ``split``.

    Records without a known layout are an error if *no* record has one, else skipped (they are rare in the wild)."""
    if os.path.exists(source):
        if os.path.isdir(source):
            raise SFTDataError(f"{source!r} is a directory, expected a .jsonl or .json file")
        records = _read_records(source)
    elif source.endswith((".json", ".jsonl")) or source.startswith((".", "/", "~")) or source.count("/") > 1:
        raise SFTDataError(f"{source!r} does not exist")
    else:
        records = _load_hub(source, split)
    conversations = [c for c in map(record_to_messages, records) if c]
    conversations = [c for c in conversations if any(m["role"] == "assistant" for m in c)]
    if not conversations:
        keys = sorted({k for r in records[:50] if isinstance(r, dict) for k in r})
        raise SFTDataError(f"{source}: no usable rows (need a 'messages' list with an assistant turn, 'prompt'/"
                           f"'response' or 'instruction'/'input'/'output' columns; found columns {keys or 'none'})")
    return conversations


def _hub_offline() -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except Exception:  # pragma: no cover - very old huggingface_hub
        return False


def hub_reachable(timeout: float = 2.0) -> bool:
    """False when offline mode is set or the hub does not answer within ``timeout`` seconds (no retries)."""
    if _hub_offline():
        return False
    import socket
    from urllib.parse import urlparse

    try:
        from huggingface_hub import constants

        endpoint = constants.ENDPOINT
    except Exception:  # pragma: no cover
        endpoint = "https://huggingface.co"
    host = urlparse(endpoint).hostname or "huggingface.co"
    port = urlparse(endpoint).port or (443 if endpoint.startswith("https") else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _load_hub(name: str, split: str) -> list[dict[str, Any]]:
    if not hub_reachable():
        raise SFTDataError(f"{name!r} is not a local file and the Hugging Face hub is not reachable (offline); pass a "
                           ".jsonl/.json file")
    import datasets

    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as exc:  # noqa: BLE001 - any hub/dataset error is a data error here
        raise SFTDataError(f"could not load the hub dataset {name!r} (split {split!r}): "
                           f"{' '.join(str(exc).split())}") from exc
    return [dict(r) for r in ds]


def subsample(items: Sequence, n: Optional[int], seed: int) -> list:
    """A fixed random subset of ``n`` items (all of them, in order, if ``n`` is None or ≥ len)."""
    items = list(items)
    if n is None or n >= len(items):
        return items
    idx = sorted(random.Random(seed).sample(range(len(items)), n))
    return [items[i] for i in idx]


# --------------------------------------------------------------------------------------------------------------------
# tokenization with assistant-only labels
# --------------------------------------------------------------------------------------------------------------------


def ensure_chat_template(tokenizer) -> None:
    """Give a tokenizer without a chat template the ChatML one (and a pad token: the end-of-sequence token)."""
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = CHATML_TEMPLATE
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        else:
            tokenizer.add_special_tokens({"pad_token": "<pad>"})


def _render(tokenizer, messages, add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def assistant_char_spans(tokenizer, messages: Conversation) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns (content + end-of-turn token,
    without trailing whitespace). Raises SFTDataError if the template is not prefix-consistent."""
    full = _render(tokenizer, messages, False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start_text = _render(tokenizer, messages[:i], True) if i else _render(tokenizer, [], True)
        end_text = _render(tokenizer, messages[: i + 1], False)
        if not end_text.startswith(start_text) or not full.startswith(end_text):
            raise SFTDataError("the tokenizer's chat template renders a conversation prefix differently from the "
                               "whole conversation; cannot locate the assistant tokens")
        end = len(end_text.rstrip())
        if end > len(start_text):
            spans.append((len(start_text), end))
    return full, spans


def tokenize_conversation(tokenizer, messages: Conversation, max_seq_length: int) -> dict[str, list[int]]:
    """``input_ids``, ``attention_mask`` and ``labels`` (-100 outside assistant tokens), truncated to
    ``max_seq_length`` tokens."""
    text, spans = assistant_char_spans(tokenizer, messages)
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = enc["input_ids"]
        mask = [any(s <= a < e for s, e in spans) and b > a for a, b in enc["offset_mapping"]]
    else:  # slow tokenizer: token-level prefixes (exact when tokenization does not merge across the boundaries)
        ids, mask = [], []
        cursor = 0
        for s, e in spans + [(len(text), len(text))]:
            for piece, flag in ((text[cursor:s], False), (text[s:e], True)):
                if piece:
                    piece_ids = tokenizer(piece, add_special_tokens=False)["input_ids"]
                    ids += piece_ids
                    mask += [flag] * len(piece_ids)
            cursor = e
    ids, mask = ids[:max_seq_length], mask[:max_seq_length]
    labels = [t if m else IGNORE_INDEX for t, m in zip(ids, mask)]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


@dataclass
class SFTData:
    examples: list[dict[str, list[int]]]
    dropped: int  # examples with no assistant token left after truncation
    conversations: list[Conversation]  # the kept ones, aligned with ``examples``

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def assistant_tokens(self) -> int:
        return sum(sum(1 for t in e["labels"] if t != IGNORE_INDEX) for e in self.examples)


def build_sft_data(conversations: Sequence[Conversation], tokenizer, max_seq_length: int) -> SFTData:
    """Tokenize every conversation; drop (and count) those with no assistant token within ``max_seq_length``."""
    ensure_chat_template(tokenizer)
    examples, kept, dropped = [], [], 0
    for conv in conversations:
        ex = tokenize_conversation(tokenizer, conv, max_seq_length)
        if any(t != IGNORE_INDEX for t in ex["labels"]):
            examples.append(ex)
            kept.append(conv)
        else:
            dropped += 1
    return SFTData(examples, dropped, kept)


def to_dataset(data: SFTData):
    """A ``datasets.Dataset`` (input_ids, attention_mask, labels) for the Trainer."""
    import datasets

    return datasets.Dataset.from_list(data.examples)


class PaddingCollator:
    """Right-pads ``input_ids`` (with ``pad_token_id``), ``attention_mask`` (0) and ``labels`` (-100)."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: Optional[int] = None) -> None:
        self.pad_token_id = int(pad_token_id)
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, Any]:
        import torch

        length = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        out = {"input_ids": [], "attention_mask": [], "labels": []}
        for f in features:
            n = len(f["input_ids"])
            pad = length - n
            out["input_ids"].append(list(f["input_ids"]) + [self.pad_token_id] * pad)
            out["attention_mask"].append(list(f.get("attention_mask", [1] * n)) + [0] * pad)
            out["labels"].append(list(f.get("labels", f["input_ids"])) + [IGNORE_INDEX] * pad)
        return {k: torch.tensor(v, dtype=torch.long) for k, v in out.items()}


def make_collator(tokenizer) -> PaddingCollator:
    ensure_chat_template(tokenizer)
    return PaddingCollator(tokenizer.pad_token_id)


def batches(examples: Sequence[dict], collator: Callable, batch_size: int, seed: Optional[int] = None,
            n_batches: Optional[int] = None) -> list[dict]:
    """Collated batches (shuffled with ``seed`` unless None), at most ``n_batches``, cycling if there are fewer."""
    order = list(range(len(examples)))
    if seed is not None:
        random.Random(seed).shuffle(order)
    out, i = [], 0
    total = n_batches if n_batches is not None else math.ceil(len(order) / batch_size)
    while len(out) < total and order:
        chunk = [order[(i + j) % len(order)] for j in range(min(batch_size, len(order)))]
        i += len(chunk)
        out.append(collator([examples[j] for j in chunk]))
    return out


# --------------------------------------------------------------------------------------------------------------------
# evaluation
# --------------------------------------------------------------------------------------------------------------------


def evaluate(model, data: SFTData | Sequence[dict], collator: Callable, batch_size: int = 8) -> dict[str, float]:
    """Token-weighted mean loss and token accuracy over all assistant tokens (labels != -100) of ``data``."""
    import torch
    import torch.nn.functional as F

    examples = data.examples if isinstance(data, SFTData) else list(data)
    # batch by length (less padding); the result does not depend on the order
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total_loss, correct, tokens = 0.0, 0, 0
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            batch = collator([examples[i] for i in order[start:start + batch_size]])
            labels = batch.pop("labels").to(device)
            logits = model(**{k: v.to(device) for k, v in batch.items()}).logits
            logits, labels = logits[:, :-1].float(), labels[:, 1:]
            keep = labels != IGNORE_INDEX
            if not keep.any():
                continue
            sel_logits, sel_labels = logits[keep], labels[keep]
            total_loss += F.cross_entropy(sel_logits, sel_labels, reduction="sum").item()
            correct += (sel_logits.argmax(-1) == sel_labels).sum().item()
            tokens += int(keep.sum())
    model.train(was_training)
    if tokens == 0:
        return {"loss": float("nan"), "token_accuracy": float("nan"), "tokens": 0}
    return {"loss": total_loss / tokens, "token_accuracy": correct / tokens, "tokens": tokens}


def prompt_of(conversation: Conversation) -> Conversation:
    """The turns before the last assistant turn (what a generation is asked to continue)."""
    last = max(i for i, m in enumerate(conversation) if m["role"] == "assistant")
    return conversation[:last]


def generate(model, tokenizer, prompts: Sequence[Conversation], max_new_tokens: int = 48) -> list[str]:
    """Greedy continuation of each prompt (a list of turns) after the template's generation prompt."""
    import torch

    ensure_chat_template(tokenizer)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    with torch.no_grad():
        for messages in prompts:
            text = _render(tokenizer, list(messages), True)
            ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"].to(device)
            gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=tokenizer.eos_token_id)
            out.append(tokenizer.decode(gen[0, ids.shape[1]:], skip_special_tokens=True).strip())
    model.train(was_training)
    return out


# --------------------------------------------------------------------------------------------------------------------
# methods
# --------------------------------------------------------------------------------------------------------------------


_BLOCK = re.compile(r"\.(\d+)\.")


def target_layers(model, target_modules: Sequence[str] = DEFAULT_TARGETS,
                  layers: Optional[Sequence[int]] = None) -> dict[str, Any]:
    """``{name: nn.Linear}`` of the modules named ``*.<target>`` inside blocks ``layers`` (all blocks if None)."""
    import torch

    out = {}
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or name.rsplit(".", 1)[-1] not in target_modules:
            continue
        m = _BLOCK.search("." + name + ".")
        if layers is not None and (m is None or int(m.group(1)) not in set(layers)):
            continue
        out[name] = module
    return out


def block_indices(model, blocks_every: int) -> list[int]:
    """Blocks 0, n, 2n, ... of the model (``num_hidden_layers`` from its config)."""
    return list(range(0, int(model.config.num_hidden_layers), blocks_every))


def sft_budget(model, keep_ratio: float, target_modules: Sequence[str] = DEFAULT_TARGETS,
               layers: Optional[Sequence[int]] = None) -> dict[str, int]:
    """SparseGrad's per-step entries Σk on those layers and the LoRA rank matching it (r · Σ(out + in) ≈ Σk)."""
    shapes = [tuple(m.weight.shape) for m in target_layers(model, target_modules, layers).values()]
    if not shapes:
        raise ValueError(f"no Linear layer named {list(target_modules)} in blocks {list(layers or [])}")
    sum_k = sum(math.ceil(keep_ratio * o * i) for o, i in shapes)
    rank = max(1, round(sum_k / sum(o + i for o, i in shapes)))
    return {"sparsegrad_k": sum_k, "lora_rank": rank, "lora_params": rank * sum(o + i for o, i in shapes),
            "layer_params": sum(o * i for o, i in shapes), "layers": len(shapes)}


@dataclass
class SFTSetup:
    model: Any
    callbacks: list = field(default_factory=list)
    trainable_params: int = 0  # entries the method may change per step (Σk for SparseGrad/MeProp)
    note: str = ""
    bases: Any = None  # the SparseGradBases used (sparsegrad)
    calibration_s: float = 0.0


def setup_sft_method(method: str, base_model, *, layers: Sequence[int], keep_ratio: float = 0.01,
                     target_modules: Sequence[str] = DEFAULT_TARGETS,
                     calibration: Optional[Iterable[dict]] = None, calibration_steps: int = 8,
                     bases: Any = None, progress: bool = False, step_in_backward: bool = True,
                     **config_options: Any) -> SFTSetup:
    """Wrap ``base_model`` (a causal LM) for ``method`` on ``target_modules`` of blocks ``layers``.

    ``calibration``: collated training batches with labels (sparsegrad, unless ``bases`` — a path or a
    ``SparseGradBases`` — is given). ``config_options``: further ``SparseGradConfig`` fields (selection, max_support,
    rounding, sparse_optimizer, refresh_interval, gram_precision, bases_dtype; the config's defaults otherwise);
    ``step_in_backward`` goes to ``SparseGradCallback``."""
    from peft import LoraConfig, get_peft_model

    import peft_sparsegrad
    from peft_sparsegrad import SparseGradCallback, SparseGradConfig

    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    layers, targets = list(layers), list(target_modules)
    budget = sft_budget(base_model, keep_ratio, targets, layers)
    where = f"{'/'.join(targets)} of blocks {_ranges(layers)}"
    if method == "full":
        chosen = target_layers(base_model, targets, layers)
        names = {f"{n}.{p}" for n, m in chosen.items() for p, _ in m.named_parameters()}
        for name, p in base_model.named_parameters():
            p.requires_grad_(name in names)
        n = sum(p.numel() for p in base_model.parameters() if p.requires_grad)
        return SFTSetup(base_model, [], n, f"{where}: all {n:,} weights, AdamW")
    if method == "lora":
        r = budget["lora_rank"]
        config = LoraConfig(task_type="CAUSAL_LM", r=r, lora_alpha=2 * r, target_modules=targets,
                            layers_to_transform=layers, lora_dropout=0.0)
        model = get_peft_model(base_model, config)
        return SFTSetup(model, [], budget["lora_params"], f"LoRA r={r} on {where} ({budget['lora_params']:,} params)")
    common = dict(task_type="CAUSAL_LM", target_modules=targets, layers_to_transform=layers, keep_ratio=keep_ratio,
                  **config_options)
    start = time.perf_counter()
    if method == "meprop":
        config = SparseGradConfig(bases="identity", **common)
    elif isinstance(bases, str):
        config = SparseGradConfig(bases=bases, **common)
    elif bases is not None:
        config = SparseGradConfig(precomputed_bases=bases, **common)
    else:
        if calibration is None:
            raise ValueError("sparsegrad needs calibration batches (or bases)")
        config = SparseGradConfig(calibration_steps=calibration_steps, **common)
        bases = peft_sparsegrad.calibrate(base_model, config, calibration, progress=progress)
        config.precomputed_bases = bases
    calibration_s = time.perf_counter() - start
    model = get_peft_model(base_model, config)
    return SFTSetup(model, [SparseGradCallback(step_in_backward=step_in_backward)], budget["sparsegrad_k"],
                    f"top-{keep_ratio:.2%} of {where} ({budget['sparsegrad_k']:,} entries per step, "
                    f"{config.selection_summary()}{', identity bases' if method == 'meprop' else ''})",
                    bases if method == "sparsegrad" else None, calibration_s)


def _ranges(layers: Sequence[int]) -> str:
    layers = list(layers)
    if len(layers) > 2 and all(b - a == layers[1] - layers[0] for a, b in zip(layers, layers[1:])):
        return f"{layers[0]},{layers[1]},…,{layers[-1]}"
    return ",".join(map(str, layers))


def stored_params(model, method: str) -> int:
    """Trained parameters a saved checkpoint of ``method`` holds: the non-zeros of ΔW' for SparseGrad/MeProp (bases
    excluded), the LoRA matrices, or the trainable weights for ``full``."""
    if method == "full":
        return sum(p.numel() for p in model.parameters() if p.requires_grad)
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(model)
    if method == "lora":
        return sum(v.numel() for k, v in state.items() if "lora_" in k)
    return sum(v.numel() for k, v in state.items() if k.endswith("sparsegrad_values"))


class _StepTimer:
    def __init__(self):
        from transformers import TrainerCallback

        timer = self

        class CB(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                timer._t = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                timer.times.append(time.perf_counter() - timer._t)

        self.times: list[float] = []
        self._t = 0.0
        self.callback = CB()

    def median(self) -> float:
        import statistics

        t = self.times[1:] if len(self.times) > 3 else self.times
        return statistics.median(t) if t else float("nan")


def train(setup: SFTSetup, train_data: SFTData, collator: Callable, *, lr: float, epochs: float, batch_size: int,
          seed: int, output_dir: str, bf16: bool = False, progress: bool = False, warmup_ratio: float = 0.03,
          gradient_accumulation_steps: int = 1, max_steps: int = -1) -> dict[str, Any]:
    """Train ``setup.model`` with the plain HF ``Trainer`` (+ the method's callbacks). Returns timing and loss."""
    import torch
    from transformers import Trainer, TrainingArguments

    timer = _StepTimer()
    args = TrainingArguments(
        output_dir=output_dir, per_device_train_batch_size=batch_size, learning_rate=lr, num_train_epochs=epochs,
        max_steps=max_steps, warmup_steps=warmup_ratio, lr_scheduler_type="linear", weight_decay=0.0,
        logging_steps=10, save_strategy="no", eval_strategy="no", report_to=[], seed=seed, data_seed=seed,
        use_cpu=not torch.cuda.is_available(), bf16=bf16, remove_unused_columns=False, disable_tqdm=not progress,
        dataloader_num_workers=0, gradient_accumulation_steps=gradient_accumulation_steps,
    )
    trainer = Trainer(model=setup.model, args=args, train_dataset=to_dataset(train_data), data_collator=collator,
                      callbacks=[*setup.callbacks, timer.callback])
    start = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - start
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"train_time_s": train_s, "step_time_s": timer.median(), "steps": trainer.state.global_step,
            "train_loss": next((h["train_loss"] for h in reversed(trainer.state.log_history) if "train_loss" in h),
                               None), "loss_curve": losses, "trainer": trainer}


def load_causal_lm(model_path: str, seed: int = 0, dtype: str = "float32"):
    """A pretrained causal LM (weights in ``dtype``: "float32" or "bfloat16") and its tokenizer (with a chat
    template)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {dtype!r}")
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    ensure_chat_template(tokenizer)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, dtype))
    if model.generation_config is not None:  # greedy everywhere: no sampling defaults from the checkpoint
        model.generation_config.do_sample = False
        for k in ("temperature", "top_p", "top_k"):
            if hasattr(model.generation_config, k):
                setattr(model.generation_config, k, None)
    return model, tokenizer


def train_sft(model_path: str, train_conversations: Sequence[Conversation], eval_conversations: Sequence[Conversation],
              *, method: str = "sparsegrad", lr: float = 1e-3, epochs: float = 1.0, batch_size: int = 8,
              max_seq_length: int = 512, blocks_every: int = 3, keep_ratio: float = 0.01,
              calibration_steps: int = 8, bases: Any = None, seed: int = 0, bf16: bool = False,
              output_dir: Optional[str] = None, num_samples: int = 3, max_new_tokens: int = 48, progress: bool = False,
              eval_before: Optional[dict] = None, samples_before: Optional[list[str]] = None, eval_batch_size: int = 8,
              max_steps: int = -1, step_in_backward: bool = True, model_dtype: str = "float32",
              eval_reloaded: bool = False, **config_options: Any) -> dict[str, Any]:
    """Tokenize, build ``method``, evaluate, train, evaluate again; returns metrics (and the trained ``model``,
    ``tokenizer`` under those keys). ``eval_before``/``samples_before`` skip recomputing the base model's numbers
    (they depend only on the base model and the eval set; ``eval_before=False`` skips it). ``output_dir`` is the
    Trainer's scratch directory. ``model_dtype``: the weights' dtype ("bfloat16" trains bf16 weights in place).
    ``eval_reloaded``: also evaluate the saved adapter loaded onto a fresh copy of the base model (what a user ships;
    with stochastic rounding the trained W also carries rounding noise the adapter does not).
    ``config_options``: ``SparseGradConfig`` fields (see ``setup_sft_method``)."""
    import tempfile

    import torch

    model, tokenizer = load_causal_lm(model_path, seed, model_dtype)
    train_data = build_sft_data(train_conversations, tokenizer, max_seq_length)
    eval_data = build_sft_data(eval_conversations, tokenizer, max_seq_length)
    if len(train_data) == 0:
        raise SFTDataError(f"no training example has an assistant token within --max-seq-length {max_seq_length} "
                           f"({train_data.dropped} dropped)")
    if len(eval_data) == 0:
        raise SFTDataError(f"no eval example has an assistant token within --max-seq-length {max_seq_length} "
                           f"({eval_data.dropped} dropped)")
    collator = make_collator(tokenizer)
    prompts = [prompt_of(c) for c in eval_data.conversations[:num_samples]]
    if eval_before is None:
        eval_before = evaluate(model, eval_data, collator, eval_batch_size)
    elif eval_before is False:  # not needed (e.g. learning-rate selection)
        eval_before = {"loss": None, "token_accuracy": None}
    if samples_before is None:
        samples_before = generate(model, tokenizer, prompts, max_new_tokens) if num_samples else []
    layers = block_indices(model, blocks_every)
    calibration = None
    if method == "sparsegrad" and bases is None:
        calibration = batches(train_data.examples, collator, batch_size, seed=seed, n_batches=calibration_steps)
    setup = setup_sft_method(method, model, layers=layers, keep_ratio=keep_ratio, calibration=calibration,
                             calibration_steps=calibration_steps, bases=bases, progress=progress,
                             step_in_backward=step_in_backward, **config_options)
    with tempfile.TemporaryDirectory() as scratch:
        result = train(setup, train_data, collator, lr=lr, epochs=epochs, batch_size=batch_size, seed=seed,
                       output_dir=output_dir or scratch, bf16=bf16, progress=progress, max_steps=max_steps)
    trainer = result.pop("trainer")
    trained = trainer.model
    eval_after = evaluate(trained, eval_data, collator, eval_batch_size)
    samples_after = generate(trained, tokenizer, prompts, max_new_tokens) if num_samples else []
    reloaded = {}
    if eval_reloaded and method in ("sparsegrad", "meprop", "lora"):
        from peft import PeftModel

        with tempfile.TemporaryDirectory() as saved:
            trained.save_pretrained(saved)
            fresh, _ = load_causal_lm(model_path, seed, model_dtype)
            reloaded = evaluate(PeftModel.from_pretrained(fresh, saved), eval_data, collator, eval_batch_size)
            reloaded = {"eval_loss_reloaded": reloaded["loss"], "eval_token_accuracy_reloaded": reloaded["token_accuracy"]}
    return {
        "method": method, "lr": lr, "epochs": epochs, "batch_size": batch_size, "max_seq_length": max_seq_length,
        "seed": seed, "layers": layers, "keep_ratio": keep_ratio if method != "full" else None,
        "eval_loss_before": eval_before["loss"], "eval_loss_after": eval_after["loss"],
        "eval_token_accuracy_before": eval_before["token_accuracy"],
        "eval_token_accuracy_after": eval_after["token_accuracy"], "eval_tokens": eval_after["tokens"], **reloaded,
        "train_samples": len(train_data), "train_dropped": train_data.dropped, "eval_samples": len(eval_data),
        "eval_dropped": eval_data.dropped, "train_assistant_tokens": train_data.assistant_tokens,
        "trainable_params": setup.trainable_params, "stored_params": stored_params(trained, method),
        "note": setup.note, "calibration_s": setup.calibration_s, **result,
        "samples": [{"prompt": p[-1]["content"] if p else "", "before": b, "after": a}
                    for p, b, a in zip(prompts, samples_before, samples_after)],
        "torch": torch.__version__, "model": trained, "tokenizer": tokenizer, "bases": setup.bases,
    }
