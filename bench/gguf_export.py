"""Our GGUF (``superweight quantize --format gguf``) against llama.cpp's own quantizer of the same type,
at equal file size, with perplexity computed from llama.cpp's own logits on two texts.

For each model (the built-in SmolLM2-135M and Gemma-3-270M, whose float weights are themselves
dequantized from Q4_1 and Q4_K_M GGUF files: every figure is relative to those weights, and a type
that matches the source's grid, Q4_1 for SmolLM2, has an unusually easy job) one run:

1. writes the float model as an F32 GGUF (the product's writer; metadata and tokenizer copied from
   the source GGUF) and detects the super weights;
2. for each type T, four files:
   - ``llama.cpp T``: ``llama_model_quantize`` (llama-cpp-python) of the F32 file, ``pure`` (every 2-D
     decoder weight T, with llama.cpp's own fallback where a row is not whole blocks), token
     embedding and output in Q8_0, no importance matrix;
   - ``llama.cpp T + overrides``: the same with the super weights' tensors in F16 through the quantize
     parameters' tensor overrides (``tt_overrides``: what ``llama-quantize --tensor-type
     ^blk\\.L\\.ffn_down\\.weight$=f16`` passes; the patterns are ``superweight llama-cpp-overrides``');
   - ``ours T`` and ``ours T + overrides``: the product's writer (``GGUFPlan(T, search=True)``) with
     the same embedding type, and that file with the super weights' tensors in F16 (``with_f16``:
     what the writer writes with those overrides, without encoding every other tensor twice): the
     same types tensor by tensor as llama.cpp's, so the same size (checked: ``size_ratio``);
3. scores every file, and the F32 one, with ``llama_cpp.Llama(..., logits_all=True)``: windows of
   ``--seq-len`` tokens of WikiText-2 and of the LAMBADA passages (``eval.text``, context + target
   word), the project's own windowing (``eval.perplexity``), the NLL from llama.cpp's logits.

    nice python bench/gguf_export.py [--models smollm2-135m gemma3-270m] [--types q4_0 q4_1 q4_k]
        [--seq-len 512 --windows 8] [--threads 2]  -> bench/results/gguf_export.json
"""
from __future__ import annotations

import argparse
import ctypes
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from superweight.core.files import write_json_atomic  # noqa: E402
from superweight.eval.perplexity import tokenize_stream, window_spans  # noqa: E402
from superweight.eval.text import load_text  # noqa: E402
from superweight.find.loop import detect  # noqa: E402
from superweight.model.load import load_model  # noqa: E402
from superweight.quant.gguf_export import GGUFPlan, write_gguf  # noqa: E402
from superweight.quant.llama_cpp import TensorOverride, overrides_for  # noqa: E402

TEXTS = ("wikitext2", "lambada")
EMBED = "q8_0"


def llama_cpp_quantize(src: Path, out: Path, type_name: str, threads: int, overrides: list[TensorOverride] = ()) -> None:
    """llama.cpp's own quantizer: every 2-D weight ``type_name`` (``pure``), embedding and output Q8_0,
    ``overrides`` as ``--tensor-type PATTERN=TYPE`` (the parameters' ``tt_overrides``, null-terminated)."""
    import gguf
    import llama_cpp

    ftype = {"q4_k": "MOSTLY_Q4_K_M", "q5_k": "MOSTLY_Q5_K_M"}.get(type_name, f"MOSTLY_{type_name.upper()}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread = threads
    params.ftype = int(gguf.LlamaFileType[ftype])
    params.pure = True
    params.token_embedding_type = int(gguf.GGMLQuantizationType[EMBED.upper()])
    params.output_tensor_type = int(gguf.GGMLQuantizationType[EMBED.upper()])
    table = (llama_cpp.llama_model_tensor_override * (len(overrides) + 1))()
    for i, o in enumerate(overrides):
        table[i].pattern, table[i].type = o.pattern.encode(), int(gguf.GGMLQuantizationType[o.type.upper()])
    table[len(overrides)].pattern = None
    if overrides:
        params.tt_overrides = ctypes.cast(table, ctypes.POINTER(llama_cpp.llama_model_tensor_override))
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({type_name}) returned {rc}")


def with_f16(ours: Path, source: Path, names: set[str], out: Path) -> None:
    """``ours`` with the tensors ``names`` in F16 from ``source``'s float values: byte for byte what the
    writer writes with those overrides (it encodes each tensor on its own; an F16 tensor is the plain
    float16 of the weights), without encoding the others twice."""
    import gguf

    reader, src = gguf.GGUFReader(str(ours)), gguf.GGUFReader(str(source))
    floats = {t.name: np.array(t.data, dtype=np.float32) for t in src.tensors if t.name in names}
    w = gguf.GGUFWriter(str(out), reader.fields["general.architecture"].contents())
    for key, f in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        sub = f.types[1] if f.types[0] == gguf.GGUFValueType.ARRAY and len(f.types) > 1 else None
        w.add_key_value(key, f.contents(), f.types[0], sub_type=sub)
    for t in reader.tensors:
        if t.name in floats:
            w.add_tensor(t.name, floats[t.name].astype(np.float16))
        elif t.tensor_type == gguf.GGMLQuantizationType.F32:
            w.add_tensor(t.name, np.array(t.data))
        else:
            w.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def tensor_types(path: Path) -> dict[str, str]:
    import gguf

    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}


def llama_perplexity(path: Path, windows: list[tuple[list[int], int]], threads: int) -> dict:
    """exp(mean NLL) of each window's scored tokens, from llama.cpp's logits of every position."""
    from llama_cpp import Llama

    n_ctx = max(len(ids) for ids, _ in windows)
    llm = Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=True,
                n_threads=threads, verbose=False)
    nll, count, start = 0.0, 0, time.perf_counter()
    for ids, first in windows:
        llm.reset()
        llm.eval(ids)
        logits = torch.from_numpy(np.array(llm.scores[first - 1: len(ids) - 1], dtype=np.float32))
        target = torch.tensor(ids[first:])
        nll += float(torch.nn.functional.cross_entropy(logits.double(), target, reduction="sum"))
        count += len(target)
    del llm
    return {"ppl": float(np.exp(nll / count)), "nll": nll / count, "tokens": count, "seconds": time.perf_counter() - start}


def cached_perplexity(path: Path, text: str, windows: list[tuple[list[int], int]], threads: int) -> dict:
    """``llama_perplexity``, kept beside the file (``FILE.ppl-TEXT-NxL.json``, valid while the file's size
    and modification time are those it was measured on): ``--score`` processes measure files in
    parallel, the main run reuses their figures."""
    key = f"{text}-{len(windows)}x{max(len(ids) for ids, _ in windows)}"
    cache, stamp = Path(f"{path}.ppl-{key}.json"), [path.stat().st_size, path.stat().st_mtime]
    if cache.is_file():
        got = json.loads(cache.read_text())
        if got["stamp"] == stamp:
            return got["result"]
    result = llama_perplexity(path, windows, threads)
    write_json_atomic(cache, {"stamp": stamp, "result": result})
    return result


def text_windows(tokenizer, source: str, seq_len: int, n_windows: int) -> list[tuple[list[int], int]]:
    """The project's windows (``eval.perplexity``: stride = seq_len) over the first tokens of ``source``."""
    ids = tokenize_stream(tokenizer, load_text(source), seq_len * n_windows).tolist()
    return [(ids[b:e], f - b) for b, e, f in window_spans(len(ids), seq_len, seq_len)]


def files_for(lm, model: str, types: list[str], overrides: list[TensorOverride], work: Path, threads: int) -> dict[str, Path]:
    """The F32 source and, for each type, the four files compared (see the module docstring)."""
    model = model.strip("/").replace("/", "_")
    src = work / f"{model}-f32.gguf"
    if not src.is_file():  # files are written atomically: one that exists is whole (rerun after a cut run)
        write_gguf(lm, GGUFPlan("f32", search=False, embed_type="f32"), src)
    files = {"float (F32)": src}
    for t in types:
        lc = work / f"{model}-{t}-llamacpp.gguf"
        if not lc.is_file():
            llama_cpp_quantize(src, lc, t, threads)
        files[f"llama.cpp {t}"] = lc
        files[f"llama.cpp {t} + overrides"] = work / f"{model}-{t}-llamacpp-ovr.gguf"
        if not files[f"llama.cpp {t} + overrides"].is_file():
            llama_cpp_quantize(src, files[f"llama.cpp {t} + overrides"], t, threads, overrides)
        path, start = work / f"{model}-{t}-ours.gguf", time.perf_counter()
        if not path.is_file():
            write_gguf(lm, GGUFPlan(t, search=True, embed_type=EMBED), path)
            print(f"  ours {t}: written in {time.perf_counter() - start:.0f} s", flush=True)
        files[f"ours {t}"] = files[f"ours {t} + overrides"] = path
        if overrides:
            files[f"ours {t} + overrides"] = work / f"{model}-{t}-ours-ovr.gguf"
            with_f16(path, src, {o.tensor for o in overrides}, files[f"ours {t} + overrides"])
    return files


def run_model(model: str, args) -> dict:
    torch.set_num_threads(args.threads)
    lm = load_model(model)
    det = detect(lm.model, lm.tokenizer, model_name=model, arch=lm.arch)
    overrides = overrides_for(lm.arch.name, lm.model.config.num_hidden_layers, det.super_weights, "f16")
    windows = {text: text_windows(lm.tokenizer, text, args.seq_len, args.windows) for text in args.texts}
    files = files_for(lm, model, args.types, overrides, args.workdir, args.threads)
    notes = lm.notes
    del lm
    rows, types = {}, {}
    for name, path in files.items():
        types[name] = tensor_types(path)
        counts = {k: list(types[name].values()).count(k) for k in sorted(set(types[name].values()))}
        rows[name] = {"bytes": path.stat().st_size, "type_counts": counts,
                      "ppl": {text: cached_perplexity(path, text, w, args.threads) for text, w in windows.items()}}
        print(f"{model:14s} {name:28s} {rows[name]['bytes'] / 1e6:8.2f} MB  "
              + "  ".join(f"{t} {r['ppl']:.3f}" for t, r in rows[name]["ppl"].items()), flush=True)
    comparison = compare(rows, types, args.types)
    return {"notes": notes, "super_weights": [[s.layer, s.row, s.col] for s in det.super_weights],
            "overrides": [o.argument for o in overrides], "rows": rows, "comparison": comparison}


def score(model: str, paths: list[Path], args) -> None:
    """``--score``: measure these files only (the cache beside each), e.g. in parallel processes."""
    from transformers import AutoTokenizer

    from superweight.core.files import default_cache_dir
    from superweight.model.load import gguf_cache_folder
    from superweight.model.source import ModelSource, SourceKind

    src = ModelSource.of(model)
    folder = gguf_cache_folder(src.path, default_cache_dir()) if src.kind is SourceKind.GGUF else src.path
    tokenizer = AutoTokenizer.from_pretrained(folder)
    for path in paths:
        for text in args.texts:
            r = cached_perplexity(path, text, text_windows(tokenizer, text, args.seq_len, args.windows), args.threads)
            print(f"{path.name} {text} {r['ppl']:.3f}", flush=True)


def assemble(model: str, args) -> dict:
    """``--assemble``: the model's entry from the files and per-file perplexities already in the work
    folder (written by a run and by ``--score`` processes), without loading the model; what was not
    measured is listed under ``missing``. The overrides are read back from llama.cpp's file (its F16 tensors)."""
    stem, key = model.strip("/").replace("/", "_"), f"{args.windows}x{args.seq_len}"
    names = {"float (F32)": f"{stem}-f32.gguf"}
    for t in args.types:
        names.update({f"llama.cpp {t}": f"{stem}-{t}-llamacpp.gguf", f"llama.cpp {t} + overrides": f"{stem}-{t}-llamacpp-ovr.gguf",
                      f"ours {t}": f"{stem}-{t}-ours.gguf", f"ours {t} + overrides": f"{stem}-{t}-ours-ovr.gguf"})
    rows, types, missing = {}, {}, []
    for name, file in names.items():
        path = args.workdir / file
        caches = {text: Path(f"{path}.ppl-{text}-{key}.json") for text in args.texts}
        have = {text: json.loads(c.read_text())["result"] for text, c in caches.items() if path.is_file() and c.is_file()}
        missing += [f"{name}: {text}" for text in args.texts if text not in have]
        if have:
            types[name] = tensor_types(path)
            counts = {k: list(types[name].values()).count(k) for k in sorted(set(types[name].values()))}
            rows[name] = {"bytes": path.stat().st_size, "type_counts": counts, "ppl": have}
    first_lc = next((types[n] for n in types if n.startswith("llama.cpp") and n.endswith("overrides")), {})
    overrides = sorted(n for n, t in first_lc.items() if t == "F16")
    comparison = compare(rows, types, args.types)
    return {"assembled": True, "overrides": overrides, "rows": rows, "comparison": comparison, "missing": missing}


def against_reference(rows: dict, type_names: list[str], ref: str, fields) -> list[dict]:
    """Ours against the ``ref`` rows (``"llama.cpp"`` here, ``"reference"`` in bench/gguf_torch.py), type by
    type, with and without the overrides, on each text both were measured on; ``fields(name, ours, other)``
    adds each pair's own entries (``name``: ours' row name)."""
    out = []
    for t in type_names:
        for suffix in ("", " + overrides"):
            ours, other = rows.get(f"ours {t}{suffix}"), rows.get(f"{ref} {t}{suffix}")
            if ours is None or other is None:
                continue
            entry = {"type": t, "overrides": bool(suffix), **fields(f"{t}{suffix}", ours, other)}
            for text in (x for x in ours["ppl"] if x in other["ppl"]):
                o, r = ours["ppl"][text]["ppl"], other["ppl"][text]["ppl"]
                entry[text] = {"ours": o, ref: r, "ours_lower": o < r}
            out.append(entry)
    return out


def compare(rows: dict, types: dict, type_names: list[str]) -> list[dict]:
    """Ours against llama.cpp's quantizer, with the size ratio and whether the tensor types match."""
    return against_reference(rows, type_names, "llama.cpp", lambda name, ours, other: {
        "size_ratio": ours["bytes"] / other["bytes"], "same_types": types[f"ours {name}"] == types[f"llama.cpp {name}"]})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--score", nargs="+", type=Path, default=None, help="only measure these files (of --models' first)")
    ap.add_argument("--splice", nargs="+", default=None, help="OURS F32 OUT TENSOR...: write ours + overrides")
    ap.add_argument("--assemble", action="store_true", help="the JSON from the files and measurements in --workdir")
    ap.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    ap.add_argument("--types", nargs="+", default=["q4_0", "q4_1", "q4_k"])
    ap.add_argument("--texts", nargs="+", default=list(TEXTS))
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/superweight-gguf-export"))
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "gguf_export.json")
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    import llama_cpp

    if args.score:
        return score(args.models[0], args.score, args)
    if args.splice:  # ours + overrides from ours and the F32 file: OURS F32 OUT TENSOR...
        ours, src, out, *names = args.splice
        return with_f16(Path(ours), Path(src), set(names), Path(out))
    result = {"command": "python bench/gguf_export.py " + " ".join(sys.argv[1:]), "llama_cpp_python": llama_cpp.__version__,
              "seq_len": args.seq_len, "windows": args.windows, "embedding_type": EMBED, "threads": args.threads,
              "models": {}}
    for model in args.models:
        measured = assemble(model, args) if args.assemble else run_model(model, args)
        if args.out.is_file():  # models measured by other runs (one process per model) are kept
            result["models"] = {**json.loads(args.out.read_text())["models"], **result["models"]}
        result["models"][model] = {"command": result["command"], **measured}
        write_json_atomic(args.out, result)  # each model as soon as it is measured
    for model, r in result["models"].items():
        for c in r["comparison"]:
            print(model, c["type"], "+ovr" if c["overrides"] else "    ", f"size x{c['size_ratio']:.4f}",
                  "  ".join(f"{t}: ours {c[t]['ours']:.3f} vs {c[t]['llama.cpp']:.3f}" for t in args.texts if t in c))


if __name__ == "__main__":
    main()
