"""HOSVD bases U_out, U_in per layer type: streaming Gram accumulation, the tensorly reference, and bases I/O (the
products with the bases are in ``peft_sparsegrad.rotation``).

For a layer type whose calibration gradients G_1..G_N (each out × in, N = steps · blocks) are stacked into a
N × out × in tensor, the HOSVD factor matrices of the two weight modes are the left singular vectors of its mode
unfoldings, i.e. the eigenvectors of

    Σ_n G_n G_nᵀ  (out × out)  -> U_out        Σ_n G_nᵀ G_n  (in × in)  -> U_in

sorted by decreasing eigenvalue. ``GramAccumulator`` sums these streaming, so calibration memory is O(out² + in²) per
type plus one gradient, never N · out · in (the paper's stated limitation). ``tensorly_hosvd`` computes the same
factors from the explicit stack and is kept as the reference.

Two precisions (``SparseGradConfig.gram_precision``):

Both precisions form only the lower triangle of each Gram matrix (all that ``eigh`` reads): half the products.

* ``"fp32"`` (default): products in float32 (GEMM speed); sums and the eigendecomposition in float64, because
  eigenvectors of nearly equal eigenvalues are unstable in float32.
* ``"bf16"``: for large models, where the products and the out × out eigendecomposition dominate (LLaMA-2-7B: out =
  11008). Each gradient is cast to bfloat16 once; only the lower triangle of each Gram matrix (all that ``eigh``
  reads) is formed, in bfloat16 products (AVX512-BF16/AMX CPUs and GPU tensor cores; a CPU matmul cannot return
  float32 from bfloat16 inputs, so each product block is rounded to bfloat16 once) summed in float32; ``eigh`` runs in
  float32. Measured on 2 CPU cores (AVX512-BF16) at LLaMA-2-7B's (11008, 4096): one gradient adds in 1.0 s instead of
  ~7 s, eigh(11008) takes 77 s instead of 150-240 s (float64, extrapolated), the Gram matrices take half the memory,
  so 30 gradients of one layer type cost 111 s and 1.9 GiB. The cost is accuracy where eigenvectors are weakly
  determined (nearly equal eigenvalues), which hardly matters for concentrating gradients: on MiniLM/SST-2 the leading
  eigenvectors agree with the fp32 path to |cos| ≥ 0.999999 and the held-out gradient energy the top 1 % of rotated
  entries hold changes by -2e-5 and -3e-5 (of 0.923 and 0.873). See README, "Speed and memory", and
  ``benchmarks/gram_precision_quality.py``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .rotation import BasisPair, Support, _column_major  # noqa: F401  (BasisPair and Support are used via this module)

BASES_FILE_FORMAT = "peft_sparsegrad.bases/1"
ADAPTER_BASES_PREFIX = "sparsegrad_bases."  # key prefix of the bases inside adapter_model.safetensors


@dataclass
class SparseGradBases:
    """Bases for every layer type of a model, plus which modules belong to each type (for checks and inspection)."""

    pairs: dict[str, BasisPair]
    members: dict[str, list[str]] = field(default_factory=dict)
    eigenvalues: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict, repr=False)

    def shape(self, layer_type: str) -> tuple[int, int]:
        pair = self.pairs[layer_type]
        return (pair.U_out.shape[0], pair.U_in.shape[0])

    def check_compatible(self, layer_types: dict[str, str], shapes: dict[str, tuple[int, int]]) -> None:
        """Raise ValueError unless every targeted module's type has bases of the module's shape."""
        for name, layer_type in layer_types.items():
            if layer_type not in self.pairs:
                raise ValueError(
                    f"The given bases have no entry for layer type '{layer_type}' (module '{name}'); they cover "
                    f"{sorted(self.pairs)}. Calibrate on this model or pass target_modules matching those bases."
                )
            pair = self.pairs[layer_type]
            if pair.is_identity:
                continue
            if self.shape(layer_type) != shapes[name]:
                raise ValueError(
                    f"Bases for '{layer_type}' are {self.shape(layer_type)} (out, in) but module '{name}' has weight "
                    f"shape {shapes[name]}: the bases were computed for another model."
                )


#: Values of ``SparseGradConfig.gram_precision``: (product dtype, sum and eigh dtype).
GRAM_PRECISIONS = {"fp32": (torch.float32, torch.float64), "bf16": (torch.bfloat16, torch.float32)}


class GramAccumulator:
    """Streaming Σ G Gᵀ and Σ Gᵀ G for one layer type; ``precision`` as in the module docstring."""

    def __init__(self, out_features: int, in_features: int, device: torch.device | str = "cpu",
                 precision: str = "fp32") -> None:
        if precision not in GRAM_PRECISIONS:
            raise ValueError(f"Gram precision must be one of {tuple(GRAM_PRECISIONS)}, got {precision!r}.")
        self.precision = precision
        self.product_dtype, sum_dtype = GRAM_PRECISIONS[precision]
        self.gram_out = torch.zeros(out_features, out_features, dtype=sum_dtype, device=device)
        self.gram_in = torch.zeros(in_features, in_features, dtype=sum_dtype, device=device)
        self.count = 0

    @torch.no_grad()
    def add(self, grad: torch.Tensor) -> None:
        """Add one gradient G (out × in)."""
        g = grad.detach().to(device=self.gram_out.device, dtype=self.product_dtype)
        _add_gram_lower(self.gram_out, g)  # Σ G Gᵀ
        _add_gram_lower(self.gram_in, g.T)  # Σ Gᵀ G
        self.count += 1

    def all_reduce(self) -> None:
        """Sum over data-parallel ranks, so every rank computes identical bases (float64 or float32 sums alike)."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            for t in (self.gram_out, self.gram_in):
                dist.all_reduce(t)

    def bases(self, device: torch.device | str | None = None) -> tuple[BasisPair, tuple[torch.Tensor, torch.Tensor]]:
        """Eigenvectors sorted by decreasing eigenvalue (float64 or, for "bf16", float32 decomposition; float32
        result)."""
        u_out, s_out = eigenbasis(self.gram_out if device is None else self.gram_out.to(device))
        u_in, s_in = eigenbasis(self.gram_in if device is None else self.gram_in.to(device))
        return BasisPair(u_out, u_in), (s_out, s_in)


_GRAM_BLOCK = 1024


def _add_gram_lower(acc: torch.Tensor, g: torch.Tensor) -> None:
    """Lower triangle of acc += g gᵀ, in row blocks (row block i needs columns ≤ i only; ``eigh`` reads nothing above
    the diagonal): half the products of a full g gᵀ, and temporaries of block × n, not n × n (a full-size temporary of
    an 11008² Gram matrix would be 0.45 GiB in float32). The block product is added to the (float64 or float32) sum
    in place, without a converted copy."""
    for start in range(0, g.shape[0], _GRAM_BLOCK):
        stop = min(start + _GRAM_BLOCK, g.shape[0])
        acc[start:stop, :stop] += g[start:stop] @ g[:stop].T


def _sorted_eigh(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvectors and eigenvalues in decreasing order; only the lower triangle of ``gram`` is read."""
    eigenvalues, eigenvectors = torch.linalg.eigh(gram, UPLO="L")
    return eigenvectors.flip(-1), eigenvalues.flip(-1)


def eigenbasis(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One side of ``GramAccumulator.bases()``: float32 eigenvectors of a Gram matrix (in its dtype's ``eigh``), sorted
    by decreasing eigenvalue, column-major as ``BasisPair`` stores them, and the eigenvalues. ``eigh`` already returns
    that layout, so there is no n × n copy beyond the reordering (11008²: 0.45 GiB in float32). Public so benchmarks
    time exactly this."""
    u, s = _sorted_eigh(gram)
    return _column_major(u.float()), s


def tensorly_hosvd(grads: list[torch.Tensor]) -> tuple[BasisPair, tuple[torch.Tensor, torch.Tensor]]:
    """Reference: HOSVD factors of the explicitly stacked N × out × in gradient tensor, via tensorly.

    Memory N · out · in; use it to check the streaming path, not for large models.
    """
    import numpy as np
    import tensorly as tl

    stacked = np.stack([g.detach().double().cpu().numpy() for g in grads])  # (N, out, in)
    factors, singular_values = [], []
    with tl.backend_context("numpy"):
        for mode in (1, 2):
            unfolded = tl.unfold(stacked, mode)
            u, s, _ = tl.svd_interface(unfolded, n_eigenvecs=unfolded.shape[0], flip_sign=False)
            factors.append(torch.from_numpy(np.ascontiguousarray(u)).float())
            # eigenvalues of the Gram matrix are the squared singular values of the unfolding
            singular_values.append(torch.from_numpy(np.asarray(s) ** 2))
    return BasisPair(factors[0], factors[1]), (singular_values[0], singular_values[1])


def save_bases(bases: SparseGradBases, path: str | os.PathLike) -> None:
    """Write bases to a safetensors file that ``SparseGradConfig(bases=path)`` and ``sparsegrad finetune`` reuse."""
    tensors = {}
    for layer_type, pair in bases.pairs.items():
        if pair.is_identity:
            raise ValueError("Identity bases need no file: use SparseGradConfig(bases='identity').")
        tensors[f"{layer_type}.U_out"] = pair.U_out.detach().float().cpu().contiguous()
        tensors[f"{layer_type}.U_in"] = pair.U_in.detach().float().cpu().contiguous()
    metadata = {"format": BASES_FILE_FORMAT, "members": json.dumps(bases.members), "types": json.dumps(list(bases.pairs))}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_file(tensors, os.fspath(path), metadata=metadata)


def load_bases(path: str | os.PathLike) -> SparseGradBases:
    """Read bases from a file written by ``save_bases`` or from a saved SparseGrad adapter directory."""
    path = os.fspath(path)
    if os.path.isdir(path):
        weights = os.path.join(path, "adapter_model.safetensors")
        if not os.path.isfile(weights):
            raise ValueError(f"'{path}' is a directory without adapter_model.safetensors: not a saved adapter.")
        return _bases_from_adapter_file(weights)
    if not os.path.isfile(path):
        raise ValueError(f"Bases file '{path}' does not exist. Write one with peft_sparsegrad.save_bases or "
                         "`sparsegrad calibrate`.")
    with safe_open(path, framework="pt") as f:
        metadata = f.metadata() or {}
        if metadata.get("format") != BASES_FILE_FORMAT:
            raise ValueError(f"'{path}' is not a SparseGrad bases file (missing format tag {BASES_FILE_FORMAT!r}).")
        pairs = {t: BasisPair(f.get_tensor(f"{t}.U_out"), f.get_tensor(f"{t}.U_in"))
                 for t in json.loads(metadata["types"])}
    return SparseGradBases(pairs, json.loads(metadata.get("members", "{}")))


def _bases_from_adapter_file(weights: str) -> SparseGradBases:
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    with safe_open(weights, framework="pt") as f:
        for key in f.keys():
            layer_type, name = split_bases_key(key)
            if layer_type is not None:
                tensors.setdefault(layer_type, {})[name] = f.get_tensor(key)
    if not tensors:
        raise ValueError(f"'{weights}' holds no SparseGrad bases (an identity/MeProp adapter has none).")
    return SparseGradBases({t: BasisPair(d["U_out"], d["U_in"]) for t, d in tensors.items()})


def bases_key(layer_type: str, name: str, prefix: str = "") -> str:
    """Key of one basis matrix in adapter_model.safetensors."""
    return f"{prefix}{ADAPTER_BASES_PREFIX}{layer_type}.{name}"


def split_bases_key(key: str) -> tuple[Optional[str], Optional[str]]:
    """Inverse of ``bases_key``: (layer_type, 'U_out' | 'U_in'), or (None, None) for other keys."""
    head, sep, rest = key.partition(ADAPTER_BASES_PREFIX)
    if not sep or head not in ("", "base_model.model."):
        return None, None
    layer_type, _, name = rest.rpartition(".")
    if name not in ("U_out", "U_in"):
        return None, None
    return layer_type, name
