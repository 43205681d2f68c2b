"""SparseDelta: the adapter ΔW' (the change of W' = U_outᵀ W U_in since injection) stored on its support only.

During training the base weight W itself is trained in place (see ``peft_sparsegrad.layer``), so the adapter never
needs a dense tensor: ΔW' is a sorted vector of flat indices (int32, row-major in the out × in matrix) and a float32
vector of values. The support only grows: an entry that was updated once stays in it, also if its value returns to 0,
so that optimizer moments kept "on the support" stay aligned with it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

#: Flat indices are stored as int32: every MLP weight of current LLMs has fewer than 2**31 entries.
MAX_NUMEL = 2**31 - 1


@dataclass
class SparseDelta:
    """ΔW' of one layer and adapter: ``values`` at the sorted, unique flat indices ``flat`` of an out × in matrix."""

    flat: torch.Tensor  # (n,) int32, sorted ascending, unique
    values: torch.Tensor  # (n,) float32
    shape: tuple[int, int]  # (out, in)

    @classmethod
    def empty(cls, shape: tuple[int, int], device: torch.device | str = "cpu") -> "SparseDelta":
        if shape[0] * shape[1] > MAX_NUMEL:
            raise ValueError(f"SparseGrad supports weights of at most 2**31 - 1 entries, got {shape}.")
        return cls(torch.empty(0, dtype=torch.int32, device=device), torch.empty(0, dtype=torch.float32,
                                                                                 device=device), tuple(shape))

    @classmethod
    def from_dense(cls, dense: torch.Tensor) -> "SparseDelta":
        """The non-zero entries of a dense out × in ΔW'."""
        flat = dense.reshape(-1).nonzero().squeeze(1)
        return cls(flat.to(torch.int32), dense.reshape(-1)[flat].float(), tuple(dense.shape))

    @classmethod
    def from_indices(cls, rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor,
                     shape: tuple[int, int]) -> "SparseDelta":
        """From (row, column) pairs as saved in ``adapter_model.safetensors`` (any order, unique)."""
        flat = rows.long() * shape[1] + cols.long()
        order = flat.argsort()
        return cls(flat[order].to(torch.int32), values.float()[order].contiguous(), tuple(shape))

    @property
    def nnz(self) -> int:
        return self.flat.numel()

    @property
    def device(self) -> torch.device:
        return self.flat.device

    def to(self, device: torch.device) -> "SparseDelta":
        if self.flat.device != device:
            self.flat, self.values = self.flat.to(device), self.values.to(device)
        return self

    def rows_cols(self) -> tuple[torch.Tensor, torch.Tensor]:
        flat = self.flat.long()
        return flat.div(self.shape[1], rounding_mode="floor"), flat.remainder(self.shape[1])

    def to_dense(self) -> torch.Tensor:
        dense = torch.zeros(self.shape[0] * self.shape[1], dtype=torch.float32, device=self.device)
        return dense.index_copy_(0, self.flat.long(), self.values).view(self.shape)

    def positions(self, idx: torch.Tensor) -> torch.Tensor:
        """Positions in ``flat`` of the flat indices ``idx`` (int64, all of which must be in the support)."""
        return torch.searchsorted(self.flat, idx.to(torch.int32))

    def grow(self, idx: torch.Tensor) -> Optional[torch.Tensor]:
        """Add the flat indices ``idx`` (sorted int64) to the support, new entries at 0.

        Returns where the old entries went (int64 positions in the new support), or None if nothing was added, so
        that state aligned with the support (optimizer moments) can follow.
        """
        if idx.numel() == 0:
            return None
        new = idx.to(torch.int32)
        if self.nnz:
            known = self.flat[torch.searchsorted(self.flat, new).clamp_max(self.nnz - 1)] == new
            if bool(known.all()):
                return None
            flat = torch.cat([self.flat, new[~known]]).sort().values
        else:
            flat = new
        pos_old = torch.searchsorted(flat, self.flat)
        values = torch.zeros(flat.numel(), dtype=torch.float32, device=flat.device)
        values.index_copy_(0, pos_old, self.values)
        self.flat, self.values = flat, values
        return pos_old
