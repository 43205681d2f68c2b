"""SparseGradModel: the PEFT tuner. Resolves and validates targets, obtains bases (calibration, identity, file or
checkpoint) *before* touching the model, swaps in SparseGradLinear, and stores adapters sparsely.

Saved format (adapter_model.safetensors), per adapted layer ``<m>``:
``<m>.sparsegrad_indices`` (int32, nnz: flat row-major indices of ΔW's entries in its out × in matrix; adapters
saved by earlier versions hold 2 × nnz rows and columns, which load too), ``<m>.sparsegrad_values`` (float32, nnz) and
``<m>.sparsegrad_shape`` (int32, (out, in) of ΔW'; optional when loading), plus the bases once per layer type:
``sparsegrad_bases.<type>.U_out`` / ``.U_in`` (in their storage dtype, float16 by default; absent for
identity/MeProp).
"""

from __future__ import annotations

import contextlib
import zlib
from typing import Optional

import torch
from peft.tuners.tuners_utils import BaseTuner
from torch import nn

from .bases import BasisPair, SparseGradBases, bases_key, load_bases, split_bases_key
from .calibration import collect_bases
from .config import SparseGradConfig
from .delta import SparseDelta
from .layer import CALIBRATING_ATTR, SparseGradLayer, SparseGradLinear
from .registration import PREFIX
from .targets import DEFAULT_TARGET_MODULES, assign_layer_types, find_target_modules, resolve_default_targets, \
    weight_shape

_PEFT_PREFIX = "base_model.model."

NO_BASES_ERROR = (
    "SparseGrad needs bases U_out, U_in. Either train with the Hugging Face Trainer and "
    "callbacks=[SparseGradCallback()] (it calibrates on the first calibration_steps training batches), or pass "
    "calibration_dataloader=<iterable of batches with labels> to SparseGradConfig, bases='identity' (MeProp, no "
    "data), bases=<path to a bases file from save_bases / `sparsegrad calibrate`, or to a saved SparseGrad adapter>, "
    "or precomputed_bases=<SparseGradBases>."
)


@contextlib.contextmanager
def _calibrating(model: nn.Module):
    """Calibration consumes W.grad itself: let the routing guard of already adapted, trainable weights pass (a
    PeftModel's add_adapter with calibration data, calibrate_pending from SparseGradCallback.on_train_begin)."""
    weights = [m.get_base_layer().weight for m in model.modules() if isinstance(m, SparseGradLayer)]
    marked = [w for w in dict.fromkeys(weights) if not getattr(w, CALIBRATING_ATTR, False)]
    for w in marked:
        setattr(w, CALIBRATING_ATTR, True)
    try:
        yield
    finally:
        for w in marked:
            delattr(w, CALIBRATING_ATTR)


class SparseGradModel(BaseTuner):
    """Creates a SparseGrad model from a pretrained transformers model (use ``peft.get_peft_model``).

    Example::

        >>> import peft_sparsegrad
        >>> from peft import get_peft_model
        >>> config = peft_sparsegrad.SparseGradConfig(calibration_dataloader=loader, task_type="SEQ_CLS")
        >>> model = get_peft_model(base_model, config)
    """

    prefix: str = PREFIX
    tuner_layer_cls = SparseGradLayer
    target_module_mapping = {model_type: targets for model_type, (targets, _) in DEFAULT_TARGET_MODULES.items()}

    def _prepare_adapter_config(self, peft_config: SparseGradConfig, model_config: dict) -> SparseGradConfig:
        resolve_default_targets(peft_config, model_config.get("model_type"))
        return peft_config

    def inject_adapter(
        self,
        model: nn.Module,
        adapter_name: str,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
        state_dict: Optional[dict[str, torch.Tensor]] = None,
    ) -> None:
        # Everything that can fail on user input happens here, before PEFT replaces a single module. This also runs
        # for PeftModel.add_adapter, which (unlike __init__) calls no pre-injection hook.
        config = self.peft_config[adapter_name]
        config.__post_init__()  # re-validate: fields may have been set after construction (e.g. CLI strings)
        self._prepare_adapter_config(config, self.get_model_config(model))
        targets = find_target_modules(model, config)
        shapes = {name: weight_shape(m.get_base_layer() if hasattr(m, "get_base_layer") else m)
                  for name, m in targets.items()}
        layer_types = assign_layer_types(shapes)
        type_shapes = {t: list(shapes[name]) for name, t in layer_types.items()}
        if config.layer_shapes is not None and config.bases == "checkpoint" and config.layer_shapes != type_shapes:
            raise ValueError(
                f"This adapter was trained on a base model with other shapes: it adapts layer types (out, in) "
                f"{config.layer_shapes}, this model has {type_shapes}. Load it onto the base model it was trained on."
            )
        pairs = self._obtain_bases(model, config, targets, layer_types, shapes)
        self._injection = (layer_types, pairs)
        try:
            super().inject_adapter(model, adapter_name, autocast_adapter_dtype, low_cpu_mem_usage, state_dict)
        finally:
            del self._injection
        config.calibration_dataloader = None  # consumed; don't keep the data alive with the model
        config.layer_shapes = type_shapes

    @staticmethod
    def _obtain_bases(model, config, targets, layer_types, shapes) -> dict[str, Optional[BasisPair]]:
        types = set(layer_types.values())
        if config.precomputed_bases is not None:
            if not isinstance(config.precomputed_bases, SparseGradBases):
                raise TypeError("precomputed_bases must be a SparseGradBases (from peft_sparsegrad.calibrate).")
            config.precomputed_bases.check_compatible(layer_types, shapes)
            return {t: config.precomputed_bases.pairs[t] for t in types}
        if config.bases == "identity":
            identity = BasisPair(None, None)
            return {t: identity for t in types}
        if config.bases == "checkpoint":
            return {t: None for t in types}  # filled by _remap_adapter_state_dict_for_load
        if config.bases == "calibrate":
            if config.calibration_dataloader is None:
                return {t: None for t in types}  # pending: calibrate_pending() (SparseGradCallback) fills them
            with _calibrating(model):
                bases = collect_bases(model, targets, config.calibration_dataloader, config.calibration_steps,
                                      config.basis_method, precision=getattr(config, "gram_precision", "fp32"))
            return {t: bases.pairs[t] for t in types}
        bases = load_bases(config.bases)
        bases.check_compatible(layer_types, shapes)
        return {t: bases.pairs[t] for t in types}

    def _create_and_replace(self, peft_config, adapter_name, target, target_name, parent, current_key, **kwargs):
        layer_types, pairs = self._injection
        layer_type = layer_types[current_key]
        # A config read from a saved adapter (layer_shapes filled in) gets ΔW' from the checkpoint: never a random
        # init_weights=False start, which would go into W in place before loading (and stay there if loading fails).
        init_weights = peft_config.init_weights or peft_config.layer_shapes is not None
        args = (peft_config.keep_ratio, pairs[layer_type], layer_type, init_weights)
        refresh = peft_config.refresh_interval if getattr(peft_config, "selection", "dynamic") == "periodic" else 0
        options = {"refresh_interval": refresh, "bases_dtype": getattr(peft_config, "bases_dtype", "float16"),
                   "rounding": getattr(peft_config, "rounding", "stochastic"),
                   "max_support": getattr(peft_config, "max_support", None),
                   "compute_dtype": getattr(peft_config, "compute_dtype", "auto")}
        if isinstance(target, SparseGradLinear):
            target.update_layer(adapter_name, *args, **options)
            return
        new_module = SparseGradLinear(target, adapter_name, *args, **options)
        new_module.sparsegrad_rounding_key = zlib.crc32(current_key.encode())  # same on every rank and run
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)  # an added, inactive adapter is not trainable
        self._replace_module(parent, target_name, new_module, target)

    def _replace_module(self, parent, child_name, new_module, child) -> None:
        # Unlike BaseTuner's version, never copy `.weight` onto the new module: on unload the "new module" may be a
        # head without a weight (RoBERTa's classification head inside ModulesToSaveWrapper).
        if isinstance(child, SparseGradLayer) and new_module is child.get_base_layer():
            child.unload_weight()  # unload: W keeps only the merged adapters (it was trained in place)
        setattr(parent, child_name, new_module)
        if hasattr(child, "base_layer"):
            child = child.base_layer
        weight = getattr(child, "weight", None)
        if weight is not None and weight.device.type != "meta":
            for name, module in new_module.named_modules():
                # meta ΔW' (low_cpu_mem_usage=True) is materialised by the state-dict load, not moved
                if self.prefix in name and not any(p.device.type == "meta" for p in module.parameters()):
                    module.to(weight.device)

    def sparsegrad_layers(self) -> list[SparseGradLinear]:
        return [m for m in self.model.modules() if isinstance(m, SparseGradLinear)]

    def trainable_summary(self, adapter_name: Optional[str] = None) -> dict[str, int]:
        """What SparseGrad trains, counted as such (``PeftModel.print_trainable_parameters`` prints it): the adapted
        weights (trained in place, so PEFT's count calls all of them trainable), the per-step budget Σk, ΔW''s
        current support, the adapter file's bytes (ΔW' at 8 B per entry + the bases once per layer type) and the
        other trainable parameters (heads, ``modules_to_save``)."""
        adapter = adapter_name or self.active_adapter
        if isinstance(adapter, list):  # several active adapters: the first
            adapter = adapter[0]
        layers = [m for m in self.sparsegrad_layers() if adapter in m.sparsegrad_delta]
        bases = {}
        for m in layers:
            pair = m.sparsegrad_bases[adapter]
            if pair is not None and not pair.is_identity:
                stored = m._bases_storage_dtype(adapter)
                bases[m.sparsegrad_type[adapter]] = (pair.U_out.numel() + pair.U_in.numel()) * stored.itemsize
        adapted = {id(m.get_base_layer().weight) for m in layers}
        others = sum(p.numel() for p in self.model.parameters() if p.requires_grad and id(p) not in adapted)
        support = sum(m.sparsegrad_delta[adapter].nnz for m in layers)
        return {"adapted_layers": len(layers), "adapted_weights": sum(m.out_features * m.in_features for m in layers),
                "budget_per_step": sum(m.sparsegrad_k[adapter] for m in layers), "support": support,
                "adapter_bytes": 8 * support + sum(bases.values()), "other_trainable": others}

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        # PEFT freezes every parameter outside the adapter containers, the base weights included; here the base
        # weight W of a layer *is* what trains (in place) while one of its adapters is active and trainable.
        super()._mark_only_adapters_as_trainable(model)
        for module in model.modules():
            if isinstance(module, SparseGradLayer):
                module.update_trainability()

    def pending_bases(self) -> dict[str, str]:
        """{module name: layer type} of the adapters still waiting for calibration (no data was given)."""
        return {name: module.sparsegrad_type[a] for name, module in self.model.named_modules()
                if isinstance(module, SparseGradLayer)
                for a in module.sparsegrad_bases if module.sparsegrad_bases[a] is None
                and self.peft_config[a].bases == "calibrate"}

    def calibrate_pending(self, dataloader, progress: bool = True) -> None:
        """Calibrate the adapters created without data or bases on ``calibration_steps`` batches of ``dataloader``.

        ``SparseGradCallback`` calls this with the Trainer's training dataloader when training begins. The model is
        left as it was (weights, ``requires_grad``, ``.grad``); only the bases are filled in.
        """
        for adapter, config in self.peft_config.items():
            layers = {name: module for name, module in self.model.named_modules()
                      if isinstance(module, SparseGradLayer) and module.sparsegrad_bases.get(adapter, 0) is None}
            if not layers or config.bases != "calibrate":
                continue
            if dataloader is None:
                raise ValueError(NO_BASES_ERROR)
            with _calibrating(self.model):
                bases = collect_bases(self.model, layers, dataloader, config.calibration_steps, config.basis_method,
                                      progress, precision=config.gram_precision)
            for name, module in layers.items():
                module.sparsegrad_bases[adapter] = bases.pairs[module.sparsegrad_type[adapter]]

    # ---- checkpoint format -------------------------------------------------------------------------------------

    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        out = dict(super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names))
        prefix = _PEFT_PREFIX if any(k.startswith(_PEFT_PREFIX) for k in state_dict) else ""
        for name, module in model.named_modules():
            if not isinstance(module, SparseGradLayer) or adapter_name not in module.sparsegrad_delta:
                continue
            if module.sparsegrad_bases[adapter_name] is None:
                raise ValueError(f"Adapter '{adapter_name}' has no bases yet (calibration pending or not loaded); "
                                 "nothing consistent can be saved. " + NO_BASES_ERROR)
            pair = module.pair(adapter_name)  # in its storage dtype (bases_dtype) even before the first step
            delta = module.sparsegrad_delta[adapter_name]
            # the sparse change of W' on its support (zeros included: the support is what optimizer moments follow)
            out[f"{name}.sparsegrad_indices.{adapter_name}"] = delta.flat.to(torch.int32).cpu().contiguous()
            out[f"{name}.sparsegrad_values.{adapter_name}"] = delta.values.detach().float().cpu().contiguous()
            # (out, in) of ΔW': without it a MeProp adapter (no bases saved) of a smaller model would load silently
            out[f"{name}.sparsegrad_shape.{adapter_name}"] = torch.tensor(delta.shape, dtype=torch.int32)
            if not pair.is_identity:
                layer_type = module.sparsegrad_type[adapter_name]
                # in their storage dtype (float16 by default: half the file, and exactly what training used)
                out[bases_key(layer_type, "U_out", prefix)] = pair.U_out.detach().cpu().contiguous()
                out[bases_key(layer_type, "U_in", prefix)] = pair.U_in.detach().cpu().contiguous()
        return out

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        state_dict = dict(state_dict)
        layers = {name.removeprefix(_PEFT_PREFIX): m for name, m in model.named_modules()
                  if isinstance(m, SparseGradLayer) and adapter_name in m.sparsegrad_delta}
        loaded: dict[str, dict[str, torch.Tensor]] = {}
        for key in [k for k in state_dict if split_bases_key(k)[0] is not None]:
            layer_type, name = split_bases_key(key)
            loaded.setdefault(layer_type, {})[name] = state_dict.pop(key)
        pairs = {t: BasisPair(d["U_out"].float(), d["U_in"].float()) for t, d in loaded.items()}
        exact: dict[tuple[str, torch.dtype], bool] = {}
        new_bases: dict[str, BasisPair] = {}
        keep_float32: list[str] = []
        for name, layer in layers.items():
            layer_type = layer.sparsegrad_type[adapter_name]
            pair = pairs.get(layer_type)
            if pair is None:
                if layer.sparsegrad_bases[adapter_name] is None:
                    raise ValueError(f"The checkpoint has no bases for layer type '{layer_type}' (module '{name}'): "
                                     "it was saved for another model or target_modules.")
                continue
            if (pair.U_out.shape[0], pair.U_in.shape[0]) != (layer.out_features, layer.in_features):
                raise ValueError(
                    f"The checkpoint's bases for '{layer_type}' are {tuple(pair.U_out.shape)}, {tuple(pair.U_in.shape)} "
                    f"but module '{name}' is {layer.out_features} × {layer.in_features}: this adapter was trained on "
                    "a base model with other shapes."
                )
            new_bases[name] = pair
            # Bases saved in float32 by a float32-bases run (or an older version) stay float32 even where the config
            # says float16: rounding them would move the merged W away from what was trained.
            storage = layer._bases_storage_dtype(adapter_name)
            if storage != torch.float32 and not exact.setdefault((layer_type, storage), pair.exact_in(storage)):
                keep_float32.append(name)
        deltas: dict[str, SparseDelta] = {}
        for key in [k for k in state_dict if k.endswith(".sparsegrad_indices")]:
            head = key.removesuffix(".sparsegrad_indices")
            indices = state_dict.pop(key).long()
            values = state_dict.pop(f"{head}.sparsegrad_values")
            layer_name = head.removeprefix(_PEFT_PREFIX)
            layer = layers.get(layer_name)
            if layer is None:
                raise ValueError(f"The checkpoint adapts '{head}', which is not a SparseGrad layer of this model.")
            shape = (layer.out_features, layer.in_features)
            saved_shape = state_dict.pop(f"{head}.sparsegrad_shape", None)  # absent in older checkpoints
            if saved_shape is not None and tuple(saved_shape.tolist()) != shape:
                raise ValueError(f"The checkpoint's ΔW' for '{head}' is {tuple(saved_shape.tolist())} but the module's "
                                 f"weight is {shape[0]} × {shape[1]}: this adapter was trained on a base model with "
                                 "other shapes.")
            if indices.dim() == 1:  # flat indices (this version)
                indices = torch.stack([indices.div(shape[1], rounding_mode="floor"), indices.remainder(shape[1])])
            if indices.numel() and (indices[0].max() >= shape[0] or indices[1].max() >= shape[1]
                                    or indices.min() < 0):
                raise ValueError(f"The checkpoint's ΔW' for '{head}' does not fit the module's {shape[0]} × {shape[1]} "
                                 "weight: this adapter was trained on a base model with other shapes.")
            deltas[layer_name] = SparseDelta.from_indices(indices[0], indices[1], values, shape)
        # all checks passed: now change the model (W follows ΔW' where the adapter is applied)
        for name, pair in new_bases.items():
            layers[name].sparsegrad_bases[adapter_name] = pair.to(layers[name].get_base_layer().weight.device)
        for name in keep_float32:
            layers[name].sparsegrad_bases_dtype[adapter_name] = "float32"
        for name, delta in deltas.items():
            layers[name].set_delta(adapter_name, delta)
        return super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
