"""SparseGradConfig: what to adapt, how many rotated-gradient entries to keep, and where the bases come from."""

from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass, field, fields
from typing import Any, Iterable, Literal, Optional, Union

from peft.config import PeftConfig

from .registration import SPARSEGRAD
from .rounding import ROUNDINGS

#: Values of ``SparseGradConfig.bases`` that are not a path.
BASES_MODES = ("calibrate", "identity", "checkpoint")
#: Fields that exist only at run time and never reach ``adapter_config.json``.
RUNTIME_FIELDS = ("calibration_dataloader", "precomputed_bases")
SPARSE_OPTIMIZERS = ("adamw", "sparse_adam", "sgd")
SELECTIONS = ("dynamic", "periodic")
BASES_DTYPES = ("float16", "float32", "auto")
COMPUTE_DTYPES = ("auto", "float32", "bfloat16")


@dataclass
class SparseGradConfig(PeftConfig):
    """Configuration of a SparseGrad adapter (Chekalina et al., EMNLP 2024).

    Each targeted MLP weight W (out × in) is trained as W' = U_outᵀ W U_in, where U_out, U_in are the HOSVD bases of
    gradients collected in a short calibration pass; every optimizer step keeps only the k = ⌈keep_ratio·out·in⌉ entries
    of the rotated gradient with the largest magnitude. ``bases="identity"`` gives MeProp (U = I).
    """

    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={
            "help": "Names (suffixes) or a regex of the Linear/Conv1D layers to adapt. None: the MLP layers of the "
            "architecture (see peft_sparsegrad.targets.DEFAULT_TARGET_MODULES); attention is never a default."
        },
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Names (suffixes) or a regex of modules never to adapt."}
    )
    layers_to_transform: Optional[Union[list[int], int]] = field(
        default=None, metadata={"help": "Only adapt the blocks with these indices (needs list-style target_modules)."}
    )
    layers_pattern: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Name of the block list used with layers_to_transform, e.g. 'layer'."}
    )
    keep_ratio: float = field(
        default=0.01,
        metadata={"help": "Fraction of W' entries updated per optimizer step (top-k by |gradient|), in (0, 1]."},
    )
    bases: str = field(
        default="calibrate",
        metadata={
            "help": "'calibrate': compute U_out, U_in from calibration gradients (needs calibration_dataloader); "
            "'identity': U = I (MeProp, needs no data); a path to a bases file (save_bases) or a saved SparseGrad "
            "adapter directory: reuse those bases; 'checkpoint': the bases are in the adapter weights being loaded "
            "(written automatically by save_pretrained)."
        },
    )
    calibration_steps: int = field(
        default=30, metadata={"help": "Number of calibration batches (forward + backward, no optimizer step)."}
    )
    basis_method: Literal["gram", "tensorly"] = field(
        default="gram",
        metadata={
            "help": "'gram': streaming eigenvectors of sum G Gᵀ and sum Gᵀ G (memory O(out² + in²) per layer type); "
            "'tensorly': reference HOSVD of the explicitly stacked gradient tensor (memory steps·blocks·out·in)."
        },
    )
    gram_precision: Literal["fp32", "bf16"] = field(
        default="fp32",
        metadata={
            "help": "Arithmetic of basis_method='gram' (ignored by 'tensorly'). 'fp32': float32 products, float64 "
            "sums and eigendecomposition (most accurate, default). 'bf16': bfloat16 products of the lower triangle "
            "(several times faster on CPUs with AVX512-BF16/AMX and on GPU tensor cores), float32 sums and float32 "
            "eigendecomposition (half the memory), for large models such as LLaMA-2-7B."
        },
    )
    sparse_optimizer: Literal["adamw", "sparse_adam", "sgd"] = field(
        default="adamw",
        metadata={
            "help": "Update rule used for the sparse W' entries by SparseGradCallback / create_sparsegrad_optimizer: "
            "'adamw' (regular AdamW on the entries ever selected), 'sparse_adam' (the paper's lazy Adam, "
            "torch.optim.SparseAdam arithmetic, its moments kept on the same support), 'sgd'. All keep O(support) state."
        },
    )
    selection: Optional[Literal["dynamic", "periodic"]] = field(
        default=None,
        metadata={
            "help": "'periodic': the top-k support S is re-selected from the full rotated gradient every "
            "refresh_interval steps and fixed in between, when the step computes the rotated gradient only at those "
            "k entries and AdamW state is k values (the fastest and leanest; needs sparse_optimizer 'adamw' or "
            "'sgd'). 'dynamic' (the paper): every step keeps the top-k entries of the full rotated gradient. "
            "None (default): 'periodic', or 'dynamic' with sparse_optimizer='sparse_adam' (lazy Adam is plain Adam "
            "on a fixed support)."
        },
    )
    refresh_interval: int = field(
        default=100,
        metadata={"help": "selection='periodic' only: optimizer steps between two re-selections of the support."},
    )
    max_support: Optional[float] = field(
        default=2.0,
        metadata={
            "help": "Bound on ΔW''s support, in multiples of k: ΔW' (the adapter) holds at most ⌈max_support · k⌉ "
            "entries, so training state and adapter file stay bounded however long a run is (8 bytes per entry in "
            "the file). Selections take new entries while there is room; once the support is full they pick the "
            "top-k among its entries. None: unbounded (the paper's dynamic method: every step's new top-k entries "
            "join the support, which grows without bound). Must be >= 1."
        },
    )
    rounding: Literal["stochastic", "compensated"] = field(
        default="stochastic",
        metadata={
            "help": "How updates reach bf16/fp16 base weights W (ignored for float32 W). 'stochastic' (default): "
            "unbiased stochastic rounding of W + change, no memory besides W; W carries the rounding noise, which "
            "the adapter file (exact ΔW') does not. 'compensated': a residual of W's dtype keeps what rounding "
            "loses (W + residual has ~16 significant bits for bf16): exact to that precision, at 2 bytes per "
            "adapted weight. See peft_sparsegrad.rounding."
        },
    )
    bases_dtype: Literal["float16", "float32", "auto"] = field(
        default="float16",
        metadata={
            "help": "Storage precision of the bases U_out, U_in (the step computes in compute_dtype either way). 'float16' (default): half the memory of float32 (2 (out² + in²) bytes per layer "
            "type saved), orthogonal to ~6e-4 — far finer than the bases' own estimate from a few calibration batches; "
            "forward and backward are the plain layer's regardless, and the saved adapter holds exactly these values, "
            "so merging and loading reproduce the trained W. keep_ratio = 1 with SGD then matches full fine-tuning to "
            "~1e-3. 'float32': that match to float32 rounding, at twice the bases' memory. 'auto': float16 for "
            "bf16/fp16 weights, float32 otherwise (what earlier versions did)."
        },
    )
    compute_dtype: Literal["auto", "float32", "bfloat16"] = field(
        default="auto",
        metadata={
            "help": "Precision of the training step's dense products (the rotation U_outᵀ G U_in, its top-k, g[S] and "
            "the update U_out δ U_inᵀ); ΔW', its moments and the sparse products stay float32 either way. 'auto' "
            "(default): bfloat16 for bf16/fp16 weights on an accelerator (fast tensor-core GEMMs), float32 on CPU "
            "(where bf16 GEMMs convert their operands to float32 buffers, which raised the measured step peak by "
            "~0.8 B per adapted weight) and for float32 weights. 'float32' / 'bfloat16' force one."
        },
    )
    bias: Literal["none", "all", "sparsegrad_only"] = field(
        default="none",
        metadata={"help": "Which biases train (in the original basis): 'none', 'all', or 'sparsegrad_only'."},
    )
    init_weights: bool = field(
        default=True,
        metadata={"help": "Start ΔW' at zero (outputs equal the base model). False: small random ΔW', for tests only."},
    )
    modules_to_save: Optional[list[str]] = field(
        default=None,
        metadata={"help": "Extra modules trained densely and saved with the adapter, e.g. ['classifier']."},
    )
    layer_shapes: Optional[dict[str, list[int]]] = field(
        default=None,
        metadata={
            "help": "Filled in automatically: (out, in) of every layer type adapted. Saved with the adapter so that "
            "loading onto a base model with other shapes fails before the model is touched."
        },
    )
    calibration_dataloader: Optional[Iterable[Any]] = field(
        default=None,
        repr=False,
        compare=False,
        metadata={
            "help": "Iterable of batches the model accepts (with labels, so the output has a loss). Used only while "
            "get_peft_model calibrates; never written to adapter_config.json."
        },
    )
    precomputed_bases: Optional[Any] = field(
        default=None,
        repr=False,
        compare=False,
        metadata={"help": "A SparseGradBases object to use instead of calibrating (run time only)."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = SPARSEGRAD
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        if isinstance(self.keep_ratio, bool) or not isinstance(self.keep_ratio, (int, float)):
            raise TypeError(f"keep_ratio must be a number in (0, 1], got {self.keep_ratio!r}.")
        if not 0.0 < float(self.keep_ratio) <= 1.0:
            raise ValueError(f"keep_ratio must be in (0, 1], got {self.keep_ratio}. The paper uses 0.01.")
        if isinstance(self.calibration_steps, bool) or not isinstance(self.calibration_steps, int):
            raise TypeError(f"calibration_steps must be an int >= 1, got {self.calibration_steps!r}.")
        if self.calibration_steps < 1:
            raise ValueError(f"calibration_steps must be >= 1, got {self.calibration_steps}.")
        if not isinstance(self.bases, (str, os.PathLike)):
            raise TypeError(
                f"bases must be 'calibrate', 'identity', 'checkpoint' or a path, got {type(self.bases).__name__}; "
                "pass a SparseGradBases object as precomputed_bases=..."
            )
        self.bases = os.fspath(self.bases)
        if self.basis_method not in ("gram", "tensorly"):
            raise ValueError(f"basis_method must be 'gram' or 'tensorly', got {self.basis_method!r}.")
        if self.gram_precision not in ("fp32", "bf16"):
            raise ValueError(f"gram_precision must be 'fp32' or 'bf16', got {self.gram_precision!r}.")
        if self.sparse_optimizer not in SPARSE_OPTIMIZERS:
            raise ValueError(f"sparse_optimizer must be one of {SPARSE_OPTIMIZERS}, got {self.sparse_optimizer!r}.")
        if self.selection is None:
            self.selection = "dynamic" if self.sparse_optimizer == "sparse_adam" else "periodic"
        if self.selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {SELECTIONS}, got {self.selection!r}.")
        if isinstance(self.refresh_interval, bool) or not isinstance(self.refresh_interval, int):
            raise TypeError(f"refresh_interval must be an int >= 1, got {self.refresh_interval!r}.")
        if self.refresh_interval < 1:
            raise ValueError(f"refresh_interval must be >= 1, got {self.refresh_interval}.")
        if self.selection == "periodic" and self.sparse_optimizer == "sparse_adam":
            raise ValueError(
                "selection='periodic' fixes the support between refreshes, where lazy SparseAdam is plain Adam on the "
                "support: use sparse_optimizer='adamw' (O(k) state) or 'sgd' with it."
            )
        if self.max_support is not None:
            if isinstance(self.max_support, bool) or not isinstance(self.max_support, (int, float)):
                raise TypeError(f"max_support must be a number >= 1 or None, got {self.max_support!r}.")
            if not math.isfinite(self.max_support) or self.max_support < 1:
                raise ValueError(f"max_support must be >= 1 (in multiples of k) or None (unbounded), got "
                                 f"{self.max_support}.")
        if self.rounding not in ROUNDINGS:
            raise ValueError(f"rounding must be one of {ROUNDINGS}, got {self.rounding!r}.")
        if self.bases_dtype not in BASES_DTYPES:
            raise ValueError(f"bases_dtype must be one of {BASES_DTYPES}, got {self.bases_dtype!r}.")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"compute_dtype must be one of {COMPUTE_DTYPES}, got {self.compute_dtype!r}.")
        if self.bias not in ("none", "all", "sparsegrad_only"):
            raise ValueError(f"bias must be 'none', 'all' or 'sparsegrad_only', got {self.bias!r}.")
        if self.layers_to_transform is not None and isinstance(self.target_modules, str):
            raise ValueError("layers_to_transform cannot be used when target_modules is a regex string.")
        # "No data and no bases" is reported by get_peft_model, not here: PeftConfig.from_pretrained builds this class
        # from a saved adapter_config.json, which legitimately has no data.

    def selection_summary(self) -> str:
        """How the entries are chosen, in words (notes of the recipes and benchmarks)."""
        chosen = ("re-selected every step" if self.selection == "dynamic"
                  else f"support re-selected every {self.refresh_interval} steps")
        bound = "unbounded support" if self.max_support is None else f"support ≤ {self.max_support:g}·k"
        return f"{chosen}, {bound}"

    def to_dict(self) -> dict:
        """Serializable fields only. The dataloader is dropped before copying (a generator cannot be deep-copied), and
        a saved adapter always carries its bases, so the saved ``bases`` says where to find them."""
        out = {f.name: copy.deepcopy(getattr(self, f.name)) for f in fields(self) if f.name not in RUNTIME_FIELDS}
        if out["bases"] != "identity":
            out["bases"] = "checkpoint"
        return out
