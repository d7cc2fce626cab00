"""Weight formats: the quantized / packed linear kernels against float references, each format against
float32 on the same (tiny, random) weights with explicit bounds, and the loader's memory discipline."""

import pytest
import torch
import torch.nn.functional as F

import jvlm
from conftest import image_conversation, random_image
from jvlm import checkpoint
from jvlm.config import JinaVLMConfig
from jvlm.engine import quant
from jvlm.engine.kv_cache import KVCache
from jvlm.errors import InvalidRequestError
from jvlm.models import decoder, vision
from jvlm.models.decoder import Segment
from jvlm.models.jina_vlm import JinaVLM
from jvlm.testing import jina_vlm_config

# Bounds of each format against float32 on the tiny checkpoint (measured: bf16 ≈ 1.0% / 1.5% max,
# int8 ≈ 2.1% / 3.2% max relative error of logits; top-1 agreement ≈ 93% both). The README quotes them.
BOUNDS = {  # format: (relative error of final hidden states and of logits, mean teacher-forced top-1 agreement)
    "bfloat16": (0.03, 0.85),
    "int8": (0.06, 0.85),
}
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,",
           "1, 2, 3, 4, 5,", "Grüße aus Berlin — 你好，世界。", "The quick brown fox jumps over the lazy dog."]

BACKENDS = (["fbgemm"] if quant.fbgemm_available() else []) + ["torch"] \
    + (["onednn"] if quant.onednn_int8_available() else [])


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def make_int8(w, bias=None, backend=None):
    cls = quant.Int8LinearOneDNN if backend == "onednn" else quant.Int8Linear
    m = cls(w.shape[1], w.shape[0], bias is not None)
    m.load_weight(lambda a, b: w[a:b], 16, backend)
    if bias is not None:
        m.bias = torch.nn.Parameter(bias, requires_grad=False)
    return m


# ----------------------------------------------------------------------------------------- kernels
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("M", [1, 3, 8, 300])  # decode-sized and prefill-sized calls take different kernels
@pytest.mark.parametrize("K", [64, 72])  # 72: not a multiple of 16 (the weight-only kernel's limit)
def test_int8_linear_matches_float_reference(backend, M, K):
    g = torch.Generator().manual_seed(M * K)
    w, b = torch.randn(96, K, generator=g) / K**0.5, 0.1 * torch.randn(96, generator=g)
    x = torch.randn(M, K, generator=g)
    m = make_int8(w, b, backend)
    with torch.inference_mode():
        y = m(x)
        assert y.shape == (M, 96) and y.dtype == torch.float32
        # the weight's own rounding: per-channel int8 keeps each row within half a step
        step = w.abs().amax(1, keepdim=True) / 127
        assert bool(((m.dequantized_weight() - w).abs() <= step / 2 + 1e-7).all())
        assert rel(y, F.linear(x, m.dequantized_weight(), b)) < 0.02  # activation quantization only
        assert rel(y, F.linear(x, w, b)) < 0.03  # both
        assert rel(m(x[None]).squeeze(0), y) == 0.0  # leading dims are only a view


@pytest.mark.parametrize("backend", BACKENDS)
def test_int8_quantizes_activations_per_token(backend):
    """A token with huge activations (an outlier) must not cost the other tokens of the call their precision,
    and a token's result stays close to what it gets alone."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(128, 64, generator=g) / 8
    x = torch.randn(12, 64, generator=g)
    x[5] *= 1000.0
    m = make_int8(w, backend=backend)
    with torch.inference_mode():
        y = m(x)
        exact = F.linear(x, m.dequantized_weight())
        for i in range(12):
            assert rel(y[i], exact[i]) < 0.02, i
            assert rel(y[i], m(x[i:i + 1])[0]) < 0.02, i
        from_bf16 = m(x.bfloat16())  # what the bfloat16 attention hands the output projection
        assert from_bf16.dtype == torch.float32 and rel(from_bf16, y) < 0.02


def test_int8_tall_weight_is_packed_in_blocks(monkeypatch):
    if not quant.fbgemm_available():
        pytest.skip("FBGEMM not available")
    monkeypatch.setattr(quant.Int8Linear, "PACK_BLOCK_BYTES", 64 * 100)  # 100 rows of K=64 per block
    w = torch.randn(350, 64)
    m = make_int8(w)
    assert len(m.packed) == 4
    x = torch.randn(3, 64)
    with torch.inference_mode():
        assert rel(m(x), F.linear(x, w)) < 0.03
        assert rel(m(x[:1]), F.linear(x[:1], w)) < 0.03


def test_packed_bf16_linear_matches_f_linear():
    w, b = torch.randn(80, 48).bfloat16(), torch.randn(80).bfloat16()
    m = quant.PackedLinear(48, 80, True)
    m.load_weight(lambda a, c: w[a:c], 16)
    m.bias = torch.nn.Parameter(b, requires_grad=False)
    with torch.inference_mode():
        for M in (1, 5, 200):
            x = torch.randn(M, 48).bfloat16()
            assert rel(m(x), F.linear(x, w, b)) < 1e-2
        assert rel(m.dequantized_weight(), w) < 1e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bf16_vision_attention_matches_sdpa(dtype):
    g = torch.Generator().manual_seed(0)
    B, T, H, hd = 2, 50, 10, 72  # 10 heads: chunks of 4, 4 and 2
    qkv = torch.randn(B, T, 3, H, hd, generator=g).to(dtype)
    with torch.inference_mode():
        y = vision.bf16_attention(qkv)
        q, k, v = qkv.float().permute(2, 0, 3, 1, 4)
        ref = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, T, H * hd)
    assert y.dtype == torch.bfloat16 and y.shape == (B, T, H * hd)
    assert 0 < rel(y, ref) < 1e-2  # bfloat16 rounding, nothing worse
    for b in range(B):  # each image attends only to itself
        assert rel(vision.bf16_attention(qkv[b:b + 1])[0], y[b]) == 0


@pytest.mark.parametrize("start, n", [(0, 300), (0, 2), (40, 300), (97, 5), (3000, 40)])  # blocks, prefixes
def test_bf16_causal_attention_matches_sdpa(start, n):
    g = torch.Generator().manual_seed(start + n)
    q = torch.randn(4, n, 32, generator=g)  # 4 query heads over 2 key heads (GQA)
    k, v = torch.randn(2, start + n, 32, generator=g), torch.randn(2, start + n, 32, generator=g)
    mask = torch.arange(start + n) <= (start + torch.arange(n))[:, None]
    with torch.inference_mode():
        y = decoder.bf16_causal_attention(q, k, v, start)
        ref = F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=mask, enable_gqa=True)[0]
    assert y.shape == q.shape and y.dtype == torch.float32
    assert 0 < rel(y, ref) < 1e-2
    # causality: changing the last key/value changes only the last query's output
    k2, v2 = k.clone(), v.clone()
    k2[:, -1] += 1.0
    v2[:, -1] += 1.0
    with torch.inference_mode():
        y2 = decoder.bf16_causal_attention(q, k2, v2, start)
    assert torch.equal(y2[:, :-1], y[:, :-1]) and not torch.equal(y2[:, -1], y[:, -1])


def test_bf16_causal_attention_bounds_its_scores(monkeypatch):
    """Long contexts take smaller query blocks (one block's scores within SCORES_BYTES), same result."""
    g = torch.Generator().manual_seed(7)
    q = torch.randn(4, 100, 32, generator=g)
    k, v = torch.randn(2, 500, 32, generator=g), torch.randn(2, 500, 32, generator=g)
    with torch.inference_mode():
        whole = decoder.bf16_causal_attention(q, k, v, 400)
        calls = []
        monkeypatch.setattr(decoder, "SCORES_BYTES", 2 * 4 * 500 * 20)  # → blocks of 20 queries
        monkeypatch.setattr(torch, "softmax", lambda x, dim: calls.append(x.shape) or x.softmax(dim))
        blocked = decoder.bf16_causal_attention(q, k, v, 400)
    assert len(calls) == 5 and max(c.numel() * 2 for c in calls) <= decoder.SCORES_BYTES
    assert rel(blocked, whole) < 1e-2


def test_formats_choose_kernels():
    """int8: oneDNN for the image path where available, FBGEMM (or the fallback) for the decoder; bf16 attention
    in both narrow formats (int8: where the CPU has bf16 dot products), the reference SDPA in float32."""
    cfg = JinaVLMConfig.from_dict(jina_vlm_config())
    int8_attention = torch.bfloat16 if quant.cpu_has_bf16() else None  # emulated bf16 loses to fused fp32
    for name, attention in (("float32", None), ("bfloat16", torch.bfloat16), ("int8", int8_attention)):
        with torch.device("meta"):
            model = JinaVLM(cfg)
        quant.swap_modules(model, quant.resolve_format(name))
        assert model.vision.layers[0].attn.attention_dtype == attention
        assert model.decoder.layers[0].attn.attention_dtype == attention
        if name == "int8":
            image_kernel = quant.Int8LinearOneDNN if quant.onednn_int8_available() else quant.Int8Linear
            assert type(model.vision.layers[0].ffn.up) is image_kernel
            assert type(model.connector.projector.up) is image_kernel
            assert type(model.decoder.layers[0].ffn.up) is quant.Int8Linear
            assert type(model.lm_head) is quant.Int8Linear


def test_attention_dtype_follows_the_cpu(monkeypatch):
    monkeypatch.setattr(quant, "cpu_has_bf16", lambda: False)
    assert quant.attention_dtype(quant.resolve_format("int8")) is None  # float activations: fused float32
    assert quant.attention_dtype(quant.resolve_format("bfloat16")) == torch.bfloat16  # bf16 anyway
    monkeypatch.setattr(quant, "cpu_has_bf16", lambda: True)
    assert quant.attention_dtype(quant.resolve_format("int8")) == torch.bfloat16
    assert quant.attention_dtype(quant.resolve_format("float32")) is None


def test_kv_cache_dtype_follows_the_format(monkeypatch):
    """int8 keeps its KV cache in bfloat16 where attention runs in bfloat16 anyway; float32 never narrows it."""
    monkeypatch.setattr(quant, "cpu_has_bf16", lambda: False)
    assert quant.kv_cache_dtype(quant.resolve_format("int8")) == torch.float32
    assert quant.kv_cache_dtype(quant.resolve_format("bfloat16")) == torch.bfloat16
    monkeypatch.setattr(quant, "cpu_has_bf16", lambda: True)
    assert quant.kv_cache_dtype(quant.resolve_format("int8")) == torch.bfloat16
    assert quant.kv_cache_dtype(quant.resolve_format("float32")) == torch.float32


def test_format_names():
    assert quant.resolve_format("bf16").name == "bfloat16"
    assert quant.resolve_format(torch.float32).name == "float32"
    assert quant.resolve_format("INT8").name == "int8"
    with pytest.raises(InvalidRequestError, match="int8"):
        jvlm.load("/nonexistent", dtype="int3")


# ----------------------------------------------------------------------------------------- formats vs float32
@pytest.fixture(scope="module")
def formats(tiny_dir, vlm):
    out = {"float32": vlm, "bfloat16": jvlm.load(tiny_dir, dtype="bfloat16"), "int8": jvlm.load(tiny_dir, dtype="int8")}
    yield out
    for name in ("bfloat16", "int8"):
        out[name].close()


def forward_all(m, prompt, extra=()):
    """Final hidden states and logits at every position of prompt + extra tokens (teacher forcing)."""
    ids = list(prompt.ids) + list(extra)
    x = m.model.decoder.embedding(torch.tensor(ids))
    if prompt.images:
        image = prompt.images[0]
        features = m.model.encode_images(image.inputs.crops, image.inputs.masks)
        keep = image.positions >= 0
        x.index_add_(0, image.positions[keep], features[keep].to(x.dtype))
    cache = KVCache(m.model.cfg.text, len(ids), m.model.cache_dtype)
    h = m.model.decoder(x, torch.arange(len(ids)), [Segment(cache, 0, len(ids))])
    return h.float(), m.model.lm_head(h).float()


@pytest.mark.parametrize("fmt", ["bfloat16", "int8"])
def test_format_agrees_with_float32(formats, fmt):
    ref, other = formats["float32"], formats[fmt]
    bound, min_agreement = BOUNDS[fmt]
    conversations = [[{"role": "user", "content": p}] for p in PROMPTS]
    conversations.append(image_conversation(random_image(640, 480, seed=3), "Describe this image"))
    agreements = []
    with torch.inference_mode():
        for conversation in conversations:
            prompt = ref.prepare(conversation)
            continuation = ref.chat(conversation, max_new_tokens=12).token_ids
            h0, l0 = forward_all(ref, prompt, continuation)
            h, logits = forward_all(other, prompt, continuation)
            assert rel(h, h0) < bound and rel(logits, l0) < bound, (conversation, rel(h, h0), rel(logits, l0))
            n = len(prompt.ids)
            agreements.append(float((logits[n - 1:-1].argmax(-1) == l0[n - 1:-1].argmax(-1)).float().mean()))
    assert sum(agreements) / len(agreements) >= min_agreement, agreements


@pytest.mark.parametrize("fmt", ["bfloat16", "int8"])
def test_format_decode_agrees_with_float32(formats, fmt, monkeypatch):
    """What the engine's decode steps see (the format's KV cache, one token at a time) against float32's logits
    at the same positions, and against the format's own teacher-forced prefill."""
    ref, other = formats["float32"], formats[fmt]
    seen = []
    accept = other.engine._accept
    monkeypatch.setattr(other.engine, "_accept", lambda r, logits: (seen.append(logits.float()), accept(r, logits)))
    conversation = image_conversation(random_image(640, 480, seed=4), "What is in the picture?")
    with torch.inference_mode():
        result = other.chat(conversation, max_new_tokens=10)
        prompt = other.prepare(conversation)
        decoded = torch.stack(seen)  # (10, V): the prefill's last row, then nine decode steps
        n = len(prompt.ids)
        _, l0 = forward_all(ref, prompt, result.token_ids)
        _, own = forward_all(other, prompt, result.token_ids)
    assert other.engine.prefixes.entries, "the finished conversation's cache is kept"
    cache = next(iter(other.engine.prefixes.entries.values()))[1]
    assert cache.k[0].dtype == other.model.cache_dtype
    assert rel(decoded, l0[n - 1:-1]) < BOUNDS[fmt][0]
    assert rel(decoded, own[n - 1:-1]) < BOUNDS[fmt][0] / 2


@pytest.mark.parametrize("fmt", ["bfloat16", "int8"])
def test_format_image_features_agree(formats, fmt):
    image = formats["float32"].prepare(image_conversation(random_image(800, 600, seed=5))).images[0]
    with torch.inference_mode():
        a = formats["float32"].model.encode_images(image.inputs.crops, image.inputs.masks)
        b = formats[fmt].model.encode_images(image.inputs.crops, image.inputs.masks)
    assert rel(b, a) < BOUNDS[fmt][0]


def test_int8_linear_inputs_are_scratch(formats, monkeypatch):
    """The decoder's and the vision tower's int8 linears scale their input in place
    (quant.SCRATCH_INPUT_MODULES), so the model must never read such an input after the call: overwriting each
    one with NaN right after it must change no logit (prefill with an image, a batch, decode steps)."""
    vlm = formats["int8"]
    scratch = [name for name, m in vlm.model.named_modules() if getattr(m, "input_is_scratch", False)]
    assert {name.split(".")[0] for name in scratch} == {"decoder", "vision"}, scratch
    assert all(name.startswith(("decoder.layers.", "vision.layers.")) for name in scratch), scratch
    conversations = [image_conversation(random_image(640, 480, seed=6), "What is here?"),
                     [{"role": "user", "content": PROMPTS[0]}]]

    def logits_seen():
        seen, accept = [], vlm.engine._accept
        with monkeypatch.context() as patch:
            patch.setattr(vlm.engine, "_accept", lambda r, logits: (seen.append(logits.float().clone()),
                                                                    accept(r, logits))[1])
            vlm.engine.prefixes.clear()
            vlm.engine.features.entries.clear()  # the vision tower runs each time
            vlm.chat(conversations, max_new_tokens=5)
        return torch.stack(seen)

    clean = logits_seen()
    calls = []

    def poisoning(product):  # where forward and forward_add (the residual adds) scale x
        def poisoning_product(self, x):
            y = product(self, x)
            if self.input_is_scratch:
                calls.append(self)
                x.fill_(float("nan"))
            return y
        return poisoning_product

    for cls in (quant.Int8Linear, quant.Int8LinearOneDNN):
        monkeypatch.setattr(cls, "_product", poisoning(cls._product))
    poisoned = logits_seen()
    if quant.fbgemm_available() and quant.onednn_int8_available():  # (the fallbacks never scale in place)
        assert len(set(map(id, calls))) == len(scratch)
    assert torch.equal(clean, poisoned)


def test_int8_chat_end_to_end(formats):
    """The engine runs the int8 model like any other: images, batches, streaming, the prefix cache."""
    vlm = formats["int8"]
    assert vlm.model.weight_format == "int8" and vlm.model.dtype == torch.float32
    photo = random_image(800, 600, seed=1)
    first = vlm.chat(image_conversation(photo), max_new_tokens=6)
    assert first.usage.completion_tokens == 6
    follow = image_conversation(photo) + [{"role": "assistant", "content": first.text},
                                          {"role": "user", "content": "And then?"}]
    second = vlm.chat(follow, max_new_tokens=3)
    assert second.usage.cached_tokens > first.usage.prompt_tokens // 2
    batch = vlm.chat([[{"role": "user", "content": p}] for p in PROMPTS[:3]], max_new_tokens=4)
    assert [r.usage.completion_tokens for r in batch] == [4, 4, 4]


# ----------------------------------------------------------------------------------------- loading
@pytest.mark.parametrize("fmt", ["int8", "bfloat16"])
def test_loading_converts_block_by_block(tiny_dir, monkeypatch, fmt):
    """No float32 copy of the model: linear weights are read a block of rows at a time and converted at
    once; afterwards no float32 weight matrix remains."""
    reads = []
    original = checkpoint.SafetensorsFile.read

    def spy(self, name, start=0, stop=None):
        out = original(self, name, start, stop)
        reads.append((name, out.nbytes))
        return out

    monkeypatch.setattr(checkpoint.SafetensorsFile, "read", spy)
    monkeypatch.setattr(checkpoint, "CHUNK_BYTES", 4096)
    vlm = jvlm.load(tiny_dir, dtype=fmt)
    weight_reads = [n for name, n in reads if name.endswith(".weight") and "lnorm" not in name
                    and n > 1024 and "embedding" not in name]
    assert weight_reads and max(weight_reads) <= 4096
    linears = [m for m in vlm.model.modules() if isinstance(m, (quant.Int8Linear, quant.PackedLinear))]
    assert linears and not any(isinstance(m, torch.nn.Linear) for m in vlm.model.modules())
    floats = [p for p in vlm.model.parameters() if p.dim() == 2 and p.dtype == torch.float32]
    if fmt == "int8":  # only small float tables remain (position / padding embeddings); big tables are bf16
        assert all(p.numel() <= 729 * 64 for p in floats), [p.shape for p in floats]
        assert vlm.model.decoder.embedding.embedding.dtype == torch.bfloat16
    else:
        assert not floats
    vlm.close()
