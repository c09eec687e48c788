"""The quantize command: packed artifacts (the perplexity sweep of schemes is `superweight sweep`)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..core.errors import SuperweightError
from ..core.files import check_output
from ..model.arch import checked_against
from .inputs import check_super_weights, check_super_weights_early, read_super_weights
from .app import check_json_out, write_json_out, app, console, detect_default, err_console, load_lm, setup_logging
from .options import ModelArg, ModelOptions, grouped
from .console import print_tables
from ..core.progress import step
from ..model.streamed import StreamedModel
from ..find.streamed import stream_detect
from ..quant.streamed import stream_quantize
from ..quant.w8a8 import CALIBRATION, w8a8_activations
from ..quant.gguf_codec import check_type
from ..quant.gguf_export import export_gguf
from ..model.loaded import parse_dtype
from ..quant.config import scheme_config
from ..quant.artifact import Manifest, export_artifact
from ..model.mode import choose_mode


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


def streamed_keep(model: str, super_weights: Optional[Path], dtype: str, device: str) -> list:
    """The super weights of a model that streams: from ``--super-weights`` (checked against the model's
    meta skeleton: its architecture and every index, no weight read) or detected now, streamed as well."""
    if super_weights is not None:
        det = read_super_weights(super_weights)
        sm = StreamedModel(model, dtype, device)
        try:
            return checked_against(det, sm.arch, sm.model, model, super_weights)
        finally:
            sm.close()
    with step("detecting super weights (streamed)"):
        return _held(stream_detect(model, model_name=model, dtype=dtype, device=device))


def _streamed(model: str, config, keep_super_weights: bool, super_weights: Optional[Path], out: Path, force: bool,
              include: Optional[str], exclude: str, dtype: str, device: str, activations: bool, storage: dict) -> dict:
    """A local safetensors model quantized layer by layer (``stream_quantize``); the super weights from
    ``streamed_keep``."""
    keep = streamed_keep(model, super_weights, dtype, device) if keep_super_weights else []
    with step("quantizing layer by layer (streamed)"):
        return stream_quantize(model, config, keep, out, include, exclude, dtype=dtype, device=device, force=force,
                               activations=activations, **storage)


def _activations(lm, include: Optional[str], exclude: str) -> dict:
    """The W8A8 artifact's activations entry, found on calibration text before the weights change."""
    with step(f"finding the super activations' input channels ({CALIBRATION})"):
        return w8a8_activations(lm.model, lm.tokenizer, include, exclude)


def _gguf(model: str, scheme: str, search: str, keep_super_weights: bool, super_weights: Optional[Path], out: Path,
          force: bool, json_path: Optional[Path], layout_options: tuple, dtype: str, cache_dir, device: str) -> None:
    """``--format gguf``: one GGUF file, the super weights' tensors in F16 (``quant.gguf_export``)."""
    check_type(scheme)
    if any(o is not None for o in layout_options):
        raise SuperweightError("--format gguf takes its layout from the llama.cpp type (--scheme): drop --block, --group, "
                               "--clip-z, --topk, --outliers and --include")
    if out.exists() and not force:
        raise SuperweightError(f"{out} already exists: pick another --out or pass --force to replace it")
    check_output(out, "--out")
    lm = load_lm(model, dtype, cache_dir, None, device, dequantize=True)
    keep = keep_for(lm, keep_super_weights, super_weights)
    with step(f"writing {out} ({scheme}, {'our range search' if search == 'mse' else 'reference'} block parameters)"):
        summary = export_gguf(lm, scheme, search, keep, out)
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


@app.command("quantize")
@grouped
def quantize_cmd(
    model: str = ModelArg,
    scheme: str = typer.Option(
        "int4", "--scheme", help="int2, int3, int4, int8, nf4, ternary, or w8a8 (int8 weights per tensor by default, "
        "8-bit per-token inputs with the super activations' channels held out, found on calibration text)."
    ),
    block: Optional[int] = typer.Option(None, "--block", help="Paper's blocks: runs of B elements of the flattened tensor."),
    group: Optional[int] = typer.Option(None, "--group", help="Groups of G along the input dimension of each row."),
    per_channel: bool = typer.Option(False, "--per-channel", help="One scale per output channel."),
    clip_z: Optional[float] = typer.Option(None, "--clip-z", help="Clip weights at mean +- Z std before quantizing."),
    topk: int = typer.Option(0, "--topk", min=0, help="Ternary: also keep the K largest other weights per matrix in FP16."),
    search: Optional[str] = typer.Option(None, "--search", help="int*/nf4 range per group: minmax (default), mse (least-squares range search, never worse than minmax) or hqq (HQQ's solver, int*); --format gguf: mse (default) or minmax (llama.cpp's reference quantizers)."),
    zero_point: str = typer.Option("float", "--zero-point", help="int*: float (float16), int8 (integer steps) or fix8 (8-bit fixed point)."),
    outliers: float = typer.Option(0.0, "--outliers", min=0.0, help="int*/nf4: bits per weight spent on the largest other weights, held out exact."),
    sa_weight: float = typer.Option(1.0, "--sa-weight", min=1.0, help="With --search mse: fit weight of the columns that read the super activation."),
    keep_super_weights: bool = typer.Option(True, "--keep-super-weights/--no-keep-super-weights", help="Hold the super weights out (exact)."),
    super_weights: Optional[Path] = typer.Option(None, "--super-weights", help="A `superweight detect --json` file (default: detect now)."),
    include: Optional[str] = typer.Option(None, "--include", help="Regex: quantize only linear modules whose name matches."),
    exclude: str = typer.Option(r"(^|\.)lm_head$", "--exclude", help="Regex of linear modules to leave untouched."),
    oversize: str = typer.Option("error", "--oversize", help="A tensor smaller than --block/--group: error, or tensor (quantize it per tensor)."),
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
    if super_weights is not None and keep_super_weights:  # a bad file fails now, not after loading the model
        check_super_weights_early(read_super_weights(super_weights), model, super_weights, opts.cache_dir)
    check_json_out(json_path)

    if out_format not in ("artifact", "gguf"):
        raise SuperweightError(f"unknown --format {out_format!r}: use artifact or gguf")
    if out is None:
        raise SuperweightError("pass --out DIR to write an artifact (or run `superweight sweep` to compare schemes)")
    if out_format == "gguf":
        return _gguf(model, scheme, search or "mse", keep_super_weights, super_weights, out, force, json_path,
                     (block, group, clip_z, topk or None, outliers or None, include), opts.dtype, opts.cache_dir, opts.device)
    search = search or "minmax"
    if out.exists() and not force:
        raise SuperweightError(f"{out} already exists: pick another --out or pass --force to replace it")
    check_output(out, "--out", folder=True)
    config = scheme_config(scheme, block, group, clip_z, topk, per_channel, oversize,
                           search=search, zero_point=zero_point, outliers=outliers, sa_weight=sa_weight)

    storage = _storage(untouched_dtype, embeddings)
    w8a8 = scheme == "w8a8"
    if choose_mode(model, opts.dtype, stream, opts.device_map, opts.cache_dir, opts.device) == "stream":
        manifest = _streamed(model, config, keep_super_weights, super_weights, out, force, include, exclude, opts.dtype, opts.device,
                             w8a8, storage)
    else:
        lm = load_lm(model, opts, dequantize=True)
        keep = keep_for(lm, keep_super_weights, super_weights)
        acts = _activations(lm, include, exclude) if w8a8 else None
        manifest = export_artifact(lm, config, keep, out, force, include, exclude, write_back=False,  # only the file is used
                                   activations=acts, **storage)
    print_tables(Manifest.from_dict(manifest).tables(out))
    write_json_out(json_path, manifest)
