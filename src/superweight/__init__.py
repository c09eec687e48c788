"""superweight: find, prove and use the super weights of causal language models.

>>> import superweight as sw
>>> lm = sw.load_model("smollm2-135m")
>>> result = sw.detect(lm.model, lm.tokenizer)
>>> [(s.layer, s.row, s.col) for s in result.super_weights]
"""
from .core.version import __version__

from .core.errors import SuperweightError
from .model.arch import ArchSpec, SUPPORTED
from .model.arch_infer import get_arch
from .model.load import load_model
from .model.loaded import LoadedModel
from .model.source import DEFAULT_MODEL, ModelSource, SourceKind
from .model.capture import ActivationCapture
from .find.loop import DetectionResult, SpikeRule, SuperWeight, detect
from .find.api import FindConfig, find_super_weights
from .prove.ablate import scaled_weights, zeroed_weights
from .quant.artifact import load_quantized, save_quantized
from .eval.generate import Generation, generate

__all__ = [
    "__version__", "SuperweightError", "ArchSpec", "get_arch", "SUPPORTED", "LoadedModel", "load_model",
    "DEFAULT_MODEL", "ModelSource", "SourceKind", "ActivationCapture", "DetectionResult", "SpikeRule", "SuperWeight", "detect",
    "FindConfig", "find_super_weights",
    "scaled_weights", "zeroed_weights",
    "load_quantized", "save_quantized", "generate", "Generation",
]
