"""The products of the rotated basis: g = U_outᵀ G U_in, its top-k, g[S], and U_out δ U_inᵀ — never a dense copy too many.

A training step of one adapted weight W (out × in) needs three products with its layer type's bases U_out, U_in:

* the rotated gradient g = U_outᵀ G U_in and its k largest entries by |g| (dynamic selection, periodic refresh):
  ``BasisPair.rotate_topk``;
* g only on a fixed support S of k entries (periodic selection between refreshes): ``BasisPair.rotate_at``;
* the change of W for a sparse change δ of W' (the update): ΔW = U_out δ U_inᵀ, produced in row or column blocks that
  the layer adds to W one at a time: ``BasisPair.unrotated_blocks``.

Peak memory is what these products are written for. The bases are stored once per layer type (float16 by default) and
are never cast whole and cached: a cast of U_out of an up_proj is larger than the weight it serves. Only the *smaller*
basis of a layer (min(out, in)² entries) is cast whole for a product; the larger one is read in column blocks. The top-k
is taken block by block as the rotated gradient is produced (a running candidate set of ≤ 4k entries), so g itself never
exists: besides G (overwritten in place when the caller owns it) a full rotation holds blocks of ``BLOCK_ELEMENTS``.
The update is likewise a stream of blocks of ΔW, so no dense out × in change is ever materialised.

Products run in the *compute dtype* (``SparseGradConfig.compute_dtype``: by default bfloat16 for half-precision weights
on accelerators, float32 on CPU and for float32 weights); the sparse sides (``torch.sparse.sampled_addmm``, sparse × dense) run in float32.
"""

from __future__ import annotations

import warnings
import weakref
from dataclasses import dataclass, field
from typing import Iterator, Optional

import numpy as np
import torch

#: Elements per block of a streamed product on CPU (float32 blocks of 512 KiB stay in cache); on GPUs one block is
#: far larger, as kernel launches, not cache, set the cost there.
BLOCK_ELEMENTS = {"cpu": 1 << 17, "default": 1 << 24}
#: δ is handled as a dense |R| × |C| block while it fills at least 1/DENSE_FILL of it, else as a sparse matrix.
DENSE_FILL = 32


def block_rows(n_rows: int, row_len: int, device: torch.device) -> int:
    """Rows per block so that a block holds about ``BLOCK_ELEMENTS`` elements."""
    elements = BLOCK_ELEMENTS["cpu"] if device.type == "cpu" else BLOCK_ELEMENTS["default"]
    return max(1, min(n_rows, elements // max(1, row_len)))


def bucket(m: int, n: int) -> int:
    """The smallest size ≥ m on a geometric grid (multiples of 16, ratio ~1.25); n once that reaches 90 % of n.

    Gathered row/column counts |R|, |C| of a support change with every selection; GEMMs of ever new shapes make
    CPU libraries (oneDNN) compile and cache a kernel per shape, memory that grows for the whole run. Padding the
    gathers to this grid (≤ 25 % more columns, most often far less) keeps the set of shapes small, and a gather of
    nearly everything becomes a plain view of the whole basis."""
    size = 16
    while size < m:
        size = max(size + 16, (int(size * 1.25) + 15) // 16 * 16)
    return n if size >= 0.9 * n else size


def gather_index(index: torch.Tensor, n: int) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``index`` (sorted, unique, int64) widened to ``bucket(len, n)`` entries: followed by the smallest indices of
    range(n) it lacks, or all of range(n). Returns (widened index, remap): positions p into ``index`` become
    ``remap[p]`` in the widened one (None: unchanged)."""
    target = bucket(index.numel(), n)
    if target >= n:
        return torch.arange(n, device=index.device), index
    if target <= index.numel():
        return index, None
    free = torch.ones(n, dtype=torch.bool, device=index.device)
    free[index] = False
    return torch.cat([index, free.nonzero().squeeze(1)[:target - index.numel()]]), None


def rows_of(u_t: torch.Tensor, index: torch.Tensor, start: int = 0, stop: Optional[int] = None) -> torch.Tensor:
    """Rows ``index[start:stop]`` of Uᵀ (= columns of U): a view where the index is all rows in order."""
    if index.numel() == u_t.shape[0]:  # gather_index's arange
        return u_t[start:stop]
    return u_t[index[start:stop]]


def _column_major(u: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    if u is None or u.dim() != 2 or u.mT.is_contiguous():
        return u
    return u.mT.contiguous().mT


def _topk_positions(magnitude: torch.Tensor, m: int) -> torch.Tensor:
    """Positions (int64, any order) of the m largest entries of a 1-D float32 ``magnitude``."""
    n = magnitude.numel()
    if m >= n:
        return torch.arange(n, device=magnitude.device)
    if magnitude.device.type == "cpu":  # numpy's introselect is ~5x faster than torch.topk on CPU
        return torch.from_numpy(np.argpartition(magnitude.numpy(), n - m)[n - m:].astype(np.int64))
    return magnitude.topk(m, sorted=False).indices


class TopK:
    """The k entries of largest magnitude of a matrix seen block by block (a running set of at most 4k candidates).

    With ``support`` (sorted int32 flat indices) and ``max_new``, at most ``max_new`` entries outside the support may be
    chosen: every support entry is a candidate, and only the ``max_new`` largest others (a capped support, see
    ``SparseGradConfig.max_support``).
    """

    def __init__(self, k: int, n_in: int, device: torch.device, support: Optional[torch.Tensor] = None,
                 max_new: Optional[int] = None) -> None:
        self.k, self.n_in, self.device = k, n_in, device
        self.restricted = support is not None and max_new is not None
        self.support = support.long() if self.restricted else None
        self.max_new = max_new if self.restricted else k
        self._idx: list[torch.Tensor] = []
        self._val: list[torch.Tensor] = []
        self._count = 0
        self._in_idx: list[torch.Tensor] = []  # restricted: values at the support entries (all kept)
        self._in_val: list[torch.Tensor] = []

    def add(self, block: torch.Tensor, row0: int, col0: int) -> None:
        """``block`` = g[row0 : row0 + b, col0 : col0 + c] (any float dtype)."""
        values = block.float().reshape(-1)  # a copy for bf16 blocks; a view of a float32 block
        rows, cols = block.shape
        flat_of = lambda pos: (pos.div(cols, rounding_mode="floor") + row0) * self.n_in + pos.remainder(cols) + col0
        magnitude = values.abs()  # a new tensor: may be edited below
        if self.restricted and self.support.numel():
            # support entries inside this block: ranges of flat indices per row of the block
            lo = row0 * self.n_in + col0
            hi = (row0 + rows - 1) * self.n_in + col0 + cols
            start, stop = torch.searchsorted(self.support, torch.tensor([lo, hi], device=self.support.device)).tolist()
            cand = self.support[start:stop]
            r, c = cand.div(self.n_in, rounding_mode="floor") - row0, cand.remainder(self.n_in) - col0
            inside = (c >= 0) & (c < cols)
            cand, pos = cand[inside], (r * cols + c)[inside]
            self._in_idx.append(cand)
            self._in_val.append(values[pos])
            magnitude[pos] = -1.0  # not a "new" candidate
        m = min(self.max_new, magnitude.numel())
        if m <= 0:
            return
        pos = _topk_positions(magnitude, m)
        if self.restricted:
            pos = pos[magnitude[pos] >= 0]
        self._idx.append(flat_of(pos))
        self._val.append(values[pos])
        self._count += pos.numel()
        if self._count > 4 * max(self.max_new, 1):
            self._reduce(self.max_new)

    def _reduce(self, m: int) -> None:
        idx, val = torch.cat(self._idx), torch.cat(self._val)
        keep = _topk_positions(val.abs(), m)
        self._idx, self._val, self._count = [idx[keep]], [val[keep]], keep.numel()

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(flat indices int64 sorted ascending, values float32) of the top-k."""
        if self.restricted and self._count > self.max_new:
            self._reduce(self.max_new)  # at most max_new new entries may enter the final choice
        idx = self._idx + self._in_idx
        val = self._val + self._in_val
        if not idx:
            return torch.empty(0, dtype=torch.long, device=self.device), torch.empty(0, device=self.device)
        idx, val = torch.cat(idx), torch.cat(val)
        keep = _topk_positions(val.abs(), self.k)
        idx, val = idx[keep], val[keep]
        order = idx.argsort()
        return idx[order], val[order]


@dataclass
class BasisPair:
    """Orthogonal bases of one layer type. ``None`` stands for the identity (MeProp): no rotation at all.

    Stored in float16 by default (``SparseGradConfig.bases_dtype``, ``stored_as``: half the memory of float32, still
    orthogonal to ~6e-4) or float32; products run in the compute dtype (module docstring), casting only what a product
    reads. One object is shared by every layer of the type, so moving it (``to``) moves it for all of them, and it is
    kept out of ``nn.Module`` buffers: DDP would otherwise re-broadcast it every forward and PEFT would cast it to a bf16
    base model's dtype.
    """

    U_out: Optional[torch.Tensor]  # (out, out), stored column-major
    U_in: Optional[torch.Tensor]  # (in, in), stored column-major

    def __post_init__(self) -> None:
        # Column-major storage (Uᵀ contiguous): gathers of columns of U (rows of Uᵀ) read contiguous memory.
        self.U_out, self.U_in = _column_major(self.U_out), _column_major(self.U_in)

    @property
    def is_identity(self) -> bool:
        return self.U_out is None

    def to(self, device: torch.device) -> "BasisPair":
        if self.U_out is not None and self.U_out.device != device:
            self.U_out = self.U_out.to(device)
            self.U_in = self.U_in.to(device)
        return self

    def stored_as(self, dtype: torch.dtype) -> "BasisPair":
        """This pair stored in ``dtype`` (``SparseGradConfig.bases_dtype``); one object per source pair, dtype and
        device, so the layers of a type keep sharing their bases."""
        if self.is_identity or self.U_out.dtype == dtype:
            return self
        stored = self.__dict__.setdefault("_stored", {})
        other = stored.get(dtype)
        if other is None or other.U_out.device != self.U_out.device:
            other = stored[dtype] = BasisPair(self.U_out.to(dtype), self.U_in.to(dtype))
        return other

    def row_block(self, first: int, end: int) -> "BasisPair":
        """The pair with only rows first:end of U_out (a rectangular (end − first) × out U_out, cached): the products
        of a rank that holds rows first:end of W and of its gradient (``peft_sparsegrad.sharded``)."""
        if self.is_identity or (first, end) == (0, self.U_out.shape[0]):
            return self
        blocks = self.__dict__.setdefault("_row_blocks", {})
        key = (first, end, self.U_out.device, self.U_out.dtype)
        if key not in blocks:
            blocks[key] = BasisPair(self.U_out[first:end], self.U_in)
        return blocks[key]

    def exact_in(self, dtype: torch.dtype) -> bool:
        """Whether storing this pair in ``dtype`` loses nothing (a loaded adapter's bases must stay what it trained with)."""
        if self.is_identity:
            return True
        return all(torch.equal(u.to(dtype).to(u.dtype), u) for u in (self.U_out, self.U_in))

    def float32(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(U_out, U_in) in float32, not cached (references and tests)."""
        return self.U_out.float(), self.U_in.float()

    @staticmethod
    def _columns(u: torch.Tensor, index: torch.Tensor | slice, dtype: torch.dtype) -> torch.Tensor:
        """U[:, index] in ``dtype``, gathered before the cast (column-major: contiguous rows of Uᵀ)."""
        return u.T[index].to(dtype).T

    # ---- the rotated gradient -------------------------------------------------------------------------------------

    def rotate(self, grad: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """U_outᵀ · grad · U_in, dense, in ``dtype`` (default float32): the gradient of W' from the gradient of W. A
        reference (tests, tiny layers); the training step uses ``rotate_topk`` / ``rotate_at``."""
        dtype = dtype or torch.float32
        if self.is_identity:
            return grad.to(dtype)
        return self.U_out.to(dtype).T @ grad.to(dtype) @ self.U_in.to(dtype)

    def rotate_topk(self, grad: torch.Tensor, k: int, dtype: Optional[torch.dtype] = None, *, inplace: bool = False,
                    support: Optional[torch.Tensor] = None, max_new: Optional[int] = None,
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The k entries of g = U_outᵀ · grad · U_in with the largest |g|: (flat indices int64 sorted, values float32).

        g is produced block by block and only a running top-k of it is kept (``TopK``; ``support`` / ``max_new``
        restrict it to a capped support). With ``inplace`` the caller hands over ``grad`` (out × in, row-major), which
        is overwritten with its half-rotated product: then nothing of the size of G is allocated at all.
        """
        dtype = dtype or torch.float32
        n_out, n_in = grad.shape
        top = TopK(k, n_in, grad.device, support, max_new)
        if self.is_identity:
            step = block_rows(n_out, n_in, grad.device)
            for r0 in range(0, n_out, step):
                top.add(grad[r0:r0 + step], r0, 0)
            return top.result()
        owned = inplace and grad.dtype == dtype and grad.is_contiguous()
        h = grad if owned else grad.to(dtype, copy=True, memory_format=torch.contiguous_format)
        if n_out >= n_in:
            # H = G U_in (the smaller basis cast whole), row blocks in place; then g = U_outᵀ H by row blocks of g
            u_in = self.U_in.to(dtype)
            step = block_rows(n_out, n_in, grad.device)
            for r0 in range(0, n_out, step):
                h[r0:r0 + step] = h[r0:r0 + step] @ u_in
            del u_in
            step = block_rows(n_out, n_in, grad.device)
            for r0 in range(0, n_out, step):
                top.add(self._columns(self.U_out, slice(r0, r0 + step), dtype).T @ h, r0, 0)
        else:
            # H = U_outᵀ G (the smaller basis cast whole), column blocks in place; then g = H U_in by column blocks
            u_out_t = self.U_out.to(dtype).T
            step = block_rows(n_in, n_out, grad.device)
            for c0 in range(0, n_in, step):
                h[:, c0:c0 + step] = u_out_t @ h[:, c0:c0 + step]
            del u_out_t
            for c0 in range(0, n_in, step):
                top.add(h @ self._columns(self.U_in, slice(c0, c0 + step), dtype), 0, c0)
        return top.result()

    def rotate_at(self, grad: torch.Tensor, support: "Support", dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """(U_outᵀ · grad · U_in)[S] for the k entries S of ``support`` (float32, in the order of ``support.flat``).

        Only the rows R and columns C that S occupies matter: the cheaper side is a dense product with the gathered
        columns of one basis, the other is sampled at S (``torch.sparse.sampled_addmm``), chunk by chunk of R: cost
        out · in · min(|R|, |C|) + k · max(out, in) instead of out · in · (out + in) for the full rotation, and no
        float32 copy of a whole basis.
        """
        if self.is_identity:
            return grad.reshape(-1).index_select(0, support.flat.long()).float()
        dtype = dtype or torch.float32
        rows, cols, crow, col = support.block_parts()
        n_out, n_in = grad.shape
        g = grad.to(dtype)
        out = torch.empty(col.numel(), dtype=torch.float32, device=grad.device)
        step = block_rows(rows.numel(), max(n_out, n_in), grad.device)
        # sampled_addmm takes dot products of rows of mat1 with columns of mat2 (float32): mat1 row-major, mat2
        # column-major (~1.8x faster on CPU than a row-major mat2)
        by_columns = cols.numel() <= rows.numel()
        if by_columns:  # (U_out[:, R]ᵀ · (G U_in[:, C]))[S]: X = G U_in[:, C] once, out × |C|, column-major
            fixed = (rows_of(self.U_in.T, cols).to(dtype) @ g.T).float().T
        else:  # ((U_out[:, R]ᵀ G) · U_in[:, C])[S]: U_in[:, C] once, in × |C|, column-major
            fixed = rows_of(self.U_in.T, cols).float().T
        for r0 in range(0, rows.numel(), step):
            r1 = min(r0 + step, rows.numel())
            a, b = int(crow[r0]), int(crow[r1])
            if a == b:
                continue
            pattern = _csr(crow[r0:r1 + 1] - a, col[a:b], (r1 - r0, cols.numel()))
            if by_columns:
                mat1, mat2 = rows_of(self.U_out.T, rows, r0, r1).float(), fixed  # U_out[:, R_chunk]ᵀ
            else:
                mat1, mat2 = (rows_of(self.U_out.T, rows, r0, r1).to(dtype) @ g).float(), fixed  # U_out[:, R_c]ᵀ G
            if grad.device.type != "cpu":
                mat2 = mat2.contiguous()  # the layout trick is for the CPU kernel; cuSPARSE takes row-major
            out[a:b] = torch.sparse.sampled_addmm(pattern, mat1, mat2, beta=0.0).values()
        return out

    # ---- the change of W ------------------------------------------------------------------------------------------

    def unrotated_blocks(self, flat: torch.Tensor, values: torch.Tensor, shape: tuple[int, int],
                         dtype: Optional[torch.dtype] = None, support: Optional["Support"] = None,
                         rows: Optional[tuple[int, int]] = None,
                         ) -> Iterator[tuple[tuple[slice, slice], torch.Tensor]]:
        """ΔW = U_out · δ · U_inᵀ for δ = ``values`` at the unique sorted flat indices ``flat``, as a stream of
        ((rows, cols) slices of W, block of ΔW in ``dtype``) that together cover W once.

        With R, C the rows and columns δ occupies and B = δ[R, C] (dense in ``dtype`` while it fills ≥ 1/DENSE_FILL
        of the block, else a float32 CSR matrix), ΔW = U_out[:, R] · B · U_in[:, C]ᵀ. The side whose gathered basis
        columns are fewer is kept whole and the other streamed: row blocks ΔW[r] = (U_out[r, R] B) U_in[:, C]ᵀ or
        column blocks ΔW[:, c] = U_out[:, R] (B U_in[c, C]ᵀ). ``support``: δ is on this periodic Support, in its
        order (its rows/columns are cached there). ``rows`` = (first, end): only those rows of ΔW, with slices
        relative to ``first`` (the rows of W a rank holds under FSDP2).
        """
        if self.is_identity:
            raise ValueError("identity bases change W entry by entry (SparseGradLayer handles MeProp)")
        dtype = dtype or torch.float32
        n_out, n_in = shape
        values = values.float()
        if support is not None:
            rows_index, cols, crow, col = support.block_parts()
            r_pos = torch.repeat_interleave(torch.arange(crow.numel() - 1, device=values.device), crow.diff().long())
            c_pos = col.long()
        else:
            flat = flat.long()
            rows_index, r_pos = torch.unique_consecutive(flat.div(n_in, rounding_mode="floor"),
                                                         return_inverse=True)
            cols, c_pos = torch.unique(flat.remainder(n_in), return_inverse=True)
            (rows_index, r_map), (cols, c_map) = gather_index(rows_index, n_out), gather_index(cols, n_in)
            r_pos = r_pos if r_map is None else r_map[r_pos]
            c_pos = c_pos if c_map is None else c_map[c_pos]
        n_r, n_c = rows_index.numel(), cols.numel()
        if values.numel() == 0:
            return
        dense = n_r * n_c <= DENSE_FILL * values.numel()
        row_blocks = n_in * n_c <= n_out * n_r  # keep U_in[:, C] whole and stream rows of W, or the other way round
        # B (or Bᵀ for row blocks): |R| × |C|, the side to stream second
        index = torch.stack([c_pos, r_pos] if row_blocks else [r_pos, c_pos])
        size = (n_c, n_r) if row_blocks else (n_r, n_c)
        if dense:
            block = torch.zeros(size, dtype=dtype, device=values.device)
            block[index[0], index[1]] = values.to(dtype)
        else:
            with warnings.catch_warnings():  # "sparse CSR support is in beta": CSR @ dense is what we need
                warnings.simplefilter("ignore", UserWarning)
                block = torch.sparse_coo_tensor(index, values, size, check_invariants=False).coalesce() \
                    .to_sparse_csr()
        product_dtype = dtype if dense else torch.float32
        first, end = rows if rows is not None else (0, n_out)
        if row_blocks:
            u_in_c_t = rows_of(self.U_in.T, cols).to(dtype)  # U_in[:, C]ᵀ: |C| × in
            u_out_t = self.U_out.T if n_r == n_out else self.U_out.T[rows_index]  # U_out[:, R]ᵀ, |R| × out
            step = block_rows(end - first, n_in, values.device)
            for r0 in range(first, end, step):
                r1 = min(r0 + step, end)
                n_t = block @ u_out_t[:, r0:r1].to(product_dtype)  # (U_out[r, R] B)ᵀ: |C| × b
                yield (slice(r0 - first, r1 - first), slice(None)), n_t.T.to(dtype) @ u_in_c_t
        else:
            u_out_r = rows_of(self.U_out.T, rows_index)[:, first:end].to(dtype).T  # U_out[rows, R]: (end-first) × |R|
            u_in_t = self.U_in.T if n_c == n_in else self.U_in.T[cols]  # U_in[:, C]ᵀ: |C| × in, stored dtype
            step = block_rows(n_in, end - first, values.device)
            for c0 in range(0, n_in, step):
                m = block @ u_in_t[:, c0:c0 + step].to(product_dtype)  # B U_in[c, C]ᵀ: |R| × b
                yield (slice(None), slice(c0, c0 + step)), u_out_r @ m.to(dtype)

    def unrotate_sparse(self, flat: torch.Tensor, values: torch.Tensor, shape: tuple[int, int],
                        dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """U_out · δ · U_inᵀ as one dense out × in tensor (in ``dtype``, default float32) for δ = ``values`` at the
        unique sorted flat indices ``flat``: merges, loading and references (training adds ``unrotated_blocks``)."""
        dtype = dtype or torch.float32
        out = torch.zeros(shape, dtype=dtype, device=values.device)
        if self.is_identity:
            return out.view(-1).index_copy_(0, flat.long(), values.to(dtype)).view(shape)
        for index, block in self.unrotated_blocks(flat, values, shape, dtype):
            out[index] = block
        return out

    def unrotate(self, delta: torch.Tensor) -> torch.Tensor:
        """U_out · ΔW' · U_inᵀ (float32, out × in) for a dense ΔW': the change of W from the change of W'."""
        flat = delta.reshape(-1).nonzero().squeeze(1)
        return self.unrotate_sparse(flat, delta.reshape(-1)[flat], tuple(delta.shape))


@dataclass
class Support:
    """A fixed set of k entries of an out × in matrix: sorted flat indices, plus the block pattern rotations need.

    ``selection="periodic"`` keeps ΔW' training on one Support between refreshes; the step computes the rotated
    gradient only there (``BasisPair.rotate_at``). ``selected_at`` is the optimizer step that chose it.
    """

    flat: torch.Tensor  # (k,) int32 or int64, sorted ascending, unique
    shape: tuple[int, int]  # (out, in)
    selected_at: int
    _block: Optional[tuple[torch.Tensor, ...]] = field(default=None, repr=False)
    #: weak reference to the ΔW' index vector S was last merged into (the step skips re-checking it until then)
    merged_into: Optional[weakref.ref] = field(default=None, repr=False)

    def block_parts(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(R, C, crow, col): the rows and columns S occupies — sorted, then widened to the shape grid
        (``gather_index``; extra rows and columns hold no entry) — and S as CSR of the |R| × |C| block (int32 row
        pointers and column positions, 4 bytes per entry, cached until the next refresh). Row-major CSR order = the
        order of ``flat``."""
        if self._block is None or self._block[0].device != self.flat.device:
            n_out, n_in = self.shape
            flat = self.flat.long()
            rows, row_pos = torch.unique_consecutive(flat.div(n_in, rounding_mode="floor"), return_inverse=True)
            cols, col_pos = torch.unique(flat.remainder(n_in), return_inverse=True)
            (rows, r_map), (cols, c_map) = gather_index(rows, n_out), gather_index(cols, n_in)
            row_pos = row_pos if r_map is None else r_map[row_pos]
            col_pos = col_pos if c_map is None else c_map[col_pos]
            crow = torch.zeros(rows.numel() + 1, dtype=torch.int32, device=self.flat.device)
            crow[1:] = torch.bincount(row_pos, minlength=rows.numel()).cumsum(0)
            self._block = (rows, cols, crow, col_pos.to(torch.int32))
        return self._block

    def block(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(R, C, pattern): ``block_parts`` with S as a float32 CSR pattern of the |R| × |C| block (zero values; the
        mask of ``torch.sparse.sampled_addmm``)."""
        rows, cols, crow, col = self.block_parts()
        return rows, cols, _csr(crow, col, (rows.numel(), cols.numel()))


def _csr(crow: torch.Tensor, col: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A float32 CSR matrix of zeros with this pattern (the mask ``sampled_addmm`` fills)."""
    with warnings.catch_warnings():  # "CSR support is in beta": sampled_addmm on CSR is what we need
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, col, torch.zeros(col.numel(), dtype=torch.float32, device=col.device),
                                       size=size, check_invariants=False)
