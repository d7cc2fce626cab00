"""Typed view of jina-vlm's nested (OLMo/Molmo-style) ``config.json``, built in one place.

Every field the model needs is read explicitly; a missing field raises ``CheckpointError`` naming
its path, and a value this implementation does not support (e.g. a different pooling type) is
refused rather than silently ignored.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import CheckpointError

_MISSING = object()


def _get(d: dict, path: str, default: Any = _MISSING) -> Any:
    node: Any = d
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node or node[part] is None:
            if default is _MISSING:
                raise CheckpointError(f"config.json: missing field '{path}'")
            return default
        node = node[part]
    return node


def _require(path: str, value: Any, allowed: tuple) -> Any:
    if value not in allowed:
        raise CheckpointError(f"config.json: unsupported value {path}={value!r} (supported: {list(allowed)})")
    return value


@dataclass(frozen=True)
class TextConfig:
    hidden_size: int
    n_layers: int
    vocab_size: int  # rows of the base embedding table == lm_head rows
    additional_vocab_size: int  # rows of the extra table (image tokens)
    max_sequence_length: int
    rope_theta: float
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_size: int
    norm_eps: float
    qkv_bias: bool


@dataclass(frozen=True)
class VisionConfig:
    hidden_size: int
    n_layers: int
    image_size: int
    patch_size: int
    n_heads: int
    head_dim: int
    ffn_size: int
    norm_eps: float
    vit_layers: tuple[int, ...]  # indices into the (n_layers + 1)-entry hidden-state list

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def feature_layers(self) -> tuple[int, ...]:
        """0-based block indices whose outputs the connector consumes (e.g. (24, 18))."""
        n_states = self.n_layers + 1  # block outputs + post-LN output
        layers = tuple(i % n_states for i in self.vit_layers)
        for i in layers:
            if i >= self.n_layers:
                raise CheckpointError("config.json: vit_layers selects the post-LN output, which is not supported")
        return layers

    @property
    def blocks_needed(self) -> int:
        return max(self.feature_layers) + 1


@dataclass(frozen=True)
class ConnectorConfig:
    input_size: int  # vision width × number of feature layers
    hidden_size: int  # pooling attention width (n_heads × head_dim)
    n_heads: int
    head_dim: int
    pooling_h: int
    pooling_w: int
    projector_size: int
    output_size: int


@dataclass(frozen=True)
class JinaVLMConfig:
    text: TextConfig
    vision: VisionConfig
    connector: ConnectorConfig
    tie_word_embeddings: bool
    raw: dict

    @classmethod
    def from_dict(cls, d: dict) -> JinaVLMConfig:
        if not isinstance(d, dict):
            raise CheckpointError("config.json: top level is not an object")
        model_type = d.get("model_type")
        if model_type != "jvlm":
            raise CheckpointError(f"config.json: model_type is {model_type!r}, expected 'jvlm' (jina-vlm)")
        t = _get(d, "text_config")
        ta = _get(t, "block_config.attn_config")
        tf = _get(t, "block_config.ffn_config")
        if not _get(t, "rope", True):
            raise CheckpointError("config.json: text_config.rope=false (learned positions) is not supported")
        _require("text_config.partial_rotary_factor", float(_get(t, "partial_rotary_factor", 1.0)), (1.0,))
        _require("text_config.rope_scaling", _get(t, "rope_scaling", None), (None,))
        _require("text_config.normalize_input_embeds", bool(_get(t, "normalize_input_embeds", False)), (False,))
        _require("text_config.block_config.postnorm", bool(_get(t, "block_config.postnorm", False)), (False,))
        _require("text_config.block_config.lnorm_config.type", _get(t, "block_config.lnorm_config.type", "rms"),
                 ("rms",))
        _require("text ffn activation_type", _get(tf, "activation_type", "silu"), ("silu", "swiglu"))
        _require("text ffn gated_activation", bool(_get(tf, "gated_activation", True)), (True,))
        _require("text attention sliding_window", int(_get(ta, "sliding_window", -1)), (-1, 0))
        _require("text attention q_lnorm", bool(_get(ta, "q_lnorm", True)), (True,))
        _require("text attention k_lnorm", bool(_get(ta, "k_lnorm", True)), (True,))
        hidden = int(_get(t, "hidden_size"))
        n_heads = int(_get(ta, "n_heads"))
        text = TextConfig(
            hidden_size=hidden,
            n_layers=int(_get(t, "n_layers") if "n_layers" in t else _get(t, "num_hidden_layers")),
            vocab_size=int(_get(t, "embedding_size", _get(t, "vocab_size"))),
            additional_vocab_size=int(_get(t, "additional_vocab_size")),
            max_sequence_length=int(_get(t, "max_sequence_length")),
            rope_theta=float(_get(t, "rope_theta")),
            n_heads=n_heads,
            n_kv_heads=int(_get(ta, "n_kv_heads", n_heads)),
            head_dim=int(_get(ta, "head_dim", hidden // n_heads)),
            ffn_size=int(_get(tf, "size")),
            norm_eps=float(_get(t, "block_config.lnorm_config.eps", 1e-6)),
            qkv_bias=bool(_get(ta, "q_bias", False) or _get(ta, "k_bias", False) or _get(ta, "v_bias", False)),
        )

        v = _get(d, "vision_config")
        va = _get(v, "block_config.attn_config")
        vf = _get(v, "block_config.ffn_config")
        _require("vision_config.linear_patch_embedding", bool(_get(v, "linear_patch_embedding", True)), (True,))
        _require("vision_config.use_cls_token", bool(_get(v, "use_cls_token", False)), (False,))
        _require("vision_config.pre_lnorm", bool(_get(v, "pre_lnorm", False)), (False,))
        _require("vision_config.use_absolute_positional_embeddings",
                 bool(_get(v, "use_absolute_positional_embeddings", True)), (True,))
        _require("vision ffn activation_type", _get(vf, "activation_type"), ("gelu_pytorch_tanh", "gelu_tanh"))
        _require("vision ffn gated_activation", bool(_get(vf, "gated_activation", False)), (False,))
        input_size = _get(v, "input_size")
        if isinstance(input_size, (list, tuple)):
            if len(input_size) != 2 or input_size[0] != input_size[1]:
                raise CheckpointError(f"config.json: vision_config.input_size {input_size} must be square")
            input_size = input_size[0]
        v_hidden = int(_get(v, "hidden_size"))
        v_heads = int(_get(va, "n_heads"))
        vision = VisionConfig(
            hidden_size=v_hidden,
            n_layers=int(_get(v, "n_layers")),
            image_size=int(input_size),
            patch_size=int(_get(v, "patch_size")),
            n_heads=v_heads,
            head_dim=int(_get(va, "head_dim", v_hidden // v_heads)),
            ffn_size=int(_get(vf, "size")),
            norm_eps=float(_get(v, "block_config.lnorm_config.eps", 1e-6)),
            vit_layers=tuple(int(i) for i in _get(v, "vit_layers")),
        )
        vision.feature_layers  # noqa: B018 - validates vit_layers early

        c = _get(v, "vl_connector_config")
        _require("vl_connector_config.pooling_type", _get(c, "pooling_type"), ("attention_meanq",))
        _require("vl_connector_config.padding_embed_type", _get(c, "padding_embed_type"), ("pad_and_partial_pad",))
        _require("vl_connector_config.projector_type", _get(c, "projector_type"), ("mlp",))
        _require("mlp_projector_config.activation_type", _get(c, "mlp_projector_config.activation_type", "silu"),
                 ("silu", "swiglu"))
        c_heads = int(_get(c, "attn_pooling_config.n_heads"))
        c_head_dim = int(_get(c, "attn_pooling_config.head_dim"))
        output_size = int(_get(v, "output_size"))
        if output_size != text.hidden_size:
            raise CheckpointError(
                f"config.json: vision_config.output_size ({output_size}) != text_config.hidden_size "
                f"({text.hidden_size})"
            )
        connector = ConnectorConfig(
            input_size=v_hidden * len(vision.vit_layers),
            hidden_size=c_heads * c_head_dim,
            n_heads=c_heads,
            head_dim=c_head_dim,
            pooling_h=int(_get(c, "pooling_h")),
            pooling_w=int(_get(c, "pooling_w")),
            projector_size=int(_get(c, "mlp_projector_config.size")),
            output_size=output_size,
        )
        return cls(text=text, vision=vision, connector=connector,
                   tie_word_embeddings=bool(d.get("tie_word_embeddings", False)), raw=d)

    @classmethod
    def from_file(cls, path: str | Path) -> JinaVLMConfig:
        path = Path(path)
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise CheckpointError(f"{path.parent} is not a jina-vlm snapshot: config.json is missing") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(d)
