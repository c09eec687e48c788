"""The quantize command: packed artifacts (the perplexity sweep of schemes is `superweight sweep`)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import typer

from ..core.errors import SuperweightError
from ..core.files import check_output
from ..model.arch import checked_against
from .inputs import check_super_weights, check_super_weights_early, read_super_weights
from .app import app, check_json_out, console, detect_default, err_console, load_lm, mode_of, open_streamed, setup_logging, write_json_out
from .options import ModelArg, ModelOptions, cli, grouped
from .console import print_tables
from ..core.progress import step
from ..model.streamed import StreamedModel
from ..find.streamed import stream_detect
from ..quant.streamed import stream_quantize
from ..quant.w8a8 import CALIBRATION, w8a8_activations
from ..quant.gguf_codec import check_type
from ..quant.gguf_export import export_gguf
from ..model.loaded import parse_dtype
from ..quant.config import RTN, Ternary, scheme_config
from ..quant.artifact import Manifest, export_artifact
from ..model.mode import Mode
from ..model.source import ModelSource


def parse_size(text: str) -> Optional[int]:
    """``16384``, ``128x128`` or ``tensor`` (per tensor) -> elements per block."""
    if text.lower() in ("tensor", "per-tensor", "none"):
        return None
    try:
        parts = [int(p) for p in text.lower().split("x")]
    except ValueError:
        raise SuperweightError(f"bad --size {text!r}: use e.g. 16384, 128x128 or tensor") from None
    size = 1
    for p in parts:
        size *= p
    return size


def keep_for(lm, keep: bool, super_weights: Optional[Path]):
    """The super weights to hold out: from a detection JSON, or detected now; [] when not kept."""
    if not keep:
        return []
    if super_weights is not None:
        return check_super_weights(read_super_weights(super_weights), lm, super_weights)
    return _held(detect_default(lm))


def _held(result) -> list:
    """A detection's super weights, to hold out, with a note when there are none or the fallback found them."""
    if not result.super_weights:
        err_console.print("[yellow]note:[/] no super weight detected: nothing is held out")
    elif any(a.fallback for a in result.activations):
        err_console.print(
            f"[yellow]note:[/] the {len(result.super_weights)} super weight(s) held out were found by detection's fallback: "
            f"no activation reached {result.trace_rule.ratio:,.0f}x its layer's median (`superweight detect` measures them)"
        )
    return result.super_weights


def streamed_keep(sm: StreamedModel, super_weights: Optional[Path]) -> list:
    """The super weights of a model that streams: from ``--super-weights`` (checked against the model's
    meta skeleton: its architecture and every index, no weight read) or detected now, streamed as well."""
    if super_weights is not None:
        return checked_against(read_super_weights(super_weights), sm.arch, sm.model, sm.source.ref, super_weights)
    with step("detecting super weights (streamed)"):
        return _held(stream_detect(sm, model_name=sm.source.ref))


def _streamed(source: ModelSource, config, keep_super_weights: bool, super_weights: Optional[Path], out: Path, force: bool,
              include: Optional[str], exclude: str, opts: ModelOptions, activations: bool, storage: dict) -> dict:
    """A local safetensors model quantized layer by layer (``stream_quantize``), the super weights from
    ``streamed_keep``: one ``StreamedModel`` for both."""
    with open_streamed(source, opts) as sm:
        keep = streamed_keep(sm, super_weights) if keep_super_weights else []
        with step("quantizing layer by layer (streamed)"):
            return stream_quantize(sm, config, keep, out, include, exclude, force=force, activations=activations, **storage)


def _activations(lm, include: Optional[str], exclude: str) -> dict:
    """The W8A8 artifact's activations entry, found on calibration text before the weights change."""
    with step(f"finding the super activations' input channels ({CALIBRATION})"):
        return w8a8_activations(lm.model, lm.tokenizer, include, exclude)


def _gguf(source: ModelSource, scheme: SchemeOptions, keep_super_weights: bool, super_weights: Optional[Path], out: Path,
          force: bool, json_path: Optional[Path], include: Optional[str], opts: ModelOptions) -> None:
    """``--format gguf``: one GGUF file, the super weights' tensors in F16 (``quant.gguf_export``)."""
    search = scheme.search or "mse"
    check_type(scheme.scheme)
    if any(o is not None for o in (scheme.block, scheme.group, scheme.clip_z, scheme.topk or None, scheme.outliers or None,
                                   include)):
        raise SuperweightError("--format gguf takes its layout from the llama.cpp type (--scheme): drop --block, --group, "
                               "--clip-z, --topk, --outliers and --include")
    if out.exists() and not force:
        raise SuperweightError(f"{out} already exists: pick another --out or pass --force to replace it")
    check_output(out, "--out")
    lm = load_lm(source, opts, dequantize=True)
    keep = keep_for(lm, keep_super_weights, super_weights)
    with step(f"writing {out} ({scheme.scheme}, {'our range search' if search == 'mse' else 'reference'} block parameters)"):
        summary = export_gguf(lm, scheme.scheme, search, keep, out)
    types: dict[str, int] = {}
    for row in summary["tensors"].values():
        types[row["type"]] = types.get(row["type"], 0) + 1
    console.print(f"wrote {out}: {summary['bytes'] / 1e6:.1f} MB, tensors by type "
                  + ", ".join(f"{k} {v}" for k, v in sorted(types.items()))
                  + (f"; super weights' tensors: {', '.join(summary['overrides'])}" if summary["overrides"] else ""))
    write_json_out(json_path, summary)


def _storage(untouched_dtype: str, embeddings: str) -> dict:
    """``--untouched-dtype`` and ``--embeddings`` as ``save_quantized``'s keywords, checked before any load."""
    if embeddings not in ("float", "int8"):
        raise SuperweightError(f"bad --embeddings {embeddings!r}: use float or int8")
    if untouched_dtype not in ("auto", "float16", "bfloat16", "float32"):
        raise SuperweightError(f"bad --untouched-dtype {untouched_dtype!r}: use auto, float16, bfloat16 or float32")
    return {"untouched_dtype": None if untouched_dtype == "auto" else parse_dtype(untouched_dtype), "embeddings": embeddings}


@dataclass(frozen=True)
class SchemeOptions:
    """How ``quantize`` quantizes: the scheme, its layout and its range search (an option group)."""

    scheme: str = cli(typer.Option(
        "int4", "--scheme", help="int2, int3, int4, int8, nf4, ternary, or w8a8 (int8 weights per tensor by default, "
        "8-bit per-token inputs with the super activations' channels held out, found on calibration text)."))
    block: Optional[int] = cli(typer.Option(None, "--block", help="Paper's blocks: runs of B elements of the flattened tensor."))
    group: Optional[int] = cli(typer.Option(None, "--group", help="Groups of G along the input dimension of each row."))
    per_channel: bool = cli(typer.Option(False, "--per-channel", help="One scale per output channel."))
    clip_z: Optional[float] = cli(typer.Option(None, "--clip-z", help="Clip weights at mean +- Z std before quantizing."))
    topk: int = cli(typer.Option(0, "--topk", min=0, help="Ternary: also keep the K largest other weights per matrix in FP16."))
    search: Optional[str] = cli(typer.Option(
        None, "--search", help="int*/nf4 range per group: minmax (default), mse (least-squares range search, never worse "
        "than minmax) or hqq (HQQ's solver, int*); --format gguf: mse (default) or minmax (llama.cpp's reference quantizers)."))
    zero_point: str = cli(typer.Option(
        "float", "--zero-point", help="int*: float (float16), int8 (integer steps) or fix8 (8-bit fixed point)."))
    outliers: float = cli(typer.Option(
        0.0, "--outliers", min=0.0, help="int*/nf4: bits per weight spent on the largest other weights, held out exact."))
    sa_weight: float = cli(typer.Option(
        1.0, "--sa-weight", min=1.0, help="With --search mse: fit weight of the columns that read the super activation."))
    oversize: str = cli(typer.Option(
        "error", "--oversize", help="A tensor smaller than --block/--group: error, or tensor (quantize it per tensor)."))

    def config(self) -> RTN | Ternary:
        """The quantization config these options name (``quant.config.scheme_config``)."""
        return scheme_config(self.scheme, self.block, self.group, self.clip_z, self.topk, self.per_channel, self.oversize,
                             search=self.search or "minmax", zero_point=self.zero_point, outliers=self.outliers,
                             sa_weight=self.sa_weight)


@app.command("quantize")
@grouped
def quantize_cmd(
    model: str = ModelArg,
    scheme: SchemeOptions = SchemeOptions(),
    keep_super_weights: bool = typer.Option(True, "--keep-super-weights/--no-keep-super-weights", help="Hold the super weights out (exact)."),
    super_weights: Optional[Path] = typer.Option(None, "--super-weights", help="A `superweight detect --json` file (default: detect now)."),
    include: Optional[str] = typer.Option(None, "--include", help="Regex: quantize only linear modules whose name matches."),
    exclude: str = typer.Option(r"(^|\.)lm_head$", "--exclude", help="Regex of linear modules to leave untouched."),
    out: Optional[Path] = typer.Option(None, "--out", help="Artifact folder to write (written to a temp folder, then renamed)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing --out folder."),
    untouched_dtype: str = typer.Option(
        "auto", "--untouched-dtype", help="Tensors left unquantized (embeddings, norms): auto (a 16-bit model's own dtype; "
        "float32 ones in float16, bfloat16 beyond its range), float16, bfloat16 or float32."),
    embeddings: str = typer.Option("float", "--embeddings", help="float, or int8: the embeddings as per-row 8-bit codes."),
    stream: bool = typer.Option(
        False, "--stream", help="Read a local safetensors model one layer at a time (automatic when it does not fit in memory)."
    ),
    out_format: str = typer.Option("artifact", "--format", help="artifact (a packed folder) or gguf (one file llama.cpp runs; "
                                   "--scheme is then a llama.cpp type: q4_0, q4_1, q5_0, q5_1, q4_k, q5_k, q6_k, q8_0, tq2_0 ...)."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write the manifest here."),
    opts: ModelOptions = ModelOptions(),
) -> None:
    """Quantize MODEL into a packed artifact (--out); `superweight sweep` compares schemes by perplexity.

    Example: `superweight quantize --scheme int4 --group 64 --search mse --zero-point int8 --outliers 0.12
    --sa-weight 16 --out smol-int4` (the outlier-aware scheme; the paper's recipe is
    `--block 16384 --clip-z 9`), then
    `superweight.load_quantized("smol-int4")` (or any command with MODEL = smol-int4).
    """
    setup_logging(opts.verbose, opts.quiet)
    det = read_super_weights(super_weights) if super_weights is not None and keep_super_weights else None
    source = ModelSource.of(model)  # resolved once: the checks, the mode and the load share it
    if det is not None:  # a bad file fails now, not after loading the model
        check_super_weights_early(det, source, super_weights, opts.cache_dir)
    check_json_out(json_path)
    out = _checked_out(out, out_format, force)
    if out_format == "gguf":
        return _gguf(source, scheme, keep_super_weights, super_weights, out, force, json_path, include, opts)
    config, storage = scheme.config(), _storage(untouched_dtype, embeddings)
    w8a8 = scheme.scheme == "w8a8"
    if mode_of(source, stream, opts) is Mode.STREAM:
        manifest = _streamed(source, config, keep_super_weights, super_weights, out, force, include, exclude, opts, w8a8,
                             storage)
    else:
        lm = load_lm(source, opts, dequantize=True)
        keep = keep_for(lm, keep_super_weights, super_weights)
        acts = _activations(lm, include, exclude) if w8a8 else None
        manifest = export_artifact(lm, config, keep, out, force, include, exclude, write_back=False,  # only the file is used
                                   activations=acts, **storage)
    print_tables(Manifest.from_dict(manifest).tables(out))
    write_json_out(json_path, manifest)


def _checked_out(out: Optional[Path], out_format: str, force: bool) -> Path:
    """``--out`` and ``--format`` checked before any work: a known format, a path given, not there (or --force)."""
    if out_format not in ("artifact", "gguf"):
        raise SuperweightError(f"unknown --format {out_format!r}: use artifact or gguf")
    if out is None:
        raise SuperweightError("pass --out DIR to write an artifact (or run `superweight sweep` to compare schemes)")
    if out_format == "artifact":  # the GGUF path checks its file after its own option checks
        if out.exists() and not force:
            raise SuperweightError(f"{out} already exists: pick another --out or pass --force to replace it")
        check_output(out, "--out", folder=True)
    return out
