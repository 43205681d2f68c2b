"""HOSVD bases U_out, U_in per layer type: streaming Gram accumulation, the tensorly reference, and bases I/O.

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
import warnings
import weakref
from dataclasses import dataclass, field
from typing import ClassVar, Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file

BASES_FILE_FORMAT = "peft_sparsegrad.bases/1"
ADAPTER_BASES_PREFIX = "sparsegrad_bases."  # key prefix of the bases inside adapter_model.safetensors


@dataclass
class BasisPair:
    """Orthogonal bases of one layer type. ``None`` stands for the identity (MeProp): no rotation at all.

    Stored in float32, or in float16 (by default for layers with bf16/fp16 weights, ``stored_as``: half the memory,
    still orthogonal to ~6e-4, ten times finer than a bf16 weight's own precision; bfloat16 would be ~5e-3). The
    products always run in float32 or the compute dtype (``cast``). One object is shared by every layer of the type, so moving
    it to another device (``to``) moves it for all of them, and it is kept out of ``nn.Module`` buffers: DDP would
    otherwise re-broadcast it every forward and PEFT would cast it to a bf16 base model's dtype.
    """

    U_out: Optional[torch.Tensor]  # (out, out), stored column-major
    U_in: Optional[torch.Tensor]  # (in, in), stored column-major

    #: ``unrotate_sparse`` gathers the columns of U that δ occupies only while they are fewer than this share of all:
    #: above it, copying them costs more than the zero rows they save in the GEMM (measured on CPU).
    GATHER_BELOW: ClassVar[float] = 0.75

    def __post_init__(self) -> None:
        # Column-major storage (Uᵀ contiguous): the sparse products read columns of U (rows of Uᵀ), which is ~20× faster
        # on contiguous memory; dense GEMMs take either layout at the same speed.
        self.U_out, self.U_in = _column_major(self.U_out), _column_major(self.U_in)

    @property
    def is_identity(self) -> bool:
        return self.U_out is None

    def to(self, device: torch.device) -> "BasisPair":
        if self.U_out is not None and self.U_out.device != device:
            self.U_out = self.U_out.to(device)
            self.U_in = self.U_in.to(device)
            self._cast = {}
        return self

    def stored_as(self, dtype: torch.dtype) -> "BasisPair":
        """This pair stored in ``dtype`` (float16 for half-precision layers, see ``SparseGradConfig.bases_dtype``);
        one object per source pair, dtype and device, so the layers of a type keep sharing their bases."""
        if self.is_identity or self.U_out.dtype == dtype:
            return self
        stored = self.__dict__.setdefault("_stored", {})
        other = stored.get(dtype)
        if other is None or other.U_out.device != self.U_out.device:
            other = stored[dtype] = BasisPair(self.U_out.to(dtype), self.U_in.to(dtype))
        return other

    def exact_in(self, dtype: torch.dtype) -> bool:
        """Whether storing this pair in ``dtype`` loses nothing (a loaded adapter's bases must stay what it trained with)."""
        if self.is_identity:
            return True
        return all(torch.equal(u.to(dtype).to(u.dtype), u) for u in (self.U_out, self.U_in))

    def float32(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(U_out, U_in) in float32, not cached (merges, unmerges: outside the training step)."""
        return self.U_out.float(), self.U_in.float()

    def cast(self, dtype: Optional[torch.dtype]) -> tuple[torch.Tensor, torch.Tensor]:
        """(U_out, U_in) in ``dtype`` (float32 if None), cached until ``release_cast``: a bf16 model's training step
        runs its GEMMs at its precision (bf16 GEMMs are several times faster; the gradient is bf16 anyway) and its
        sparse products in float32 from the float16 storage. The optimizer releases the copies after each step, so
        all layers of a type share one cast per step and no copy stays alive between steps."""
        dtype = dtype or torch.float32
        if self.U_out.dtype == dtype:
            return self.U_out, self.U_in
        cache = self.__dict__.setdefault("_cast", {})
        if dtype not in cache or cache[dtype][0].device != self.U_out.device:
            cache[dtype] = (_column_major(self.U_out.to(dtype)), _column_major(self.U_in.to(dtype)))
        return cache[dtype]

    def release_cast(self) -> None:
        self.__dict__.pop("_cast", None)

    def rotate(self, grad: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """U_outᵀ · grad · U_in: the gradient of W' from the gradient of W (both out × in), computed in ``dtype``
        (default float32) and returned in it."""
        if self.is_identity:
            return grad if dtype is None else grad.to(dtype)
        u_out, u_in = self.cast(dtype)
        return u_out.T @ grad.to(u_out.dtype) @ u_in

    def rotate_at(self, grad: torch.Tensor, support: "Support", dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """(U_outᵀ · grad · U_in)[S] for the k entries S of ``support`` (float32, in the order of ``support.flat``).

        Only the rows R and columns C that S occupies matter: the cheaper side is rotated densely against U[:, C] (or
        U[:, R]) and the other is sampled at S (``torch.sparse.sampled_addmm``): cost out · in · min(|R|, |C|) + k · max(out,
        in) instead of out · in · (out + in) for the full rotation; rotated gradients concentrate on leading basis
        vectors, so |R|, |C| are often far below out, in. The gathered columns of U are kept on ``support`` for the
        ``unrotate_at`` of the same step.
        """
        if self.is_identity:
            return grad.reshape(-1).index_select(0, support.flat).float()
        u_out, u_in = self.cast(dtype)
        f_out, f_in = self.cast(torch.float32)
        grad = grad.to(u_out.dtype)
        support.factors = None
        if not support.use_block():
            # S spreads over most rows and columns: no gathers, sample the full-size product (the sparse unrotation
            # of ``unrotate_at`` follows); cost out · in · min(out, in) + k · max(out, in)
            n_out, n_in = grad.shape
            if n_in <= n_out:  # (U_outᵀ · (G U_in))[S]
                mat1, mat2 = f_out.T, (u_in.T @ grad.T).float().T  # G U_in column-major
            else:  # ((U_outᵀ G) · U_in)[S]
                mat1, mat2 = (u_out.T @ grad).float(), f_in
            return torch.sparse.sampled_addmm(support.pattern(), mat1, mat2, beta=0.0).values()
        rows, cols, pattern = support.block()
        # the dense product in ``dtype``; the sampling (k · max(out, in)) in float32, all sampled_addmm supports.
        # sampled_addmm takes dot products of rows of mat1 with columns of mat2: mat1 row-major, mat2 column-major
        # (~1.8× faster on CPU than a row-major mat2)
        if cols.numel() <= rows.numel():  # (U_out[:, R]ᵀ · (G U_in[:, C]))[S]
            u_in_c, u_out_r_t = u_in[:, cols], f_out.T[rows]  # (in, |C|) in dtype, (|R|, out) float32
            support.factors = (u_in_c, u_out_r_t)
            mat1, mat2 = u_out_r_t, (u_in_c.T @ grad.T).float().T  # G U_in[:, C], column-major
        else:  # ((U_out[:, R]ᵀ G) · U_in[:, C])[S]
            u_out_r, u_in_c = u_out[:, rows], f_in.T[cols].T  # (out, |R|) in dtype, (in, |C|) float32
            support.factors = (u_out_r, u_in_c)
            mat1, mat2 = (u_out_r.T @ grad).float(), u_in_c
        return torch.sparse.sampled_addmm(pattern, mat1, mat2, beta=0.0).values()

    def unrotate_at(self, values: torch.Tensor, support: "Support", dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """U_out · δ · U_inᵀ (dense out × in, in ``dtype``) for δ = ``values`` on ``support`` (in its order), reusing the
        columns of U that ``rotate_at`` gathered for it this step: cost out · |R| · |C| + out · in · min(|R|, |C|)."""
        if self.is_identity or getattr(support, "factors", None) is None:
            return self.unrotate_sparse(support.flat, values, support.shape, dtype)
        rows, cols, pattern = support.block()
        row_pos = torch.repeat_interleave(torch.arange(rows.numel(), device=values.device),
                                          pattern.crow_indices().diff().long())
        # δ as a dense |R| × |C| block: dense GEMMs beat CPU sparse × dense kernels at these densities
        block = torch.zeros(rows.numel(), cols.numel(), dtype=torch.float32, device=values.device)
        block[row_pos, pattern.col_indices().long()] = values.float()
        if cols.numel() <= rows.numel():
            u_in_c, u_out_r_t = support.factors
            n_mat = u_out_r_t.T.to(u_in_c.dtype) @ block.to(u_in_c.dtype)  # U_out[:, R] δ_block: out × |C|
            change = n_mat @ u_in_c.T
        else:
            u_out_r, u_in_c = support.factors
            m_mat = block.to(u_out_r.dtype) @ u_in_c.T.to(u_out_r.dtype)  # δ_block U_in[:, C]ᵀ: |R| × in
            change = u_out_r @ m_mat
        support.factors = None  # one step's scratch
        return change  # in the compute dtype: the weight update adds it in float32

    def unrotate_sparse(self, flat: torch.Tensor, values: torch.Tensor, shape: tuple[int, int],
                        dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """U_out · δ · U_inᵀ (dense out × in, in ``dtype``, default float32) for a δ with ``values`` at the unique
        flat indices ``flat``; the weight update adds it in float32.

        The sparse side is a sparse × dense product (cost |δ| · max(out, in)); the dense side then touches only the
        rows R or the columns C that δ occupies, whichever are fewer: cost out · in · min(|R|, |C|) (the paper's
        sparse-by-dense product), against out · in · (out + in) for a dense δ. This is what keeps
        W = W₀ + U_out ΔW' U_inᵀ current after a step that changed k entries.
        """
        n_out, n_in = shape
        values = values.float()
        flat = flat.long()
        if self.is_identity:
            dense = torch.zeros(n_out * n_in, dtype=torch.float32, device=values.device)
            return dense.index_copy_(0, flat, values).view(n_out, n_in).to(dtype or torch.float32)
        rows, cols = flat.div(n_in, rounding_mode="floor"), flat.remainder(n_in)
        used_rows = torch.unique_consecutive(rows)  # flat is sorted, so rows are
        col_used = torch.bincount(cols, minlength=n_in) > 0
        u_out, u_in = self.cast(dtype)
        f_out, f_in = self.cast(torch.float32)  # the sparse × dense products run in float32 (faster on CPU)
        if int(col_used.sum()) <= used_rows.numel():
            # N = δᵀ U_outᵀ = (U_out δ)ᵀ (in × out): non-zero rows only at C; ΔW = N[C]ᵀ U_in[:, C]ᵀ
            delta_t = torch.sparse_coo_tensor(torch.stack([cols, rows]), values, (n_in, n_out), check_invariants=False)
            n_mat = torch.sparse.mm(delta_t, f_out.T)
            used_cols = col_used.nonzero().squeeze(1)
            if used_cols.numel() < self.GATHER_BELOW * n_in:
                n_mat, u_in = n_mat[used_cols], u_in[:, used_cols]
            return n_mat.T.to(u_in.dtype) @ u_in.T
        # M = δ U_inᵀ (out × in): non-zero rows only at R; ΔW = U_out[:, R] M[R]
        delta = torch.sparse_coo_tensor(torch.stack([rows, cols]), values, (n_out, n_in), check_invariants=False,
                                        is_coalesced=True)  # sorted unique flat indices: coalesced
        m_mat = torch.sparse.mm(delta, f_in.T)
        if used_rows.numel() < self.GATHER_BELOW * n_out:
            m_mat, u_out = m_mat[used_rows], u_out[:, used_rows]
        return u_out @ m_mat.to(u_out.dtype)

    def unrotate(self, delta: torch.Tensor) -> torch.Tensor:
        """U_out · ΔW' · U_inᵀ for a dense ΔW' (out × in): the change of W from the change of W'.

        Only the rows R and columns C where ΔW' is non-zero are used (see ``unrotate_sparse``).
        """
        if self.is_identity:
            return delta.float()
        delta = delta.float()
        rows = delta.any(dim=1).nonzero().squeeze(1)
        cols = delta.any(dim=0).nonzero().squeeze(1)
        if rows.numel() == delta.shape[0] and cols.numel() == delta.shape[1]:
            u_out, u_in = self.float32()
            return u_out @ delta @ u_in.T
        return self._unrotate_block(rows, cols, delta[rows][:, cols])

    def _unrotate_block(self, rows: torch.Tensor, cols: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
        """U_out[:, R] · block · U_in[:, C]ᵀ, in the cheaper order."""
        n_out, n_in = self.U_out.shape[0], self.U_in.shape[0]
        u_out, u_in = self.U_out[:, rows].float(), self.U_in[:, cols].float()
        n_r, n_c = rows.numel(), cols.numel()
        if n_out * n_c * (n_r + n_in) <= n_in * n_r * (n_c + n_out):
            return (u_out @ block) @ u_in.T
        return u_out @ (block @ u_in.T)


def _column_major(u: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    if u is None or u.dim() != 2 or u.mT.is_contiguous():
        return u
    return u.mT.contiguous().mT


@dataclass
class Support:
    """A fixed set of k entries of an out × in matrix: sorted flat indices, plus the block pattern rotations need.

    ``selection="periodic"`` keeps ΔW' training on one Support between refreshes; the optimizer computes the rotated
    gradient only there (``BasisPair.rotate_at``). ``selected_at`` is the optimizer step that chose it.
    """

    flat: torch.Tensor  # (k,) int32 or int64, sorted ascending, unique
    shape: tuple[int, int]  # (out, in)
    selected_at: int
    _block: Optional[tuple[torch.Tensor, ...]] = field(default=None, repr=False)
    _full: Optional[tuple[torch.Tensor, torch.Tensor]] = field(default=None, repr=False)
    _use_block: Optional[bool] = field(default=None, repr=False)
    factors: Optional[tuple[torch.Tensor, torch.Tensor]] = field(default=None, repr=False)  # rotate_at -> unrotate_at
    #: weak reference to the ΔW' index vector S was last merged into (the optimizer skips re-checking it until then)
    merged_into: Optional[weakref.ref] = field(default=None, repr=False)

    #: Block products (gathered columns of U, dense |R| × |C| δ) pay off while S fills at least 1/BLOCK_FILL of the
    #: |R| × |C| block; sparser, the full-size sampling and the sparse × dense unrotation are cheaper (measured on CPU).
    BLOCK_FILL = 32

    def use_block(self) -> bool:
        """Whether the block products are the cheaper route for S (decided once; the block pattern, 4 bytes per
        entry, is only built for a support that uses it)."""
        if self._use_block is None:
            n_in = self.shape[1]
            n_rows = torch.unique_consecutive(self.flat.div(n_in, rounding_mode="floor")).numel()  # flat is sorted
            n_cols = int((torch.bincount(self.flat.remainder(n_in).long(), minlength=n_in) > 0).sum())
            self._use_block = n_rows * n_cols <= self.BLOCK_FILL * self.flat.numel()
        return self._use_block

    def pattern(self) -> torch.Tensor:
        """S as a float32 CSR pattern of the full out × in matrix (int32 indices kept; values made per call)."""
        if self._full is None or self._full[0].device != self.flat.device:
            n_out, n_in = self.shape
            crow = torch.zeros(n_out + 1, dtype=torch.int32, device=self.flat.device)
            crow[1:] = torch.bincount(self.flat.div(n_in, rounding_mode="floor").long(), minlength=n_out).cumsum(0)
            self._full = (crow, self.flat.remainder(n_in).to(torch.int32))
        crow, col = self._full
        values = torch.zeros(col.numel(), dtype=torch.float32, device=col.device)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return torch.sparse_csr_tensor(crow, col, values, size=self.shape, check_invariants=False)

    def block(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(R, C, pattern): the rows and columns S occupies (sorted) and S as a float32 CSR pattern of the |R| × |C|
        block (zero values; the mask of ``torch.sparse.sampled_addmm``). Row-major CSR order = the order of ``flat``.

        Only the int32 row pointers and column indices are kept between refreshes (4 bytes per entry); the pattern's
        values are a new zero vector per call."""
        if self._block is None or self._block[0].device != self.flat.device:
            n_in = self.shape[1]
            rows, row_pos = torch.unique(self.flat.div(n_in, rounding_mode="floor"), return_inverse=True)
            cols, col_pos = torch.unique(self.flat.remainder(n_in), return_inverse=True)
            crow = torch.zeros(rows.numel() + 1, dtype=torch.int32, device=self.flat.device)
            crow[1:] = torch.bincount(row_pos, minlength=rows.numel()).cumsum(0)
            self._block = (rows, cols, crow, col_pos.to(torch.int32))
        rows, cols, crow, col = self._block
        values = torch.zeros(col.numel(), dtype=torch.float32, device=col.device)
        with warnings.catch_warnings():  # "CSR support is in beta": sampled_addmm on CSR is what we need
            warnings.simplefilter("ignore", UserWarning)
            pattern = torch.sparse_csr_tensor(crow, col, values, size=(rows.numel(), cols.numel()),
                                              check_invariants=False)
        return rows, cols, pattern


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
