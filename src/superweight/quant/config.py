"""Quantization configs: small frozen dataclasses that round-trip through versioned JSON.

``RTN(bits=4, block=128 * 128, clip=ZScore(9))`` reads as the paper's blockwise INT4 with z-score
clipping; ``Ternary(topk=64)`` as BitNet b1.58 absmean ternary with 64 extra FP16 outliers per
matrix; ``W8A8(method="holdout")`` as the activation simulation. ``to_dict``/``from_dict`` give
``{"version": 1, "type": "RTN", ...}``; ``scheme_config("int4", block=...)`` maps CLI names.
"""
from __future__ import annotations

import difflib
from dataclasses import asdict, dataclass, fields
from enum import StrEnum
from typing import Union

from ..core.errors import SuperweightError

CONFIG_VERSION = 1


class Levels(StrEnum):
    UNIFORM = "uniform"  # asymmetric INT-N
    NF4 = "nf4"  # QLoRA NormalFloat4, absmax scale


class Oversize(StrEnum):
    ERROR = "error"  # a tensor smaller than the block or group is refused
    TENSOR = "tensor"  # ... or quantized per tensor


class Search(StrEnum):
    MINMAX = "minmax"  # each group's range
    MSE = "mse"  # least-squares range search (quant/search.py)
    HQQ = "hqq"  # HQQ's half-quadratic solver


class ZeroPoint(StrEnum):
    FLOAT = "float"  # float16
    INT8 = "int8"  # integer steps
    FIX8 = "fix8"  # 8-bit fixed point, 2^-(7-bits) steps


@dataclass(frozen=True)
class ZScore:
    """Clamp a tensor to ``mean +- z * std`` before quantizing."""

    z: float = 9.0

    def __post_init__(self) -> None:
        if not self.z > 0:
            raise SuperweightError(f"z-score clip threshold must be > 0, got {self.z}")


@dataclass(frozen=True)
class Percentile:
    """Clamp ``|w|`` to its ``p``-th percentile (e.g. 99.99) before quantizing."""

    p: float = 99.99

    def __post_init__(self) -> None:
        if not 0 < self.p <= 100:
            raise SuperweightError(f"percentile clip must be in (0, 100], got {self.p}")


Clip = Union[ZScore, Percentile]

# Linear layers fed by a norm (attention q/k/v and MLP up/gate of the 14 supported architectures).
SMOOTHABLE = r"(q_proj|k_proj|v_proj|qkv_proj|query_key_value|c_attn|gate_proj|up_proj|gate_up_proj|c_fc|fc1|dense_h_to_4h)$"


def _check_size(name: str, value: int | None) -> None:
    if value is not None and (not isinstance(value, int) or value < 1):
        raise SuperweightError(f"{name} must be a positive integer, got {value!r}")


def _coerce(config, name: str, kind: type[StrEnum]) -> None:
    """``config.name`` as a member of ``kind`` (a config built from strings or JSON), or a one-line error."""
    value = getattr(config, name)
    _check_choice(name, value, tuple(m.value for m in kind))
    object.__setattr__(config, name, kind(value))


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise SuperweightError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


def _check_granularity(group: int | None, block: int | None, per_channel: bool) -> None:
    _check_size("group", group)
    _check_size("block", block)
    if sum([group is not None, block is not None, per_channel]) > 1:
        raise SuperweightError("pick one of group, block or per_channel (or none: per tensor)")


@dataclass(frozen=True)
class RTN:
    """Asymmetric round-to-nearest INT-``bits`` (or NF4 levels) with one scale per group.

    Granularity: ``block`` = contiguous runs of B elements of the flattened tensor (the paper's
    "block"; a last, shorter run takes the remainder), ``group`` = runs of g along the input
    dimension of each row (shorter last group when g does not divide it), ``per_channel`` = one
    group per output row, none of them = one group per tensor. ``oversize="tensor"`` quantizes a
    tensor smaller than the block per tensor instead of refusing it.
    """

    bits: int = 4
    group: int | None = None
    block: int | None = None
    per_channel: bool = False
    clip: Clip | None = None
    levels: Levels = Levels.UNIFORM
    oversize: Oversize = Oversize.ERROR
    search: Search = Search.MINMAX
    zero_point: ZeroPoint = ZeroPoint.FLOAT
    outliers: float = 0.0  # sparse-part budget in bits per weight for the largest other weights of each matrix
    sa_weight: float = 1.0  # fit weight of the elements that read the super activation's channel (mse only)

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise SuperweightError(f"bits must be an integer from 2 to 8, got {self.bits!r}")
        _check_granularity(self.group, self.block, self.per_channel)
        _coerce(self, "levels", Levels)
        if self.levels == "nf4" and self.bits != 4:
            raise SuperweightError("NF4 levels need bits=4")
        _coerce(self, "oversize", Oversize)
        _coerce(self, "search", Search)
        if self.search == "hqq" and self.levels == "nf4":
            raise SuperweightError("search='hqq' moves a zero point, which NF4 has not: use search='mse'")
        _coerce(self, "zero_point", ZeroPoint)
        if self.zero_point != "float" and self.levels == "nf4":
            raise SuperweightError("NF4 has no zero point: drop zero_point='int8'")
        if not 0 <= self.outliers < 8:
            raise SuperweightError(f"outliers is a budget in bits per weight, from 0 to 8, got {self.outliers}")
        if not self.sa_weight >= 1:
            raise SuperweightError(f"sa_weight must be >= 1 (1 = no special care), got {self.sa_weight}")

    @property
    def kind(self) -> str:
        """The handler that stores this config's codes (see ``quant/schemes.py``)."""
        if self.levels == "nf4":
            return "nf4"
        return {"int8": "rtn_z8", "fix8": "rtn_zf8"}.get(self.zero_point, "rtn")

    @property
    def holds_out_of_range(self) -> bool:
        """True when held-out values are left out of their group's range (every new option);
        False for the paper's recipe and plain RTN, where kept weights are quantized with the rest."""
        return self.search != "minmax" or self.outliers > 0 or self.zero_point != "float"


@dataclass(frozen=True)
class Ternary:
    """BitNet b1.58 absmean ternary: ``gamma = mean|W|`` per tensor (or per group / block),
    ``W_q = clip(round(W / (gamma + eps)), -1, 1)``; ``topk`` largest other weights per matrix are
    kept as sparse FP16 values (on top of any super weights passed as ``keep``)."""

    group: int | None = None
    block: int | None = None
    topk: int = 0
    eps: float = 1e-5
    oversize: Oversize = Oversize.ERROR

    def __post_init__(self) -> None:
        _check_granularity(self.group, self.block, False)
        if not isinstance(self.topk, int) or self.topk < 0:
            raise SuperweightError(f"topk must be a non-negative integer, got {self.topk!r}")
        _coerce(self, "oversize", Oversize)

    @property
    def kind(self) -> str:
        return "ternary"


@dataclass(frozen=True)
class W8A8:
    """Simulated W8A8: per-tensor 8-bit weights, per-token 8-bit activations on every linear input.

    ``method``: "naive"; "holdout" (elements with ``|x| >= holdout_ratio * median|x|`` of the input
    tensor, i.e. the super activations, are replaced by the median, the tensor is quantized and
    dequantized, then they are put back exactly); "smoothquant" (per-channel smoothing with
    ``alpha``, calibrated on a few text samples, on the layers matching ``smooth``: those that read a
    norm's output, as SmoothQuant's ``smooth_lm`` does; o_proj / down_proj are quantized naively,
    since folding their smoothing into a norm is impossible).
    """

    method: str = "naive"
    alpha: float = 0.85
    holdout_ratio: float = 1000.0
    smooth: str = SMOOTHABLE
    weights: str = "tensor"  # "tensor": asymmetric per tensor (the paper); "channel": symmetric absmax per output row
    symmetric: bool = False  # activations: asymmetric per token (the paper) or symmetric absmax (SmoothQuant's code)

    def __post_init__(self) -> None:
        if self.method not in ("naive", "holdout", "smoothquant"):
            raise SuperweightError(f"W8A8 method must be naive, holdout or smoothquant, got {self.method!r}")
        _check_choice("weights", self.weights, ("tensor", "channel"))
        if not 0 <= self.alpha <= 1:
            raise SuperweightError(f"SmoothQuant alpha must be in [0, 1], got {self.alpha}")


QuantConfig = Union[RTN, Ternary, W8A8]
_TYPES = {cls.__name__: cls for cls in (RTN, Ternary, W8A8, ZScore, Percentile)}


def to_dict(config) -> dict:
    """``{"version": 1, "type": <class>, <fields>}``; nested clip configs become dicts too."""
    out = {"version": CONFIG_VERSION, "type": type(config).__name__}
    for f in fields(config):
        value = getattr(config, f.name)
        out[f.name] = to_dict(value) if type(value).__name__ in _TYPES else value
    return out


def from_dict(data: dict):
    """Rebuild a config written by ``to_dict``; a clear error for another version or type."""
    if not isinstance(data, dict):
        raise SuperweightError(f"a quantization config must be a JSON object, got {type(data).__name__}")
    if data.get("version") != CONFIG_VERSION:
        raise SuperweightError(f"quantization config version {data.get('version')!r} is not {CONFIG_VERSION}")
    name = data.get("type")
    if name not in _TYPES:
        raise SuperweightError(f"unknown quantization config type {name!r}: one of {', '.join(_TYPES)}")
    cls = _TYPES[name]
    kwargs = {}
    for f in fields(cls):
        if f.name in data:
            value = data[f.name]
            kwargs[f.name] = from_dict(value) if isinstance(value, dict) else value
    return cls(**kwargs)


SCHEMES = ("int2", "int3", "int4", "int8", "nf4", "ternary", "w8a8")

# An artifact's 8-bit embeddings (``quantize --embeddings int8``): per row (token), min/max 8-bit codes.
EMBEDDING_INT8 = RTN(bits=8, per_channel=True)


def scheme_config(
    scheme: str, block: int | None = None, group: int | None = None, clip_z: float | None = None,
    topk: int = 0, per_channel: bool = False, oversize: str = "error", **rtn_options,
) -> RTN | Ternary:
    """The config behind a CLI ``--scheme`` name; ``rtn_options`` (``search``, ``zero_point``,
    ``outliers``, ``sa_weight``) go to ``RTN``. ``w8a8``: its weights' config (int8, per tensor unless a
    block, group or per-channel is given); the activations are the artifact's ``activations`` entry."""
    clip = ZScore(clip_z) if clip_z is not None else None
    if (scheme.startswith("int") and scheme in SCHEMES) or scheme == "w8a8":
        return RTN(bits=int(scheme[3:]) if scheme.startswith("int") else 8, block=block, group=group,
                   per_channel=per_channel, clip=clip, oversize=oversize, **rtn_options)
    if scheme == "nf4":
        return RTN(bits=4, block=block, group=group, per_channel=per_channel, clip=clip, levels="nf4", oversize=oversize,
                   **rtn_options)
    if rtn_options and any(v not in (None, 0, 1.0, "minmax", "float") for v in rtn_options.values()):
        raise SuperweightError(f"{', '.join(rtn_options)} apply to int* and nf4 schemes, not {scheme}")
    if scheme == "ternary":
        if clip is not None:
            raise SuperweightError("--clip-z does not apply to ternary (absmean already bounds the scale)")
        if per_channel:
            raise SuperweightError("ternary is per tensor, --group or --block: drop --per-channel")
        return Ternary(group=group, block=block, topk=topk, oversize=oversize)
    guess = difflib.get_close_matches(scheme, SCHEMES, n=1)
    hint = f" Did you mean {guess[0]}?" if guess else ""
    raise SuperweightError(f"unknown scheme {scheme!r}.{hint} Use one of: {', '.join(SCHEMES)}")


def describe(config) -> str:
    """A short human label, e.g. ``int4 block=16384 clip z=9``."""
    d = asdict(config)
    if isinstance(config, W8A8):
        setting = "" if (config.weights, config.symmetric) == ("tensor", False) else f" ({config.weights} W, {'sym' if config.symmetric else 'asym'} A)"
        return f"W8A8 {config.method}{setting}"
    head = "ternary" if isinstance(config, Ternary) else ("nf4" if config.levels == "nf4" else f"int{config.bits}")
    parts = [head]
    for key in ("block", "group"):
        if d.get(key):
            parts.append(f"{key}={d[key]}")
    if d.get("per_channel"):
        parts.append("per-channel")
    if not any(d.get(k) for k in ("block", "group", "per_channel")):
        parts.append("per-tensor")
    clip = getattr(config, "clip", None)
    if isinstance(clip, ZScore):
        parts.append(f"clip z={clip.z:g}")
    elif isinstance(clip, Percentile):
        parts.append(f"clip p={clip.p:g}")
    if isinstance(config, Ternary) and config.topk:
        parts.append(f"top{config.topk}")
    if isinstance(config, RTN):
        parts += _rtn_options(config)
    return " ".join(parts)


def _rtn_options(config: RTN) -> list[str]:
    out = [config.search] if config.search != "minmax" else []
    if config.zero_point != "float":
        out.append(f"zero={config.zero_point}")
    if config.outliers:
        out.append(f"outliers={config.outliers:g}b")
    if config.sa_weight != 1:
        out.append(f"sa-weight={config.sa_weight:g}")
    return out
