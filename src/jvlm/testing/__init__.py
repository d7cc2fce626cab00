"""Tiny random jina-vlm checkpoints in exactly the official snapshot format.

They are the fixture of every test and the way to run the whole pipeline offline. The weights are
random, so the answers are gibberish; everything else (nested config, official tensor names,
sharded safetensors with an index, the real Qwen tokenizer, preprocessing) is the real thing.

``python -m jvlm.testing DIR`` (or ``jvlm write-tiny DIR``) writes one.
"""

from __future__ import annotations

import copy
import json
from importlib import resources
from pathlib import Path

import torch
from safetensors.torch import save_file

PREPROCESSOR_CONFIG = {
    "image_processor_type": "JinaVLMImageProcessor",
    "processor_class": "JinaVLMProcessor",
    "cropping_method": "overlap-and-resize",
    "base_input_size": [378, 378],
    "patch_size": 14,
    "max_crops": 12,
    "overlap_margins": [4, 4],
    "pooling_h": 2,
    "pooling_w": 2,
    "token_length_h": 14,
    "token_length_w": 14,
    "use_column_tokens": True,
    "min_pixels": 3136,
    "max_pixels": 1003520,
    "size": {"shortest_edge": 3136, "longest_edge": 1003520},
    "do_resize": True,
    "do_convert_rgb": True,
    "normalization_method": "minmax",
    "image_min": -1.0,
    "image_max": 1.0,
    "interpolation": "bilinear",
    "antialias": False,
    "resize_in_float32": False,
    "preserve_aspect_ratio": False,
}

FULL_CONFIG = {  # the released jina-vlm geometry (spec §2.1)
    "model_type": "jvlm",
    "architectures": ["JinaVLMForConditionalGeneration"],
    "tie_word_embeddings": False,
    "bos_token_id": 151643,
    "eos_token_id": 151643,
    "pad_token_id": 151643,
    "image_token_index": 151940,
    "torch_dtype": "float32",
    "text_config": {
        "model_type": "jvlm",
        "hidden_size": 2048,
        "n_layers": 28,
        "vocab_size": 151936,
        "embedding_size": 151936,
        "additional_vocab_size": 128,
        "max_sequence_length": 40960,
        "rope": True,
        "rope_theta": 1000000.0,
        "partial_rotary_factor": 1.0,
        "rope_scaling": None,
        "block_config": {
            "attn_config": {"n_heads": 16, "n_kv_heads": 8, "head_dim": 128, "q_lnorm": True, "k_lnorm": True,
                            "qkv_lnorm_on_heads": True, "sliding_window": -1,
                            "lnorm_config": {"type": "rms", "eps": 1e-6, "bias": False, "with_affine": True}},
            "ffn_config": {"activation_type": "silu", "gated_activation": True, "size": 6144, "bias": False},
            "lnorm_config": {"type": "rms", "eps": 1e-6, "bias": False, "with_affine": True},
        },
    },
    "vision_config": {
        "model_type": "jvlm",
        "hidden_size": 1152,
        "n_layers": 27,
        "input_size": [378, 378],
        "patch_size": 14,
        "n_channels": 3,
        "linear_patch_embedding": True,
        "patch_embedding_bias": True,
        "use_absolute_positional_embeddings": True,
        "positional_interpolation": "bicubic",
        "use_cls_token": False,
        "pre_lnorm": False,
        "post_lnorm": True,
        "vit_layers": [-4, -10],
        "output_size": 2048,
        "block_config": {
            "attn_config": {"n_heads": 16, "head_dim": 72, "n_kv_heads": None, "q_bias": True, "k_bias": True,
                            "v_bias": True, "o_bias": True},
            "ffn_config": {"activation_type": "gelu_pytorch_tanh", "gated_activation": False, "size": 4304,
                           "bias": True},
            "lnorm_config": {"type": "default", "eps": 1e-6, "bias": True, "with_affine": True},
        },
        "vl_connector_config": {
            "pooling_type": "attention_meanq",
            "padding_embed_type": "pad_and_partial_pad",
            "projector_type": "mlp",
            "pooling_h": 2,
            "pooling_w": 2,
            "spatial_merge_size": 2,
            "attn_pooling_config": {"n_heads": 16, "head_dim": 72, "n_kv_heads": None, "q_bias": True,
                                    "o_bias": True},
            "mlp_projector_config": {"activation_type": "silu", "gated_activation": True, "size": 6144,
                                     "bias": False},
        },
    },
}


def jina_vlm_config(
    *,
    text_hidden: int = 64,
    text_layers: int = 2,
    text_heads: int = 4,
    text_kv_heads: int = 2,
    text_ffn: int = 128,
    vision_hidden: int = 32,
    vision_layers: int = 6,
    vision_heads: int = 2,
    vision_ffn: int = 64,
    vit_layers: tuple[int, ...] = (-3, -5),
    projector_size: int = 96,
    max_sequence_length: int = 8192,
    full: bool = False,
) -> dict:
    """The nested official config; ``full=True`` gives the released 2.4B geometry, else a tiny one."""
    cfg = copy.deepcopy(FULL_CONFIG)
    if full:
        return cfg
    t, v = cfg["text_config"], cfg["vision_config"]
    t.update(hidden_size=text_hidden, n_layers=text_layers, max_sequence_length=max_sequence_length)
    t["block_config"]["attn_config"].update(n_heads=text_heads, n_kv_heads=text_kv_heads,
                                            head_dim=text_hidden // text_heads)
    t["block_config"]["ffn_config"]["size"] = text_ffn
    v.update(hidden_size=vision_hidden, n_layers=vision_layers, vit_layers=list(vit_layers), output_size=text_hidden)
    v["block_config"]["attn_config"].update(n_heads=vision_heads, head_dim=vision_hidden // vision_heads)
    v["block_config"]["ffn_config"]["size"] = vision_ffn
    c = v["vl_connector_config"]
    c["attn_pooling_config"].update(n_heads=vision_heads, head_dim=vision_hidden // vision_heads)
    c["mlp_projector_config"]["size"] = projector_size
    return cfg


def official_tensor_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor of the official checkpoint (spec §3.1) with its shape."""
    t, v = config["text_config"], config["vision_config"]
    ta, tf = t["block_config"]["attn_config"], t["block_config"]["ffn_config"]
    va, vf = v["block_config"]["attn_config"], v["block_config"]["ffn_config"]
    c = v["vl_connector_config"]
    D, V, P = t["hidden_size"], t["embedding_size"], v["patch_size"]
    q, kv = ta["n_heads"] * ta["head_dim"], ta["n_kv_heads"] * ta["head_dim"]
    W = v["hidden_size"]
    vw = va["n_heads"] * va["head_dim"]
    C = W * len(v["vit_layers"])
    ch = c["attn_pooling_config"]["n_heads"] * c["attn_pooling_config"]["head_dim"]
    num_patches = (v["input_size"][0] // P) ** 2
    s: dict[str, tuple[int, ...]] = {}
    pv = "model.vision_model."
    s[pv + "patch_embed.proj.weight"] = (W, P * P * 3)
    s[pv + "patch_embed.proj.bias"] = (W,)
    s[pv + "pos_embed"] = (num_patches, W)
    for i in range(v["n_layers"]):
        p = f"{pv}layers.{i}."
        s.update({p + "attn_lnorm.weight": (W,), p + "attn_lnorm.bias": (W,), p + "attn.qkv_w.weight": (3 * vw, W),
                  p + "attn.q_b": (vw,), p + "attn.k_b": (vw,), p + "attn.v_b": (vw,),
                  p + "attn.out.weight": (W, vw), p + "attn.out.bias": (W,),
                  p + "ffn_lnorm.weight": (W,), p + "ffn_lnorm.bias": (W,),
                  p + "ffn.up.weight": (vf["size"], W), p + "ffn.up.bias": (vf["size"],),
                  p + "ffn.down.weight": (W, vf["size"]), p + "ffn.down.bias": (W,)})
    s[pv + "post_lnorm.weight"] = (W,)
    s[pv + "post_lnorm.bias"] = (W,)
    pc = pv + "vl_connector."
    ps = c["mlp_projector_config"]["size"]
    s.update({pc + "pad_embed": (2, C), pc + "pooling.q_w.weight": (ch, C), pc + "pooling.q_b": (ch,),
              pc + "pooling.kv_w.weight": (2 * ch, C), pc + "pooling.k_b": (ch,), pc + "pooling.v_b": (ch,),
              pc + "pooling.out.weight": (ch, ch), pc + "pooling.out.bias": (ch,),
              pc + "projector.up.weight": (2 * ps, ch), pc + "projector.down.weight": (v["output_size"], ps)})
    pl = "model.language_model."
    s[pl + "embedding.embedding"] = (V, D)
    s[pl + "embedding.new_embedding"] = (t["additional_vocab_size"], D)
    for i in range(t["n_layers"]):
        p = f"{pl}layers.{i}."
        s.update({p + "attn_lnorm.weight": (D,), p + "attn.qkv_w.weight": (q + 2 * kv, D),
                  p + "attn.q_b": (q,), p + "attn.k_b": (kv,), p + "attn.v_b": (kv,),
                  p + "attn.q_lnorm.weight": (ta["head_dim"],), p + "attn.k_lnorm.weight": (ta["head_dim"],),
                  p + "attn.out.weight": (D, q), p + "ffn_lnorm.weight": (D,),
                  p + "ffn.up.weight": (2 * tf["size"], D), p + "ffn.down.weight": (D, tf["size"])})
    s[pl + "ln_f.weight"] = (D,)
    s["lm_head.weight"] = (V, D)
    return s


def random_tensor(name: str, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """Random values with sensible scales, so activations stay O(1) and logits are decisive."""
    if name.endswith(("attn.q_b", "attn.k_b", "attn.v_b")) and "language_model" in name:
        return torch.zeros(shape)  # disabled biases are stored as zeros in the official checkpoint
    if "lnorm" in name or name.endswith("ln_f.weight"):
        base = 1.0 if name.endswith("weight") else 0.0
        return base + 0.1 * torch.randn(shape, generator=generator)
    if name.endswith(("embedding.embedding", "new_embedding", "pos_embed", "pad_embed")):
        return torch.randn(shape, generator=generator)
    if len(shape) == 1:  # biases
        return 0.1 * torch.randn(shape, generator=generator)
    return torch.randn(shape, generator=generator) / shape[-1] ** 0.5


def write_tiny_checkpoint(
    directory: str | Path,
    *,
    seed: int = 0,
    shards: int = 2,
    dtype: torch.dtype = torch.float32,
    **config_overrides,
) -> Path:
    """Write a complete random jina-vlm snapshot to ``directory`` and return its path."""
    from .qwen_tokenizer import write_tokenizer_files

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = jina_vlm_config(**config_overrides)
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    generator = torch.Generator().manual_seed(seed)
    tensors = {name: random_tensor(name, shape, generator).to(dtype)
               for name, shape in official_tensor_shapes(config).items()}

    names = list(tensors)
    per_shard = -(-len(names) // shards)
    weight_map = {}
    for k in range(shards):
        part = names[k * per_shard:(k + 1) * per_shard]
        fname = f"model-{k + 1:05d}-of-{shards:05d}.safetensors" if shards > 1 else "model.safetensors"
        save_file({n: tensors[n].contiguous() for n in part}, directory / fname, metadata={"format": "pt"})
        weight_map.update({n: fname for n in part})
    if shards > 1:
        total = sum(t.nbytes for t in tensors.values())
        (directory / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))

    (directory / "config.json").write_text(json.dumps(config, indent=2))
    (directory / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR_CONFIG, indent=2))
    (directory / "processor_config.json").write_text(
        json.dumps({"processor_class": "JinaVLMProcessor", "always_start_with_space": True}, indent=2))
    (directory / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 151643, "eos_token_id": [151643, 151645], "do_sample": False}, indent=2))
    template = resources.files(__package__).joinpath("chat_template.jinja").read_text(encoding="utf-8")
    (directory / "chat_template.jinja").write_text(template, encoding="utf-8")
    write_tokenizer_files(directory)
    (directory / "JVLM_RANDOM_WEIGHTS").write_text("random weights written by jvlm.testing: answers are gibberish\n")
    return directory
