"""jina-vlm assembled: vision tower → connector → decoder, plus the official-name weight mapping.

The model exposes two seams and nothing else (no tokenizing, sampling or caching policy):
- ``encode_images(crops, masks)``: pixels of N crops → connector features (N, 196, D);
- ``forward(ids, positions, segments, image_features, image_positions, logits_at)``: one ragged
  step over the new tokens of several sequences; image features are *added* onto the embeddings
  of the ``<im_patch>`` tokens they target.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from ..config import JinaVLMConfig
from .connector import Connector
from .decoder import Decoder, Segment
from .vision import VisionTower


class JinaVLM(nn.Module):
    def __init__(self, cfg: JinaVLMConfig):
        super().__init__()
        self.cfg = cfg
        self.vision = VisionTower(cfg.vision)
        self.connector = Connector(cfg.connector)
        self.decoder = Decoder(cfg.text)
        self.lm_head = nn.Linear(cfg.text.hidden_size, cfg.text.vocab_size, bias=False)

    kv_dtype: torch.dtype | None = None  # set by the loader where the KV cache is narrower than ``dtype``

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype (activations); weights may be stored narrower (engine/quant.py)."""
        return self.decoder.ln_f.weight.dtype

    @property
    def cache_dtype(self) -> torch.dtype:
        """The dtype of the KV cache the engine allocates for this model."""
        return self.kv_dtype or self.dtype

    def encode_images(self, crops: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """crops (N, 729, 588), masks (N, 729) → features (N, 196, D) in the model dtype."""
        if len(crops) > 1:  # one crop at a time: its activations fit in the CPU caches (faster, less memory)
            return torch.cat([self.encode_images(crops[i:i + 1], masks[i:i + 1]) for i in range(len(crops))])
        keep = ~(crops == -1).flatten(1).all(dim=1)  # an all −1 crop is padding (also a black crop, as upstream)
        features = self.vision(crops)
        features = features * keep.to(features.dtype)[:, None, None]
        return self.connector(features, masks)

    def forward(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        segments: list[Segment],
        image_features: torch.Tensor | None = None,
        image_positions: torch.Tensor | None = None,
        logits_at: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """ids, positions (T,); image_features (K, D) added at rows image_positions (K,) of the new tokens.

        Returns logits (len(logits_at), vocab) in float32 — only the rows asked for, since the head is the
        most expensive single matmul of a long prefill.
        """
        x = self.decoder.embedding(ids)  # (T, D)
        if image_features is not None and image_features.numel():
            x.index_add_(0, image_positions, image_features.to(x.dtype))
        h = self.decoder(x, positions, segments)
        if logits_at is not None:
            h = h[logits_at]
            if not len(h):  # a prompt chunk before the last one: only its KV cache is wanted
                return torch.empty(0, self.cfg.text.vocab_size)
        return self.lm_head(h).float()


# ---------------------------------------------------------------------------------------------
# Official checkpoint names → this module's names. One pure function; applied once at load time.

_PREFIXES = (
    ("model.vision_model.vl_connector.", "connector."),
    ("model.vision_model.", "vision."),
    ("model.language_model.", "decoder."),
    ("lm_head.", "lm_head."),
)
_FUSED_BIAS = {  # official bias parameters that become the bias of one fused Linear
    r"(vision\.layers\.\d+\.attn)\.(q_b|k_b|v_b)$": ("qkv", ("q_b", "k_b", "v_b")),
    r"(decoder\.layers\.\d+\.attn)\.(q_b|k_b|v_b)$": ("qkv", ("q_b", "k_b", "v_b")),
    r"(connector\.pooling)\.(k_b|v_b)$": ("kv", ("k_b", "v_b")),
    r"(connector\.pooling)\.(q_b)$": ("q", ("q_b",)),
}


def _rename(name: str) -> str | None:
    for old, new in _PREFIXES:
        if name.startswith(old):
            name = new + name[len(old):]
            break
    else:
        return None
    name = name.replace(".attn.qkv_w.", ".attn.qkv.")
    name = name.replace("pooling.q_w.", "pooling.q.").replace("pooling.kv_w.", "pooling.kv.")
    return name


def unused_official_key(name: str, cfg: JinaVLMConfig) -> bool:
    """Tensors of the official checkpoint that jina-vlm never consumes (top ViT blocks, ViT post-LN)."""
    if name.startswith("model.vision_model.post_lnorm."):
        return True
    m = re.match(r"model\.vision_model\.layers\.(\d+)\.", name)
    return bool(m) and cfg.vision.blocks_needed <= int(m.group(1)) < cfg.vision.n_layers


def map_official_names(names: list[str], cfg: JinaVLMConfig) -> tuple[dict[str, list[str]], list[str], list[str]]:
    """Plan the official → internal mapping.

    Returns (plan, skipped, unknown): ``plan`` maps each internal tensor name to the official names
    concatenated (in order) to build it; ``skipped`` are known-but-unused tensors; ``unknown`` are names
    that belong to nothing. Fused biases whose parts are all absent are simply not planned (zero bias).
    Idempotent in the sense that internal names are not official names: mapping a mapped set plans nothing.
    """
    plan: dict[str, list[str]] = {}
    fused: dict[str, tuple[tuple[str, ...], dict[str, str]]] = {}
    skipped, unknown = [], []
    for name in names:
        if unused_official_key(name, cfg):
            skipped.append(name)
            continue
        new = _rename(name)
        if new is None:
            unknown.append(name)
            continue
        for pattern, (target, parts) in _FUSED_BIAS.items():
            m = re.match(pattern, new)
            if m:
                fused.setdefault(f"{m.group(1)}.{target}.bias", (parts, {}))[1][m.group(2)] = name
                break
        else:
            plan[new] = [name]
    for target, (parts, found) in fused.items():
        plan[target] = [found.get(p, "") for p in parts]  # "" = absent part, filled with zeros
    return plan, skipped, unknown
