"""HOSVD bases U_out, U_in per layer type: streaming Gram accumulation, the tensorly reference, and bases I/O.

For a layer type whose calibration gradients G_1..G_N (each out × in, N = steps · blocks) are stacked into a
N × out × in tensor, the HOSVD factor matrices of the two weight modes are the left singular vectors of its mode
unfoldings, i.e. the eigenvectors of

    Σ_n G_n G_nᵀ  (out × out)  -> U_out        Σ_n G_nᵀ G_n  (in × in)  -> U_in

sorted by decreasing eigenvalue. ``GramAccumulator`` sums these streaming, so calibration memory is O(out² + in²) per
type plus one gradient, never N · out · in (the paper's stated limitation). Products are formed in float32 (GEMM
speed); sums and the eigendecomposition are float64, because eigenvectors of nearly equal eigenvalues are unstable in
float32. ``tensorly_hosvd`` computes the same factors from the explicit stack and is kept as the reference.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file

BASES_FILE_FORMAT = "peft_sparsegrad.bases/1"
ADAPTER_BASES_PREFIX = "sparsegrad_bases."  # key prefix of the bases inside adapter_model.safetensors


@dataclass
class BasisPair:
    """Orthogonal bases of one layer type, float32. ``None`` stands for the identity (MeProp): no rotation at all.

    One object is shared by every layer of the type, so moving it to another device (``to``) moves it for all of them,
    and it is kept out of ``nn.Module`` buffers: DDP would otherwise re-broadcast it every forward and PEFT would cast
    it to a bf16/fp16 base model's dtype, which destroys orthogonality.
    """

    U_out: Optional[torch.Tensor]  # (out, out)
    U_in: Optional[torch.Tensor]  # (in, in)

    @property
    def is_identity(self) -> bool:
        return self.U_out is None

    def to(self, device: torch.device) -> "BasisPair":
        if self.U_out is not None and self.U_out.device != device:
            self.U_out = self.U_out.to(device)
            self.U_in = self.U_in.to(device)
        return self

    def rotate(self, grad: torch.Tensor) -> torch.Tensor:
        """U_outᵀ · grad · U_in: the gradient of W' from the gradient of W (both out × in)."""
        if self.is_identity:
            return grad
        return self.U_out.T @ grad @ self.U_in

    def rotate_from_activations(self, grad_out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """U_outᵀ (grad_outᵀ x) U_in computed as (grad_out U_out)ᵀ (x U_in), for tokens × out and tokens × in inputs.

        Costs tokens · (out² + in² + out · in) instead of tokens · out · in + out · in · (out + in): cheaper for
        short batches (``rotation_cost`` decides).
        """
        return (grad_out.float() @ self.U_out).T @ (x.float() @ self.U_in)

    def prefers_activations(self, tokens: int) -> bool:
        """Whether rotating the activations is cheaper than rotating the dense weight gradient."""
        if self.is_identity:
            return False
        n_out, n_in = self.U_out.shape[0], self.U_in.shape[0]
        return tokens * (n_out**2 + n_in**2) < n_out * n_in * (n_out + n_in)

    def unrotate(self, delta: torch.Tensor) -> torch.Tensor:
        """U_out · ΔW' · U_inᵀ: the change of W from the change of W'.

        ΔW' is sparse, and in the rotated basis its support concentrates on few rows R and columns C, so only
        U_out[:, R] · ΔW'[R, C] · U_in[:, C]ᵀ is formed (the paper's sparse-by-dense product); cost
        out · |R| · |C| + out · |C| · in instead of out · in · (out + in).
        """
        if self.is_identity:
            return delta
        rows = delta.any(dim=1).nonzero().squeeze(1)
        cols = delta.any(dim=0).nonzero().squeeze(1)
        n_out, n_in = delta.shape
        if rows.numel() == n_out and cols.numel() == n_in:
            return self.U_out @ delta @ self.U_in.T
        u_out, u_in, block = self.U_out[:, rows], self.U_in[:, cols], delta[rows][:, cols]
        if n_out * cols.numel() * (rows.numel() + n_in) <= n_in * rows.numel() * (cols.numel() + n_out):
            return (u_out @ block) @ u_in.T
        return u_out @ (block @ u_in.T)


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


class GramAccumulator:
    """Streaming Σ G Gᵀ and Σ Gᵀ G for one layer type (float64 sums)."""

    def __init__(self, out_features: int, in_features: int, device: torch.device | str = "cpu") -> None:
        self.gram_out = torch.zeros(out_features, out_features, dtype=torch.float64, device=device)
        self.gram_in = torch.zeros(in_features, in_features, dtype=torch.float64, device=device)
        self.count = 0

    @torch.no_grad()
    def add(self, grad: torch.Tensor) -> None:
        """Add one gradient G (out × in)."""
        g = grad.detach().to(device=self.gram_out.device, dtype=torch.float32)
        _add_gram(self.gram_out, g)  # Σ G Gᵀ
        _add_gram(self.gram_in, g.T)  # Σ Gᵀ G
        self.count += 1

    def all_reduce(self) -> None:
        """Sum over data-parallel ranks, so every rank computes identical bases."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            for t in (self.gram_out, self.gram_in):
                dist.all_reduce(t)

    def bases(self, device: torch.device | str | None = None) -> tuple[BasisPair, tuple[torch.Tensor, torch.Tensor]]:
        """Eigenvectors sorted by decreasing eigenvalue (float64 decomposition, float32 result)."""
        u_out, s_out = _sorted_eigh(self.gram_out if device is None else self.gram_out.to(device))
        u_in, s_in = _sorted_eigh(self.gram_in if device is None else self.gram_in.to(device))
        return BasisPair(u_out.float().contiguous(), u_in.float().contiguous()), (s_out, s_in)


_GRAM_BLOCK = 1024


def _add_gram(acc: torch.Tensor, g: torch.Tensor) -> None:
    """acc += g gᵀ in row blocks, so the float32 product and its float64 copy are block × n, not n × n (a full-size
    temporary of an 11008² Gram matrix would be 1.4 GiB)."""
    for start in range(0, g.shape[0], _GRAM_BLOCK):
        block = g[start:start + _GRAM_BLOCK]
        acc[start:start + _GRAM_BLOCK] += (block @ g.T).double()


def _sorted_eigh(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    eigenvalues, eigenvectors = torch.linalg.eigh(gram)
    return eigenvectors.flip(-1), eigenvalues.flip(-1)


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
