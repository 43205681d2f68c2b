"""SparseGrad under data parallelism: the adapted weights leave DDP's gradient buckets, SparseGrad reduces them.

DDP all-reduces every trainable parameter's dense gradient, through buckets that hold a dense copy of all of them: for
the adapted weights that is full fine-tuning's gradient memory and traffic. ``exclude_from_ddp`` takes them out
(``DistributedDataParallel._set_params_and_buffers_to_ignore_for_model``, the hook DDP reads when it wraps a model),
and the step inside backward (``peft_sparsegrad.fused``) reduces what the update needs: k values of g[S] between
refreshes of periodic selection, the dense gradient on refresh steps and for dynamic selection. Call it before the
model is wrapped; ``SparseGradCallback`` does so when the ``Trainer`` is built (its ``on_init_end``), which is before
the Trainer wraps the model.

DDP refuses to wrap a module with no trainable parameter left. When the adapted weights are all that trains (a causal
LM with SparseGrad on its MLP), a zero-valued one-element *anchor* parameter is added and joined to the first adapted
layer's input as ``x + 0 · anchor``: DDP then reduces one number per step, and nothing the model computes changes.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .layer import OWNER_ATTR, SparseGradLayer

#: Name of the anchor parameter on the model (present only while excluded weights leave DDP nothing else to reduce).
DDP_ANCHOR = "sparsegrad_ddp_anchor"
_ANCHOR_HOOK = "_sparsegrad_ddp_anchor_hook"


def adapted_weight_names(model: nn.Module) -> list[str]:
    """Fully qualified names (relative to ``model``) of the trainable adapted weights."""
    return [name for name, p in model.named_parameters() if hasattr(p, OWNER_ATTR) and p.requires_grad]


def exclude_from_ddp(model: nn.Module) -> list[str]:
    """Keep the adapted weights out of DDP's gradient buckets; SparseGrad's step inside backward reduces them.

    Call before ``DistributedDataParallel(model)``. Returns the excluded names. Idempotent."""
    names = adapted_weight_names(model)
    if not names:
        raise ValueError("exclude_from_ddp: the model has no trainable SparseGrad weights (build it with "
                         "get_peft_model and a SparseGradConfig first).")
    ignored = sorted(set(getattr(model, "_ddp_params_and_buffers_to_ignore", ())) | set(names))
    torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignored)
    others = [p for n, p in model.named_parameters() if p.requires_grad and n not in ignored]
    if not others and not hasattr(model, DDP_ANCHOR):
        _add_anchor(model)
    return names


def excluded_from_ddp(params) -> bool:
    """Whether every one of ``params`` is left out of DDP's buckets."""
    params = list(params)
    return bool(params) and all(getattr(p, "_ddp_ignored", False) for p in params)


def _add_anchor(model: nn.Module) -> None:
    first = next((m for m in model.modules() if isinstance(m, SparseGradLayer)), None)
    if first is None:
        raise ValueError("exclude_from_ddp: the model has no SparseGrad layer.")
    weight = first.get_base_layer().weight
    anchor = nn.Parameter(torch.zeros((), device=weight.device, dtype=torch.float32))
    model.register_parameter(DDP_ANCHOR, anchor)

    def join(module: nn.Module, args: tuple):
        x = args[0]
        return (x + (anchor * 0).to(x.dtype), *args[1:])

    setattr(model, _ANCHOR_HOOK, first.register_forward_pre_hook(join))


def include_in_ddp(model: nn.Module) -> None:
    """Undo ``exclude_from_ddp`` (for a model not yet wrapped again): DDP reduces the adapted weights densely."""
    names = set(adapted_weight_names(model))
    for name, p in model.named_parameters():
        if name in names and hasattr(p, "_ddp_ignored"):
            del p._ddp_ignored
    remaining = [n for n in getattr(model, "_ddp_params_and_buffers_to_ignore", ()) if n not in names]
    if hasattr(model, "_ddp_params_and_buffers_to_ignore"):
        model._ddp_params_and_buffers_to_ignore = remaining
    hook: Optional[torch.utils.hooks.RemovableHandle] = getattr(model, _ANCHOR_HOOK, None)
    if hook is not None:
        hook.remove()
        delattr(model, _ANCHOR_HOOK)
    if hasattr(model, DDP_ANCHOR):
        delattr(model, DDP_ANCHOR)
