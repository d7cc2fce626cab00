"""The library face end to end on a tiny random checkpoint: loading, prompts, generation, caches, errors."""

import json
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import jvlm
from conftest import image_conversation, random_image
from jvlm.errors import (
    CheckpointError,
    ContextLengthError,
    ImageError,
    InvalidRequestError,
    ModelNotFoundError,
)
from jvlm.testing import write_tiny_checkpoint


@pytest.fixture(scope="module")
def photo():
    return random_image(800, 600, seed=1)


# ----------------------------------------------------------------------------------------- loading
def copy_snapshot(src, dst):
    shutil.copytree(src, dst)
    return dst


def edit_weights(snapshot, edit):
    """Rewrite the snapshot's weights (as one file) after ``edit`` changed the tensor dict in place."""
    tensors = {}
    for shard in sorted(snapshot.glob("*.safetensors")):
        tensors.update(load_file(shard))
        shard.unlink()
    (snapshot / "model.safetensors.index.json").unlink()
    edit(tensors)
    save_file(tensors, snapshot / "model.safetensors")


def test_strict_loading_names_every_problem(tiny_dir, tmp_path):
    snap = copy_snapshot(tiny_dir, tmp_path / "broken")

    def edit(t):
        del t["model.vision_model.patch_embed.proj.weight"]
        del t["model.vision_model.pos_embed"]
        t["model.vision_model.extra_thing"] = torch.zeros(3)
        t["model.vision_model.layers.0.attn.out.bias"] = torch.zeros(7)

    edit_weights(snap, edit)
    with pytest.raises(CheckpointError) as e:
        jvlm.load(snap)
    msg = str(e.value)
    for name in ("patch_embed.proj.weight", "pos_embed", "extra_thing", "layers.0.attn.out.bias"):
        assert name in msg
    assert "4 problem" in msg


def test_disabled_zero_biases_may_be_absent(tiny_dir, tmp_path, vlm):
    snap = copy_snapshot(tiny_dir, tmp_path / "nobias")
    def edit(t):
        removed = [t.pop(k) for k in list(t) if "language_model" in k and k.endswith(("q_b", "k_b"))]
        assert len(removed) == 4

    edit_weights(snap, edit)
    ids = vlm.chat([{"role": "user", "content": "hi"}], max_new_tokens=5).token_ids
    other = jvlm.load(snap)
    assert other.chat([{"role": "user", "content": "hi"}], max_new_tokens=5).token_ids == ids


def test_nonzero_bias_that_config_disables_is_an_error(tiny_dir, tmp_path):
    snap = copy_snapshot(tiny_dir, tmp_path / "badbias")

    def edit(t):
        key = next(k for k in t if "language_model" in k and k.endswith("q_b"))
        t[key] = torch.ones_like(t[key])

    edit_weights(snap, edit)
    with pytest.raises(CheckpointError, match="q_b"):
        jvlm.load(snap)


def test_single_file_checkpoint_and_bf16(tmp_path):
    snap = write_tiny_checkpoint(tmp_path / "single", shards=1, dtype=torch.bfloat16)
    assert (snap / "model.safetensors").exists()
    model = jvlm.load(snap, dtype="bfloat16")
    assert model.model.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in model.model.parameters())


def test_config_problems_are_named(tiny_dir, tmp_path):
    snap = copy_snapshot(tiny_dir, tmp_path / "cfg")
    cfg = json.loads((snap / "config.json").read_text())
    del cfg["text_config"]["rope_theta"]
    (snap / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="rope_theta"):
        jvlm.load(snap)
    cfg["model_type"] = "llama"
    (snap / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="model_type"):
        jvlm.load(snap)


def test_not_a_snapshot_and_offline_uncached(tmp_path, monkeypatch):
    with pytest.raises(CheckpointError, match="config.json"):
        jvlm.load(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ModelNotFoundError) as e:
        jvlm.load("jinaai/jina-vlm")
    assert "\n" not in str(e.value) and "jinaai/jina-vlm" in str(e.value)


def test_load_progress_reports_bytes(tiny_dir):
    seen = []
    jvlm.load(tiny_dir, progress=lambda done, total: seen.append((done, total)))
    assert seen and seen[-1][0] == seen[-1][1] > 1_000_000


# ----------------------------------------------------------------------------------------- prompts
def test_import_is_light_and_the_api_is_complete():
    """`import jvlm` must not import torch (the CLI's --help and error paths stay instant); every exported
    name still resolves."""
    code = ("import sys, jvlm; assert 'torch' not in sys.modules, 'torch imported'; "
            "[getattr(jvlm, n) for n in jvlm.__all__]; assert 'torch' in sys.modules; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "ok", out.stderr
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        jvlm.nope  # noqa: B018


def test_url_policy_is_passed_to_the_processor(tiny_dir, tmp_path):
    """jvlm.load(url_policy=...) governs where images may come from (here: no local paths)."""
    random_image(64, 64).save(tmp_path / "a.png")
    strict = jvlm.load(tiny_dir, url_policy=jvlm.UrlPolicy(allow_local_paths=False), max_batch=1)
    try:
        with pytest.raises(ImageError, match="local"):
            strict.prepare(image_conversation(str(tmp_path / "a.png")))
    finally:
        strict.close()


def test_image_prompt_layout(vlm, photo):
    prompt = vlm.prepare(image_conversation(photo))
    tok = vlm.tokenizer
    assert prompt.ids[0] == tok.bos_token_id == 151643
    assert prompt.image_tokens == 1054
    image = prompt.images[0]
    positions = image.positions[image.positions >= 0]
    assert all(prompt.ids[p] == tok.image_ids["<im_patch>"] for p in positions.tolist())
    assert len(set(positions.tolist())) == sum(1 for t in prompt.ids if t == tok.image_ids["<im_patch>"]) == 1012
    assert tok.image_prompt_id not in prompt.ids
    text = tok.decode(prompt.ids, skip_special_tokens=False)
    assert text.startswith("<|endoftext|><|im_start|>user\n<im_start>")
    assert text.endswith("Describe this image<|im_end|>\n<|im_start|>assistant\n")


def test_two_images_in_one_turn_and_images_across_turns(vlm, photo):
    small = random_image(100, 100, seed=2)
    conv = image_conversation(photo, "Compare", small)
    prompt = vlm.prepare(conv)
    assert prompt.image_tokens == 1054 + 424
    assert prompt.images[1].offset == prompt.images[0].offset + 1054
    multi = conv + [{"role": "assistant", "content": "They differ."},
                    {"role": "user", "content": [{"type": "image", "image": small}, {"type": "text", "text": "And?"}]}]
    prompt = vlm.prepare(multi)
    assert len(prompt.images) == 3 and prompt.image_tokens == 1054 + 424 + 424
    out = vlm.chat(multi, max_new_tokens=4)
    assert out.usage.image_tokens == 1054 + 424 + 424 and out.usage.completion_tokens >= 1


def test_image_features_land_on_im_patch_tokens(vlm, photo):
    """Independent path: transformers' Qwen3 on inputs_embeds = tables + features at the processor's positions."""
    from jvlm.testing.reference import transformers_qwen3

    model = vlm.model
    prompt = vlm.prepare(image_conversation(photo))
    ids = torch.tensor(prompt.ids)
    with torch.inference_mode():
        table = torch.cat([model.decoder.embedding.embedding, model.decoder.embedding.new_embedding])
        embeds = table[ids].clone()
        image = prompt.images[0]
        features = model.encode_images(image.inputs.crops, image.inputs.masks)
        keep = image.positions >= 0
        embeds[image.positions[keep]] += features[keep]
        expected = transformers_qwen3(model)(inputs_embeds=embeds[None]).logits[0, -1]
    first = vlm.chat(image_conversation(photo), max_new_tokens=1, logprobs=True)
    assert first.token_ids[0] == int(expected.argmax())
    assert abs(first.logprobs[0].logprob - float(torch.log_softmax(expected, -1).max())) < 1e-4


def test_text_only_and_plain_string_content(vlm):
    out = vlm.chat([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}],
                   max_new_tokens=6)
    assert out.usage.image_tokens == 0 and 1 <= out.usage.completion_tokens <= 6
    assert out.finish_reason in ("stop", "length")


# ----------------------------------------------------------------------------------------- generation
def test_batch_equals_individual_greedy(vlm, photo):
    convs = [image_conversation(photo, "What is shown?"), [{"role": "user", "content": "Tell me a story"}],
             image_conversation(random_image(300, 700, seed=5), "Read the text")]
    vlm.engine.prefixes.clear()
    alone = [vlm.chat(c, max_new_tokens=12).token_ids for c in convs]
    vlm.engine.prefixes.clear()
    together = vlm.chat(convs, max_new_tokens=12)
    assert [r.token_ids for r in together] == alone


def test_stream_deltas_concatenate_to_text(vlm, photo):
    conv = image_conversation(photo)
    full = vlm.chat(conv, max_new_tokens=24)
    deltas = list(vlm.chat(conv, max_new_tokens=24, stream=True))
    assert "".join(d.text for d in deltas) == full.text
    assert sum(len(d.token_ids) for d in deltas) == len(full.token_ids)
    assert deltas[-1].finish_reason == full.finish_reason and deltas[-1].result.text == full.text


def test_streaming_is_utf8_safe(vlm):
    """No delta ever carries a replacement character that the final text does not have."""
    for seed in range(3):
        deltas = list(vlm.chat([{"role": "user", "content": "你好"}], max_new_tokens=40, temperature=1.0,
                               seed=seed, stream=True))
        text = "".join(d.text for d in deltas)
        assert text == deltas[-1].result.text
        assert text.count("\ufffd") == deltas[-1].result.text.count("\ufffd")


def test_batched_stream_has_indices(vlm):
    convs = [[{"role": "user", "content": "one"}], [{"role": "user", "content": "two"}]]
    deltas = list(vlm.chat(convs, max_new_tokens=5, stream=True))
    finals = {d.index: d.result for d in deltas if d.result}
    assert set(finals) == {0, 1}
    for i in (0, 1):
        assert "".join(d.text for d in deltas if d.index == i) == finals[i].text


def test_max_new_tokens_and_stop_strings(vlm):
    conv = [{"role": "user", "content": "Count"}]
    out = vlm.chat(conv, max_new_tokens=20, temperature=1.0, seed=7)
    assert out.usage.completion_tokens <= 20
    if out.finish_reason == "length":
        assert out.usage.completion_tokens == 20
    text = out.text
    assert len(text) > 12
    for stop in (text[2:4], text[len(text) // 2:len(text) // 2 + 3], text[-3:]):  # early, mid-answer, at the end
        cut = vlm.chat(conv, max_new_tokens=20, temperature=1.0, seed=7, stop=[stop])
        assert cut.finish_reason == "stop" and cut.text == text[: text.find(stop)]
        streamed = "".join(d.text for d in vlm.chat(conv, max_new_tokens=20, temperature=1.0, seed=7,
                                                     stop=stop, stream=True))
        assert streamed == cut.text


def test_incremental_detokenization_matches_a_full_decode(vlm, monkeypatch):
    """Each step decodes only the answer's tail; the text must still equal decoding every token at once, at
    every step, for random tokens (partial UTF-8 sequences, special and end tokens included)."""
    engine, tokenizer = vlm.engine, vlm.engine.tokenizer
    decoded_lengths = []
    full_decode = tokenizer.decode
    monkeypatch.setattr(tokenizer, "decode", lambda ids, **kw: decoded_lengths.append(len(ids)) or full_decode(ids))
    vocab = tokenizer.tokenizer.get_vocab_size(with_added_tokens=True)
    multibyte = tokenizer.encode("Grüße aus 東京 🙂, ¿qué tal? Привет")
    for seed in range(4):
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, vocab, (60,), generator=g).tolist() if seed % 2 else multibyte * 3
        ids[5::17] = [next(iter(engine.eos_ids))] * len(ids[5::17])
        r = SimpleNamespace(generated=[], committed="", detok_context=0, detok_read=0)
        for token in ids:
            r.generated.append(token)
            decoded_lengths.clear()
            text = engine._text(r)
            if not seed % 2:  # real text: only the tail is decoded (a character spans at most 4 byte tokens)
                assert max(decoded_lengths) <= 8, (len(r.generated), decoded_lengths)
            assert text == full_decode([t for t in r.generated if t not in engine.eos_ids]), (seed, len(r.generated))


def test_seeded_sampling_is_reproducible_and_differs_from_greedy(vlm):
    conv = [{"role": "user", "content": "Write a poem"}]
    a = vlm.chat(conv, max_new_tokens=16, temperature=1.2, top_p=0.95, top_k=50, seed=123)
    b = vlm.chat(conv, max_new_tokens=16, temperature=1.2, top_p=0.95, top_k=50, seed=123)
    greedy = vlm.chat(conv, max_new_tokens=16)
    assert a.token_ids == b.token_ids
    assert a.token_ids != greedy.token_ids


def test_penalties_act_on_seen_tokens():
    from jvlm.engine.sampling import Sampler, SamplingParams

    logits = torch.tensor([2.0, 1.9, -1.0, 0.5])
    assert Sampler(SamplingParams())(logits, [0], [0]) == 0
    assert Sampler(SamplingParams(repetition_penalty=1.5))(logits, [0], []) == 1  # 2.0 / 1.5 < 1.9
    adjusted = Sampler(SamplingParams(repetition_penalty=2.0)).adjust(logits.clone(), [2], [])
    assert adjusted[2] == -2.0  # negative logits are multiplied
    adjusted = Sampler(SamplingParams(frequency_penalty=0.5, presence_penalty=0.25)).adjust(logits.clone(), [], [3, 3])
    assert torch.allclose(adjusted, torch.tensor([2.0, 1.9, -1.0, 0.5 - 1.0 - 0.25]))


def test_usage_and_timings(vlm, photo):
    out = vlm.chat(image_conversation(photo), max_new_tokens=8)
    assert out.usage.prompt_tokens == len(vlm.prepare(image_conversation(photo)).ids)
    assert out.usage.image_tokens == 1054
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    t = out.timings
    assert 0 < t.time_to_first_token_s <= t.total_s and t.prefill_s > 0


# ----------------------------------------------------------------------------------------- caches
def test_caches_do_not_change_answers(vlm, photo):
    engine = vlm.engine
    conv = image_conversation(photo, "What is this?")
    engine.prefixes.clear()
    engine.features.entries.clear()
    first = vlm.chat(conv, max_new_tokens=10)
    assert first.timings.vision_s > 0 and first.usage.cached_tokens == 0
    follow = conv + [{"role": "assistant", "content": first.text}, {"role": "user", "content": "And the colours?"}]
    cached = vlm.chat(follow, max_new_tokens=10)
    assert cached.usage.cached_tokens > 1000  # the image and the first turn came from the prefix cache
    assert cached.timings.vision_s == 0
    engine.prefixes.clear()
    engine.features.entries.clear()
    fresh = vlm.chat(follow, max_new_tokens=10)
    assert fresh.usage.cached_tokens == 0
    assert fresh.token_ids == cached.token_ids


def test_a_new_prefill_runs_in_slices_while_others_decode(vlm, photo, monkeypatch):
    """A request that is decoding keeps getting tokens while a new image prompt is prefilled (a crop or a
    chunk of prompt tokens per step), a request cancelled mid-prefill ends at once, and every answer is the
    one each request gets alone."""
    from jvlm.engine.sampling import SamplingParams

    engine = vlm.engine
    monkeypatch.setattr(engine, "eos_ids", set())  # the story must outlast the image prompt's prefill
    story, image = [{"role": "user", "content": "Tell me a long story"}], image_conversation(photo, "What is it?")
    engine.prefixes.clear()
    engine.features.entries.clear()
    alone_story = vlm.chat(story, max_new_tokens=40).token_ids
    alone_image = vlm.chat(image, max_new_tokens=5).token_ids
    engine.prefixes.clear()
    engine.features.entries.clear()
    monkeypatch.setattr(engine, "prefill_slice_s", 0.0)  # one unit of prefill work per step
    monkeypatch.setattr(engine, "sliced_prefill_chunk", 100)

    decoding = engine.submit(vlm.prepare(story), SamplingParams(max_new_tokens=40))
    engine.step()
    assert len(decoding._request.generated) == 1
    passes = engine.stats.forward_passes
    sliced = engine.submit(vlm.prepare(image), SamplingParams(max_new_tokens=5))
    steps = 0
    while not sliced._request.generated:
        engine.step()
        steps += 1
    crops = len(vlm.prepare(image).images[0].inputs.crops)
    chunks = -(-len(vlm.prepare(image).ids) // 100)
    assert steps == crops + chunks  # a unit per step, each followed by a decode step of the story
    assert len(decoding._request.generated) == 1 + steps
    assert engine.stats.forward_passes - passes == chunks + steps

    cancelled = engine.submit(vlm.prepare(image_conversation(random_image(500, 400, seed=9))),
                              SamplingParams(max_new_tokens=5))
    engine.step()
    assert cancelled._request.prefill is not None  # under way
    cancelled.cancel()
    engine.step()
    assert cancelled.result().finish_reason == "cancelled" and cancelled._request.prefill is None
    assert sliced.result().token_ids == alone_image
    assert decoding.result().token_ids == alone_story


def test_chunked_prefill_gives_the_same_answer(vlm, photo):
    """A prompt prefilled in chunks (image tokens straddling the chunk edges, a cached prefix before them)
    gets the answer and log-probabilities of a single pass."""
    engine = vlm.engine
    conv = image_conversation(photo, "What is this?")
    follow = conv + [{"role": "assistant", "content": "A photo."}, {"role": "user", "content": "And the colours?"}]

    def answer(chunk, conversations):
        engine.prefixes.clear()
        engine.prefill_chunk = chunk
        try:
            return [vlm.chat(c, max_new_tokens=6, logprobs=True) for c in conversations]
        finally:
            engine.prefill_chunk = 2048

    whole = answer(1 << 20, [conv, follow])
    passes = engine.stats.forward_passes
    chunked = answer(97, [conv, follow])
    n = len(vlm.prepare(conv).ids)
    assert engine.stats.forward_passes - passes >= -(-n // 97) + 5  # the first prompt took several passes
    assert chunked[1].usage.cached_tokens == whole[1].usage.cached_tokens > 0
    for a, b in zip(whole, chunked, strict=True):
        assert a.token_ids == b.token_ids
        assert max(abs(x.logprob - y.logprob) for x, y in zip(a.logprobs, b.logprobs, strict=True)) < 1e-4


def test_prefix_cache_does_not_confuse_different_images(vlm):
    a, b = random_image(640, 480, seed=10), Image.new("RGB", (640, 480), (250, 250, 250))
    vlm.engine.prefixes.clear()
    out_a = vlm.chat(image_conversation(a), max_new_tokens=8, logprobs=True)
    out_b = vlm.chat(image_conversation(b), max_new_tokens=8, logprobs=True)
    assert out_b.usage.cached_tokens < 10  # same layout, different pixels: only the text before the image
    vlm.engine.prefixes.clear()
    fresh_b = vlm.chat(image_conversation(b), max_new_tokens=8, logprobs=True)
    assert fresh_b.token_ids == out_b.token_ids
    assert abs(fresh_b.logprobs[0].logprob - out_b.logprobs[0].logprob) < 1e-5
    assert abs(out_a.logprobs[0].logprob - out_b.logprobs[0].logprob) > 1e-4  # the image does matter


# ----------------------------------------------------------------------------------------- bf16
def test_bf16_agrees_with_fp32(tiny_dir, vlm, photo):
    bf16 = jvlm.load(tiny_dir, dtype="bfloat16")
    prompt = vlm.prepare(image_conversation(photo))
    with torch.inference_mode():
        def last_logits(m):
            from jvlm.engine.kv_cache import KVCache
            from jvlm.models.decoder import Segment

            image = prompt.images[0]
            feats = m.model.encode_images(image.inputs.crops, image.inputs.masks)
            keep = image.positions >= 0
            cache = KVCache(m.model.cfg.text, len(prompt.ids), m.model.cache_dtype)
            return m.model(torch.tensor(prompt.ids), torch.arange(len(prompt.ids)),
                           [Segment(cache, 0, len(prompt.ids))], feats[keep], image.positions[keep],
                           logits_at=torch.tensor([len(prompt.ids) - 1]))[0]

        a, b = last_logits(vlm), last_logits(bf16)
    rel = float((a - b).norm() / a.norm())
    assert rel < 0.05, rel
    assert float(torch.nn.functional.cosine_similarity(a, b, dim=0)) > 0.99


# ----------------------------------------------------------------------------------------- bad input
def test_bad_inputs_raise_typed_errors_before_compute(vlm, tmp_path):
    passes = vlm.engine.stats.forward_passes
    corrupt = tmp_path / "bad.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    cases = [
        (image_conversation(tmp_path / "missing.jpg"), ImageError, "not found"),
        (image_conversation(corrupt), ImageError, "bad.png"),
        ("hello", InvalidRequestError, "list of messages"),
        ([{"role": "robot", "content": "x"}], InvalidRequestError, "robot"),
        ([{"role": "user", "content": 5}], InvalidRequestError, "content"),
        ([{"role": "user", "content": [{"type": "audio"}]}], InvalidRequestError, "audio"),
        ([{"role": "user", "content": "<|image|> what is this?"}], InvalidRequestError, "placeholder"),
    ]
    for conv, err, text in cases:
        with pytest.raises(err, match=text):
            vlm.chat(conv, max_new_tokens=4)
    with pytest.raises(InvalidRequestError, match="max_crops"):
        vlm.chat(image_conversation(random_image(50, 50)), max_crops=0)
    with pytest.raises(InvalidRequestError, match="temperature"):
        vlm.chat([{"role": "user", "content": "x"}], temperature=-1)
    with pytest.raises(InvalidRequestError, match="max_new_tokens"):
        vlm.chat([{"role": "user", "content": "x"}], max_new_tokens=0)
    with pytest.raises(InvalidRequestError, match="seed must be a 64-bit integer"):
        vlm.chat([{"role": "user", "content": "x"}], seed=2**64)
    with pytest.raises(InvalidRequestError, match="special tokens"):
        vlm.score([{"role": "user", "content": "x"}], ["<|image|>", "no"])
    assert vlm.engine.stats.forward_passes == passes
    for bad in (0, -1, 2.5):
        with pytest.raises(InvalidRequestError, match="max_batch"):
            jvlm.engine.engine.Engine(vlm.model, vlm.tokenizer, set(), 64, max_batch=bad)
    for name, bad in (("prefill_slice_s", -1), ("prefill_slice_s", float("nan")), ("sliced_prefill_chunk", 0)):
        with pytest.raises(InvalidRequestError, match=name):
            jvlm.engine.engine.Engine(vlm.model, vlm.tokenizer, set(), 64, **{name: bad})


def test_arguments_of_the_wrong_kind_are_typed_errors(vlm):
    passes = vlm.engine.stats.forward_passes
    conv = [{"role": "user", "content": "x"}]
    for name in ("logprobs", "stream"):
        for truthy in ("yes", 1):
            with pytest.raises(InvalidRequestError, match=f"{name} must be True or False, got {truthy!r}"):
                vlm.chat(conv, **{name: truthy})
    with pytest.raises(InvalidRequestError, match="conversation 1 of the batch must be a list of messages, got str"):
        vlm.chat([conv, "hi"])
    with pytest.raises(InvalidRequestError, match="conversation 1 of the batch .* got dict"):
        vlm.chat(([conv[0]], conv[0]))
    for bad in (None, 3, ""):
        with pytest.raises(InvalidRequestError, match="load expects a model: a snapshot directory path or a hub"):
            jvlm.load(bad)
    for bad in (0, "2", 1.5, True):
        with pytest.raises(InvalidRequestError, match="threads must be an integer >= 1"):
            jvlm.load(vlm.snapshot, threads=bad)
    assert vlm.engine.stats.forward_passes == passes


def test_load_sets_the_thread_count(tiny_dir):
    before = torch.get_num_threads()
    try:
        with jvlm.load(tiny_dir, threads=1) as one:  # a context manager: closed (its engine stopped) on exit
            assert torch.get_num_threads() == 1
            assert one.chat([{"role": "user", "content": "hi"}], max_new_tokens=2).usage.completion_tokens >= 1
        assert one.engine._stopping
    finally:
        torch.set_num_threads(before)


def test_a_tuple_conversation_is_a_conversation(vlm):
    conv = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "how are you?"}]
    expected = vlm.chat(conv, max_new_tokens=3).text
    assert vlm.chat(tuple(conv), max_new_tokens=3).text == expected
    assert [r.text for r in vlm.chat((tuple(conv), conv), max_new_tokens=3)] == [expected, expected]
    assert vlm.score(tuple(conv), ["yes", "no"]).candidates


def test_prompt_longer_than_context(tmp_path):
    small = jvlm.load(write_tiny_checkpoint(tmp_path / "short", max_sequence_length=512))
    with pytest.raises(ContextLengthError, match="512"):
        small.chat(image_conversation(random_image(800, 600)), max_new_tokens=4)
    assert small.engine.stats.forward_passes == 0
    out = small.chat([{"role": "user", "content": "hi"}], max_new_tokens=10_000)
    assert out.usage.total_tokens <= 512
