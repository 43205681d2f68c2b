"""The calibration pass: a few forward + backward passes that collect the targeted weights' gradients into bases.

No optimizer step is taken: afterwards every weight is bit-identical, every ``requires_grad`` and ``.grad`` is what it
was, and the model's train/eval mode is untouched (dropout stays as the model has it). Each weight gradient is consumed
by a post-accumulate hook the moment backward produces it and then freed, so at most one layer's dense gradient is
alive at a time.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from typing import Any, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from .bases import GramAccumulator, SparseGradBases, tensorly_hosvd
from .sharded import is_sharded
from .targets import assign_layer_types, find_target_modules, is_conv1d, resolve_default_targets, weight_shape


def _base_layer(module: nn.Module) -> nn.Module:
    return module.get_base_layer() if hasattr(module, "get_base_layer") else module


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def _loss_of(model: nn.Module, batch: Any, step: int) -> torch.Tensor:
    try:
        if isinstance(batch, Mapping):
            output = model(**batch)
        elif isinstance(batch, (list, tuple)):
            output = model(*batch)
        else:
            output = model(batch)
    except Exception as exc:
        raise ValueError(
            f"Calibration batch {step} could not be run by the model ({type(exc).__name__}: {exc}). "
            "calibration_dataloader must yield batches the model accepts, e.g. dicts of tensors with labels."
        ) from exc
    loss = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", output)
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise ValueError(
            f"Calibration batch {step} produced no scalar loss. Include labels in the batches so the model returns "
            "a loss (e.g. batch['labels'])."
        )
    if not torch.isfinite(loss):
        raise ValueError(f"Calibration batch {step} produced a non-finite loss ({loss.item()}).")
    return loss


def collect_bases(
    model: nn.Module,
    targets: dict[str, nn.Module],
    dataloader: Iterable[Any],
    steps: int,
    method: str = "gram",
    progress: bool = True,
    precision: str = "fp32",
) -> SparseGradBases:
    """Run ``steps`` calibration batches and return the HOSVD bases of every layer type of ``targets``.

    ``precision`` is ``SparseGradConfig.gram_precision`` ("fp32" or "bf16", see ``peft_sparsegrad.bases``); the
    "tensorly" method ignores it.
    """
    if dataloader is None:
        raise ValueError("Calibration needs a calibration_dataloader.")
    shapes = {name: weight_shape(_base_layer(m)) for name, m in targets.items()}
    layer_types = assign_layer_types(shapes)
    members: dict[str, list[str]] = {}
    for name, layer_type in layer_types.items():
        members.setdefault(layer_type, []).append(name)
    weights = {name: _base_layer(m).weight for name, m in targets.items()}
    transposed = {name: is_conv1d(_base_layer(m)) for name, m in targets.items()}
    device = next(iter(weights.values())).device

    accumulators = {t: GramAccumulator(*shapes[names[0]], device=device, precision=precision)
                    for t, names in members.items() if method != "tensorly"}  # tensorly stacks the gradients
    stacks: dict[str, list[torch.Tensor]] = {t: [] for t in members}
    non_finite: list[str] = []
    sharded: list[str] = []

    def make_hook(name: str):
        layer_type = layer_types[name]

        def hook(param: torch.Tensor) -> None:
            grad = param.grad
            if is_sharded(grad):  # FSDP2: the rows of the averaged gradient; gather the whole (transient, one layer)
                sharded.append(name)
                grad = grad.full_tensor()
            grad = grad.T if transposed[name] else grad  # G: out × in
            if not torch.isfinite(grad).all():
                non_finite.append(name)
            elif method == "tensorly":
                stacks[layer_type].append(grad.detach().float().cpu().clone())
            else:
                accumulators[layer_type].add(grad)
            param.grad = None  # free it now: at most one dense layer gradient alive

        return hook

    params = list(model.parameters())
    saved_requires_grad = [p.requires_grad for p in params]
    saved_grads = {name: w.grad for name, w in weights.items()}
    handles = []
    done = 0
    try:
        for p in params:
            p.requires_grad_(False)
        for name, w in weights.items():
            w.grad = None
            w.requires_grad_(True)
            handles.append(w.register_post_accumulate_grad_hook(make_hook(name)))
        bar = tqdm(total=steps, desc="SparseGrad calibration", disable=not progress, leave=False)
        for batch in dataloader:
            loss = _loss_of(model, _to_device(batch, device), done)
            loss.backward()
            if non_finite:
                raise ValueError(
                    f"Calibration batch {done} gave NaN/Inf gradients in {sorted(set(non_finite))}. Check the data "
                    "and the model's dtype (fp16 base models overflow easily; calibrate in fp32 or bf16)."
                )
            done += 1
            bar.update(1)
            if done >= steps:  # stop before pulling another batch: an iterator keeps the rest for its owner
                break
        bar.close()
    finally:
        for handle in handles:
            handle.remove()
        for p, flag in zip(params, saved_requires_grad):
            p.requires_grad_(flag)
        for name, w in weights.items():
            w.grad = saved_grads[name]
    if done == 0:
        raise ValueError("calibration_dataloader yielded no batches: pass a non-empty iterable of batches.")
    if done < steps:
        warnings.warn(f"calibration_dataloader ran out after {done} of calibration_steps={steps} batches.")

    pairs, eigenvalues = {}, {}
    for layer_type in members:
        if method == "tensorly":
            pairs[layer_type], eigenvalues[layer_type] = tensorly_hosvd(stacks[layer_type])
            continue
        if not sharded:  # sharded weights gathered the averaged gradient: every rank summed the same already
            accumulators[layer_type].all_reduce()
        pairs[layer_type], eigenvalues[layer_type] = accumulators[layer_type].bases()
        del accumulators[layer_type]  # free this type's Gram matrices before the next decomposition
    return SparseGradBases(pairs, members, eigenvalues)


def calibrate(model: nn.Module, config, dataloader: Optional[Iterable[Any]] = None, progress: bool = True) -> SparseGradBases:
    """Compute SparseGrad bases for ``model`` without adapting it.

    Use it to pay for calibration once and share the bases between runs::

        bases = calibrate(model, SparseGradConfig(calibration_steps=30), loader)
        save_bases(bases, "bases.safetensors")
        config = SparseGradConfig(bases="bases.safetensors", ...)   # or precomputed_bases=bases
    """
    import copy

    config = copy.copy(config)  # target resolution must not change the caller's config
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    resolve_default_targets(config, model_type)
    targets = find_target_modules(model, config)
    loader = dataloader if dataloader is not None else config.calibration_dataloader
    return collect_bases(model, targets, loader, config.calibration_steps, config.basis_method, progress,
                         precision=config.gram_precision)
