"""Write a random Llama checkpoint of about S GB in shards, with one planted super weight.

    python bench/make_big_model.py --size-gb 33 --out /tmp/big-llama --width 7b

Real Llama widths (7b: hidden 4096, intermediate 11008; 13b: 5120/13824; 34b: 8192/22016 with
8 KV heads); the layer count is chosen to reach the size. Nothing holds the model: each decoder
layer is generated and written as its own shard (one layer in memory), so the file can be larger
than RAM. Weights are slices of one pool of N(0, 0.02) values at random offsets (generating 10^10
fresh normals would take minutes of CPU; the layers still differ from each other).

Planting without a full forward: the script streams the first ``layer`` layers of the written
checkpoint on the detection prompt (``superweight.model.streamed.StreamedModel``), takes the MLP input h of
``layer`` at token 0, and rewrites in place (inside the shard file) the gate and up rows of the
intermediate channel ``col`` to ``a * h / |h|``, so that channel reaches silu(a|h|) * a|h| ~ the
``--activation`` target on that token only, and sets down_proj[row, col] to ``--weight``. The
coordinates and the prompt are written to ``superweight_planted.json`` beside the shards.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from superweight.model.checkpoint import read_header

WIDTHS = {
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32),
    "13b": dict(hidden_size=5120, intermediate_size=13824, num_attention_heads=40, num_key_value_heads=40),
    "34b": dict(hidden_size=8192, intermediate_size=22016, num_attention_heads=64, num_key_value_heads=8),
}
VOCAB = 32000
POOL = 1 << 26  # 64M values


def layer_shapes(w: dict) -> dict[str, tuple[int, ...]]:
    h, i = w["hidden_size"], w["intermediate_size"]
    kv = h // w["num_attention_heads"] * w["num_key_value_heads"]
    return {
        "self_attn.q_proj.weight": (h, h), "self_attn.k_proj.weight": (kv, h), "self_attn.v_proj.weight": (kv, h),
        "self_attn.o_proj.weight": (h, h), "mlp.gate_proj.weight": (i, h), "mlp.up_proj.weight": (i, h),
        "mlp.down_proj.weight": (h, i), "input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,),
    }


class Pool:
    """Random tensors cut from one pool of normals at random offsets."""

    def __init__(self, std: float, dtype: torch.dtype, seed: int):
        self.gen = torch.Generator().manual_seed(seed)
        self.values = (torch.randn(POOL, generator=self.gen) * std).to(dtype)

    def tensor(self, shape: tuple[int, ...]) -> torch.Tensor:
        n, parts = math.prod(shape), []
        while n > 0:
            k = min(n, POOL // 2)
            off = int(torch.randint(0, POOL - k, (1,), generator=self.gen))
            parts.append(self.values[off: off + k])
            n -= k
        return torch.cat(parts).reshape(shape)


def config_for(width: str, layers: int, dtype: torch.dtype):
    from transformers import LlamaConfig

    cfg = LlamaConfig(**WIDTHS[width], num_hidden_layers=layers, vocab_size=VOCAB, max_position_embeddings=4096,
                      tie_word_embeddings=False, dtype=str(dtype).removeprefix("torch."))
    cfg.architectures = ["LlamaForCausalLM"]
    return cfg


def layers_for(size_gb: float, width: str, itemsize: int) -> int:
    shapes = layer_shapes(WIDTHS[width])
    per_layer = sum(math.prod(s) for s in shapes.values()) * itemsize
    outer = 2 * VOCAB * WIDTHS[width]["hidden_size"] * itemsize
    return max(2, math.ceil((size_gb * 2**30 - outer) / per_layer))


def size_gb_for(layers: int, width: str, itemsize: int) -> float:
    """The on-disk size (GiB) of a checkpoint of ``layers`` layers: the inverse of ``layers_for``."""
    shapes = layer_shapes(WIDTHS[width])
    per_layer = sum(math.prod(s) for s in shapes.values()) * itemsize
    return (layers * per_layer + 2 * VOCAB * WIDTHS[width]["hidden_size"] * itemsize) / 2**30


def check_plant(args: argparse.Namespace, layers: int, itemsize: int) -> str | None:
    """Why the planted coordinates do not fit the checkpoint (None when they do)."""
    w = WIDTHS[args.width]
    if not 0 <= args.layer < layers:
        need = size_gb_for(args.layer + 1, args.width, itemsize)
        return (f"--size-gb {args.size_gb:g} gives {layers} layers of {args.width} width, too few to plant in --layer {args.layer}: "
                f"pass --size-gb {math.ceil(need * 10) / 10:g} or more, or --layer {layers - 1} or less")
    if not 0 <= args.row < w["hidden_size"] or not 0 <= args.col < w["intermediate_size"]:
        return (f"--row {args.row} / --col {args.col} are outside {args.width}'s down-projection "
                f"[{w['hidden_size']}, {w['intermediate_size']}]: pick a row below {w['hidden_size']} and a col below {w['intermediate_size']}")
    if args.size_gb <= 0:
        return f"--size-gb must be positive, not {args.size_gb:g}"
    return None


def write_checkpoint(out: Path, width: str, layers: int, dtype: torch.dtype, seed: int) -> None:
    from safetensors.torch import save_file

    from superweight.testing.synthetic import byte_tokenizer

    out.mkdir(parents=True, exist_ok=True)
    pool, w = Pool(0.02, dtype, seed), WIDTHS[width]
    weight_map: dict[str, str] = {}
    name = "model-outer.safetensors"
    outer = {
        "model.embed_tokens.weight": pool.tensor((VOCAB, w["hidden_size"])),
        "lm_head.weight": pool.tensor((VOCAB, w["hidden_size"])),
        "model.norm.weight": torch.ones(w["hidden_size"], dtype=dtype),
    }
    save_file(outer, str(out / name), metadata={"format": "pt"})
    weight_map.update({k: name for k in outer})
    del outer
    for i in range(layers):
        name = f"model-layer-{i:05d}.safetensors"
        tensors = {
            f"model.layers.{i}.{k}": torch.ones(s, dtype=dtype) if len(s) == 1 else pool.tensor(s)
            for k, s in layer_shapes(w).items()
        }
        save_file(tensors, str(out / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in tensors})
        print(f"  wrote layer {i + 1}/{layers}", end="\r", file=sys.stderr, flush=True)
    total = sum((out / f).stat().st_size for f in set(weight_map.values()))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    config_for(width, layers, dtype).to_json_file(out / "config.json")
    byte_tokenizer().save_pretrained(out)


def _data_offset(path: Path, key: str) -> tuple[int, list[int]]:
    header = read_header(path)
    return header.data_start + header.entries[key]["data_offsets"][0], header.entries[key]["shape"]


def write_row(path: Path, key: str, row: int, values: torch.Tensor) -> None:
    """Overwrite one row of a 2-D tensor inside its safetensors file."""
    start, shape = _data_offset(path, key)
    cols = shape[1] if len(shape) > 1 else 1
    with open(path, "r+b") as f:
        f.seek(start + row * cols * values.element_size())
        f.write(values.contiguous().view(torch.uint8).numpy().tobytes())


@torch.no_grad()
def mlp_input_token0(folder: Path, layer: int, prompt: str) -> torch.Tensor:
    """h = the MLP input of ``layer`` at token 0, by streaming layers 0..layer of the checkpoint."""
    from superweight.find.runner import encode_prompt
    from superweight.model.capture import first_tensor
    from superweight.model.streamed import StreamedModel, hidden_of, with_hidden
    from superweight.testing.synthetic import byte_tokenizer

    sm = StreamedModel(folder, "float32")
    calls = sm.layer_calls(encode_prompt(byte_tokenizer(), prompt))
    hidden, seen = hidden_of(calls[0]), []
    for i in range(layer + 1):
        with sm.layer(i):
            up = sm.layers[i].get_submodule(sm.arch.up_proj)
            handle = up.register_forward_pre_hook(lambda m, args: seen.append(args[0][0, 0].clone()))
            try:
                args, kwargs = with_hidden(calls[i], hidden)
                hidden = first_tensor(sm.layers[i](*args, **kwargs))
            finally:
                handle.remove()
    return seen[-1]


def plant(folder: Path, layer: int, row: int, col: int, weight: float, activation: float, prompt: str) -> dict:
    """Make down_proj[row, col] of ``layer`` a super weight on the first token of ``prompt``."""
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    cfg = json.loads((folder / "config.json").read_text())
    dtype = getattr(torch, cfg.get("dtype") or cfg.get("torch_dtype") or "bfloat16")
    h = mlp_input_token0(folder, layer, prompt)
    u = math.sqrt(activation)  # silu(u) * u ~ u^2 for u >> 1
    row_values = (u * h / h.norm() ** 2).to(dtype)  # so that row . h = u
    prefix = f"model.layers.{layer}.mlp."
    for proj in ("gate_proj", "up_proj"):
        write_row(folder / index[prefix + proj + ".weight"], prefix + proj + ".weight", col, row_values)
    inter = cfg["intermediate_size"]
    down = prefix + "down_proj.weight"
    start, _ = _data_offset(folder / index[down], down)
    with open(folder / index[down], "r+b") as f:
        f.seek(start + (row * inter + col) * dtype.itemsize)
        f.write(torch.tensor([weight], dtype=dtype).view(torch.uint8).numpy().tobytes())
    info = {"layer": layer, "row": row, "col": col, "weight": weight, "target_activation": activation,
            "prompt": prompt, "mlp_input_norm_token0": float(h.norm())}
    (folder / "superweight_planted.json").write_text(json.dumps(info, indent=1))
    return info


def main(argv: list[str] | None = None) -> dict:
    from superweight.find.loop import DEFAULT_PROMPT

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-gb", type=float, required=True, help="target size on disk, GiB")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--width", choices=sorted(WIDTHS), default="7b")
    ap.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    ap.add_argument("--layer", type=int, default=2, help="planted layer (Llama-7B's is 2)")
    ap.add_argument("--row", type=int, default=3968, help="planted hidden channel (Llama-7B's 3968)")
    ap.add_argument("--col", type=int, default=7003, help="planted intermediate channel (Llama-7B's 7003)")
    ap.add_argument("--weight", type=float, default=-2.0)
    ap.add_argument("--activation", type=float, default=2000.0, help="target down_proj input on token 0")
    ap.add_argument("--prompt", default=DEFAULT_PROMPT)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    layers = layers_for(args.size_gb, args.width, dtype.itemsize)
    problem = check_plant(args, layers, dtype.itemsize)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        raise SystemExit(2)
    if args.out.exists() and any(args.out.iterdir()):
        raise SystemExit(f"{args.out} is not empty: pass a new folder")
    print(f"writing {layers} layers of {args.width} width ({args.dtype}) to {args.out}", file=sys.stderr)
    t0 = time.perf_counter()
    write_checkpoint(args.out, args.width, layers, dtype, args.seed)
    t1 = time.perf_counter()
    info = plant(args.out, args.layer, args.row, args.col, args.weight, args.activation, args.prompt)
    t2 = time.perf_counter()
    size = sum(p.stat().st_size for p in args.out.glob("*.safetensors"))
    info.update(width=args.width, layers=layers, dtype=args.dtype, bytes=size, write_s=t1 - t0, plant_s=t2 - t1)
    (args.out / "superweight_planted.json").write_text(json.dumps(info, indent=1))
    print(json.dumps(info), file=sys.stderr)
    return info


if __name__ == "__main__":
    main()
