"""superweight: find, prove and use the super weights of causal language models.

>>> import superweight as sw
>>> lm = sw.load_model("smollm2-135m")
>>> result = sw.detect(lm.model, lm.tokenizer)
>>> [(s.layer, s.row, s.col) for s in result.super_weights]
"""
__version__ = "0.1.0"

from .errors import SuperweightError  # noqa: E402
from .arch import ArchSpec, get_arch, SUPPORTED  # noqa: E402
from .load import LoadedModel, load_model, DEFAULT_MODEL  # noqa: E402
from .capture import ActivationCapture  # noqa: E402
from .detect import DetectionResult, SpikeRule, SuperWeight, detect  # noqa: E402
from .ablate import scaled_weights, zeroed_weights  # noqa: E402
from .export import load_quantized, save_quantized  # noqa: E402

__all__ = [
    "SuperweightError", "ArchSpec", "get_arch", "SUPPORTED", "LoadedModel", "load_model",
    "DEFAULT_MODEL", "ActivationCapture", "DetectionResult", "SpikeRule", "SuperWeight", "detect",
    "scaled_weights", "zeroed_weights",
    "load_quantized", "save_quantized",
]
