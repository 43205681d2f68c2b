"""Make SPARSEGRAD a PEFT method.

PEFT's ``register_peft_method`` (>= 0.15) only accepts names already in the closed ``PeftType`` enum and PEFT has no
plugin entry point, so importing this package adds the enum member at run time and registers config, tuner and prefix.
Both steps are idempotent: importing twice (or reloading) is harmless.
"""

from __future__ import annotations

from peft.utils import PeftType

NAME = "sparsegrad"
PREFIX = "sparsegrad_"


def _add_enum_member(enum_cls: type, name: str, value: str):
    """Add ``name = value`` to a str-valued Enum after its creation (CPython 3.10-3.13)."""
    if name in enum_cls.__members__:
        return enum_cls[name]
    member = str.__new__(enum_cls, value)
    member._name_ = name
    member._value_ = value
    member.__init__(value)
    if hasattr(enum_cls, "_add_member_"):  # Python >= 3.13 keeps the maps consistent itself
        enum_cls._add_member_(name, member)
    else:
        enum_cls._member_map_[name] = member
        enum_cls._member_names_.append(name)
    enum_cls._value2member_map_[value] = member
    # Enum's metaclass blocks attribute assignment, and Python >= 3.12 looks members up through the class dict.
    type.__setattr__(enum_cls, name, member)
    return member


SPARSEGRAD = _add_enum_member(PeftType, NAME.upper(), NAME.upper())


def register_sparsegrad(config_cls: type, model_cls: type) -> None:
    """Register config and tuner with PEFT, unless this process already did."""
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
    from peft.utils import register_peft_method

    if PEFT_TYPE_TO_TUNER_MAPPING.get(SPARSEGRAD) is model_cls:
        return
    if SPARSEGRAD in PEFT_TYPE_TO_TUNER_MAPPING:  # re-import of the package (e.g. importlib.reload): replace
        from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING

        for mapping in (PEFT_TYPE_TO_TUNER_MAPPING, PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING):
            mapping.pop(SPARSEGRAD, None)
    register_peft_method(name=NAME, config_cls=config_cls, model_cls=model_cls, prefix=PREFIX)


def patch_print_trainable_parameters() -> None:
    """``PeftModel.print_trainable_parameters`` counts every parameter with requires_grad, which for SparseGrad is
    every adapted weight (trained in place) and says nothing about what it trains. For a SparseGrad model it prints
    ``SparseGradModel.trainable_summary`` instead; other PEFT methods are untouched. Idempotent."""
    from peft import PeftModel

    original = PeftModel.print_trainable_parameters
    if getattr(original, "_sparsegrad", False):
        return

    def print_trainable_parameters(self) -> None:
        summary = getattr(self.base_model, "trainable_summary", None)
        config = self.peft_config.get(self.active_adapter) if isinstance(self.active_adapter, str) else None
        if not callable(summary) or getattr(config, "peft_type", None) != SPARSEGRAD:
            return original(self)
        s = summary()
        _, all_param = self.get_nb_trainable_parameters()
        print(f"SparseGrad: {s['budget_per_step']:,d} entries per step (Σk) of {s['adapted_weights']:,d} adapted "
              f"weights in {s['adapted_layers']} layers (trained in place) || support {s['support']:,d} entries || "
              f"adapter {s['adapter_bytes'] / 2**20:.1f} MiB || other trainable params {s['other_trainable']:,d} || "
              f"all params {all_param:,d}")

    print_trainable_parameters._sparsegrad = True
    print_trainable_parameters.__doc__ = original.__doc__
    PeftModel.print_trainable_parameters = print_trainable_parameters
