"""Logprobs on generated tokens and scoring of candidate answers (library face)."""

import math

import pytest
import torch

from conftest import image_conversation, random_image
from jvlm.engine.kv_cache import KVCache
from jvlm.errors import InvalidRequestError
from jvlm.models.decoder import Segment


def full_logits(vlm, ids, prompt=None):
    """Independent forward over the whole sequence (no cache reuse, no engine): logits at every position."""
    model = vlm.model
    with torch.inference_mode():
        feats = pos = None
        if prompt is not None and prompt.images:
            image = prompt.images[0]
            keep = image.positions >= 0
            feats = model.encode_images(image.inputs.crops, image.inputs.masks)[keep]
            pos = image.positions[keep]
        cache = KVCache(model.cfg.text, len(ids), model.cache_dtype)
        return model(torch.tensor(ids), torch.arange(len(ids)), [Segment(cache, 0, len(ids))], feats, pos,
                     logits_at=torch.arange(len(ids)))


def test_greedy_logprobs_equal_log_softmax_of_an_independent_forward(vlm):
    photo = random_image(640, 480, seed=3)
    conv = image_conversation(photo, "What is it?")
    vlm.engine.prefixes.clear()
    out = vlm.chat(conv, max_new_tokens=8, logprobs=True, top_logprobs=5)
    prompt = vlm.prepare(conv)
    seq = prompt.ids + out.token_ids
    logp = torch.log_softmax(full_logits(vlm, seq, prompt), dim=-1)
    assert len(out.logprobs) == len(out.token_ids)
    for j, entry in enumerate(out.logprobs):
        row = logp[len(prompt.ids) - 1 + j]
        assert entry.token_id == out.token_ids[j]
        assert abs(entry.logprob - float(row[entry.token_id])) <= 1e-5
        assert entry.logprob == pytest.approx(float(row.max()), abs=1e-5)  # greedy picks the top token
        assert [t.token_id for t in entry.top_logprobs] == row.topk(5).indices.tolist()
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[-1].logprob
        assert entry.token == vlm.tokenizer.token_text(entry.token_id)


def test_logprobs_are_raw_even_when_sampling_with_temperature(vlm):
    conv = [{"role": "user", "content": "Say something"}]
    out = vlm.chat(conv, max_new_tokens=6, temperature=1.7, top_p=0.9, seed=11, logprobs=True)
    prompt = vlm.prepare(conv)
    logp = torch.log_softmax(full_logits(vlm, prompt.ids + out.token_ids), dim=-1)
    for j, entry in enumerate(out.logprobs):
        assert abs(entry.logprob - float(logp[len(prompt.ids) - 1 + j, entry.token_id])) <= 1e-5


def test_logprobs_match_transformers_for_text(vlm):
    pytest.importorskip("transformers")
    from jvlm.testing.reference import transformers_qwen3

    conv = [{"role": "user", "content": "Name three colours."}]
    out = vlm.chat(conv, max_new_tokens=6, logprobs=True, top_logprobs=3)
    prompt = vlm.prepare(conv)
    with torch.inference_mode():
        ref = transformers_qwen3(vlm.model)(torch.tensor([prompt.ids + out.token_ids])).logits[0]
    logp = torch.log_softmax(ref.float(), dim=-1)
    for j, entry in enumerate(out.logprobs):
        assert abs(entry.logprob - float(logp[len(prompt.ids) - 1 + j, entry.token_id])) <= 1e-4


def test_streamed_deltas_carry_their_logprobs(vlm):
    conv = [{"role": "user", "content": "Hello there"}]
    deltas = list(vlm.chat(conv, max_new_tokens=10, logprobs=True, top_logprobs=2, stream=True))
    streamed = [e for d in deltas if d.logprobs for e in d.logprobs]
    result = deltas[-1].result
    assert [e.token_id for e in streamed] == result.token_ids
    assert [e.logprob for e in streamed] == [e.logprob for e in result.logprobs]


def test_batched_logprobs_match_single(vlm):
    convs = [[{"role": "user", "content": "one"}], [{"role": "user", "content": "two two"}]]
    vlm.engine.prefixes.clear()
    alone = [vlm.chat(c, max_new_tokens=6, logprobs=True) for c in convs]
    vlm.engine.prefixes.clear()
    together = vlm.chat(convs, max_new_tokens=6, logprobs=True)
    for a, b in zip(alone, together, strict=True):
        assert a.token_ids == b.token_ids
        assert [e.logprob for e in a.logprobs] == pytest.approx([e.logprob for e in b.logprobs], abs=1e-5)


def test_logprob_options_are_validated(vlm):
    conv = [{"role": "user", "content": "x"}]
    with pytest.raises(InvalidRequestError, match="top_logprobs"):
        vlm.chat(conv, logprobs=True, top_logprobs=21)
    with pytest.raises(InvalidRequestError, match="logprobs"):
        vlm.chat(conv, top_logprobs=3)
    assert vlm.chat(conv, max_new_tokens=2).logprobs is None


def test_score_equals_forced_per_token_logprobs(vlm):
    photo = random_image(500, 400, seed=4)
    conv = image_conversation(photo, "Is there any written language in this image? Answer yes or no.")
    candidates = ["yes", "no", "Yes, there is text.", "不是"]
    vlm.engine.prefixes.clear()
    vlm.engine.features.entries.clear()
    before = vlm.engine.stats.forward_passes
    scored = vlm.score(conv, candidates)
    prompt = vlm.prepare(conv)
    prefill_passes = -(-len(prompt.ids) // vlm.engine.prefill_chunk)
    # one shared prefill (in chunks) + one batched pass for all candidates
    assert vlm.engine.stats.forward_passes - before == prefill_passes + 1

    assert scored.usage.prompt_tokens == len(prompt.ids) and scored.usage.image_tokens == prompt.image_tokens
    for cand, result in zip(candidates, scored.candidates, strict=True):
        tokens = vlm.tokenizer.encode(cand)
        logp = torch.log_softmax(full_logits(vlm, prompt.ids + tokens, prompt), dim=-1)
        forced = [float(logp[len(prompt.ids) - 1 + j, t]) for j, t in enumerate(tokens)]
        assert result.text == cand and result.num_tokens == len(tokens)
        assert result.token_logprobs == pytest.approx(forced, abs=1e-5)
        assert result.logprob == pytest.approx(sum(forced), abs=1e-4)
    assert sum(c.probability for c in scored.candidates) == pytest.approx(1.0, abs=1e-9)
    ratio = scored.candidates[0].probability / scored.candidates[1].probability
    assert math.log(ratio) == pytest.approx(scored.candidates[0].logprob - scored.candidates[1].logprob, abs=1e-6)
    assert scored.best.logprob == max(c.logprob for c in scored.candidates)


def test_score_matches_greedy_generation_of_the_same_text(vlm):
    conv = [{"role": "user", "content": "Continue"}]
    out = vlm.chat(conv, max_new_tokens=5, logprobs=True)
    text_tokens = [t for t in out.token_ids if t not in vlm.generation.eos_token_ids]
    scored = vlm.score(conv, [vlm.tokenizer.decode(text_tokens)])
    if vlm.tokenizer.encode(scored.candidates[0].text) == text_tokens:
        assert scored.candidates[0].token_logprobs == pytest.approx([e.logprob for e in out.logprobs[: len(
            text_tokens)]], abs=1e-5)


def test_score_rejects_bad_candidates(vlm):
    conv = [{"role": "user", "content": "x"}]
    for bad in ([], [""], "yes", [1, 2]):
        with pytest.raises(InvalidRequestError, match="candidates"):
            vlm.score(conv, bad)
