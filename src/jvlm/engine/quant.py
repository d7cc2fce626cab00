"""Weight formats: a load-time swap of ``nn.Linear`` (the model files keep plain ``nn.Linear``).

The loader builds the model on the meta device, calls ``swap_modules`` to replace the linears by the
format's module, then hands each swapped module its weight through ``load_weight`` a block of rows at a
time, so no float32 copy of a weight exists beyond one block (and never of the whole model).

Formats (``jvlm.load(path, dtype=...)``):
- ``float32``: plain ``nn.Linear``; the reference numerics.
- ``bfloat16``: bfloat16 everywhere; linears keep their weight prepacked for oneDNN (blocked layout),
  which streams it ~1.7× faster than ``F.linear`` at decode batch sizes.
- ``int8``: every linear (vision tower, connector, decoder, head) holds an int8 weight with one float32
  scale per output channel (symmetric, round to nearest). Activations are quantized on the fly, per
  token (dynamic, asymmetric uint8 over the token's range), and multiplied int8 × int8 → int32 by
  FBGEMM's packed kernels (VNNI), which dequantize, add the bias and write float32 in one pass. In the
  decoder the same packed weight serves decode (bandwidth-bound: ~1 byte read per weight) and prefill
  (compute-bound: int8 dot products); the vision tower and connector, which never see fewer than 196
  rows per call, use oneDNN's int8 kernel instead (``Int8LinearOneDNN``), faster at those sizes.
  Activations and norms are float32; the embedding tables (lookups, not
  matmuls) are stored in bfloat16; on CPUs with bfloat16 dot products attention (a third of the vision
  tower's time in float32) runs its matmuls in bfloat16 and the KV cache (read whole at every decode
  step) is stored in bfloat16 (``kv_cache_dtype``).

FBGEMM quantizes one scale per *call*, so rows (tokens) are first divided by their own absmax and the
output rows multiplied back (a linear map commutes with that); this makes the quantization per token,
so a token's result never depends on the other tokens (or sequences) of the batch. Where FBGEMM is
missing (non-x86 builds) the same format runs on ``torch._int_mm`` / ``torch._weight_int8pack_mm``.
"""

from __future__ import annotations

import ctypes
import functools
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..models.decoder import Attention, Embedding
from ..models.vision import VisionAttention


@dataclass(frozen=True)
class WeightFormat:
    name: str
    dtype: torch.dtype  # activations, norms, biases and the KV cache
    linear: type[nn.Module] | None = None  # replaces nn.Linear; None = plain nn.Linear in ``dtype``
    table_dtype: torch.dtype | None = None  # embedding tables, when they differ from ``dtype``
    description: str = ""
    attention_dtype: torch.dtype | None = None  # None: fused SDPA in ``dtype`` (models/vision.py, decoder.py)
    image_linear: Callable[[], type[nn.Module] | None] | None = None  # the vision tower's and connector's
    # linears (≥ 196 rows per call, never decode), when a kernel suits them better than ``linear``
    kv_dtype: torch.dtype | None = None  # the KV cache, when narrower than ``dtype`` (see kv_cache_dtype)


IMAGE_MODULES = ("vision.", "connector.")
# linears whose input is always a temporary of the model's own forward, never read after the call
# (models/decoder.py, models/vision.py; tests/test_quant.py checks that overwriting it after the call changes
# nothing)
SCRATCH_INPUT_MODULES = ("decoder.layers.", "vision.layers.")


ReadRows = Callable[[int, int], torch.Tensor]  # (start, stop) → those rows of a float weight


@functools.cache
def _cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return frozenset(next((line for line in f if line.startswith("flags")), "").split())
    except OSError:
        return frozenset()


def cpu_has_vnni() -> bool:
    return bool({"avx512_vnni", "avx_vnni"} & _cpu_flags())


def cpu_has_bf16() -> bool:
    """bfloat16 dot products in hardware (x86: AVX-512 BF16 or AMX; Arm: the BF16 extension)."""
    return bool({"avx512_bf16", "amx_bf16", "bf16"} & _cpu_flags())


def attention_dtype(fmt: WeightFormat) -> torch.dtype | None:
    """The format's attention dtype, except that float activations keep the fused float kernel on CPUs
    without bfloat16 dot products (there bf16 matmuls are emulated and lose to it)."""
    if fmt.attention_dtype == torch.bfloat16 and fmt.dtype != torch.bfloat16 and not cpu_has_bf16():
        return None
    return fmt.attention_dtype


def kv_cache_dtype(fmt: WeightFormat) -> torch.dtype:
    """The dtype the format's KV cache is stored in. Every decode step reads the whole cache of every
    sequence (float32: 229 KB per token at the released geometry, ~0.25 GB per step at an image prompt's
    1.1k tokens, next to 1.7 GB of int8 weights), so the int8 format keeps it in bfloat16: half the bytes
    and half the memory, for bfloat16 rounding of K and V. Only where attention runs in bfloat16 anyway
    (``attention_dtype``), so that no CPU without bfloat16 dot products gets slower attention."""
    if fmt.kv_dtype is not None and attention_dtype(fmt) == fmt.kv_dtype:
        return fmt.kv_dtype
    return fmt.dtype


@functools.cache
def fbgemm_available() -> bool:
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        return False
    try:
        _fbgemm_pack(torch.zeros(16, 16, dtype=torch.int8), torch.ones(16))
        return True
    except (RuntimeError, AttributeError):
        return False


def _fbgemm_pack(q: torch.Tensor, scales: torch.Tensor):
    with warnings.catch_warnings():  # quantized tensors are deprecated, but still FBGEMM's only entry point
        warnings.simplefilter("ignore")
        qweight = torch._make_per_channel_quantized_tensor(
            q, scales.double(), torch.zeros(q.shape[0], dtype=torch.long), 0)
        return torch.ops.quantized.linear_prepack(qweight, None)


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: w (N, K) float → (int8 (N, K), float32 scales (N,)) with w ≈ q · scale.

    |w · 127 / max|w|| ≤ 127 (+ rounding, which ``round`` brings back to 127), so no clamp is needed; three
    passes over w (loading the int8 model spends most of its time here and in FBGEMM's packing).
    """
    w = w.float()
    absmax = _row_absmax(w)  # (N, 1)
    return torch.mul(w, 127.0 / absmax).round_().to(torch.int8), absmax.squeeze(1) / 127.0


def quantize_read_rows(read_rows: ReadRows, start: int, stop: int, K: int, rows_per_chunk: int
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows start…stop of a float weight, read and quantized ``rows_per_chunk`` at a time (no float copy
    of the whole range) → (int8 (stop − start, K), float32 scales)."""
    q = torch.empty(stop - start, K, dtype=torch.int8)
    scales = torch.empty(stop - start, dtype=torch.float32)
    for c in range(start, stop, rows_per_chunk):
        d = min(c + rows_per_chunk, stop)
        q[c - start:d - start], scales[c - start:d - start] = quantize_rows(read_rows(c, d))
    return q, scales


# ------------------------------------------------------------------------------------------ int8
def _row_absmax(x: torch.Tensor) -> torch.Tensor:
    """(M, K) → (M, 1) max |x| per row, never 0 (two plain reductions beat abs().amax() and the inf-norm)."""
    return torch.maximum(x.amax(dim=1, keepdim=True), x.amin(dim=1, keepdim=True).neg_()).clamp_(min=1e-30)


SMALL_M = 4  # fallback kernels only: rows per call up to which weight-only int8 beats W8A8
W8A8_BLOCK_ROWS = 256  # fallback W8A8 works on blocks of rows so its intermediates stay in cache


def w8a8_linear(x: torch.Tensor, weight_t: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None
                ) -> torch.Tensor:
    """Fallback W8A8: x (M, K) float32, weight_t (K, N) int8 view, scales (N,) → (M, N) float32.

    Activations are quantized per row (symmetric); int8 × int8 → int32; y = acc · row_scale · scale + bias.
    """
    out = torch.empty(x.shape[0], weight_t.shape[1], dtype=torch.float32)
    for a in range(0, x.shape[0], W8A8_BLOCK_ROWS):
        xb = x[a:a + W8A8_BLOCK_ROWS]
        row_scale = _row_absmax(xb).div_(127.0)
        xq = torch.round(xb / row_scale).to(torch.int8)
        y = torch._int_mm(xq, weight_t).to(torch.float32).mul_(row_scale)  # (m, N)
        out[a:a + W8A8_BLOCK_ROWS] = y.mul_(scales) if bias is None else torch.addcmul(bias, y, scales)
    return out


class Int8Linear(nn.Module):
    """Linear with an int8 weight (N, K) and per-output-channel scales; float in (float32 or, from the
    bfloat16 attention, bfloat16), float32 out.

    The weight lives in FBGEMM's packed form (or, in the fallback, as a plain int8 tensor); it is not a
    registered buffer, so it is filled by ``load_weight`` rather than by ``load_state_dict``. A very tall
    weight (the head: 151936 rows) is packed as a few blocks of rows, so packing never holds more than
    one block twice.
    """

    PACK_BLOCK_BYTES = 64 << 20
    # True where the caller never reads the input again (the decoder's and the vision tower's linears, set by
    # ``swap_modules`` from SCRATCH_INPUT_MODULES):
    # the per-token scaling then runs in place instead of into a fresh buffer the size of the input (with
    # the SwiGLU and rotary passes saved in models/decoder.py, a 1074-token prefill ~1.5% faster)
    input_is_scratch = False

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype), requires_grad=False) if bias else None
        self.packed: list = []  # FBGEMM packed weights, one per block of output rows
        self.qweight: torch.Tensor | None = None  # fallback: int8 (N, K)
        self.scales: torch.Tensor | None = None  # fallback: float32 (N,)
        self._scales_bf16: torch.Tensor | None = None

    def load_weight(self, read_rows: ReadRows, rows_per_chunk: int = 4096, backend: str | None = None) -> None:
        """Quantize a float weight read ``rows_per_chunk`` rows at a time (and pack it block by block)."""
        N, K = self.out_features, self.in_features
        fbgemm = (backend or ("fbgemm" if fbgemm_available() else "torch")) == "fbgemm"
        block = N if not fbgemm else max(1, min(N, self.PACK_BLOCK_BYTES // K))
        blocks = -(-N // block)
        block = -(-N // blocks)  # equal blocks
        self.packed, self.qweight, self.scales = [], None, None
        for a in range(0, N, block):
            b = min(a + block, N)
            q, scales = quantize_read_rows(read_rows, a, b, K, rows_per_chunk)
            if fbgemm:
                self.packed.append(_fbgemm_pack(q, scales))
            else:
                self.qweight, self.scales = q, scales
                self._scales_bf16 = scales.to(torch.bfloat16)

    def weight_nbytes(self) -> int:
        """Memory held by the weight: int8 values + per-channel scale, zero point and column offset."""
        return self.out_features * self.in_features + 12 * self.out_features

    def dequantized_weight(self) -> torch.Tensor:
        """float32 (N, K): what this module multiplies by (tests)."""
        if self.packed:
            return torch.cat([p.unpack()[0].dequantize() for p in self.packed])
        return self.qweight.float() * self.scales[:, None]

    def _fbgemm(self, x: torch.Tensor) -> torch.Tensor:
        reduce_range = not cpu_has_vnni()  # without VNNI, u8·s8 pairs can saturate int16: use 7-bit activations
        ys = [torch.ops.quantized.linear_dynamic(x, p, reduce_range) for p in self.packed]
        return ys[0] if len(ys) == 1 else torch.cat(ys, dim=1)

    def _product(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x (..., K) → (the packed kernel's product (M, N), float32, without the bias; the per-token scale
        (M, 1) its rows still need, or None where there is one token: FBGEMM's own per-call scale is then
        already per token)."""
        x2 = x.reshape(-1, self.in_features).float()
        if x2.shape[0] == 1:
            return self._fbgemm(x2), None
        row = _row_absmax(x2)
        inverse = row.reciprocal()
        scratch = self.input_is_scratch or x2.data_ptr() != x.data_ptr()  # .float() made a copy
        return self._fbgemm(x2.mul_(inverse) if scratch and x2.is_contiguous() else x2 * inverse), row

    def forward_add(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """residual + self(x), float32, written over the product (models/decoder.py ``add_linear``): the
        per-token scale is applied in the add, one pass over a still-cached output instead of two passes and
        a fresh buffer (at 1074×2048: ~0.12 against ~0.6 ms)."""
        if not self.packed:
            return residual + self(x)
        y, row = self._product(x)  # y is ours: the sum goes into it, still in the caches
        flat = residual.reshape(y.shape)
        y = y.add_(flat) if row is None else torch.addcmul(flat, y, row, out=y)
        return (y if self.bias is None else y.add_(self.bias)).view(residual.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        if self.packed:
            y, row = self._product(x)
            if row is not None:
                y = y.mul_(row) if self.bias is None else torch.addcmul(self.bias, y, row, out=y)  # in place
            elif self.bias is not None:
                y += self.bias
            return y.view(*lead, self.out_features)
        x2 = x.reshape(-1, self.in_features).float()
        M = x2.shape[0]
        if M <= SMALL_M and self.in_features % 16 == 0:  # the weight-only kernel needs K % 16 == 0
            y = torch._weight_int8pack_mm(x2.to(torch.bfloat16), self.qweight, self._scales_bf16).float()
            if self.bias is not None:
                y += self.bias
        else:
            y = w8a8_linear(x2, self.qweight.t(), self.scales, self.bias)
        return y.view(*lead, self.out_features)  # float32 whatever the input's float dtype

    def extra_repr(self) -> str:
        kernel = f"fbgemm×{len(self.packed)}" if self.packed else "torch"
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, " \
               f"kernel={kernel}"


@functools.cache
def onednn_int8_available() -> bool:
    """oneDNN's int8 linear works here, on a CPU with VNNI (without it, u8·s8 pairs can saturate int16)."""
    if not cpu_has_vnni():
        return False
    try:
        layer = Int8LinearOneDNN(16, 16, True)
        layer.load_weight(lambda a, b: torch.eye(16)[a:b])
        layer.bias.data.zero_()
        return bool(torch.allclose(layer(torch.eye(16)), torch.eye(16), atol=0.02))
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


class Int8LinearOneDNN(Int8Linear):
    """The int8 format's linear for layers that only ever see many rows per call (the vision tower: 729
    per crop): the same int8 weight and per-token activation quantization, multiplied by oneDNN's VNNI
    kernel, ~1.15× FBGEMM's at these sizes. (FBGEMM stays for the decoder: at 1-8 rows, decode, it
    streams the weight 1.4-1.8× faster from DRAM, and one weight is not kept in two layouts.)
    """

    def load_weight(self, read_rows: ReadRows, rows_per_chunk: int = 4096, backend: str | None = None) -> None:
        N, K = self.out_features, self.in_features
        q, scales = quantize_read_rows(read_rows, 0, N, K, rows_per_chunk)
        self.packed = [torch.ops.onednn.qlinear_prepack(q, None)]
        self.scales, self.zero_points = scales, torch.zeros(N, dtype=torch.long)

    def _product(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (..., K), any float dtype (quantized straight from it) → (y / row scale (M, N) float32 without the
        bias, row scale (M, 1)): activations quantized per token."""
        x = x.reshape(-1, self.in_features)
        row = _row_absmax(x).float()
        # round(x·127/row) + 128 as the floor of a value ≥ 1.5; through int16 because float → uint8 is a slow
        # scalar loop in PyTorch's CPU kernels while float → int16 → uint8 is vectorized (the whole
        # quantization ~2× faster here). A float32 input nobody reads again is scaled where it lies, still in
        # the caches (for the tower's MLP input, 729×4304, ~4× faster than into a fresh buffer).
        in_place = self.input_is_scratch and x.dtype == torch.float32 and x.is_contiguous()
        xq = (x.mul_(127.0 / row) if in_place else torch.mul(x, 127.0 / row)).add_(128.5)
        xq = xq.to(torch.int16).to(torch.uint8)
        y = torch.ops.onednn.qlinear_pointwise(xq, 1.0 / 127, 128, self.packed[0], self.scales, self.zero_points,
                                               None, 1.0, 0, torch.float32, "none", [], "")
        return y, row

    def dequantized_weight(self) -> torch.Tensor:
        y, row = self._product(torch.eye(self.in_features))  # the identity quantizes exactly (127 → 255)
        return y.mul_(row).t().contiguous()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, " \
               "kernel=onednn"


# ------------------------------------------------------------------------------------------ bfloat16
class PackedLinear(nn.Module):
    """Linear whose weight is kept in oneDNN's blocked layout (reordered once at load time)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.in_features, self.out_features, self.dtype = in_features, out_features, dtype
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype), requires_grad=False) if bias else None
        self.packed: torch.Tensor | None = None
        self.weight: torch.Tensor | None = None  # kept only where oneDNN is unavailable

    def load_weight(self, read_rows: ReadRows, rows_per_chunk: int = 4096, backend: str | None = None) -> None:
        w = torch.empty(self.out_features, self.in_features, dtype=self.dtype)
        for a in range(0, self.out_features, rows_per_chunk):
            w[a:a + rows_per_chunk] = read_rows(a, min(a + rows_per_chunk, self.out_features))
        if (backend or ("onednn" if torch.backends.mkldnn.is_available() else "torch")) == "onednn":
            self.packed, self.weight = torch.ops.mkldnn._reorder_linear_weight(w, 1), None
        else:
            self.packed, self.weight = None, w

    def weight_nbytes(self) -> int:
        return self.out_features * self.in_features * torch.empty(0, dtype=self.dtype).element_size()

    def dequantized_weight(self) -> torch.Tensor:
        eye = torch.eye(self.in_features, dtype=self.dtype)
        return self._linear(eye).t().float() if self.weight is None else self.weight.float()

    def _linear(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is None:
            return F.linear(x, self.weight)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, None, "none", [], "")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        y = self._linear(x.reshape(-1, self.in_features).to(self.dtype))
        if self.bias is not None:
            y = y + self.bias
        return y.view(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class CastEmbedding(Embedding):
    """The decoder's embedding tables stored in a narrower dtype; rows are cast to ``dtype`` after lookup."""

    def __init__(self, source: Embedding, dtype: torch.dtype):
        nn.Module.__init__(self)
        self.embedding, self.new_embedding = source.embedding, source.new_embedding
        self.dtype = dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(ids).to(self.dtype)


# ------------------------------------------------------------------------------------------ registry
FORMATS = {
    "float32": WeightFormat("float32", torch.float32, None, None, "float32 weights and compute"),
    "bfloat16": WeightFormat("bfloat16", torch.bfloat16, PackedLinear, None,
                             "bfloat16 weights and compute; linears prepacked for oneDNN",
                             attention_dtype=torch.bfloat16),
    "float16": WeightFormat("float16", torch.float16, None, None, "float16 weights and compute (slow on most CPUs)"),
    "int8": WeightFormat("int8", torch.float32, Int8Linear, torch.bfloat16,
                         "int8 linears (per-channel weight scales, per-token dynamic activation quantization), "
                         "float32 activations, bfloat16 embedding tables, attention matmuls and KV cache",
                         attention_dtype=torch.bfloat16, kv_dtype=torch.bfloat16,
                         image_linear=lambda: Int8LinearOneDNN if onednn_int8_available() else None),
}
ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def resolve_format(fmt: WeightFormat | str | torch.dtype) -> WeightFormat:
    if isinstance(fmt, WeightFormat):
        return fmt
    if isinstance(fmt, torch.dtype):
        fmt = str(fmt).removeprefix("torch.")
    name = ALIASES.get(str(fmt).lower(), str(fmt).lower())
    if name not in FORMATS:
        raise ValueError(f"unsupported weight format {fmt!r} (choose from {', '.join(FORMATS)})")
    return FORMATS[name]


def swap_modules(model: nn.Module, fmt: WeightFormat) -> dict[str, nn.Module]:
    """Replace every ``nn.Linear`` of ``model`` by ``fmt.linear`` (and re-type the embedding tables).

    Returns module name → the new linear module, whose weight the caller fills with ``load_weight``;
    everything else (biases, norms, tables) is still filled by ``load_state_dict``.
    """
    swapped: dict[str, nn.Module] = {}
    image_linear = (fmt.image_linear() if fmt.image_linear else None) or fmt.linear
    for name, module in list(model.named_modules()):
        if isinstance(module, (VisionAttention, Attention)):
            module.attention_dtype = attention_dtype(fmt)
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if type(child) is nn.Linear and fmt.linear is not None:
                linear = image_linear if full.startswith(IMAGE_MODULES) else fmt.linear
                new = linear(child.in_features, child.out_features, child.bias is not None, fmt.dtype)
                if full.startswith(SCRATCH_INPUT_MODULES) and hasattr(new, "input_is_scratch"):
                    new.input_is_scratch = True
                setattr(module, child_name, new)
                swapped[full] = new
            elif type(child) is Embedding and fmt.table_dtype not in (None, fmt.dtype):
                setattr(module, child_name, CastEmbedding(child, fmt.dtype))
    return swapped


def tensor_dtype(fmt: WeightFormat, name: str) -> torch.dtype:
    """The dtype the loader stores a (non-linear-weight) tensor in."""
    if fmt.table_dtype is not None and name.startswith("decoder.embedding."):
        return fmt.table_dtype
    return fmt.dtype


def tune_allocator(loading: bool = False) -> bool:
    """Set glibc's allocator for loading (``loading=True``) or for inference (the default).

    Inference: keep large freed buffers in the heap instead of unmapping them on every free. Each big
    temporary (prefill and vision activations are tens of MB) is otherwise a fresh mmap whose pages are
    faulted in and zeroed again on every op: measured ~15-20% of a vision pass or a prefill here. Freed
    memory then stays resident (the peak, not more).
    Loading: the opposite, so the loader's temporaries never stay behind as holes in the heap under
    the weights (a fixed 1 MiB mmap threshold; the free pages left are returned when inference starts).
    glibc only; a no-op elsewhere.
    """
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4
    try:
        libc = ctypes.CDLL("libc.so.6")
        if loading:
            return bool(libc.mallopt(M_MMAP_MAX, 65536)) and bool(libc.mallopt(M_MMAP_THRESHOLD, 1 << 20))
        libc.malloc_trim(0)
        return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
    except (OSError, AttributeError):
        return False
