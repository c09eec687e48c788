"""Perplexity over a ``StreamedModel``: each window's negative log-likelihood under edits of the
weights (zeroed sets, quantized points), every layer read once per pass (``StreamedModel.run_heads``)."""
from __future__ import annotations

from typing import Sequence

import functools

import torch

from ..model.edits import zeroed
from ..model.streamed import Edit, StreamedModel, no_head
from .perplexity import token_nlls, window_nll


def zeroing(sm: StreamedModel, weights: Sequence) -> Edit:
    """The edit that zeroes ``weights`` in the layer being read (restored bit for bit after)."""
    return functools.partial(zeroed, sm.model, sm.arch, weights)


def nll_head(sm: StreamedModel, ids: torch.Tensor, first_scored: int):
    """A ``through_head`` function: ``eval.perplexity.window_nll`` of the window (float)."""
    device = sm.device
    return lambda model: float(window_nll(model, ids.to(device), first_scored))


def window_token_nlls(sm: StreamedModel, windows: Sequence[tuple[torch.Tensor, int]],
                      zero_sets: Sequence[Sequence]) -> list[list[torch.Tensor]]:
    """``perplexity.token_nlls`` of each window once per set of weights zeroed (``[window][set]``),
    every layer read once per pass."""
    edits = [zeroing(sm, weights) for weights in zero_sets]
    runs = [(w, edit) for w in range(len(windows)) for edit in edits]
    device = sm.device
    fns = [lambda model, ids=windows[w][0], first=windows[w][1]: token_nlls(model, ids.to(device), first) for w, _ in runs]
    values = sm.run_heads([ids for ids, _ in windows], runs, fns)
    return [values[w * len(edits):(w + 1) * len(edits)] for w in range(len(windows))]


def window_nlls(sm: StreamedModel, windows: Sequence[tuple[torch.Tensor, int]],
                zero_sets: Sequence[Sequence]) -> list[list[float]]:
    """``window_nll`` of each window ``(ids, first_scored)`` once per set of weights zeroed
    (``[window][set]``), every layer read once per pass (``run_heads``)."""
    return edited_nlls(sm, windows, [zeroing(sm, weights) for weights in zero_sets])


def edited_nlls(sm: StreamedModel, windows: Sequence[tuple[torch.Tensor, int]], edits: Sequence[Edit],
                first: Sequence[tuple[torch.Tensor, Edit]] = ()) -> list[list[float]]:
    """``window_nlls`` under any edits (``[window][edit]``). ``first``: runs ``(ids, edit)`` made ahead of
    them at every layer, all in the first pass and without a head (a calibration the edits read: its
    edit sees each layer before theirs do)."""
    ids = [i for i, _ in first] + [i for i, _ in windows]
    runs = [(k, edit) for k, (_, edit) in enumerate(first)]
    runs += [(len(first) + w, edit) for w in range(len(windows)) for edit in edits]
    fns = [no_head] * len(first) + [nll_head(sm, *windows[w - len(first)]) for w, _ in runs[len(first):]]
    values = sm.run_heads(ids, runs, fns, together=len(first))[len(first):]
    n = len(edits)
    return [values[w * n:(w + 1) * n] for w in range(len(windows))]
