"""The same weights in ``transformers``' own Qwen3 and SigLIP modules: the independent implementations
that jvlm's decoder and vision tower are checked against (tests) and raced against (benchmark).

Needs ``transformers`` (a test/bench dependency, not a runtime one).
"""

from __future__ import annotations

import torch

from ..models.jina_vlm import JinaVLM


def transformers_qwen3(model: JinaVLM, attn_implementation: str = "eager"):
    """A ``Qwen3ForCausalLM`` holding jvlm's decoder weights (base vocabulary only: image-token rows
    of the extra embedding table have no counterpart)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    t = model.cfg.text
    dtype = model.dtype
    config = Qwen3Config(
        vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.ffn_size,
        num_hidden_layers=t.n_layers, num_attention_heads=t.n_heads, num_key_value_heads=t.n_kv_heads,
        head_dim=t.head_dim, hidden_act="silu", max_position_embeddings=t.max_sequence_length,
        rms_norm_eps=t.norm_eps, tie_word_embeddings=False, attention_bias=False,
        rope_parameters={"rope_type": "default", "rope_theta": t.rope_theta},
        attn_implementation=attn_implementation,
    )
    with torch.device("meta"):
        ref = Qwen3ForCausalLM(config)
    q, kv = t.n_heads * t.head_dim, t.n_kv_heads * t.head_dim
    d = model.decoder
    sd = {"model.embed_tokens.weight": d.embedding.embedding, "model.norm.weight": d.ln_f.weight,
          "lm_head.weight": model.lm_head.weight}
    for i, layer in enumerate(d.layers):
        p = f"model.layers.{i}."
        wq, wk, wv = layer.attn.qkv.weight.split([q, kv, kv])
        value, gate = layer.ffn.up.weight.chunk(2)
        sd.update({
            p + "input_layernorm.weight": layer.attn_lnorm.weight,
            p + "post_attention_layernorm.weight": layer.ffn_lnorm.weight,
            p + "self_attn.q_proj.weight": wq, p + "self_attn.k_proj.weight": wk, p + "self_attn.v_proj.weight": wv,
            p + "self_attn.o_proj.weight": layer.attn.out.weight,
            p + "self_attn.q_norm.weight": layer.attn.q_lnorm.weight,
            p + "self_attn.k_norm.weight": layer.attn.k_lnorm.weight,
            p + "mlp.gate_proj.weight": gate, p + "mlp.up_proj.weight": value,
            p + "mlp.down_proj.weight": layer.ffn.down.weight,
        })
    ref.load_state_dict({k: v.detach().clone().to(dtype) for k, v in sd.items()}, strict=True, assign=True)
    ref.model.rotary_emb = type(ref.model.rotary_emb)(config)  # non-persistent buffers: rebuild off meta
    return ref.eval()


def transformers_siglip(model: JinaVLM, attn_implementation: str = "eager", n_layers: int | None = None):
    """A ``SiglipVisionModel`` holding jvlm's vision blocks (as many as jvlm builds, or ``n_layers``)."""
    from transformers import SiglipVisionConfig, SiglipVisionModel

    v = model.cfg.vision
    blocks = model.vision.layers[: n_layers or len(model.vision.layers)]
    config = SiglipVisionConfig(
        hidden_size=v.hidden_size, intermediate_size=v.ffn_size, num_hidden_layers=len(blocks),
        num_attention_heads=v.n_heads, image_size=v.image_size, patch_size=v.patch_size,
        layer_norm_eps=v.norm_eps, hidden_act="gelu_pytorch_tanh", attn_implementation=attn_implementation,
        vision_use_head=False,
    )
    ref = SiglipVisionModel(config).to(model.dtype)  # built for real: it has non-persistent buffers
    prefix = "vision_model." if any(k.startswith("vision_model.") for k in ref.state_dict()) else ""
    P, W = v.patch_size, v.hidden_size
    patch_w = model.vision.patch_embed.proj.weight  # (W, P·P·3), input index (dy·P + dx)·3 + c
    sd = {
        "embeddings.patch_embedding.weight": patch_w.view(W, P, P, 3).permute(0, 3, 1, 2),
        "embeddings.patch_embedding.bias": model.vision.patch_embed.proj.bias,
        "embeddings.position_embedding.weight": model.vision.pos_embed,
    }
    for i, block in enumerate(blocks):
        p = f"encoder.layers.{i}."
        wq, wk, wv = block.attn.qkv.weight.chunk(3)
        bq, bk, bv = block.attn.qkv.bias.chunk(3)
        sd.update({
            p + "layer_norm1.weight": block.attn_lnorm.weight, p + "layer_norm1.bias": block.attn_lnorm.bias,
            p + "layer_norm2.weight": block.ffn_lnorm.weight, p + "layer_norm2.bias": block.ffn_lnorm.bias,
            p + "self_attn.q_proj.weight": wq, p + "self_attn.q_proj.bias": bq,
            p + "self_attn.k_proj.weight": wk, p + "self_attn.k_proj.bias": bk,
            p + "self_attn.v_proj.weight": wv, p + "self_attn.v_proj.bias": bv,
            p + "self_attn.out_proj.weight": block.attn.out.weight, p + "self_attn.out_proj.bias": block.attn.out.bias,
            p + "mlp.fc1.weight": block.ffn.up.weight, p + "mlp.fc1.bias": block.ffn.up.bias,
            p + "mlp.fc2.weight": block.ffn.down.weight, p + "mlp.fc2.bias": block.ffn.down.bias,
        })
    missing, unexpected = ref.load_state_dict({prefix + k: t.detach().clone().contiguous() for k, t in sd.items()},
                                              strict=False)
    assert not unexpected, unexpected
    assert all("post_layernorm" in k for k in missing), missing  # not on jina-vlm's path
    return ref.eval()


def patchify(pixels: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(N, 3, H, W) → (N, patches, P·P·3) in jina-vlm's (dy, dx, channel) order."""
    N, C, H, W = pixels.shape
    P = patch_size
    x = pixels.view(N, C, H // P, P, W // P, P).permute(0, 2, 4, 3, 5, 1)  # (N, gh, gw, dy, dx, c)
    return x.reshape(N, (H // P) * (W // P), P * P * C)
