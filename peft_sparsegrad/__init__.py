"""peft-sparsegrad: SparseGrad (Chekalina et al., EMNLP 2024) as a Hugging Face PEFT method.

``import peft_sparsegrad`` registers the SPARSEGRAD method with PEFT; do it before ``get_peft_model`` or
``PeftModel.from_pretrained``.
"""

import logging

# peft imports bitsandbytes when it is installed (galore-torch pulls it in); its CPU backend warns on import that an
# optional kernel package is missing. Nothing here uses 4-bit kernels: keep that one logger quiet unless configured.
_bnb_logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
if _bnb_logger.level == logging.NOTSET:
    _bnb_logger.setLevel(logging.ERROR)

from .registration import SPARSEGRAD, patch_print_trainable_parameters, register_sparsegrad  # noqa: E402
from .config import SparseGradConfig
from .bases import BasisPair, SparseGradBases, load_bases, save_bases
from .calibration import calibrate
from .delta import SparseDelta
from .layer import SparseGradLayer, SparseGradLinear
from .model import SparseGradModel
from .optim import SparseGradOptimizer, SparseState, create_sparsegrad_optimizer, sparse_step
from .callback import SparseGradCallback
from .distributed import exclude_from_ddp, include_in_ddp
from .models import smollm2_path

register_sparsegrad(SparseGradConfig, SparseGradModel)
patch_print_trainable_parameters()

__version__ = "0.1.0"

__all__ = [
    "SPARSEGRAD",
    "BasisPair",
    "SparseGradBases",
    "SparseDelta",
    "SparseGradConfig",
    "SparseGradLayer",
    "SparseGradLinear",
    "SparseGradModel",
    "SparseGradOptimizer",
    "SparseState",
    "SparseGradCallback",
    "create_sparsegrad_optimizer",
    "exclude_from_ddp",
    "include_in_ddp",
    "sparse_step",
    "calibrate",
    "load_bases",
    "save_bases",
    "smollm2_path",
]
