"""Qwen3-style decoder of jina-vlm (the Qwen3-1.7B geometry for the released model).

What is special here:
- two embedding tables: the base one (151936 rows) and an extra one for jina-vlm's image tokens
  (ids ≥ 151936); they are indexed separately, never concatenated;
- per-head RMSNorm on Q and K before RoPE; RMSNorm normalizes in float32, casts back, then scales;
- the fused FFN ``up`` weight is [value; gate] (value half first);
- plain 1-D RoPE over every token (text and image alike), rotate-half convention, θ = 1e6.

The model holds no cache and no batching policy. It runs a *ragged* batch: the new tokens of several
sequences concatenated along one axis (T, D), each sequence described by a ``Segment`` that points at
its own KV cache. Linear layers see all T tokens at once; attention runs per segment, so sequences of
different lengths never need padding and each gets exactly the result it would get alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from ..config import TextConfig


class LayerCache(Protocol):
    """Per-sequence key/value storage: k[layer], v[layer] have shape (n_kv_heads, capacity, head_dim), in the
    activations' dtype or narrower (bfloat16 for the int8 format: decode reads the whole cache every step)."""

    k: list[torch.Tensor]
    v: list[torch.Tensor]


@dataclass
class Segment:
    cache: LayerCache
    start: int  # cache position of this segment's first new token (= number of tokens already cached)
    length: int  # number of new tokens in this segment


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:  # the same arithmetic as below in one op (decode runs ~110 norms a token)
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class Rotary(nn.Module):
    """cos/sin tables in float32, grown on demand; rotation done in float32 and cast back."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        self.head_dim, self.theta = head_dim, theta
        self._cos = self._sin = torch.empty(0)

    def tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        needed = int(positions.max()) + 1 if positions.numel() else 1
        if self._cos.shape[0] < needed:
            size = max(needed, 2 * self._cos.shape[0], 4096)
            exponents = torch.arange(0, self.head_dim, 2, dtype=torch.int64).float() / self.head_dim
            inv_freq = 1.0 / (self.theta**exponents)
            angles = torch.outer(torch.arange(size, dtype=torch.float32), inv_freq)
            emb = torch.cat([angles, angles], dim=-1)
            self._cos, self._sin = emb.cos(), emb.sin()
        return self._cos[positions], self._sin[positions]  # (T, hd) each


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (T, H, hd); cos/sin (T, hd) → x·cos + rotate_half(x)·sin, rotate_half(x) = (−x₂, x₁).

    The second term is added into each half in place: three passes over x instead of six.
    """
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    half = x1.shape[-1]
    out = xf * cos[:, None]
    out[..., :half].addcmul_(x2, sin[:, None, :half], value=-1)
    out[..., half:].addcmul_(x1, sin[:, None, half:])
    return out.to(x.dtype)


QUERY_BLOCK = 256  # bfloat16 prefill attention: queries per block (keys past the block's end are skipped)
SCORES_BYTES = 64 << 20  # ... fewer for long contexts, so that one block's scores stay within this


def bf16_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int) -> torch.Tensor:
    """Causal GQA attention with bfloat16 matmuls and softmax, for a prefill of many new tokens.

    q (Hq, n, hd) at positions start … start+n−1; k, v (Hkv, start+n, hd) → (Hq, n, hd) in q's dtype.
    Queries go in blocks, each against only the keys it can see, so about half of the causal
    triangle's work is skipped (as the fused kernel does). ~1.7× the fused float32 kernel for a
    1k-token prompt on CPUs with bfloat16 dot products; costs bfloat16 rounding (~0.5% relative).
    """
    Hq, n, hd = q.shape
    Hkv = k.shape[0]
    group = Hq // Hkv
    dtype = torch.bfloat16
    qg = (q * hd**-0.5).to(dtype).view(Hkv, group, n, hd)  # query heads sharing a key head together
    kt, vs = k.to(dtype).transpose(1, 2), v.to(dtype)  # (Hkv, hd, L), (Hkv, L, hd)
    out = torch.empty(Hkv, group, n, hd, dtype=dtype)
    rows = max(16, min(QUERY_BLOCK, SCORES_BYTES // (2 * Hq * (start + n))))
    for a in range(0, n, rows):
        b = min(a + rows, n)
        seen = start + b  # keys visible to the block's last query
        hidden = torch.arange(seen) > torch.arange(start + a, start + b)[:, None]  # (b−a, seen)
        bias = torch.zeros(b - a, seen, dtype=dtype).masked_fill_(hidden, float("-inf")).repeat(group, 1)
        scores = torch.baddbmm(bias, qg[:, :, a:b].reshape(Hkv, group * (b - a), hd), kt[:, :, :seen])
        out[:, :, a:b] = torch.bmm(torch.softmax(scores, dim=-1), vs[:, :seen]).view(Hkv, group, b - a, hd)
    return out.view(Hq, n, hd).to(q.dtype)


def add_linear(residual: torch.Tensor, linear: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """residual + linear(x): in one pass over the output where the linear can add while it writes it (the
    int8 format's ``forward_add``, engine/quant.py: its per-token scale and the residual in one op)."""
    forward_add = getattr(linear, "forward_add", None)
    return forward_add(x, residual) if forward_add is not None else residual + linear(x)


class Attention(nn.Module):
    """``attention_dtype`` (set per weight format by the loader, engine/quant.py): None runs the fused
    ``scaled_dot_product_attention`` in the activations' dtype (the reference numerics); bfloat16 runs
    prefills of more than one token through ``bf16_causal_attention`` (decode steps stay fused)."""

    attention_dtype: torch.dtype | None = None

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        q_size, kv_size = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
        self.split = (q_size, kv_size, kv_size)
        self.qkv = nn.Linear(cfg.hidden_size, q_size + 2 * kv_size, bias=cfg.qkv_bias)  # rows: Q | K | V
        self.q_lnorm = RMSNorm(cfg.head_dim, cfg.norm_eps)
        self.k_lnorm = RMSNorm(cfg.head_dim, cfg.norm_eps)
        self.out = nn.Linear(q_size, cfg.hidden_size, bias=False)

    def forward(self, x, cos, sin, segments: list[Segment], layer: int, residual: torch.Tensor) -> torch.Tensor:
        """→ residual + attention output (T, D)."""
        T = x.shape[0]
        q, k, v = self.qkv(x).split(self.split, dim=-1)
        q = apply_rotary(self.q_lnorm(q.view(T, self.n_heads, self.head_dim)), cos, sin)  # (T, Hq, hd)
        k = apply_rotary(self.k_lnorm(k.view(T, self.n_kv_heads, self.head_dim)), cos, sin)  # (T, Hkv, hd)
        v = v.view(T, self.n_kv_heads, self.head_dim)
        outputs = []
        offset = 0
        group = self.n_heads // self.n_kv_heads
        if any(seg.length == 1 for seg in segments):  # decode steps read the cache with queries in its dtype
            q_decode = q.to(segments[0].cache.k[layer].dtype)  # once per layer (bfloat16 for int8)
        for seg in segments:
            s, n = seg.start, seg.length
            k_cache, v_cache = seg.cache.k[layer], seg.cache.v[layer]  # (Hkv, capacity, hd)
            if n == 1:  # a decode step: the few ops per sequence matter when many sequences decode together
                k_cache[:, s], v_cache[:, s] = k[offset], v[offset]
                qg = q_decode[offset].view(1, self.n_kv_heads, group, self.head_dim)  # query heads grouped by key head
                y = F.scaled_dot_product_attention(qg, k_cache[None, :, : s + 1], v_cache[None, :, : s + 1])
                outputs.append(y.view(1, -1))
                offset += 1
                continue
            k_cache[:, s : s + n] = k[offset : offset + n].transpose(0, 1)
            v_cache[:, s : s + n] = v[offset : offset + n].transpose(0, 1)
            qs = q[None, offset : offset + n].transpose(1, 2)  # (1, Hq, n, hd): 4-D takes SDPA's fused CPU kernel
            keys, values = k_cache[None, :, : s + n], v_cache[None, :, : s + n]  # (1, Hkv, s+n, hd)
            if n > 1 and self.attention_dtype == torch.bfloat16:
                y = bf16_causal_attention(qs[0], keys[0], values[0], s)[None]
            elif s == 0:
                y = F.scaled_dot_product_attention(qs.to(keys.dtype), keys, values, is_causal=True, enable_gqa=True)
            else:  # new tokens after a cached prefix: causal within the new part, full view of the prefix
                mask = torch.arange(s + n) <= (s + torch.arange(n))[:, None]
                y = F.scaled_dot_product_attention(qs.to(keys.dtype), keys, values, attn_mask=mask, enable_gqa=True)
            outputs.append(y[0].transpose(0, 1).reshape(n, -1))
            offset += n
        y = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=0)  # mixed dtypes promote
        return add_linear(residual, self.out, y)


class MLP(nn.Module):
    """SwiGLU without biases (the decoder's FFN and the connector's projector)."""

    def __init__(self, dim: int, hidden: int, out: int | None = None):
        super().__init__()
        self.up = nn.Linear(dim, 2 * hidden, bias=False)  # rows: value | gate
        self.down = nn.Linear(hidden, out or dim, bias=False)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """→ down(SwiGLU(up(x))), plus ``residual`` when given."""
        value, gate = self.up(x).chunk(2, dim=-1)
        hidden = torch.mul(F.silu(gate, inplace=True), value)  # up's output is ours: no extra buffer
        return self.down(hidden) if residual is None else add_linear(residual, self.down, hidden)


class DecoderBlock(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.attn_lnorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_lnorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.ffn = MLP(cfg.hidden_size, cfg.ffn_size)

    def forward(self, x, cos, sin, segments, layer):
        x = self.attn(self.attn_lnorm(x), cos, sin, segments, layer, residual=x)
        return self.ffn(self.ffn_lnorm(x), residual=x)


class Embedding(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.embedding = nn.Parameter(torch.empty(cfg.vocab_size, cfg.hidden_size))
        self.new_embedding = nn.Parameter(torch.empty(cfg.additional_vocab_size, cfg.hidden_size))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        base = self.embedding.shape[0]
        extra = ids >= base
        if not bool(extra.any()):
            return F.embedding(ids, self.embedding)
        out = F.embedding(ids.masked_fill(extra, 0), self.embedding)
        out[extra] = F.embedding(ids[extra] - base, self.new_embedding)
        return out


class Decoder(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.embedding = Embedding(cfg)
        self.layers = nn.ModuleList(DecoderBlock(cfg) for _ in range(cfg.n_layers))
        self.ln_f = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.rotary = Rotary(cfg.head_dim, cfg.rope_theta)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, segments: list[Segment]) -> torch.Tensor:
        """x (T, D) input embeddings of the new tokens, positions (T,) → final-norm hidden states (T, D)."""
        cos, sin = self.rotary.tables(positions)
        for i, block in enumerate(self.layers):
            x = block(x, cos, sin, segments, i)
        return self.ln_f(x)
