"""Quantized artifacts at run time: resident weight bytes, peak RSS, decode speed and perplexity, packed
(``quant.runtime.PackedLinear``) against the float32 and bfloat16 models, the same artifact loaded dense, and
llama.cpp on GGUF files of the same weights.

    nice python bench/runtime.py [--models smollm2-135m gemma3-270m synthetic-1b] [--threads 2]
        -> bench/results/runtime.json

Every configuration runs in its own process (``--child``), so the peak RSS is that configuration's alone. Decode
speed: batch 1, a 16-token prompt, ``--new-tokens`` greedy tokens with EOS ignored, tokens after the first over
the time since the first (``superweight.generate``); the fused dequantize-then-matmul layouts (int3, ternary)
decode ``--fused-tokens`` only (they dequantize every weight per token). Resident bytes: every parameter and
buffer after load; "decoder linears" counts the quantized layers' buffers (codes, scales, zero points, sparse
part) against the same weights in float16. Perplexity: WikiText-2 test, ``--ppl-tokens`` tokens in windows of
512, packed next to the same artifact dequantized (real models; the synthetic model's random weights have none
worth reading). The synthetic model is a Llama of random N(0, 0.02) weights written in bfloat16 (hidden 2048,
intermediate 5632, 20 layers: 1.03B decoder weights). Real models are dequantized from GGUF (Q4_1, Q4_K_M).
llama.cpp (llama-cpp-python) decodes GGUF files that `superweight quantize --format gguf` writes from the same
float weights (Q4_0, and Q4_K for every matrix: the Q4_K_M mix's main type), ``llama_cpp_speed.decode_speed``.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from superweight.core.files import write_json_atomic  # noqa: E402

SCHEMES = {
    "int4 g128": ["--scheme", "int4", "--group", "128"],
    "int4 g64 + sparse": ["--scheme", "int4", "--group", "64", "--outliers", "0.12"],
    "int3 g64": ["--scheme", "int3", "--group", "64"],
    "ternary": ["--scheme", "ternary"],
}
FUSED = ("int3 g64", "ternary")
SYNTHETIC = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=20, num_attention_heads=16,
                 num_key_value_heads=16, vocab_size=49152, max_position_embeddings=2048, tie_word_embeddings=False)
WIKITEXT = ROOT.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"


# ---------------------------------------------------------------- the child: one configuration


def child(spec: dict) -> dict:
    import torch

    import superweight as sw
    from superweight.quant.runtime import PackedLinear, packed_bytes

    torch.set_num_threads(spec["threads"])
    t = time.perf_counter()
    if spec["kind"] == "artifact":
        lm = sw.load_quantized(spec["model"], dequantize=spec["dequantize"])
    else:
        lm = sw.load_model(spec["model"], dtype=spec["dtype"])
    load_s = time.perf_counter() - t
    params = sum(p.numel() for p in lm.model.parameters()) + sum(
        m.out_features * m.in_features for m in lm.model.modules() if isinstance(m, PackedLinear))
    layers = [m for m in lm.model.modules() if isinstance(m, PackedLinear)]
    linear_bytes = sum(packed_bytes(m) - (0 if m.bias is None else m.bias.numel() * m.bias.element_size()) for m in layers)
    linear_weights = sum(m.out_features * m.in_features for m in layers)
    out = {"load_s": load_s, "resident_bytes": packed_bytes(lm.model), "params": params,
           "resident_ratio_to_float16": packed_bytes(lm.model) / (2 * params),
           "kernels": sorted({m.kernel for m in layers})}
    if layers:
        out["decoder_linear_ratio_to_float16"] = linear_bytes / (2 * linear_weights)
    gen = sw.generate(lm, "The history of the city begins in the year when the first", max_new_tokens=spec["tokens"],
                      raw=True, ignore_eos=True)
    out |= {"new_tokens": gen.new_tokens, "decode_tok_s": gen.tokens_per_s, "prefill_s": gen.prefill_s}
    if spec.get("ppl_tokens"):
        from superweight.eval.perplexity import evaluate_perplexity

        text = WIKITEXT.read_text()[:400_000]
        out["ppl"] = evaluate_perplexity(lm.model, lm.tokenizer, text, seq_len=512, max_tokens=spec["ppl_tokens"]).ppl
    if spec.get("profile"):
        out["profile_top_ops"] = profile(lm, spec["profile"])
    from superweight.eval.generate import peak_rss_bytes

    out["peak_rss_bytes"] = peak_rss_bytes()
    return out


def profile(lm, tokens: int, top: int = 8) -> list[dict]:
    """torch.profiler's top operators by self CPU time over ``tokens`` decode steps."""
    import torch
    from torch.profiler import ProfilerActivity, profile as torch_profile

    ids = torch.arange(1, 17).reshape(1, -1)
    with torch.no_grad(), torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        lm.model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=0)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    return [{"op": e.key, "calls": e.count, "self_cpu_ms": e.self_cpu_time_total / 1e3,
             "share": e.self_cpu_time_total / total} for e in events[:top]]


# ---------------------------------------------------------------- the parent


def run_child(spec: dict, log, save=None) -> dict:
    proc = subprocess.run(["nice", sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True)
    if proc.returncode != 0:
        err = (proc.stderr.strip().splitlines() or ["?"])[-1]
        log(f"  failed: {err}")
        return {"error": err}
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    log(f"  {json.dumps(row)}")
    return row


class Saver:
    """Writes the results so far after every measurement (a run cut short keeps what it measured)."""

    def __init__(self, path: Path, results: dict):
        self.path, self.results = path, results

    def __call__(self) -> None:
        for rows in self.results["models"]:
            rows["decode_ratios"] = ratios(rows)
        write_json_atomic(self.path, self.results)


def synthetic_model(folder: Path) -> Path:
    """The synthetic Llama (random weights, bfloat16) written once to ``folder`` with a byte tokenizer."""
    if (folder / "config.json").is_file():
        return folder
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from transformers import AutoTokenizer

    from superweight.core.files import default_cache_dir
    from superweight.model.load import gguf_cache_folder
    from superweight.model.source import builtin_path

    tokenizer = AutoTokenizer.from_pretrained(str(gguf_cache_folder(builtin_path("smollm2-135m"), default_cache_dir())))
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**SYNTHETIC)).to(torch.bfloat16)
    model.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0) if p.dim() == 1 else p.normal_(0.0, 0.02, generator=gen)
    tmp = folder.with_name(folder.name + ".partial")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)  # SmolLM2's BPE (49,152 tokens): one llama.cpp reads
    tmp.rename(folder)  # complete or absent
    return folder


def cli(*args: str) -> None:
    subprocess.run(["nice", sys.executable, "-m", "superweight", *args], check=True, capture_output=True, text=True)


def llama_cpp_rows(source: str, work: Path, tokens: int, threads: int, dtype: str, log) -> dict:
    if importlib.util.find_spec("llama_cpp") is None:
        return {"skipped": "llama-cpp-python is not installed"}
    from llama_cpp_speed import decode_speed

    rows = {}
    for qtype in ("q4_0", "q4_k"):
        out = work / f"{qtype}.gguf"
        try:
            if not out.is_file():
                cli("quantize", source, "--format", "gguf", "--scheme", qtype, "--out", str(out), "--no-keep-super-weights",
                    "--dtype", dtype)
            speed = decode_speed(out, list(range(1, 17)), tokens, threads)
            rows[qtype] = {"file_bytes": out.stat().st_size, "decode_tok_s": speed["decode_tok_s"]}
        except Exception as exc:  # a model llama.cpp cannot take is recorded, not fatal
            detail = getattr(exc, "stderr", "") or str(exc)
            rows[qtype] = {"error": (detail.strip().splitlines() or [type(exc).__name__])[-1][:300]}
        log(f"  llama.cpp {qtype}: {rows[qtype]}")
    return rows


def model_rows(name: str, args, log, rows: dict, save) -> dict:
    work = args.workdir / name.replace("/", "_")
    work.mkdir(parents=True, exist_ok=True)
    synthetic = name == "synthetic-1b"
    source = str(synthetic_model(work / "model")) if synthetic else name
    ppl = 0 if synthetic else args.ppl_tokens
    base = {"threads": args.threads, "ppl_tokens": ppl}
    rows |= {"model": name, "baselines": {}, "schemes": {}}
    def baseline(dtype: str) -> None:
        log(f"{name} {dtype}")
        rows["baselines"][dtype] = run_child({**base, "kind": "model", "model": source, "dtype": dtype,
                                              "tokens": args.new_tokens, "profile": args.profile_tokens}, log)
        save()

    baseline("bfloat16")
    keep = ["--no-keep-super-weights"]
    if not synthetic:
        cli("detect", name, "--json", str(work / "sw.json"))
        keep = ["--super-weights", str(work / "sw.json")]
    for scheme, flags in ((k, SCHEMES[k]) for k in args.schemes):
        art = work / scheme.replace(" ", "_").replace("+", "p")
        log(f"{name} {scheme}")
        if not (art / "superweight_manifest.json").is_file():
            cli("quantize", source, *flags, *keep, "--dtype", "bfloat16" if synthetic else "float32", "--out", str(art),
                "--force")  # the synthetic model is bfloat16: quantized from it as stored
        tokens = args.fused_tokens if scheme in FUSED else args.new_tokens
        packed = run_child({**base, "kind": "artifact", "model": str(art), "dequantize": False, "tokens": tokens,
                            "profile": args.profile_tokens if scheme not in FUSED else 0}, log)
        dense = run_child({**base, "kind": "artifact", "model": str(art), "dequantize": True, "tokens": tokens}, log) \
            if ppl else {"skipped": "no perplexity to compare (random weights)"}
        rows["schemes"][scheme] = {"packed": packed, "dequantized": dense, "file_bytes": json.loads(
            (art / "superweight_manifest.json").read_text())["size"]["file_bytes"]}
        save()
    rows["llama_cpp"] = llama_cpp_rows(source, work, args.new_tokens, args.threads,
                                       "bfloat16" if synthetic else "float32", log)
    save()
    baseline("float32")  # last: the largest process (a 1B model in float32 is 4.4 GB)
    return rows


def ratios(rows: dict) -> dict:
    """Decode speed of each packed scheme over the float32 and bfloat16 models' and llama.cpp's (same run)."""
    out = {}
    f32, bf16 = (rows["baselines"].get(d, {}).get("decode_tok_s") for d in ("float32", "bfloat16"))
    cpp = {k: v.get("decode_tok_s") for k, v in rows.get("llama_cpp", {}).items() if isinstance(v, dict)}
    for scheme, r in rows["schemes"].items():
        tps = r["packed"].get("decode_tok_s")
        if not tps:
            continue
        out[scheme] = {"vs_float32": tps / f32 if f32 else None, "vs_bfloat16": tps / bf16 if bf16 else None}
        out[scheme] |= {f"vs_llama_cpp_{k}": tps / v for k, v in cpp.items() if v}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m", "synthetic-1b"])
    ap.add_argument("--schemes", nargs="+", default=list(SCHEMES), choices=list(SCHEMES))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--fused-tokens", type=int, default=16)
    ap.add_argument("--ppl-tokens", type=int, default=2048)
    ap.add_argument("--profile-tokens", type=int, default=4, help="decode steps under torch.profiler (0: none)")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/sw-runtime"))
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "runtime.json")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    log = lambda s: print(s, flush=True)  # noqa: E731
    results = {"command": "python " + " ".join(sys.argv),
               "threads": args.threads, "new_tokens": args.new_tokens, "fused_tokens": args.fused_tokens, "models": []}
    save = Saver(args.out, results)
    for name in args.models:
        results["models"].append({})
        model_rows(name, args, log, results["models"][-1], save)
        save()
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
