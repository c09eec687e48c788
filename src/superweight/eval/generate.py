"""Text generation from any model the tool loads, with its speed and memory: ``generate``.

The prompt goes through the tokenizer's chat template when it has one (``raw=True`` skips it); tokens
stream to the terminal as they come (transformers' ``TextStreamer``) when ``stream=True``. The result
gives the decode speed (tokens after the first, over the time since the first: prefill apart), the
prefill time and the whole process's peak resident memory (plus CUDA's peak allocation on a GPU).
"""
from __future__ import annotations

import resource
import sys
import time
from dataclasses import dataclass

import torch

from ..core.errors import SuperweightError
from ..model.loaded import LoadedModel
from ..model.load import load_model

DEFAULT_PROMPT = "What is the capital of France?"


@dataclass
class Generation:
    """What ``generate`` produced and how fast: ``tokens_per_s`` counts decode steps only."""

    text: str
    prompt_tokens: int
    new_tokens: int
    prefill_s: float
    decode_s: float
    tokens_per_s: float
    peak_rss_bytes: int
    peak_cuda_bytes: int | None
    chat_template: bool

    def summary(self) -> str:
        cuda = f", CUDA peak {self.peak_cuda_bytes / 2**20:,.0f} MiB" if self.peak_cuda_bytes is not None else ""
        return (f"{self.new_tokens} tokens, {self.tokens_per_s:.1f} tokens/s (decode; prefill of {self.prompt_tokens} "
                f"tokens {self.prefill_s:.2f} s), peak memory {self.peak_rss_bytes / 2**20:,.0f} MiB RSS{cuda}")


class _Clock:
    """A streamer's companion that timestamps every chunk of new tokens (the first is the prompt's)."""

    def __init__(self, inner=None):
        self.inner, self.times, self.counts = inner, [], []

    def put(self, value: torch.Tensor) -> None:
        self.times.append(time.perf_counter())
        self.counts.append(int(value.numel()))
        if self.inner is not None:
            self.inner.put(value)

    def end(self) -> None:
        if self.inner is not None:
            self.inner.end()


def prompt_ids(tokenizer, prompt: str, raw: bool) -> tuple[torch.Tensor, bool]:
    """The prompt's token ids, through the chat template when the tokenizer has one and not ``raw``."""
    if tokenizer is None:
        raise SuperweightError("this model has no tokenizer: generate needs one (a model folder with its tokenizer files)")
    if not raw and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"]
        return ids, True
    return tokenizer(prompt, return_tensors="pt")["input_ids"], False


def peak_rss_bytes() -> int:
    """The process's peak resident set size (Linux reports kilobytes, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def generate(model: str | LoadedModel, prompt: str = DEFAULT_PROMPT, max_new_tokens: int = 64, temperature: float = 0.0,
             raw: bool = False, stream: bool = False, seed: int = 0, ignore_eos: bool = False, **load) -> Generation:
    """Generate up to ``max_new_tokens`` after ``prompt`` (greedy at ``temperature`` 0, sampled above) with
    ``model``: a ``LoadedModel`` or anything ``load_model`` takes (``load``: its keywords, e.g. ``dtype``,
    ``device``, ``dequantize``); ``stream`` prints the tokens to stdout as they come; ``ignore_eos`` generates
    all ``max_new_tokens`` (a speed measurement)."""
    from transformers import TextStreamer

    lm = model if isinstance(model, LoadedModel) else load_model(model, **load)
    if max_new_tokens < 1:
        raise SuperweightError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not temperature >= 0:
        raise SuperweightError(f"temperature must be >= 0, got {temperature}")
    tok = lm.tokenizer
    ids, chat = prompt_ids(tok, prompt, raw)
    device = next(lm.model.parameters()).device
    clock = _Clock(TextStreamer(tok, skip_prompt=True, skip_special_tokens=True) if stream else None)
    sample = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    if ignore_eos:
        sample["min_new_tokens"] = max_new_tokens
    torch.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    with torch.no_grad():
        out = lm.model.generate(ids.to(device), max_new_tokens=max_new_tokens, streamer=clock,
                                pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
                                **sample)
    new = out[0, ids.shape[1]:]
    first = clock.times[1] if len(clock.times) > 1 else time.perf_counter()
    decode = clock.times[-1] - first if len(clock.times) > 2 else 0.0
    steps = max(0, len(new) - 1)
    return Generation(tok.decode(new, skip_special_tokens=True), ids.shape[1], len(new), first - start, decode,
                      steps / decode if decode > 0 else 0.0, peak_rss_bytes(),
                      torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None, chat)
