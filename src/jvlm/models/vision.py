"""SigLIP2-So400M-style vision tower of jina-vlm.

What is special here:
- the patch embedding is a Linear over flattened 14×14×3 patches ordered (dy, dx, channel);
- no CLS token, no pre-LN; learned absolute position table (729 rows for 378-px crops);
- the connector consumes raw residual-stream outputs of two inner blocks (24 and 18 for the
  released config), so only the blocks up to the deepest one used are built and run; the
  post-LN and the top blocks of the checkpoint are never loaded.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import VisionConfig
from .decoder import add_linear

HEADS_PER_CHUNK = 4  # bfloat16 attention: 4 heads' 729×729 scores (4 MB) stay in the CPU caches


def bf16_attention(qkv: torch.Tensor) -> torch.Tensor:
    """Full (non-causal) attention with bfloat16 matmuls and softmax, a few heads at a time.

    qkv (B, T, 3, H, hd) in any float dtype → (B, T, H·hd) bfloat16, the heads merged for the output
    projection. One pass casts (and scales Q) into bfloat16 head-major copies; each chunk's output goes
    straight to its place in the merged layout. For the tower's 729 tokens × 72-wide heads on a CPU with
    bfloat16 dot products this measured ~10 ms per crop and block against 17 ms for the fused float32
    kernel and 18 ms for the fused bfloat16 one; the cost is bfloat16 rounding of the scores and
    probabilities (~0.5% relative error of the attention output).
    """
    B, T, _, H, hd = qkv.shape
    dtype = torch.bfloat16
    heads = qkv.permute(2, 0, 3, 1, 4)  # (3, B, H, T, hd), a view
    qkv_bf16 = torch.empty(3, B, H, T, hd, dtype=dtype)
    torch.mul(heads[0], hd**-0.5, out=qkv_bf16[0])
    qkv_bf16[1:].copy_(heads[1:])
    q, k, v = qkv_bf16
    out = torch.empty(B, T, H, hd, dtype=dtype)
    for b in range(B):
        for a in range(0, H, HEADS_PER_CHUNK):
            c = slice(a, a + HEADS_PER_CHUNK)
            probs = torch.softmax(torch.bmm(q[b, c], k[b, c].transpose(1, 2)), dim=-1)  # (heads, T, T)
            out[b, :, c] = torch.bmm(probs, v[b, c]).transpose(0, 1)
    return out.view(B, T, H * hd)


class VisionAttention(nn.Module):
    """``attention_dtype`` (set per weight format by the loader, engine/quant.py): None runs the fused
    ``scaled_dot_product_attention`` in the activations' dtype (the reference numerics); bfloat16 runs
    ``bf16_attention``."""

    attention_dtype: torch.dtype | None = None

    def __init__(self, dim: int, n_heads: int, head_dim: int):
        super().__init__()
        self.n_heads, self.head_dim = n_heads, head_dim
        self.qkv = nn.Linear(dim, 3 * n_heads * head_dim)  # rows: Q | K | V, head-contiguous
        self.out = nn.Linear(n_heads * head_dim, dim)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """→ residual + attention output."""
        B, T, _ = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.n_heads, self.head_dim)
        if self.attention_dtype == torch.bfloat16:
            y = bf16_attention(qkv)  # bfloat16 in: int8 linears quantize it directly
        else:
            q, k, v = qkv.permute(2, 0, 3, 1, 4)  # 3×(B, H, T, hd)
            y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, T, -1)
        return add_linear(residual, self.out, y)


class VisionMLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.up = nn.Linear(dim, hidden)
        self.down = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """→ residual + MLP output."""
        return add_linear(residual, self.down, gelu_tanh(self.up(x)))


SQRT_8_OVER_PI = (8 / math.pi) ** 0.5


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU, tanh approximation, computed as x·σ(2u) (= ½x(1 + tanh u), u = √(2/π)(x + 0.044715x³)).

    In float32 this is ~1.7× ``F.gelu(approximate="tanh")`` on CPU (whose tanh is slow) and agrees with
    it to float32 rounding; in narrower dtypes the fused kernel is kept (each in-place step would round).
    """
    if x.dtype != torch.float32:
        return F.gelu(x, approximate="tanh")
    y = x * x
    return y.mul_(0.044715 * SQRT_8_OVER_PI).add_(SQRT_8_OVER_PI).mul_(x).sigmoid_().mul_(x)


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.attn_lnorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.attn = VisionAttention(cfg.hidden_size, cfg.n_heads, cfg.head_dim)
        self.ffn_lnorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.ffn = VisionMLP(cfg.hidden_size, cfg.ffn_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.attn(self.attn_lnorm(x), residual=x)  # a new tensor: x may be a kept feature layer
        return self.ffn(self.ffn_lnorm(x), residual=x)


class PatchEmbed(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.proj = nn.Linear(cfg.patch_size * cfg.patch_size * 3, cfg.hidden_size)


class VisionTower(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.feature_layers = cfg.feature_layers
        self.patch_embed = PatchEmbed(cfg)
        self.pos_embed = nn.Parameter(torch.empty(cfg.num_patches, cfg.hidden_size))
        self.layers = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.blocks_needed))

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        """patches (N, 729, 588) in [-1, 1] → concatenated features of the selected blocks (N, 729, 2·1152)."""
        x = self.patch_embed.proj(patches.to(self.pos_embed.dtype)) + self.pos_embed
        outputs: dict[int, torch.Tensor] = {}
        for i, block in enumerate(self.layers):
            x = block(x)
            if i in self.feature_layers:
                outputs[i] = x
        return torch.cat([outputs[i] for i in self.feature_layers], dim=-1)
