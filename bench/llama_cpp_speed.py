"""Tokens/s in llama.cpp (llama-cpp-python) of one ternary Llama model stored as F16, Q4_0, and
TQ2_0 / TQ1_0 with the super-weight tensor kept at F16, measured alternately in one run.

The GGUF files are written here with gguf-py (metadata, the model's BPE tokenizer, Q/K permuted for
llama.cpp's rotary layout exactly as llama.cpp's convert_hf_to_gguf.py does); the super-weight
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
import json
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
from superweight.quant.llama_cpp import gguf_tensor_name  # noqa: E402

HF_TO_GGUF = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF rotate-half layout -> llama.cpp interleaved rotary layout (convert_hf_to_gguf.py)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


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
    import gguf

    cfg = model.config
    qtype = {"f16": gguf.GGMLQuantizationType.F16, "q4_0": gguf.GGMLQuantizationType.Q4_0,
             "tq1_0": gguf.GGMLQuantizationType.TQ1_0, "tq2_0": gguf.GGMLQuantizationType.TQ2_0}[base]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]) if getattr(cfg, "rope_parameters", None) else 10000.0)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_file_type(1)
    _tokenizer_metadata(w, tokenizer)
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"].astype(np.float16))
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    for i in range(cfg.num_hidden_layers):
        pre = f"model.layers.{i}."
        w.add_tensor(f"blk.{i}.attn_norm.weight", sd[pre + "input_layernorm.weight"])
        w.add_tensor(f"blk.{i}.ffn_norm.weight", sd[pre + "post_attention_layernorm.weight"])
        for hf, short in HF_TO_GGUF.items():
            t = sd[pre + hf + ".weight"]
            if short in ("attn_q", "attn_k"):
                t = permute(t, cfg.num_attention_heads)
            name = f"blk.{i}.{short}.weight"
            kind = gguf.GGMLQuantizationType.F16 if name in f16_tensors else qtype
            if kind == gguf.GGMLQuantizationType.F16:
                w.add_tensor(name, t.astype(np.float16))
            else:
                w.add_tensor(name, gguf.quants.quantize(t, kind), raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path.stat().st_size


def _tokenizer_metadata(w, tokenizer) -> None:
    tok = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = tok["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    special = {a["id"] for a in tok.get("added_tokens", [])}
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if i in special else 1 for i in range(len(tokens))])
    w.add_token_merges(merges)
    w.add_bos_token_id(tokenizer.bos_token_id)
    w.add_eos_token_id(tokenizer.eos_token_id)


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
