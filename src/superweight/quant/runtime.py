"""Quantized weights kept packed in memory: ``PackedLinear`` computes a linear layer from the artifact's codes.

A ``PackedLinear`` holds one quantized matrix as the artifact stores it (codes, scales, zero points) and its
held-out sparse part (super weights, outliers) as flat indices with the *difference* between each exact
value and what the codes give there, so ``y = x W_q^T + x S^T (+ bias)`` equals the dequantized layer.
Three ways to compute ``x W_q^T``, chosen per layer (``kernel="auto"``: the first that runs the layout):

- ``native`` (a CPU with the native library, ``quant/native.c``): asymmetric 4-bit codes in groups of a multiple
  of 64 along rows of a multiple of 64 inputs, computed in **float32**. The codes are held 4 bits each (eight to
  an int32 word, arranged so an AVX2 register unpacks them with masks, no shuffles), the scale and zero point as float32
  per group; per group ``scale * sum q x + zero * sum x``. At a few input rows (decode) the kernel reads the codes
  straight; for more (prefill, perplexity) it dequantizes about ``CHUNK`` weights at a time (bitwise the
  dequantized load's values) and multiplies them in torch. torch's int4 kernel below computes in bfloat16 only,
  and on an AVX2 CPU (no bfloat16 instructions) it took 2.3x the native kernel's time at one input row, one thread
  (bench/results/int4_kernels.json).
- ``int4``: torch's group-wise INT4 kernel (``aten._weight_int4pack_mm_for_cpu`` on a CPU, tinygemm
  ``aten._weight_int4pack_mm`` on CUDA) for asymmetric 4-bit codes (float, int8 or fix8 zero points: each
  is ``w = q * s + z`` per group, ``grid.affine``) in groups of 32, 64, 128 or 256 along the input and a
  multiple of 16 output rows. The kernel's convention is ``w = (q - 8) * s + z'``, so ``z' = z + 8 * s``; a short last group (576 inputs in groups of 128)
  is padded with zero codes and the input with zeros. It computes in bfloat16: tinygemm takes nothing
  else, and the CPU kernel's float32 path ran 25x slower than its bfloat16 one here (torch 2.13,
  AVX-512: 2048x2048 at batch 1, 11.7 ms against 0.43 ms; a dense float32 matmul took 2.4 ms).
- ``fused``: every other layout (int2/int3/int8, NF4, ternary, blocks, per channel, per tensor): the codes of a chunk of output rows are unpacked and dequantized (``handler.dense``, the
  artifact's own dequantization) and multiplied, chunk after chunk, so no more than ``CHUNK`` dequantized
  weights exist at a time and the dense matrix never does. It computes in the input's dtype.

Fused MoE experts (3-D parameters that a transformers experts module indexes) have no packed module:
they are loaded dense, and the load says so in a note.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import SuperweightError
from . import native
from .layout import Layout
from .primitives import QuantizedTensor
from .search import UniformGrid
from .schemes import handler

CHUNK = 1 << 20  # dequantized weights per step of the fused path
INT4_GROUPS = (32, 64, 128, 256)
KERNELS = ("auto", "native", "int4", "fused")
NATIVE_DECODE_ROWS = 16  # up to this many input rows the native kernel reads the codes; beyond, dequantize + matmul


class PackedWeightError(SuperweightError, AttributeError):
    """A packed layer's dense ``weight`` was asked for (``hasattr(layer, "weight")`` is False)."""


def int4_fits(qt: QuantizedTensor, out_features: int) -> str | None:
    """Why the int4 kernel cannot run ``qt`` (None when it can)."""
    L = qt.layout
    if qt.bits != 4 or qt.zero is None or not isinstance(qt.handler.grid(4, qt.scale.dtype), UniformGrid):
        return f"{qt.handler.label(qt.bits)} codes (it runs asymmetric int4: codes times a scale plus a zero point)"
    if L.rows != out_features or L.size not in INT4_GROUPS:
        return f"runs of {L.size} over {L.rows} rows (it runs groups of {', '.join(map(str, INT4_GROUPS))} along each row)"
    if out_features % 16:
        return f"{out_features} output rows (it needs a multiple of 16)"
    return None


def native_fits(qt: QuantizedTensor, out_features: int, in_features: int, device: torch.device) -> str | None:
    """Why the native kernel cannot run ``qt`` on ``device`` (None when it can)."""
    if device.type != "cpu" or native.library() is None:
        return f"on {device} (it runs on a CPU where superweight's native library builds)"
    why = int4_fits(qt, out_features)
    if why is None and (qt.layout.size % 64 or in_features % 64):
        why = f"groups of {qt.layout.size} over {in_features} inputs (it runs groups and rows of a multiple of 64)"
    return why


def _int4_weight(codes2: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``[N, K]`` 4-bit codes in the kernel's own layout (``K`` a multiple of the group)."""
    inner = 8 if codes2.shape[1] % 128 == 0 else 4 if codes2.shape[1] % 64 == 0 else 2
    w = codes2.to(device=device, dtype=torch.int32)
    if device.type == "cpu":
        return torch.ops.aten._convert_weight_to_int4pack_for_cpu(w, inner)
    return torch.ops.aten._convert_weight_to_int4pack((w[:, ::2] << 4 | w[:, 1::2]).to(torch.uint8), inner)


class PackedLinear(nn.Module):
    """``y = x W^T + b`` from a packed ``QuantizedTensor`` of ``W`` (``[out, in]``); see the module doc."""

    def __init__(self, qt: QuantizedTensor, bias: torch.Tensor | None, kernel: str = "auto",
                 device: torch.device | str = "cpu"):
        super().__init__()
        device = torch.device(device)
        self.out_features, self.in_features = qt.shape
        self.kind, self.bits, self.layout = qt.kind, qt.bits, qt.layout
        self.kernel = self._choose(qt, kernel, device)
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(device), requires_grad=False)
        self._sparse(qt, device)
        if self.kernel == "native":
            self._pack_native(qt)
        elif self.kernel == "int4":
            self._pack_int4(qt, device)
        else:
            self.register_buffer("codes", qt.packed_codes().to(device))
            self.register_buffer("scale", qt.scale.to(device))
            self.register_buffer("zero", None if qt.zero is None else qt.zero.to(device))

    def _choose(self, qt: QuantizedTensor, kernel: str, device: torch.device) -> str:
        """The kernel that runs this layer: ``kernel``, or under ``auto`` the first of native, int4, fused that fits."""
        if kernel == "fused":
            return "fused"
        checks = {"native": lambda: native_fits(qt, self.out_features, self.in_features, device),
                  "int4": lambda: int4_fits(qt, self.out_features)}
        if kernel != "auto":
            if why := checks[kernel]():
                raise SuperweightError(f"the {kernel} kernel cannot run {why}: load with kernel 'auto' or 'fused'")
            return kernel
        return next((k for k, check in checks.items() if check() is None), "fused")

    def _sparse(self, qt: QuantizedTensor, device: torch.device) -> None:
        """The held-out entries, in row order, as (column, exact value minus the codes' value) and their rows:
        a row index each, or for the native kernel where each row's entries start (``sparse_ptr``, CSR)."""
        idx = qt.sparse_idx.long()
        delta = torch.zeros(0, device=idx.device)
        if idx.numel():
            delta = qt.sparse_val.float() - qt.dense().reshape(-1)[idx.to(qt.scale.device)].to(idx.device)
        idx, order = torch.sort(idx)
        rows, csr = idx // self.in_features, self.kernel == "native"
        self.register_buffer("sparse_cols", (idx % self.in_features).to(device, torch.int32 if csr else torch.int64))
        self.register_buffer("sparse_delta", delta[order].to(device).contiguous())
        self.register_buffer("sparse_rows", None if csr else rows.to(device))
        ptr = None
        if csr:  # the native kernel runs on a CPU only
            ptr = torch.zeros(self.out_features + 1, dtype=torch.int64, device=device)
            ptr[1:] = torch.cumsum(torch.bincount(rows.to(device), minlength=self.out_features), 0)
        self.register_buffer("sparse_ptr", ptr)

    def _pack_int4(self, qt: QuantizedTensor, device: torch.device) -> None:
        L = qt.layout
        padded = L.runs * L.size
        codes2 = L.view(qt.codes)
        if padded != L.row_len:
            codes2 = F.pad(codes2, (0, padded - L.row_len))  # zero codes, read against zero inputs
        self.group, self.padded = L.size, padded
        scale, zero = qt.handler.grid(4, qt.scale.dtype).affine((qt.scale, qt.zero))  # w = q * scale + zero, float32
        sz = torch.stack([scale.t(), (zero + 8 * scale).t()], dim=-1).contiguous()  # [runs, N, 2]
        self.register_buffer("int4_weight", _int4_weight(codes2, device))
        self.register_buffer("int4_scale_zero", sz.to(device=device, dtype=torch.bfloat16))

    def _pack_native(self, qt: QuantizedTensor) -> None:
        scale, zero = qt.handler.grid(4, qt.scale.dtype).affine((qt.scale, qt.zero))  # w = q * scale + zero, float32
        self.group = qt.layout.size
        self.register_buffer("native_codes", native.int4_pack(qt.layout.view(qt.codes).cpu()))
        self.register_buffer("native_scale", scale.float().cpu().contiguous())
        self.register_buffer("native_zero", zero.float().cpu().contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        y = getattr(self, f"_{self.kernel}")(x2)
        in_kernel = self.kernel == "native" and x2.shape[0] <= NATIVE_DECODE_ROWS  # the kernel added it
        if self.sparse_delta.numel() and not in_kernel:
            rows = self.sparse_rows if self.sparse_rows is not None else torch.repeat_interleave(
                torch.arange(self.out_features, device=self.sparse_ptr.device), self.sparse_ptr.diff())
            contrib = x2[:, self.sparse_cols.long()].to(y.dtype) * self.sparse_delta.to(y.dtype)
            y = y.index_add(1, rows.to(y.device), contrib)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*shape, self.out_features)

    def _native(self, x2: torch.Tensor) -> torch.Tensor:
        xf = x2.float().contiguous()
        parts = (self.native_codes, self.native_scale, self.native_zero, self.group)
        if xf.shape[0] <= NATIVE_DECODE_ROWS:
            sparse = (self.sparse_ptr, self.sparse_cols, self.sparse_delta) if self.sparse_delta.numel() else None
            return native.int4_mm(xf, *parts, sparse=sparse).to(x2.dtype)
        step = max(8, CHUNK // self.in_features)
        return self._by_chunks(xf, step, lambda r0, r1: native.int4_dense(*parts, r0, r1)).to(x2.dtype)

    def _int4(self, x2: torch.Tensor) -> torch.Tensor:
        xb = x2.to(torch.bfloat16)
        if self.padded != self.in_features:
            xb = F.pad(xb, (0, self.padded - self.in_features))
        mm = torch.ops.aten._weight_int4pack_mm_for_cpu if xb.device.type == "cpu" else torch.ops.aten._weight_int4pack_mm
        return mm(xb.contiguous(), self.int4_weight, self.group, self.int4_scale_zero).to(x2.dtype)

    def _fused(self, x2: torch.Tensor) -> torch.Tensor:
        return self._by_chunks(x2, chunk_rows(self.layout, self.in_features, self.out_features), self.dense_rows)

    def _by_chunks(self, x2: torch.Tensor, step: int, rows_of) -> torch.Tensor:
        """``x2 @ W^T`` with ``W`` dequantized ``step`` output rows at a time (``rows_of(r0, r1)``): the dense
        matrix never exists."""
        y = x2.new_empty((x2.shape[0], self.out_features))
        for r0 in range(0, self.out_features, step):
            r1 = min(r0 + step, self.out_features)
            y[:, r0:r1] = x2 @ rows_of(r0, r1).to(x2.dtype).t()
        return y

    def dense_rows(self, r0: int, r1: int) -> torch.Tensor:
        """Rows ``r0:r1`` of the dequantized codes (float32, before the sparse part)."""
        h, K = handler(self.kind), self.in_features
        n = (r1 - r0) * K
        b0, b1 = (r0 * K // 5, -(-r1 * K // 5)) if self.kind == "ternary" else (r0 * K * self.bits // 8, -(-r1 * K * self.bits // 8))
        codes = h.unpack_codes(self.codes[b0:b1], self.bits, n)
        sub, rows, runs = _sub_layout(self.layout, r0, r1, K)
        zero = None if self.zero is None else self.zero[rows, runs]
        return h.dense(codes, self.scale[rows, runs], zero, self.bits, sub).reshape(r1 - r0, K)

    def __getattr__(self, name: str):
        if name == "weight":  # no dense weight exists: reading or editing one needs the dense load
            raise PackedWeightError("this model's weights are held packed (a quantized artifact): load it with "
                                    "--dequantize (load_quantized(..., dequantize=True)) to read or edit them")
        return super().__getattr__(name)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, {self.kind} {self.bits}-bit, "
                f"kernel={self.kernel}, sparse={self.sparse_delta.numel()}")


def chunk_rows(layout: Layout, in_features: int, out_features: int) -> int:
    """Output rows per fused step: about ``CHUNK`` weights, starting every step on a whole byte of codes
    (8 rows of any bit width, 5 of ternary) and on a run of a block layout."""
    align = 40
    if layout.rows == 1 and layout.runs > 1:
        align = math.lcm(align, layout.size // math.gcd(layout.size, in_features))
    return min(out_features, max(align, CHUNK // in_features // align * align))


def _sub_layout(layout: Layout, r0: int, r1: int, K: int) -> tuple[Layout, slice, slice]:
    """The layout of rows ``r0:r1`` and the slices of its ``[rows, runs]`` parameters."""
    if layout.rows > 1:  # per row: groups or one run per channel
        return Layout(r1 - r0, K, layout.size), slice(r0, r1), slice(None)
    n = (r1 - r0) * K
    if layout.runs == 1:  # per tensor: one scale for all
        return Layout(1, n, n), slice(None), slice(None)
    first = r0 * K // layout.size  # blocks of the flattened tensor: r0 * K is a multiple of the block (chunk_rows)
    sub = Layout(1, n, layout.size)
    return sub, slice(None), slice(first, first + sub.runs)


def replace_linear(model: nn.Module, key: str, qt: QuantizedTensor, kernel: str, device: torch.device | str) -> PackedLinear:
    """Put a ``PackedLinear`` of ``qt`` in place of the module owning the weight ``key`` (a Linear or GPT-2's Conv1D)."""
    parent_name, _, child = key.rsplit(".", 1)[0].rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child)
    bias = getattr(old, "bias", None)
    bias = None if bias is None or bias.is_meta else bias
    packed = PackedLinear(qt, bias, kernel, device)
    setattr(parent, child, packed)
    return packed


def packed_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer of ``model`` (tied tensors once): what its weights hold in memory."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen or t.is_meta:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total
