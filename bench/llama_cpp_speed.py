"""Tokens/s in llama.cpp (llama-cpp-python) of one ternary Llama model stored as F16, Q4_0, and
TQ2_0 / TQ1_0 with the super-weight tensor kept at F16, measured alternately in one run.

The GGUF files are written by the product's writer (``superweight.quant.gguf_export``: metadata, the
model's BPE tokenizer, Q/K permuted for llama.cpp's rotary layout exactly as llama.cpp's
convert_hf_to_gguf.py does; llama.cpp's reference quantizers from gguf-py); the super-weight
tensor's name comes from the project's bridge (``superweight.quant.llama_cpp.gguf_tensor_name``).
TQ1_0/TQ2_0 need rows that are multiples of 256, which the documented 128-wide CPU model does not
have, so the speed model is a wider Llama with the same tokenizer whose decoder weights are made
exactly ternary (absmean, the BitNet forward's ``ternary_weight``): TQ2_0 stores such weights
without loss. Quality is measured elsewhere (bench/bitnet_qat.py); this measures speed only.

    python bench/llama_cpp_speed.py --tokenizer CHECKPOINT [--hidden 1024 --layers 8] [--threads 1]
        -> bench/results/llama_cpp_speed.json
"""
from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from superweight.train.bitnet import ternary_weight  # noqa: E402
from superweight.core.files import write_json_atomic  # noqa: E402
from superweight.model.arch_infer import get_arch  # noqa: E402
from superweight.model.loaded import LoadedModel  # noqa: E402
from superweight.quant.gguf_export import GGUFPlan, write_gguf as write_gguf_file  # noqa: E402
from superweight.quant.llama_cpp import gguf_tensor_name  # noqa: E402

def speed_model(tokenizer, hidden: int, layers: int, inter: int, heads: int, sw_layer: int, seed: int = 0):
    """A Llama with exactly ternary decoder weights and one planted large weight in ``sw_layer``'s down_proj."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=512, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("model.layers.") and p.dim() == 2:
                p.copy_(ternary_weight(p))
        down = model.model.layers[sw_layer].mlp.down_proj.weight
        down[7, 11] = 40 * down.abs().max()  # a super-weight-sized entry: its tensor must stay F16
    return model


def write_gguf(model, tokenizer, path: Path, base: str, f16_tensors: set[str]) -> int:
    """The product's writer (``superweight quantize --format gguf``): llama.cpp's reference quantizers
    for ``base``, the token embedding and the ``f16_tensors`` in F16, norms in F32."""
    lm = LoadedModel(model, tokenizer, get_arch(model), "speed-model", "speed-model")
    plan = GGUFPlan(base, search=False, embed_type="f16", overrides={t: "f16" for t in f16_tensors})
    return write_gguf_file(lm, plan, path)["bytes"]


def gguf_roundtrip(path: Path, model, sw_tensor: str) -> dict:
    """Read the GGUF back with gguf-py: bits per decoder weight, and whether the ternary weights and
    the F16 super-weight tensor come back exactly."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    bits, n, exact = 0, 0, True
    sd = model.state_dict()
    for t in reader.tensors:
        if not t.name.startswith("blk.") or len(t.shape) != 2:
            continue
        bits += int(t.n_bytes) * 8
        n += int(t.n_elements)
        if t.name.endswith("ffn_down.weight") or t.name == sw_tensor:
            layer = int(t.name.split(".")[1])
            ref = sd[f"model.layers.{layer}.mlp.down_proj.weight"].float().numpy()
            got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(ref.shape)
            exact = exact and np.array_equal(got.astype(np.float32), ref.astype(np.float16).astype(np.float32))
    return {"decoder_bits_per_weight": bits / n, "down_proj_exact_at_f16_precision": exact}


def decode_speed(path: Path, tokens: list[int], n_gen: int, threads: int) -> dict:
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=512, n_threads=threads, n_batch=512, verbose=False)
    llm.reset()
    t = time.perf_counter()
    llm.eval(tokens)
    prefill = time.perf_counter() - t
    t = time.perf_counter()
    for i in range(n_gen):
        llm.eval([tokens[i % len(tokens)]])
    decode = time.perf_counter() - t
    del llm
    check = Llama(model_path=str(path), n_ctx=512, n_threads=threads, n_batch=512, logits_all=True, verbose=False)
    check.eval(tokens)  # a separate instance: logits of every prompt position, outside the timed runs
    logits = np.array(check.scores[len(tokens) - 1])
    del check
    return {"prefill_tok_s": len(tokens) / prefill, "decode_tok_s": n_gen / decode, "last_prompt_logits": logits}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", type=Path, required=True, help="A `superweight train` checkpoint (its BPE tokenizer).")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=2816)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--gen", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/superweight-llama-cpp-speed"))
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "llama_cpp_speed.json")
    args = ap.parse_args()
    from transformers import AutoTokenizer

    torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    sw_layer = 1
    model = speed_model(tokenizer, args.hidden, args.layers, args.intermediate, args.heads, sw_layer)
    sw_tensor = gguf_tensor_name("LlamaForCausalLM", f"model.layers.{sw_layer}.mlp.down_proj", args.layers) + ".weight"
    args.workdir.mkdir(parents=True, exist_ok=True)
    variants = {"f16": ("f16", set()), "q4_0": ("q4_0", set()),
                "tq2_0+f16_sw": ("tq2_0", {sw_tensor}), "tq1_0+f16_sw": ("tq1_0", {sw_tensor})}
    sizes = {n: write_gguf(model, tokenizer, args.workdir / f"{n}.gguf", b, f16) for n, (b, f16) in variants.items()}
    checks = {n: gguf_roundtrip(args.workdir / f"{n}.gguf", model, sw_tensor) for n in variants}
    config = dict(hidden=args.hidden, intermediate=args.intermediate, layers=args.layers, heads=args.heads,
                  vocab=len(tokenizer), threads=args.threads, prompt_tokens=args.prompt_tokens, gen=args.gen, reps=args.reps)
    if importlib.util.find_spec("llama_cpp") is None:
        rows = {n: {"gguf_bytes": sizes[n], "size_vs_f16": sizes[n] / sizes["f16"], **checks[n]} for n in variants}
        write_json_atomic(args.out, {"command": "python " + " ".join(sys.argv), "model": config, "sw_tensor": sw_tensor,
                                     "llama_cpp": "not installed: tokens/s not measured", "rows": rows})
        for n, r in rows.items():
            print(f"{n:14s} {r['gguf_bytes'] / 1e6:8.2f} MB  x{r['size_vs_f16']:.3f} of F16  {r}")
        return
    ids = tokenizer("\n\n".join(["Apple Inc. is a worldwide tech company."] * 40))["input_ids"][: args.prompt_tokens]
    with torch.no_grad():
        hf_logits = model(input_ids=torch.tensor([ids])).logits[0, -1].numpy()
    runs: dict[str, list[dict]] = {n: [] for n in variants}
    for _ in range(args.reps):  # alternate the variants so machine load hits them alike
        for n in variants:
            runs[n].append(decode_speed(args.workdir / f"{n}.gguf", ids, args.gen, args.threads))
    rows = {}
    for n, rs in runs.items():
        logits = rs[0].pop("last_prompt_logits")
        for r in rs[1:]:
            r.pop("last_prompt_logits")
        rows[n] = {
            "gguf_bytes": sizes[n], **checks[n], "prefill_tok_s": statistics.median(r["prefill_tok_s"] for r in rs),
            "decode_tok_s": statistics.median(r["decode_tok_s"] for r in rs), "runs": rs,
            "max_abs_logit_diff_vs_hf": float(np.abs(logits - hf_logits).max()),
        }
    base = rows["f16"]
    for r in rows.values():
        r["decode_vs_f16"] = r["decode_tok_s"] / base["decode_tok_s"]
        r["prefill_vs_f16"] = r["prefill_tok_s"] / base["prefill_tok_s"]
        r["size_vs_f16"] = r["gguf_bytes"] / base["gguf_bytes"]
    write_json_atomic(args.out, {"command": "python " + " ".join(sys.argv), "model": config, "sw_tensor": sw_tensor, "rows": rows})
    for n, r in rows.items():
        print(f"{n:14s} {r['gguf_bytes'] / 1e6:8.1f} MB  prefill {r['prefill_tok_s']:8.1f} tok/s  decode {r['decode_tok_s']:7.1f} tok/s  "
              f"x{r['decode_vs_f16']:.2f}  logit diff {r['max_abs_logit_diff_vs_hf']:.3g}")


if __name__ == "__main__":
    main()
