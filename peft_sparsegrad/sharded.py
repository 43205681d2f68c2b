"""SparseGrad on weights sharded by FSDP2 (``torch.distributed.fsdp.fully_shard``): no rank holds a whole W.

FSDP2 shards every weight by rows: rank r holds W_r = W[rows_r] as the local tensor of a DTensor, and after backward's
reduce-scatter the gradient's rows G_r (already averaged over the ranks). The rotated gradient is a sum over the
ranks' rows,

    g = U_outᵀ G U_in = Σ_r U_out[rows_r]ᵀ G_r U_in,

so each rank computes its partial product with its rows of U_out and one all-reduce gives every rank the same g: the
k values g[S] between refreshes of periodic selection, the dense g for dynamic selection and refresh steps (then the
top-k runs on identical values on every rank). The clipping norm is exact: ||G||² = Σ_r ||G_r||², one more number.
The update δ of ΔW' is then the same on every rank, and each adds U_out[rows_r] δ U_inᵀ to its own rows only. ΔW',
the optimizer state and the bases are small and replicated.

Conv1D layers (GPT-2) and shardings other than FSDP2's row sharding on one mesh dimension are refused.
"""

from __future__ import annotations

from typing import Optional

import torch

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # torch without DTensor: nothing is ever sharded
    DTensor = None


def is_sharded(tensor: Optional[torch.Tensor]) -> bool:
    return DTensor is not None and isinstance(tensor, DTensor)


def local_rows(weight: torch.Tensor) -> tuple[int, int]:
    """(first, end) of the rows of W this rank holds (FSDP2: Shard(0) on a 1-D mesh)."""
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if weight.device_mesh.ndim != 1 or len(weight.placements) != 1 or weight.placements[0] != Shard(0):
        raise ValueError(f"SparseGrad supports weights sharded by rows on one mesh dimension (FSDP2's fully_shard), "
                         f"not placements {weight.placements} on a {weight.device_mesh.ndim}-D mesh.")
    shape, offset = compute_local_shape_and_global_offset(weight.shape, weight.device_mesh, weight.placements)
    return offset[0], offset[0] + shape[0]


def all_reduce_(tensor: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """SUM over the ranks of ``like``'s mesh, in place (synchronous: everything after needs the result)."""
    import torch.distributed as dist

    dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=like.device_mesh.get_group())
    return tensor


def local(tensor: torch.Tensor) -> torch.Tensor:
    """The local part of a sharded tensor (a view: in-place changes reach the DTensor), or the tensor itself."""
    return tensor.to_local() if is_sharded(tensor) else tensor


def clip_grad_norm_(parameters, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` for a model whose gradients are partly DTensors (FSDP2 shards) and partly
    plain tensors (SparseGrad's norm carrier, replicated parameters): torch's refuses the mix. One global norm: each
    mesh's gradients are reduced over that mesh, plain tensors count as they are (the carrier already holds the
    adapted weights' global norm). Returns the total norm before clipping."""
    from collections import defaultdict

    from torch.nn.utils import clip_grads_with_norm_, get_total_norm

    groups: dict = defaultdict(list)
    for p in parameters:
        if p.grad is not None:
            groups[p.grad.device_mesh if is_sharded(p.grad) else None].append(p)
    if not groups:
        return torch.zeros(())
    norms = []
    for params in groups.values():
        norm = get_total_norm([p.grad for p in params], norm_type)
        norms.append(norm.full_tensor() if is_sharded(norm) else norm)
    total = torch.linalg.vector_norm(torch.stack([n.to(norms[0].device) for n in norms]), norm_type)
    for params in groups.values():
        clip_grads_with_norm_(params, max_norm, total)
    return total
