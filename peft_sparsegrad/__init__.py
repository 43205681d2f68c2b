"""peft-sparsegrad: SparseGrad (Chekalina et al., EMNLP 2024) as a Hugging Face PEFT method.

``import peft_sparsegrad`` registers the SPARSEGRAD method with PEFT; do it before ``get_peft_model`` or
``PeftModel.from_pretrained``.
"""

from .registration import SPARSEGRAD, register_sparsegrad
from .config import SparseGradConfig
from .bases import BasisPair, SparseGradBases, load_bases, save_bases
from .calibration import calibrate
from .layer import SparseGradLayer, SparseGradLinear
from .model import SparseGradModel

register_sparsegrad(SparseGradConfig, SparseGradModel)

__version__ = "0.1.0"

__all__ = [
    "SPARSEGRAD",
    "BasisPair",
    "SparseGradBases",
    "SparseGradConfig",
    "SparseGradLayer",
    "SparseGradLinear",
    "SparseGradModel",
    "calibrate",
    "load_bases",
    "save_bases",
]
