"""Default SparseGrad targets: the MLP (feed-forward) Linear layers of each architecture, never attention.

PEFT matches list entries of ``target_modules`` as module-name suffixes. For BERT-like encoders the FFN output layer
(``layer.N.output.dense``) shares its suffix with the attention output (``layer.N.attention.output.dense``), so those
architectures also get a default ``exclude_modules`` entry. Keeping the targets a *list* (not a regex) keeps PEFT's
``layers_to_transform`` / ``layers_pattern`` usable with the defaults.
"""

from __future__ import annotations

import re

import torch
from torch import nn

_BERT_LIKE = (["intermediate.dense", "output.dense"], ["attention.output.dense"])
_LLAMA_LIKE = (["up_proj", "down_proj"], [])
_NEOX_LIKE = (["dense_h_to_4h", "dense_4h_to_h"], [])

# model_type -> (target suffixes, excluded suffixes)
DEFAULT_TARGET_MODULES: dict[str, tuple[list[str], list[str]]] = {
    **{t: _BERT_LIKE for t in ("bert", "roberta", "electra", "xlm-roberta", "camembert", "mpnet", "ernie")},
    "distilbert": (["ffn.lin1", "ffn.lin2"], []),
    **{t: _LLAMA_LIKE for t in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3")},
    "gpt2": (["mlp.c_fc", "mlp.c_proj"], []),
    "opt": (["fc1", "fc2"], []),
    **{t: (["wi", "wi_0", "wi_1", "wo"], []) for t in ("t5", "mt5", "umt5")},
    "gpt_neox": _NEOX_LIKE,
    "falcon": _NEOX_LIKE,
}

_BLOCK_INDEX = re.compile(r"(?<=\.)\d+(?=\.|$)|^\d+(?=\.)")


def is_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2) stores its weight as in × out; detected by name to avoid a hard import."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def weight_shape(module: nn.Module) -> tuple[int, int]:
    """(out, in) of a Linear or Conv1D layer, whatever its storage layout."""
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features
    if is_conv1d(module):
        in_features, out_features = module.weight.shape
        return out_features, in_features
    raise TypeError(
        f"SparseGrad can only adapt torch.nn.Linear or transformers' Conv1D layers, got {type(module).__name__}. "
        "Pass `target_modules` naming the MLP Linear layers of your model."
    )


def layer_role(module_name: str) -> str:
    """The role of a layer: its name with block indices replaced by '*'.

    ``bert.encoder.layer.3.intermediate.dense`` -> ``bert.encoder.layer.*.intermediate.dense``. Layers that share a role
    (and shape) form one *layer type*, which shares one pair of bases (as in the paper).
    """
    return _BLOCK_INDEX.sub("*", module_name)


def assign_layer_types(shapes: dict[str, tuple[int, int]]) -> dict[str, str]:
    """Map module name -> layer type key. The key is the role, suffixed by the shape only if one role has several."""
    shapes_per_role: dict[str, set[tuple[int, int]]] = {}
    for name, shape in shapes.items():
        shapes_per_role.setdefault(layer_role(name), set()).add(shape)
    types = {}
    for name, shape in shapes.items():
        role = layer_role(name)
        types[name] = role if len(shapes_per_role[role]) == 1 else f"{role}[{shape[0]}x{shape[1]}]"
    return types


def is_supported_layer(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def base_weight_as_out_in(module: nn.Module) -> torch.Tensor:
    """The weight as an (out × in) view, W in the README's notation."""
    return module.weight.T if is_conv1d(module) else module.weight


def resolve_default_targets(config, model_type: str | None) -> None:
    """Fill ``config.target_modules`` (and the matching default exclusions) when the user left it None."""
    if config.target_modules is not None:
        return
    if model_type not in DEFAULT_TARGET_MODULES:
        known = ", ".join(sorted(DEFAULT_TARGET_MODULES))
        raise ValueError(
            f"SparseGrad has no default MLP targets for model_type={model_type!r} (known: {known}). Pass "
            "target_modules=[...] naming the feed-forward Linear layers, e.g. ['up_proj', 'down_proj']."
        )
    targets, excluded = DEFAULT_TARGET_MODULES[model_type]
    config.target_modules = set(targets)
    if excluded:
        if config.exclude_modules is None:
            config.exclude_modules = set(excluded)
        elif isinstance(config.exclude_modules, str):
            suffixes = "|".join(re.escape(e) for e in excluded)
            config.exclude_modules = rf"(?:{config.exclude_modules})|(?:.*\.(?:{suffixes}))"
        else:
            config.exclude_modules = set(config.exclude_modules) | set(excluded)


def find_target_modules(model: nn.Module, config) -> dict[str, nn.Module]:
    """Modules the config targets (name -> module), validated before anything is replaced.

    Skips the internals of already-injected tuner layers (a second adapter reuses the wrapper, not its base layer).
    """
    from peft.tuners.tuners_utils import BaseTunerLayer, check_target_module_exists

    matched: dict[str, nn.Module] = {}
    inside_tuner: list[str] = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(p) for p in inside_tuner):
            continue
        if isinstance(module, BaseTunerLayer):
            inside_tuner.append(name + ".")
        result = check_target_module_exists(config, name)
        if result:  # an excluded module is falsy
            matched[name] = module
    if not matched:
        raise ValueError(
            f"No module matched target_modules={config.target_modules!r}"
            + (f" (exclude_modules={config.exclude_modules!r})" if config.exclude_modules else "")
            + ". Check the names with `[n for n, _ in model.named_modules()]`."
        )
    for name, module in matched.items():
        base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
        if not is_supported_layer(base):
            raise TypeError(
                f"Target '{name}' is a {type(base).__name__}; SparseGrad adapts only torch.nn.Linear and "
                "transformers' Conv1D. Narrow target_modules to the MLP Linear layers."
            )
    return matched
