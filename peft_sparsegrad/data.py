"""Text-classification / regression data loading and GLUE metrics.

This module is deliberately self-contained (torch, transformers, datasets, numpy,
scipy, scikit-learn and the standard library only) so that the benchmark script,
the CLI and the notebook can share one implementation of:

* the GLUE task table (:data:`GLUE_TASKS`, :func:`resolve_task`);
* loading GLUE either from the official TSV distribution (works offline) or from
  the ``nyu-mll/glue`` hub dataset (:func:`load_glue`);
* loading a user's own CSV/JSONL file (:func:`load_text_file`);
* deterministic subsampling and model-selection splits;
* tokenization without padding plus a dynamic-padding collator;
* GLUE metrics computed with scikit-learn/scipy (the ``evaluate`` package is
  avoided on purpose because it fetches metric scripts from the hub).

Every loader returns the same schema: columns ``text``, optionally ``text_pair``
and ``label`` (int class id, or float for regression).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import datasets
import numpy as np
import torch
import transformers
from scipy import stats
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

logger = logging.getLogger(__name__)

__all__ = [
    "TaskSpec",
    "GLUE_TASKS",
    "resolve_task",
    "load_glue",
    "load_text_file",
    "subsample",
    "split_for_model_selection",
    "tokenize",
    "make_collator",
    "batches",
    "compute_metrics",
    "trainer_compute_metrics",
]


# --------------------------------------------------------------------------- #
# Task table
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class TaskSpec:
    """Everything needed to load, train on and score one GLUE task.

    Kept as plain data so callers (CLI, benchmark, notebook) can build the model
    head (``num_labels``, ``label_names``) and report the right headline metric
    without knowing anything about individual tasks.
    """

    name: str
    text_columns: tuple[str, ...]
    label_column: str
    num_labels: int
    label_names: tuple[str, ...] | None
    metric: str
    dev_file: str
    hf_config: str
    hf_dev_split: str

    @property
    def is_regression(self) -> bool:
        """True for STS-B: one output, float labels, MSE loss."""
        return self.num_labels == 1

    @property
    def is_pair(self) -> bool:
        """True when examples are sentence pairs (``text_pair`` column exists)."""
        return len(self.text_columns) == 2


def _spec(name, text_columns, label_column, num_labels, label_names, metric, hf_config,
          dev_file="dev.tsv", hf_dev_split="validation") -> TaskSpec:
    return TaskSpec(name=name, text_columns=tuple(text_columns), label_column=label_column,
                    num_labels=num_labels, label_names=None if label_names is None else tuple(label_names),
                    metric=metric, dev_file=dev_file, hf_config=hf_config, hf_dev_split=hf_dev_split)


# Label names follow the ClassLabel names of the ``nyu-mll/glue`` hub dataset so
# that TSV-loaded and hub-loaded data use identical class ids.
GLUE_TASKS: dict[str, TaskSpec] = {
    s.name: s
    for s in (
        _spec("CoLA", ("sentence",), "label", 2, ("unacceptable", "acceptable"), "mcc", "cola"),
        _spec("SST-2", ("sentence",), "label", 2, ("negative", "positive"), "accuracy", "sst2"),
        _spec("MRPC", ("#1 String", "#2 String"), "Quality", 2, ("not_equivalent", "equivalent"), "f1", "mrpc"),
        _spec("STS-B", ("sentence1", "sentence2"), "score", 1, None, "pearson", "stsb"),
        _spec("QQP", ("question1", "question2"), "is_duplicate", 2, ("not_duplicate", "duplicate"), "f1", "qqp"),
        _spec("MNLI", ("sentence1", "sentence2"), "gold_label", 3, ("entailment", "neutral", "contradiction"),
              "accuracy", "mnli", dev_file="dev_matched.tsv", hf_dev_split="validation_matched"),
        _spec("QNLI", ("question", "sentence"), "label", 2, ("entailment", "not_entailment"), "accuracy", "qnli"),
        _spec("RTE", ("sentence1", "sentence2"), "label", 2, ("entailment", "not_entailment"), "accuracy", "rte"),
        _spec("WNLI", ("sentence1", "sentence2"), "label", 2, ("not_entailment", "entailment"), "accuracy", "wnli"),
    )
}

# CoLA's TSVs ship without a header row; these are the positional column names.
_HEADERLESS_COLUMNS: dict[str, tuple[str, ...]] = {
    "CoLA": ("source", "label", "original_label_mark", "sentence"),
}

# Text column names in the ``nyu-mll/glue`` hub dataset (differ from the TSVs).
_HF_TEXT_COLUMNS: dict[str, tuple[str, ...]] = {
    "CoLA": ("sentence",),
    "SST-2": ("sentence",),
    "MRPC": ("sentence1", "sentence2"),
    "STS-B": ("sentence1", "sentence2"),
    "QQP": ("question1", "question2"),
    "MNLI": ("premise", "hypothesis"),
    "QNLI": ("question", "sentence"),
    "RTE": ("sentence1", "sentence2"),
    "WNLI": ("sentence1", "sentence2"),
}

_ALIASES: dict[str, str] = {re.sub(r"[^a-z0-9]", "", k.lower()): k for k in GLUE_TASKS}
_ALIASES.update({"mnlim": "MNLI", "mnlimatched": "MNLI", "stsbenchmark": "STS-B"})



def _normalize_name(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def resolve_task(name: str | TaskSpec) -> TaskSpec:
    """Map any common spelling ("STS-B", "stsb", "sst-2", "SST2", "mnli") to its TaskSpec.

    Users type task names on the command line in many forms; normalizing here
    keeps every caller consistent. Unknown names raise ``ValueError`` listing the
    valid ones so a typo is easy to fix.
    """
    if isinstance(name, TaskSpec):
        return name
    key = _ALIASES.get(_normalize_name(str(name)))
    if key is None:
        raise ValueError(f"Unknown GLUE task {name!r}; valid names: {', '.join(GLUE_TASKS)}")
    return GLUE_TASKS[key]


# --------------------------------------------------------------------------- #
# GLUE loading
# --------------------------------------------------------------------------- #


def _features(spec: TaskSpec) -> datasets.Features:
    feats: dict[str, Any] = {"text": datasets.Value("string")}
    if spec.is_pair:
        feats["text_pair"] = datasets.Value("string")
    if spec.is_regression:
        feats["label"] = datasets.Value("float32")
    elif spec.label_names is not None:
        feats["label"] = datasets.ClassLabel(names=list(spec.label_names))
    else:  # pragma: no cover - every GLUE classification task has names
        feats["label"] = datasets.Value("int64")
    return datasets.Features(feats)


def _parse_glue_label(spec: TaskSpec, raw: str, where: str) -> float | int:
    raw = raw.strip()
    try:
        if spec.is_regression:
            return float(raw)
        if spec.label_names is not None and raw in spec.label_names:
            return spec.label_names.index(raw)
        value = int(raw)
    except ValueError:
        value = None
    if value is None or not 0 <= value < spec.num_labels:
        valid = list(spec.label_names or []) + [str(i) for i in range(spec.num_labels)]
        raise ValueError(f"{where}: unexpected {spec.name} label {raw!r} (expected one of {valid})")
    return value


def _find_task_dir(data_dir: str, spec: TaskSpec) -> str:
    exact = os.path.join(data_dir, spec.name)
    if os.path.isdir(exact) or not os.path.isdir(data_dir):
        return exact
    # Tolerate differently-cased/spelled folders such as "sst2" or "sts-b".
    for entry in sorted(os.listdir(data_dir)):
        full = os.path.join(data_dir, entry)
        if os.path.isdir(full) and _ALIASES.get(_normalize_name(entry)) == spec.name:
            return full
    return exact


def _read_glue_tsv(path: str, spec: TaskSpec) -> dict[str, list]:
    """Parse one official GLUE TSV into column lists, skipping malformed lines."""
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"GLUE {spec.name} file not found: {path!r}. Pass --data-dir (data_dir=...) pointing to a directory "
            f"in the GLUE distribution layout, i.e. <data_dir>/{spec.name}/train.tsv and "
            f"<data_dir>/{spec.name}/{spec.dev_file}."
        )
    # Some GLUE fields (MNLI parse trees) are long; the csv default limit is 128 KiB.
    csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))
    out: dict[str, list] = {"text": [], "text_pair": [], "label": []} if spec.is_pair else {"text": [], "label": []}
    skipped = 0
    # utf-8-sig drops the byte-order mark some GLUE files (MRPC) start with.
    with open(path, encoding="utf-8-sig", newline="") as fh:
        reader = csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = _HEADERLESS_COLUMNS.get(spec.name)
        if header is None:
            header = tuple(c.strip() for c in next(reader, []))
        missing = [c for c in (*spec.text_columns, spec.label_column) if c not in header]
        if missing:
            raise ValueError(f"{path}: header {list(header)} lacks GLUE {spec.name} column(s) {missing}")
        text_idx = [header.index(c) for c in spec.text_columns]
        label_idx = header.index(spec.label_column)
        for row in reader:
            if not row or row == [""]:
                continue  # blank line (e.g. trailing newline)
            if len(row) != len(header):
                skipped += 1
                continue
            out["label"].append(_parse_glue_label(spec, row[label_idx], f"{path}:{reader.line_num}"))
            out["text"].append(row[text_idx[0]])
            if spec.is_pair:
                out["text_pair"].append(row[text_idx[1]])
    if skipped:
        logger.warning("%s: skipped %d line(s) with a wrong number of fields (expected %d)",
                       path, skipped, len(header))
    return out


def load_glue(task: str | TaskSpec, data_dir: str | None = None) -> datasets.DatasetDict:
    """Load a GLUE task as a DatasetDict with ``train`` and ``validation`` splits.

    Columns are ``text``, ``text_pair`` (pair tasks only) and ``label`` (ClassLabel
    ids, or float32 for STS-B). With ``data_dir`` the official TSV distribution is
    read (``<data_dir>/<TASK>/train.tsv`` and the task's dev file), which is the
    only way that works offline; otherwise ``nyu-mll/glue`` is fetched from the hub.
    """
    spec = resolve_task(task)
    if data_dir is not None:
        task_dir = _find_task_dir(os.fspath(data_dir), spec)
        features = _features(spec)
        splits = {}
        for split, fname in (("train", "train.tsv"), ("validation", spec.dev_file)):
            cols = _read_glue_tsv(os.path.join(task_dir, fname), spec)
            splits[split] = datasets.Dataset.from_dict(cols, features=features)
        return datasets.DatasetDict(splits)

    try:
        raw = datasets.load_dataset("nyu-mll/glue", spec.hf_config)
    except Exception as exc:  # offline, hub error, ...
        raise RuntimeError(
            f"Could not load GLUE {spec.name} from the Hugging Face hub (nyu-mll/glue, config {spec.hf_config!r}). "
            f"If you are offline, pass data_dir (--data-dir) pointing to the GLUE TSV distribution "
            f"(<data_dir>/{spec.name}/train.tsv and <data_dir>/{spec.name}/{spec.dev_file})."
        ) from exc
    hf_cols = _HF_TEXT_COLUMNS[spec.name]
    rename = {hf_cols[0]: "text", "label": "label"}
    if spec.is_pair:
        rename[hf_cols[1]] = "text_pair"
    out = {}
    for split, hf_split in (("train", "train"), ("validation", spec.hf_dev_split)):
        ds = raw[hf_split].select_columns(list(rename))
        ds = ds.rename_columns({k: v for k, v in rename.items() if k != v})
        out[split] = ds.select_columns(list(_features(spec)))
    return datasets.DatasetDict(out)


# --------------------------------------------------------------------------- #
# User-provided files
# --------------------------------------------------------------------------- #


def _read_records(path: str) -> list[dict[str, Any]]:
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".csv", ".jsonl", ".json"):
        raise ValueError(f"Unsupported data file extension {ext!r} for {path!r}; use .csv, .jsonl or .json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Data file not found: {path!r}")
    if ext == ".csv":
        with open(path, encoding="utf-8-sig", newline="") as fh:
            return [dict(r) for r in csv.DictReader(fh)]
    with open(path, encoding="utf-8") as fh:
        content = fh.read()
    stripped = content.lstrip()
    if ext == ".json" and stripped.startswith("["):
        records = json.loads(stripped)
    else:
        records = [json.loads(line) for line in content.splitlines() if line.strip()]
    if not all(isinstance(r, Mapping) for r in records):
        raise ValueError(f"{path}: expected one JSON object per record")
    return [dict(r) for r in records]


def _coerce_number(value: Any) -> Any:
    """CSV gives strings; turn "1"/"0.5" into numbers so label type inference works."""
    if isinstance(value, str):
        s = value.strip()
        try:
            return int(s)
        except ValueError:
            pass
        try:
            return float(s)
        except ValueError:
            return value
    return value


def _infer_labels(train_labels: list[Any]) -> tuple[str, int, list[str] | None, dict[Any, int] | None]:
    """Decide how to treat labels: returns (kind, num_labels, label_names, value->id mapping).

    kind is "regression", "int" (numeric class labels) or "str" (string class labels).
    """
    values = [_coerce_number(v) for v in train_labels]
    if any(v is None for v in values):
        raise ValueError("label column contains missing values")
    is_num = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    if is_num:
        uniq = sorted(set(values))
        non_integral = any(isinstance(v, float) and not float(v).is_integer() for v in uniq)
        many_floats = any(isinstance(v, float) for v in uniq) and len(uniq) > 20
        if non_integral or many_floats:
            return "regression", 1, None, None
        ints = sorted({int(v) for v in uniq})
        if ints == list(range(len(ints))):  # already 0..K-1
            return "int", len(ints), None, {i: i for i in ints}
        return "int", len(ints), [str(i) for i in ints], {i: k for k, i in enumerate(ints)}
    uniq_str = sorted({str(v) for v in values})
    return "str", len(uniq_str), uniq_str, {s: k for k, s in enumerate(uniq_str)}


def _records_to_columns(records: list[dict[str, Any]], path: str, text_column: str,
                        text_pair_column: str | None, label_column: str) -> dict[str, list]:
    available = list(records[0].keys()) if records else []
    wanted = [text_column, label_column] + ([text_pair_column] if text_pair_column else [])
    missing = [c for c in wanted if not records or any(c not in r for r in records)]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; available columns: {available}")
    cols: dict[str, list] = {"text": [str(r[text_column]) for r in records]}
    if text_pair_column:
        cols["text_pair"] = [str(r[text_pair_column]) for r in records]
    cols["label"] = [r[label_column] for r in records]
    return cols


def load_text_file(
    path: str,
    text_column: str = "text",
    text_pair_column: str | None = None,
    label_column: str = "label",
    dev_fraction: float = 0.1,
    seed: int = 0,
    validation_path: str | None = None,
) -> tuple[datasets.DatasetDict, int, list[str] | None]:
    """Load a user's CSV/JSONL file into the same schema as :func:`load_glue`.

    Returns ``(DatasetDict(train, validation), num_labels, label_names)``. String
    labels are mapped to ids in sorted order (``label_names[id]`` is the string);
    numeric labels that are non-integral (or many distinct floats) mean regression
    (``num_labels == 1``). Without ``validation_path`` a deterministic
    ``dev_fraction`` of the file is held out as validation (stratified when possible).
    """
    path = os.fspath(path)
    train_cols = _records_to_columns(_read_records(path), path, text_column, text_pair_column, label_column)
    kind, num_labels, label_names, mapping = _infer_labels(train_cols["label"])

    def convert(cols: dict[str, list], where: str) -> datasets.Dataset:
        labels = []
        for raw in cols["label"]:
            v = _coerce_number(raw)
            if kind == "regression":
                labels.append(float(v))
                continue
            if kind == "str":
                key: Any = str(v)
            else:
                key = int(v) if isinstance(v, (int, float)) and float(v).is_integer() else v
            if key not in mapping:
                raise ValueError(f"{where}: label {raw!r} does not occur in the training file {path!r}")
            labels.append(mapping[key])
        feats: dict[str, Any] = {"text": datasets.Value("string")}
        if "text_pair" in cols:
            feats["text_pair"] = datasets.Value("string")
        if kind == "regression":
            feats["label"] = datasets.Value("float32")
        elif label_names is not None:
            feats["label"] = datasets.ClassLabel(names=label_names)
        else:
            feats["label"] = datasets.Value("int64")
        return datasets.Dataset.from_dict({**cols, "label": labels}, features=datasets.Features(feats))

    train = convert(train_cols, path)
    if validation_path is not None:
        validation_path = os.fspath(validation_path)
        dev_cols = _records_to_columns(_read_records(validation_path), validation_path, text_column,
                                       text_pair_column, label_column)
        dev = convert(dev_cols, validation_path)
    else:
        train, dev = split_for_model_selection(train, dev_fraction, seed)
    return datasets.DatasetDict({"train": train, "validation": dev}), num_labels, label_names


# --------------------------------------------------------------------------- #
# Subsets and splits
# --------------------------------------------------------------------------- #


def subsample(ds: datasets.Dataset, n: int | None, seed: int) -> datasets.Dataset:
    """Deterministically pick ``n`` examples (original order kept) for quick runs.

    ``n`` of ``None`` or ``>= len(ds)`` returns ``ds`` unchanged.
    """
    if n is None or n >= len(ds):
        return ds
    if n < 0:
        raise ValueError(f"subsample size must be >= 0, got {n}")
    idx = np.sort(np.random.default_rng(seed).choice(len(ds), size=n, replace=False))
    return ds.select(idx.tolist())


def _label_array(ds: datasets.Dataset) -> np.ndarray | None:
    for col in ("label", "labels"):
        if col in ds.column_names:
            return np.asarray(ds[col])
    return None


def split_for_model_selection(ds: datasets.Dataset, fraction: float,
                              seed: int) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Split ``ds`` into ``(train_part, heldout_part)`` for choosing hyperparameters.

    Lets the learning rate be selected without looking at the GLUE dev set, which is
    then only used for the final report. Stratified by label when the labels are
    integer classes with at least two examples each; otherwise a random split.
    Deterministic for a given ``seed``; original order is kept inside each part.
    """
    from sklearn.model_selection import train_test_split

    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    n = len(ds)
    if n < 2:
        raise ValueError(f"need at least 2 examples to split, got {n}")
    n_held = min(max(1, int(round(n * fraction))), n - 1)
    idx = np.arange(n)
    labels = _label_array(ds)
    stratify = None
    if labels is not None and labels.ndim == 1 and np.issubdtype(labels.dtype, np.integer):
        _, counts = np.unique(labels, return_counts=True)
        if counts.min() >= 2 and len(counts) <= min(n_held, n - n_held):
            stratify = labels
    train_idx, held_idx = train_test_split(idx, test_size=n_held, random_state=seed, shuffle=True,
                                           stratify=stratify)
    return ds.select(np.sort(train_idx).tolist()), ds.select(np.sort(held_idx).tolist())


# --------------------------------------------------------------------------- #
# Tokenization and batching
# --------------------------------------------------------------------------- #


def tokenize(ds: datasets.DatasetDict | datasets.Dataset, tokenizer, max_seq_length: int = 128):
    """Tokenize ``text``/``text_pair`` into model inputs, truncating but NOT padding.

    Padding is left to the collator so each batch is padded only to its own longest
    example. The label moves to ``labels`` (what HF models expect), all original
    columns are removed, and a ``length`` column is added for length grouping.
    """
    if isinstance(ds, datasets.DatasetDict):
        return datasets.DatasetDict({k: tokenize(v, tokenizer, max_seq_length) for k, v in ds.items()})
    has_pair = "text_pair" in ds.column_names
    has_label = "label" in ds.column_names

    def fn(batch: dict[str, list]) -> dict[str, list]:
        enc = tokenizer(batch["text"], batch["text_pair"] if has_pair else None, truncation=True,
                        max_length=max_seq_length, padding=False)
        out = {k: v for k, v in enc.items()}
        out["length"] = [len(x) for x in enc["input_ids"]]
        if has_label:
            out["labels"] = batch["label"]
        return out

    return ds.map(fn, batched=True, remove_columns=ds.column_names, desc="Tokenizing")


def _is_float_label(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return value.is_floating_point()
    if isinstance(value, np.ndarray):
        return np.issubdtype(value.dtype, np.floating)
    return isinstance(value, (float, np.floating))


def make_collator(tokenizer, pad_to_multiple_of: int | None = None) -> Callable[[list[dict]], dict]:
    """Collator that pads each batch to its longest example (dynamic padding).

    Built on ``DataCollatorWithPadding``; drops the ``length`` helper column (and any
    leftover string columns) and returns ``labels`` as float32 for regression (float
    labels) and int64 for classification, matching what HF heads use to pick the loss.
    """
    base = transformers.DataCollatorWithPadding(tokenizer, padding="longest",
                                                pad_to_multiple_of=pad_to_multiple_of, return_tensors="pt")

    def collate(features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        feats, labels = [], []
        for f in features:
            f = dict(f)
            for key in ("labels", "label"):
                if key in f:
                    labels.append(f.pop(key))
            f.pop("length", None)
            feats.append({k: v for k, v in f.items() if not isinstance(v, str)})
        batch = dict(base(feats))
        if labels:
            if len(labels) != len(feats):
                raise ValueError("some examples in the batch have labels and some do not")
            dtype = torch.float32 if any(_is_float_label(x) for x in labels) else torch.long
            batch["labels"] = torch.as_tensor(np.asarray([np.asarray(x) for x in labels]), dtype=dtype)
        return batch

    return collate


def batches(ds: datasets.Dataset, collator: Callable, batch_size: int, seed: int,
            shuffle: bool = True) -> Iterator[dict]:
    """Yield collated batches (torch tensors incl. ``labels``) in a seed-determined order.

    Used for calibration passes outside the Trainer, which must be reproducible.
    The last batch may be smaller than ``batch_size``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = np.random.default_rng(seed).permutation(len(ds)) if shuffle else np.arange(len(ds))
    for start in range(0, len(ds), batch_size):
        chunk = ds[order[start:start + batch_size].tolist()]
        keys = list(chunk)
        rows = [dict(zip(keys, vals)) for vals in zip(*(chunk[k] for k in keys))]
        yield collator(rows)


# --------------------------------------------------------------------------- #
# Metrics
# --------------------------------------------------------------------------- #


_METRIC_FAMILY = {"mcc": ("mcc",), "pearson": ("pearson", "spearman"), "spearman": ("pearson", "spearman"),
                  "f1": ("f1", "accuracy"), "accuracy": ("accuracy",)}


def _class_predictions(predictions: np.ndarray) -> np.ndarray:
    p = np.asarray(predictions)
    if p.ndim == 2 and p.shape[1] > 1:
        return p.argmax(axis=-1)
    if p.ndim == 2:  # single binary logit
        return (p[:, 0] > 0).astype(np.int64)
    return np.rint(p).astype(np.int64)  # already class ids


def compute_metrics(task_or_metric: TaskSpec | str, predictions: np.ndarray,
                    labels: np.ndarray) -> dict[str, float]:
    """GLUE metrics from logits (or regression outputs) with sklearn/scipy.

    ``task_or_metric`` is a TaskSpec, a task name ("cola", "STS-B", ...) or a
    headline metric name ("mcc", "pearson", "f1", "accuracy"). Returns all the
    task's GLUE metrics plus ``score``, the GLUE headline (MCC for CoLA, Pearson for
    STS-B, F1 for MRPC/QQP, accuracy otherwise), so callers can rank runs uniformly.
    """
    if isinstance(task_or_metric, TaskSpec):
        headline = task_or_metric.metric
    else:
        name = str(task_or_metric)
        if name.lower() in _METRIC_FAMILY:
            headline = name.lower()
        else:
            try:
                headline = resolve_task(name).metric
            except ValueError:
                raise ValueError(f"{name!r} is neither a GLUE task ({', '.join(GLUE_TASKS)}) "
                                 f"nor a metric name {list(_METRIC_FAMILY)}") from None
    labels = np.asarray(labels)
    preds = np.asarray(predictions)
    if len(preds) != len(labels):
        raise ValueError(f"{len(preds)} predictions but {len(labels)} labels")
    out: dict[str, float] = {}
    family = _METRIC_FAMILY[headline]
    if "pearson" in family:
        p = preds.reshape(len(preds), -1)[:, 0].astype(np.float64) if preds.ndim > 1 else preds.astype(np.float64)
        y = labels.reshape(-1).astype(np.float64)
        if len(p) < 2 or np.all(p == p[0]) or np.all(y == y[0]):
            out["pearson"] = out["spearman"] = math.nan  # undefined for constant input
        else:
            out["pearson"] = float(stats.pearsonr(p, y)[0])
            out["spearman"] = float(stats.spearmanr(p, y)[0])
    else:
        p = _class_predictions(preds)
        y = labels.reshape(-1).astype(np.int64)
        if "mcc" in family:
            out["mcc"] = float(matthews_corrcoef(y, p))
        if "f1" in family:
            out["f1"] = float(f1_score(y, p, pos_label=1, average="binary", zero_division=0))
        if "accuracy" in family:
            out["accuracy"] = float(accuracy_score(y, p))
    out["score"] = out[headline]
    return out


def trainer_compute_metrics(spec: TaskSpec) -> Callable[[transformers.EvalPrediction], dict[str, float]]:
    """Adapter for ``transformers.Trainer(compute_metrics=...)``.

    Handles models that return extra outputs (predictions given as a tuple) by
    taking the first element, which is the logits.
    """
    spec = resolve_task(spec)

    def fn(eval_pred: transformers.EvalPrediction) -> dict[str, float]:
        preds = eval_pred.predictions
        if isinstance(preds, (tuple, list)):
            preds = preds[0]
        labels = eval_pred.label_ids
        if isinstance(labels, (tuple, list)):
            labels = labels[0]
        return compute_metrics(spec, preds, labels)

    return fn
