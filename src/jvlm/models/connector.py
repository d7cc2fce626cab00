"""Vision–language connector of jina-vlm: pad embeddings → 2×2 windows → mean-query attention pooling
→ SwiGLU projector.

What is special here:
- ``pad_embed[1]`` ("partial padding") is added wherever the image mask is < 1 but not 0; with the
  released preprocessing that is every patch of the *last* crop of each image (the mask's −1 row);
  the addition is done in float32 and cast back once, as the reference does;
- the 27×27 grid is zero-padded to 28×28 *after* that, so edge windows hold exact zeros, which still
  take part in the attention as keys/values (no mask) and in the mean query (always ÷ 4);
- the projector's fused ``up`` weight is [value; gate] — value half first.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ConnectorConfig
from .decoder import MLP


class AttentionPooling(nn.Module):
    def __init__(self, cfg: ConnectorConfig):
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        self.q = nn.Linear(cfg.input_size, cfg.hidden_size)
        self.kv = nn.Linear(cfg.input_size, 2 * cfg.hidden_size)  # rows: K | V
        self.out = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, windows: torch.Tensor) -> torch.Tensor:
        """windows (M, P, C) with P members per window → (M, hidden)."""
        M, P, _ = windows.shape
        H, hd = self.n_heads, self.head_dim
        q = self.q(windows.mean(dim=1, keepdim=True)).view(M, 1, H, hd).transpose(1, 2)  # (M, H, 1, hd)
        k, v = self.kv(windows).view(M, P, 2, H, hd).permute(2, 0, 3, 1, 4)  # 2×(M, H, P, hd)
        y = F.scaled_dot_product_attention(q, k, v)  # (M, H, 1, hd)
        return self.out(y.reshape(M, H * hd))


class Connector(nn.Module):
    def __init__(self, cfg: ConnectorConfig):
        super().__init__()
        self.cfg = cfg
        self.pad_embed = nn.Parameter(torch.empty(2, cfg.input_size))
        self.pooling = AttentionPooling(cfg)
        self.projector = MLP(cfg.hidden_size, cfg.projector_size, cfg.output_size)

    def forward(self, features: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """features (N, 729, C), masks (N, 729) with 1 = real, <1 = (partial) padding → (N, 196, out)."""
        N, L, C = features.shape
        side = int(round(L**0.5))
        ph, pw = self.cfg.pooling_h, self.cfg.pooling_w
        masks = masks.to(torch.float32).unsqueeze(-1)
        all_pad = (masks == 0).float()
        partial = ((masks < 1).float() - all_pad).clamp(min=0)
        pad = self.pad_embed.float()
        features = (features + pad[0] * all_pad + pad[1] * partial).to(features.dtype)

        x = features.view(N, side, side, C)
        H, W = -(-side // ph) * ph, -(-side // pw) * pw
        x = F.pad(x, (0, 0, 0, W - side, 0, H - side))  # zero rows/cols at bottom/right → (N, H, W, C)
        # 2×2 windows, members in row-major order: (2R, 2C), (2R, 2C+1), (2R+1, 2C), (2R+1, 2C+1)
        x = x.view(N, H // ph, ph, W // pw, pw, C).permute(0, 1, 3, 2, 4, 5).reshape(-1, ph * pw, C)
        y = self.pooling(x)  # (N·196, hidden)
        return self.projector(y).view(N, (H // ph) * (W // pw), -1)
