"""The ``sparsegrad`` command line, end to end on a tiny SST-2-style GLUE directory and the packaged MiniLM-L6.

Commands run in-process through ``main(argv)`` (one import of torch/transformers for the whole module); one test runs
the installed console script, one a subprocess that loads a merged model without importing peft_sparsegrad.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors import safe_open

from peft_sparsegrad import load_bases
from peft_sparsegrad.cli import load_adapter, main
from peft_sparsegrad.finetune import default_model_path

TINY = ["--max-train-samples", "32", "--epochs", "1", "--batch-size", "16", "--max-seq-length", "32",
        "--calibration-steps", "2", "--no-progress"]
PROBE = ["a wonderful , moving film .", "dull and lifeless from start to finish ."]

_GOOD = ["wonderful", "moving", "charming", "brilliant", "funny", "touching", "gorgeous", "smart"]
_BAD = ["dull", "tedious", "lifeless", "clumsy", "boring", "shallow", "painful", "stale"]
_NOUNS = ["film", "story", "script", "cast", "movie", "drama"]


def _rows(n: int, offset: int) -> list[tuple[str, int]]:
    rows = []
    for i in range(n):
        j = i + offset
        label = j % 2
        adjective = (_GOOD if label else _BAD)[j % 8]
        rows.append((f"a {adjective} {_NOUNS[j % 6]} , {'truly' if j % 3 else 'rather'} {adjective} .", label))
    return rows


def _write_tsv(path, rows) -> None:
    with open(path, "w") as f:
        f.write("sentence\tlabel\n")
        f.writelines(f"{text}\t{label}\n" for text, label in rows)


@pytest.fixture(scope="module")
def glue_dir(tmp_path_factory):
    """<tmp>/glue/SST-2/{train,dev}.tsv in the official GLUE layout: 40 training and 12 dev rows."""
    root = tmp_path_factory.mktemp("glue")
    (root / "SST-2").mkdir()
    _write_tsv(root / "SST-2" / "train.tsv", _rows(40, 0))
    _write_tsv(root / "SST-2" / "dev.tsv", _rows(12, 100))
    return root


def _run(argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def finetuned(glue_dir, tmp_path_factory):
    """One `sparsegrad finetune` run (calibration + 2 training steps), shared by the tests that need an adapter."""
    out_dir = tmp_path_factory.mktemp("run") / "adapter"
    code, stdout, stderr = _run(["finetune", "--task", "sst2", "--data-dir", glue_dir, *TINY, "--output-dir", out_dir])
    assert code == 0, stderr
    return out_dir, stdout


def test_finetune_sparsegrad_end_to_end(finetuned):
    out_dir, stdout = finetuned
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "results.json"):
        assert (out_dir / name).is_file(), name
    results = json.loads((out_dir / "results.json").read_text())
    assert results["method"] == "sparsegrad" and results["task"] == "SST-2" and results["metric"] == "accuracy"
    assert 0.0 <= results["metrics"]["accuracy"] <= 1.0 and results["score"] == results["metrics"]["accuracy"]
    assert results["bases"] == "calibrated (2 steps)" and results["train_samples"] == 32
    assert results["label_names"] == ["negative", "positive"]
    config = json.loads((out_dir / "adapter_config.json").read_text())
    assert config["peft_type"] == "SPARSEGRAD" and config["keep_ratio"] == 0.01 and config["bases_dtype"] == "float16"
    with safe_open(str(out_dir / "adapter_model.safetensors"), framework="pt") as f:
        nnz = sum(f.get_slice(k).get_shape()[0] for k in f.keys() if k.endswith(".sparsegrad_values"))
        u_out = [f.get_tensor(k) for k in f.keys() if k.endswith(".U_out")]
    assert nnz > 0  # two optimizer steps changed ΔW'
    assert u_out and all(torch.equal(u.half().float(), u) for u in u_out)  # the float16 values it trained with
    assert "Dev accuracy:" in stdout
    # reloaded from disk onto a fresh base model: same outputs as the trained model, then 3 predictions
    diff = float(stdout.split("vs. the trained model = ")[1].split()[0])
    assert diff < 1e-5
    predictions = stdout.split("Predictions of the reloaded model")[1].strip().splitlines()[1:]
    assert len(predictions) == 3 and all("(gold " in line for line in predictions)


def test_calibrate_then_finetune_reuses_bases(glue_dir, tmp_path, monkeypatch):
    bases_file = tmp_path / "bases.safetensors"
    code, stdout, stderr = _run(["calibrate", "--task", "SST-2", "--data-dir", glue_dir, *TINY[:2], *TINY[4:],
                                 "--output", bases_file])
    assert code == 0, stderr
    assert "bert.encoder.layer.*.intermediate.dense: U_out 1536 × 1536, U_in 384 × 384" in stdout
    assert "bert.encoder.layer.*.output.dense: U_out 384 × 384, U_in 1536 × 1536" in stdout

    def no_calibration(*args, **kwargs):
        raise AssertionError("finetune --bases must not calibrate again")

    import peft_sparsegrad.calibration
    import peft_sparsegrad.model

    monkeypatch.setattr(peft_sparsegrad.model, "collect_bases", no_calibration)
    monkeypatch.setattr(peft_sparsegrad.calibration, "collect_bases", no_calibration)
    out_dir = tmp_path / "adapter"
    code, stdout, stderr = _run(["finetune", "--task", "SST-2", "--data-dir", glue_dir, *TINY, "--bases", bases_file,
                                 "--bases-dtype", "float32", "--output-dir", out_dir])
    assert code == 0, stderr
    assert f"Bases: reusing {bases_file}" in stdout
    results = json.loads((out_dir / "results.json").read_text())
    assert results["bases"] == str(bases_file) and results["bases_dtype"] == "float32"
    assert json.loads((out_dir / "adapter_config.json").read_text())["bases_dtype"] == "float32"
    # float32 storage: the adapter holds the calibrated bases bit for bit
    saved, reused = load_bases(bases_file), load_bases(out_dir)
    assert sorted(saved.pairs) == sorted(reused.pairs)
    for layer_type, pair in saved.pairs.items():
        assert torch.equal(pair.U_out, reused.pairs[layer_type].U_out)
        assert torch.equal(pair.U_in, reused.pairs[layer_type].U_in)


def test_merge_loads_with_plain_transformers(finetuned, tmp_path):
    adapter_dir, _ = finetuned
    merged_dir = tmp_path / "merged"
    code, stdout, stderr = _run(["merge", "--adapter", adapter_dir, "--output", merged_dir])
    assert code == 0, stderr
    assert (merged_dir / "config.json").is_file() and (merged_dir / "tokenizer.json").is_file()
    assert not (merged_dir / "adapter_config.json").exists()

    from transformers import AutoTokenizer

    model, _ = load_adapter(str(adapter_dir))
    tokenizer = AutoTokenizer.from_pretrained(str(adapter_dir))
    with torch.no_grad():
        expected = model(**tokenizer(PROBE, padding=True, return_tensors="pt")).logits

    script = textwrap.dedent(f"""
        import json, sys
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer
        model = AutoModelForSequenceClassification.from_pretrained({str(merged_dir)!r}).eval()
        tokenizer = AutoTokenizer.from_pretrained({str(merged_dir)!r})
        with torch.no_grad():
            logits = model(**tokenizer({PROBE!r}, padding=True, return_tensors="pt")).logits
        assert "peft_sparsegrad" not in sys.modules, "the merged model must not need peft_sparsegrad"
        print(json.dumps({{"logits": logits.tolist(), "labels": model.config.id2label}}))
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    torch.testing.assert_close(torch.tensor(result["logits"]), expected, atol=1e-5, rtol=1e-5)
    assert result["labels"] == {"0": "negative", "1": "positive"}


def test_inspect_reports_types_k_and_loading(finetuned):
    adapter_dir, _ = finetuned
    code, stdout, stderr = _run(["inspect", adapter_dir, "--base-model", default_model_path()])
    assert code == 0, stderr
    assert "method: sparsegrad" in stdout and "keep ratio: 0.01" in stdout
    assert "bert.encoder.layer.*.intermediate.dense: bases U_out 1536 × 1536, U_in 384 × 384; 6 layers" in stdout
    assert "bert.encoder.layer.*.output.dense: bases U_out 384 × 384, U_in 1536 × 1536; 6 layers" in stdout
    # k = ceil(0.01 * 1536 * 384) = 5899 for every MLP layer of MiniLM-L6; 12 layers
    assert stdout.count("k 5,899/step, stored nnz") == 12
    assert "per-step budget Σk: 70,788" in stdout
    assert "trainable (stored) parameters:" in stdout and "file size: adapter_model.safetensors" in stdout
    assert "loads onto" in stdout and ": yes" in stdout


def test_finetune_meprop_on_own_csv_then_inspect(tmp_path):
    """--train-file/--validation-file with custom columns and string labels; MeProp (here with periodic selection)
    stores no bases, but inspect still reports every layer's shape and k (from the saved ΔW' shapes)."""
    import csv

    for name, rows in (("train.csv", _rows(32, 0)), ("dev.csv", _rows(8, 100))):
        with open(tmp_path / name, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["review", "sentiment"])
            writer.writerows((text, "pos" if label else "neg") for text, label in rows)
    out_dir = tmp_path / "meprop"
    code, stdout, stderr = _run(["finetune", "--train-file", tmp_path / "train.csv", "--validation-file",
                                 tmp_path / "dev.csv", "--text-column", "review", "--label-column", "sentiment",
                                 "--method", "meprop", "--selection", "periodic", "--refresh-interval", "2", *TINY,
                                 "--output-dir", out_dir])
    assert code == 0, stderr
    results = json.loads((out_dir / "results.json").read_text())
    assert results["method"] == "meprop" and results["metric"] == "accuracy" and results["label_names"] == ["neg", "pos"]
    assert results["selection"] == "periodic" and results["refresh_interval"] == 2
    assert "support re-selected every 2 steps" in results["note"]
    assert results["eval_samples"] == 8 and results["bases"] is None
    code, stdout, stderr = _run(["inspect", out_dir])
    assert code == 0, stderr
    assert "method: meprop" in stdout and "identity bases (MeProp); 6 layers" in stdout
    assert stdout.count("k 5,899/step, stored nnz") == 12


@pytest.fixture(scope="module")
def other_base(tmp_path_factory):
    """A tiny random BERT with other shapes than MiniLM (hidden 32, MLP 64)."""
    from transformers import BertConfig, BertForSequenceClassification

    path = tmp_path_factory.mktemp("tiny_bert")
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    BertForSequenceClassification(config).save_pretrained(path)
    return path


def _error_cases():
    ft = ["finetune", "--output-dir", "{tmp}/out"]
    return {
        "missing data dir": (ft + ["--task", "SST-2", "--data-dir", "{tmp}/no_such_dir"], "is not a directory"),
        "unknown task": (ft + ["--task", "SST-3", "--data-dir", "{glue}"], "Unknown GLUE task 'SST-3'"),
        "task files missing": (ft + ["--task", "rte", "--data-dir", "{glue}"], "GLUE RTE file not found"),
        "keep ratio 0": (ft + ["--task", "SST-2", "--data-dir", "{glue}", "--keep-ratio", "0"], "--keep-ratio"),
        "keep ratio > 1": (ft + ["--task", "SST-2", "--data-dir", "{glue}", "--keep-ratio", "1.5"], "(0, 1]"),
        "unknown method": (ft + ["--task", "SST-2", "--data-dir", "{glue}", "--method", "adam"], "invalid choice"),
        "no data": (ft, "no data"),
        "missing bases": (ft + ["--task", "SST-2", "--data-dir", "{glue}", "--bases", "{tmp}/b.safetensors"],
                          "does not exist"),
        "missing output dir": (["finetune", "--task", "SST-2"], "--output-dir"),
        "calibrate output": (["calibrate", "--task", "SST-2", "--data-dir", "{glue}", "--output", "{tmp}/b.pt"],
                             ".safetensors"),
        "missing adapter": (["merge", "--adapter", "{tmp}/none", "--output", "{tmp}/m"], "does not exist"),
        "merge onto mismatched base": (["merge", "--adapter", "{adapter}", "--base-model", "{other}", "--output",
                                        "{tmp}/m"], "does not load onto the base model"),
        "inspect onto mismatched base": (["inspect", "{adapter}", "--base-model", "{other}"],
                                         "does not load onto the base model"),
        "no command": ([], "required"),
    }


@pytest.mark.parametrize("case", list(_error_cases()))
def test_errors_are_one_line_and_exit_2(case, glue_dir, finetuned, other_base, tmp_path):
    argv, expected = _error_cases()[case]
    values = {"tmp": tmp_path, "glue": glue_dir, "adapter": finetuned[0], "other": other_base}
    code, _, stderr = _run([a.format(**values) for a in argv])
    assert code == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("sparsegrad: error: ") and expected in lines[0], lines[0]
    assert not (tmp_path / "out").exists()


def test_console_script_help():
    script = os.path.join(os.path.dirname(sys.executable), "sparsegrad")
    assert os.path.isfile(script), "console script missing: run `pip install -e .`"
    proc = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for command in ("finetune", "calibrate", "merge", "inspect"):
        assert command in proc.stdout
    assert "Traceback" not in proc.stderr


# --------------------------------------------------------------------------------------------------------------------
# sparsegrad sft (causal LM on chat data), on a tiny random LLaMA with a tiny BPE tokenizer
# --------------------------------------------------------------------------------------------------------------------

SFT_TINY = ["--epochs", "2", "--batch-size", "8", "--max-seq-length", "64", "--calibration-steps", "2",
            "--max-new-tokens", "6", "--lr", "3e-2", "--no-progress"]


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory):
    from sft_helpers import chat_rows, save_tiny_model, write_jsonl

    root = tmp_path_factory.mktemp("chat")
    model = save_tiny_model(root / "tiny-llama", layers=4)
    return {"model": model, "train": write_jsonl(root / "train.jsonl", chat_rows(24)),
            "eval": write_jsonl(root / "eval.jsonl", chat_rows(6, 3)), "root": root}


@pytest.fixture(scope="module")
def sft_run(chat_data, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("sft") / "adapter"
    code, stdout, stderr = _run(["sft", "--model", chat_data["model"], "--train-file", chat_data["train"],
                                 "--eval-file", chat_data["eval"], "--method", "sparsegrad", *SFT_TINY,
                                 "--output-dir", out_dir])
    assert code == 0, stderr
    return out_dir, stdout


def test_sft_end_to_end(sft_run, chat_data):
    from transformers import AutoModelForCausalLM

    out_dir, stdout = sft_run
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "results.json"):
        assert (out_dir / name).is_file(), name
    r = json.loads((out_dir / "results.json").read_text())
    assert r["method"] == "sparsegrad" and r["layers"] == [0, 3] and r["train_samples"] == 24
    assert r["eval_loss_after"] < r["eval_loss_before"]
    assert 0 <= r["eval_token_accuracy_before"] <= 1 and 0 <= r["eval_token_accuracy_after"] <= 1
    assert r["train_time_s"] > 0 and r["trainable_params"] == 84 and r["stored_params"] > 0
    assert len(r["samples"]) == 3 and all(s["prompt"].startswith("What colour") for s in r["samples"])
    assert "Eval loss (assistant tokens):" in stdout and "Greedy generations" in stdout
    config = json.loads((out_dir / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM" and config["layers_to_transform"] == [0, 3]
    assert config["bases_dtype"] == "float16"
    base = config["base_model_name_or_path"]
    assert os.path.isabs(base)
    AutoModelForCausalLM.from_pretrained(base)  # the recorded base loads on this machine


def test_sft_inspect_and_merge_match_adapter_greedy_text(sft_run, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peft_sparsegrad import sft

    out_dir, _ = sft_run
    code, stdout, stderr = _run(["inspect", out_dir])
    assert code == 0, stderr
    assert "method: sparsegrad (peft_type SPARSEGRAD, task_type CAUSAL_LM)" in stdout
    assert "eval loss" in stdout and stdout.count("k 21/step, stored nnz") == 4

    merged_dir = tmp_path / "merged"
    code, stdout, stderr = _run(["merge", "--adapter", out_dir, "--output", merged_dir])
    assert code == 0, stderr
    assert f"Merged adapter {out_dir} (base: " in stdout and f") -> {merged_dir}" in stdout
    assert "(same as base + adapter)" in stdout
    adapter_model, _ = load_adapter(str(out_dir))
    tokenizer = AutoTokenizer.from_pretrained(str(out_dir))
    merged = AutoModelForCausalLM.from_pretrained(str(merged_dir)).eval()  # plain transformers
    prompts = [[{"role": "user", "content": f"What colour is the {x}?"}] for x in ("sky", "sun", "night")]
    assert sft.generate(merged, tokenizer, prompts, 8) == sft.generate(adapter_model, tokenizer, prompts, 8)
    probe = tokenizer(["What colour is the grass?"], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(merged(**probe).logits, adapter_model(**probe).logits, atol=1e-5, rtol=1e-5)


def test_sft_lora_and_full(chat_data, tmp_path):
    for method in ("lora", "full"):
        out_dir = tmp_path / method
        code, stdout, stderr = _run(["sft", "--model", chat_data["model"], "--train-file", chat_data["train"],
                                     "--method", method, *SFT_TINY, "--output-dir", out_dir])
        assert code == 0, stderr
        r = json.loads((out_dir / "results.json").read_text())
        assert r["eval_samples"] == 2 and r["train_samples"] == 22  # 10 % of --train-file held out
        assert r["eval_loss_after"] < r["eval_loss_before"]
        assert (out_dir / ("adapter_config.json" if method == "lora" else "config.json")).is_file()


def _sft_error_cases():
    base = ["sft", "--model", "{model}", "--output-dir", "{tmp}/out"]
    return {
        "missing train file": (base + ["--train-file", "{tmp}/none.jsonl"], "does not exist"),
        "missing eval file": (base + ["--train-file", "{train}", "--eval-file", "{tmp}/none.jsonl"], "does not exist"),
        "no usable columns": (base + ["--train-file", "{bad}"], "no usable rows"),
        "unknown method": (base + ["--train-file", "{train}", "--method", "adam"], "invalid choice"),
        "length too small": (base + ["--train-file", "{train}", "--eval-file", "{eval}", "--max-seq-length", "4"],
                             "no training example has an assistant token within --max-seq-length 4"),
        "bases with lora": (base + ["--train-file", "{train}", "--method", "lora", "--bases", "{train}"],
                            "--bases applies to --method sparsegrad only"),
        "model not a model dir": (["sft", "--model", "{tmp}", "--train-file", "{train}", "--output-dir", "{tmp}/out"],
                                  "is not a model directory"),
        "missing output dir": (["sft", "--train-file", "{train}"], "--output-dir"),
    }


@pytest.mark.parametrize("case", list(_sft_error_cases()))
def test_sft_errors_are_one_line_and_exit_2(case, chat_data, tmp_path):
    from sft_helpers import write_jsonl

    argv, expected = _sft_error_cases()[case]
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "a", "label": 0}])
    values = {"tmp": tmp_path, "model": chat_data["model"], "train": chat_data["train"], "eval": chat_data["eval"],
              "bad": bad}
    code, _, stderr = _run([a.format(**values) for a in argv])
    assert code == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("sparsegrad: error: ") and expected in lines[0], lines[0]
    assert not (tmp_path / "out").exists()


def test_finetune_without_data_dir_fails_fast_offline(tmp_path, monkeypatch):
    import time

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    code, _, stderr = _run(["finetune", "--task", "SST-2", "--output-dir", tmp_path / "out"])
    assert code == 2 and "not reachable" in stderr and "--data-dir" in stderr, stderr
    assert time.perf_counter() - start < 5  # no hub retries
    assert not (tmp_path / "out").exists()


def test_console_entry_parses_without_importing_torch():
    """`sparsegrad --help` and argument errors never import peft_sparsegrad (whose __init__ imports peft/torch)."""
    script = textwrap.dedent("""
        import contextlib, io, sys
        import sparsegrad_cli
        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            codes = [sparsegrad_cli.main(["--help"]), sparsegrad_cli.main(["sft", "--help"]),
                     sparsegrad_cli.main(["sft", "--train-file", "x", "--method", "adam", "--output-dir", "d"])]
        heavy = sorted(m for m in ("torch", "peft", "transformers", "peft_sparsegrad") if m in sys.modules)
        print(codes, heavy, "sparsegrad sft" in out.getvalue())
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[0, 0, 2] [] True"
