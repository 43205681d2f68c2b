"""How an update reaches a bfloat16 / float16 weight W: stochastic rounding (no extra memory) or compensated summation.

A SparseGrad step changes every entry of W a little: U_out δ U_inᵀ spreads the k changed entries of W' over the whole
matrix, mostly far below W's rounding step (bf16 keeps 8 significant bits). Rounded to nearest, such changes vanish.
``SparseGradConfig.rounding`` picks one of two remedies:

* ``"stochastic"`` (default): W ← SR(W + change), rounding up with probability equal to the distance to the value
  below, over the rounding step. Unbiased (E[SR(x)] = x), so small updates accumulate in expectation; no memory besides
  W. The price is noise: W drifts from W₀ + U_out ΔW' U_inᵀ by a sum of independent rounding errors (zero mean, about
  √(steps · step size · |change|) per entry). The adapter ΔW' itself is exact (float32); reloading it gives
  round(W₀ + ΔW) without that noise.
* ``"compensated"``: a residual of W's dtype keeps what rounding loses (W + residual carries ~16 significant bits for
  bf16): W stays W₀ + ΔW to that precision, at 2 bytes per weight.

For bf16 the stochastic rounding is the usual bit trick: add 16 random bits below the bf16 mantissa of the float32
value and truncate. For fp16 it picks between the two neighbours of the float32 value with the right probability.
The random draws of a training step are a function of the run's seed (torch's initial seed when the weight's
optimizer state was created, kept in that state), the layer's name, the step count and the block: every
data-parallel rank rounds alike, and a resumed run draws what the uninterrupted one would have.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch

ROUNDINGS = ("stochastic", "compensated")


def random_bits16(shape: torch.Size | tuple[int, ...], device: torch.device, seed: Optional[int] = None
                  ) -> torch.Tensor:
    """Uniform random integers in [0, 2¹⁶) as int32: from ``seed`` if given (the training step's draws, a function of
    the run's seed, the layer, the step and the block: identical on every data-parallel rank, and again after a
    resume), else from torch's global generator.

    On CPU torch draws ~4 ns per number, which made the rounding the slowest part of a step; numpy's PCG64 supplies the
    raw bits there, 16 per number (~7x faster)."""
    n = math.prod(shape)
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,)).item())
    if device.type != "cpu":
        generator = torch.Generator(device=device).manual_seed(seed)
        return torch.randint(0, 1 << 16, tuple(shape), dtype=torch.int32, device=device, generator=generator)
    raw = np.random.PCG64(seed).random_raw((n + 3) // 4).view(np.int16)[:n]
    return torch.from_numpy(raw).to(torch.int32).bitwise_and_(0xFFFF).view(tuple(shape))


def mix_seed(*parts: int) -> int:
    """One 62-bit seed from several integers (splitmix64 steps): distinct inputs give unrelated streams."""
    x = 0x9E3779B97F4A7C15
    for part in parts:
        x = (x ^ (int(part) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        x = (x ^ (x >> 31)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
    return x >> 2


def stochastic_round(total: torch.Tensor, dtype: torch.dtype, seed: Optional[int] = None) -> torch.Tensor:
    """``total`` (float32, consumed: it is overwritten) rounded stochastically to ``dtype`` (bfloat16 or float16),
    the random draws from ``seed`` (``random_bits16``)."""
    if dtype == torch.bfloat16:
        bits = total.view(torch.int32)
        bits.add_(random_bits16(bits.shape, bits.device, seed)).bitwise_and_(-65536)  # 0xFFFF0000: exact in bf16
        return total.to(torch.bfloat16)
    if dtype == torch.float16:
        nearest = total.to(torch.float16)
        error = total - nearest.float()
        toward = torch.where(error > 0, torch.inf, -torch.inf).to(torch.float16)
        other = torch.nextafter(nearest, toward)
        gap = (other.float() - nearest.float()).abs()
        p_other = torch.where(gap > 0, error.abs() / gap, torch.zeros_like(gap))
        uniform = random_bits16(total.shape, total.device, seed).float().add_(0.5).div_(1 << 16)
        return torch.where(uniform < p_other, other, nearest)
    raise TypeError(f"stochastic rounding is for bfloat16/float16 weights, not {dtype}")


@torch.no_grad()
def add_to_half_(w: torch.Tensor, change: torch.Tensor, mode: str, residual: torch.Tensor | None = None,
                 seed: Optional[int] = None) -> None:
    """W += change for a half-precision W (a block of it), in float32 arithmetic:

    * ``"compensated"``: total = W + residual + change; W = round(total); residual = total − W;
    * ``"stochastic"``: W = SR(W + change);
    * ``"nearest"``: W = round(W + change) (merges outside training, where the change is the whole ΔW).
    """
    total = w.float().add_(change)  # promotes in the kernel: no converted copy of ``change``
    if mode == "compensated":
        total.add_(residual)
        w.copy_(total)
        residual.copy_(total.sub_(w))
    elif mode == "stochastic":
        w.copy_(stochastic_round(total, w.dtype, seed))
    elif mode == "nearest":
        w.copy_(total)
    else:
        raise ValueError(f"unknown rounding mode {mode!r}; expected one of {ROUNDINGS + ('nearest',)}")
