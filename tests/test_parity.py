"""Numerical parity with independent implementations (float32): transformers' Qwen3 and SigLIP, and a
loop-by-loop connector written from the spec."""

import math

import pytest
import torch
import torch.nn.functional as F

from jvlm.engine.kv_cache import KVCache
from jvlm.models.decoder import Segment
from jvlm.testing.reference import patchify, transformers_qwen3, transformers_siglip

pytest.importorskip("transformers")


def rel_err(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="module")
def qwen3(vlm):
    return transformers_qwen3(vlm.model)


def test_decoder_logits_match_transformers_qwen3(vlm, qwen3):
    ids = torch.tensor(vlm.tokenizer.encode("Hello, world! Grüße aus Berlin — 你好，世界。 1234 <|im_end|>"))
    model = vlm.model
    with torch.inference_mode():
        expected = qwen3(ids[None]).logits[0]
        cache = KVCache(model.cfg.text, 128, torch.float32)
        got = model(ids, torch.arange(len(ids)), [Segment(cache, 0, len(ids))], logits_at=torch.arange(len(ids)))
    assert got.shape == expected.shape
    assert rel_err(got, expected) < 1e-5


def test_every_greedy_step_matches_transformers(vlm, qwen3):
    """Prefill + cached decode steps vs transformers' full forward over the growing sequence."""
    model = vlm.model
    ids = vlm.tokenizer.encode("The quick brown fox")
    cache = KVCache(model.cfg.text, 64, torch.float32)
    with torch.inference_mode():
        logits = model(torch.tensor(ids), torch.arange(len(ids)), [Segment(cache, 0, len(ids))],
                       logits_at=torch.tensor([len(ids) - 1]))[0]
        seq = list(ids)
        for _ in range(12):
            expected = qwen3(torch.tensor(seq)[None]).logits[0, -1]
            assert rel_err(logits, expected) < 1e-5
            token = int(expected.argmax())
            assert int(logits.argmax()) == token
            seq.append(token)
            logits = model(torch.tensor([token]), torch.tensor([len(seq) - 1]), [Segment(cache, len(seq) - 1, 1)])[0]


def test_text_only_chat_equals_transformers_generate(vlm, qwen3):
    conversation = [{"role": "user", "content": "Write one sentence about the sea."}]
    prompt = vlm.prepare(conversation)
    out = vlm.chat(conversation, max_new_tokens=16)
    with torch.inference_mode():
        ref = qwen3.generate(torch.tensor([prompt.ids]), max_new_tokens=16, do_sample=False,
                             eos_token_id=list(vlm.generation.eos_token_ids), pad_token_id=0)
    assert out.token_ids == ref[0, len(prompt.ids):].tolist()


def test_vision_tower_matches_transformers_siglip(vlm):
    model = vlm.model
    siglip = transformers_siglip(model)
    pixels = torch.rand(2, 3, 378, 378, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.inference_mode():
        hidden = siglip(pixel_values=pixels, output_hidden_states=True).hidden_states  # [embeddings, block0, ...]
        expected = torch.cat([hidden[i + 1] for i in model.vision.feature_layers], dim=-1)
        got = model.vision(patchify(pixels, 14))
    assert got.shape == expected.shape
    assert rel_err(got, expected) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gelu_tanh_matches_torch(dtype):
    """The tower's GELU (its own float32 formula) against PyTorch's tanh approximation, over the range where
    it saturates on both sides."""
    from jvlm.models.vision import gelu_tanh

    x = torch.cat([torch.linspace(-40, 40, 20001), torch.randn(729 * 64, generator=torch.Generator().manual_seed(3))])
    x = x.to(dtype)
    expected = F.gelu(x.float(), approximate="tanh")
    got = gelu_tanh(x)
    assert got.dtype == dtype and not got.isnan().any()
    error = (got.float() - expected).abs() / expected.abs().clamp(min=1)  # relative, absolute near 0
    assert float(error.max()) < (1e-6 if dtype == torch.float32 else 1e-2)


def test_vision_tower_builds_only_the_blocks_it_uses(vlm):
    cfg = vlm.model.cfg.vision
    assert cfg.n_layers == 6 and cfg.feature_layers == (4, 2)
    assert len(vlm.model.vision.layers) == 5  # block 5 and post-LN of the checkpoint are never loaded


def reference_connector(connector, features, masks):
    """Spec §5, window by window, head by head."""
    cfg = connector.cfg
    N, L, C = features.shape
    side = int(math.isqrt(L))
    out = []
    for n in range(N):
        f = features[n].clone()
        for p in range(L):
            m = float(masks[n, p])
            if m == 0:
                f[p] = f[p] + connector.pad_embed[0]
            elif m < 1:
                f[p] = f[p] + connector.pad_embed[1]
        grid = torch.zeros(side + 1, side + 1, C)
        grid[:side, :side] = f.view(side, side, C)
        rows = []
        for R in range((side + 1) // 2):
            for Cc in range((side + 1) // 2):
                X = torch.stack([grid[2 * R, 2 * Cc], grid[2 * R, 2 * Cc + 1], grid[2 * R + 1, 2 * Cc],
                                 grid[2 * R + 1, 2 * Cc + 1]])
                q = connector.pooling.q(X.mean(0))
                kv = connector.pooling.kv(X)
                k, v = kv[:, : cfg.hidden_size], kv[:, cfg.hidden_size:]
                heads = []
                for h in range(cfg.n_heads):
                    sl = slice(h * cfg.head_dim, (h + 1) * cfg.head_dim)
                    a = torch.softmax(k[:, sl] @ q[sl] / math.sqrt(cfg.head_dim), dim=0)
                    heads.append(a @ v[:, sl])
                y = connector.pooling.out(torch.cat(heads))
                u = connector.projector.up.weight @ y
                value, gate = u[: cfg.projector_size], u[cfg.projector_size:]
                rows.append(connector.projector.down.weight @ (F.silu(gate) * value))
        out.append(torch.stack(rows))
    return torch.stack(out)


def test_connector_matches_spec_reference(vlm):
    connector = vlm.model.connector
    g = torch.Generator().manual_seed(3)
    features = torch.randn(2, 729, connector.cfg.input_size, generator=g)
    masks = torch.ones(2, 729)
    masks[1] = -1  # the last crop's sentinel row → partial padding
    masks[0, :5] = 0  # all-padding patches
    with torch.inference_mode():
        got = connector(features, masks)
        expected = reference_connector(connector, features, masks)
    assert got.shape == (2, 196, connector.cfg.output_size)
    assert rel_err(got, expected) < 1e-5


def test_padding_crops_contribute_zero_vision_features(vlm):
    model = vlm.model
    crops = torch.rand(2, 729, 588) * 2 - 1
    crops[1] = -1.0  # an all −1 crop is treated as padding (upstream behaviour, also for a black crop)
    masks = torch.ones(2, 729)
    with torch.inference_mode():
        got = model.encode_images(crops, masks)
        zero = model.connector(torch.zeros(1, 729, model.cfg.connector.input_size), masks[1:])
    assert torch.allclose(got[1], zero[0], atol=1e-6)
    assert not torch.allclose(got[0], zero[0], atol=1e-3)
