"""Super-outlier-aware quantization: primitives, configs and the model-level ``quantize`` verb.

>>> from superweight.quant import RTN, ZScore, quantize
>>> result = quantize(model, RTN(bits=4, block=128 * 128, clip=ZScore(9)), keep=detection.super_weights)
"""
from .config import (  # noqa: F401
    CONFIG_VERSION, RTN, SCHEMES, W8A8, Levels, Oversize, Percentile, Search, Ternary, ZeroPoint, ZScore, describe,
    from_dict, scheme_config, to_dict,
)
from .layout import Layout, make_layout  # noqa: F401
from .codes import NF4_LEVELS  # noqa: F401
from .primitives import (  # noqa: F401
    QuantizedTensor, clip_tensor, fake_quantize, holdout_quantize, quantize_per_token,
    quantize_tensor, sqnr,
)
from .pack import pack_bits, pack_ternary, packed_bytes, unpack_bits, unpack_ternary  # noqa: F401
from .api import DEFAULT_EXCLUDE, QuantResult, keep_indices, quantize, target_modules  # noqa: F401
from .w8a8 import W8A8Stats, simulate_w8a8  # noqa: F401
