"""How far two float32 computations of the same value may differ when they sum in different orders.

Torch picks its vector kernels, and with them the order of every reduction (a dot product, a matrix
product, a sum), by the CPU's capability (``torch.backends.cpu.get_cpu_capability()``: AVX512, AVX2
or ``default``, the scalar loops ``ATEN_CPU_CAPABILITY=default`` forces) and by the thread count. So
a native kernel and torch, a simulation and the module it stands for, or one code path and another
agree to the last bit on one machine and not on the next. Tests compare such pairs with these
bounds; bitwise equality stays for what is identical by construction (round trips, restore,
pack/unpack, the same code on the same inputs).

The bound: a float32 sum of ``n`` terms in any order (recursive, blocked, pairwise) is within
``(n - 1) * u * sum|terms|`` of the exact sum, ``u = eps / 2`` (Higham, *Accuracy and Stability of
Numerical Algorithms*, 4.2); two such sums are within ``n * eps * sum|terms|`` of each other.
"""
from __future__ import annotations

import math

import torch

EPS32 = float(torch.finfo(torch.float32).eps)  # 2**-23, twice float32's unit roundoff


def sum_bound(n: int, magnitude: float | torch.Tensor) -> float | torch.Tensor:
    """The most two float32 sums of the same ``n`` terms, in two orders, can differ, when the terms'
    absolute values sum to ``magnitude`` (a number, or a tensor of them, one per output)."""
    return max(n, 1) * EPS32 * magnitude


def matmul_bound(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Per output of ``x @ w.T``: the most two float32 evaluations of it can differ
    (``sum_bound`` of its ``x.shape[-1]`` products, whose absolute values sum to ``|x| @ |w|.T``, in
    float64)."""
    return sum_bound(x.shape[-1], x.double().abs() @ w.double().abs().T)


def db_bound(n: int, rel: float = 0.0) -> float:
    """The most a ratio in dB, ``10 log10(a / b)``, can move when ``a`` is a float32 sum of ``n``
    non-negative terms (``sum_bound``: a relative error of ``n * eps``) and ``b`` has a relative
    error ``rel`` on its own: ``10 / ln 10`` dB per unit of relative error."""
    return 10.0 / math.log(10.0) * (max(n, 1) * EPS32 + rel)
