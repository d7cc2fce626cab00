"""The library face: ``jvlm.load(...)`` → ``VLM`` with ``chat`` (one, a batch, or streamed)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .checkpoint import load_model
from .config import JinaVLMConfig
from .engine.engine import Engine, RequestHandle
from .engine.quant import resolve_format, tune_allocator
from .engine.sampling import SamplingParams
from .engine.types import CandidateScore, ChatDelta, ChatResult, ScoreResult, Usage
from .errors import CheckpointError, InvalidRequestError, check_positive_int
from .hub import DEFAULT_MODEL, resolve_snapshot
from .images.fetch import ImageLimits, UrlPolicy
from .images.tiling import ImageProcessorConfig
from .processor import Processor, Prompt, is_sequence
from .tokenizer import TextTokenizer


@dataclass(frozen=True)
class GenerationConfig:
    """What ``generation_config.json`` contributes: the stop ids (its sampling fields are not applied:
    jvlm's defaults are greedy unless the caller asks otherwise)."""

    eos_token_ids: tuple[int, ...]

    @classmethod
    def from_snapshot(cls, snapshot: Path, tokenizer: TextTokenizer) -> GenerationConfig:
        path = snapshot / "generation_config.json"
        ids: list[int] = []
        if path.exists():
            try:
                eos = json.loads(path.read_text()).get("eos_token_id")
            except json.JSONDecodeError as e:
                raise CheckpointError(f"{path}: not valid JSON ({e})") from None
            ids = [eos] if isinstance(eos, int) else list(eos or [])
        ids.append(tokenizer.eos_token_id)
        im_end = tokenizer.tokenizer.token_to_id("<|im_end|>")
        if im_end is not None:  # the end of an assistant turn in a ChatML template always ends the answer
            ids.append(im_end)
        return cls(tuple(dict.fromkeys(ids)))


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path.parent} is not a jina-vlm snapshot: {path.name} is missing") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


class VLM:
    """A loaded jina-vlm: the model, its processor and an engine."""

    def __init__(self, model, tokenizer: TextTokenizer, processor: Processor, generation: GenerationConfig,
                 snapshot: Path, dtype: torch.dtype, **engine_options):
        self.model, self.tokenizer, self.processor = model, tokenizer, processor
        self.generation = generation
        self.snapshot, self.dtype = snapshot, dtype
        self.config: JinaVLMConfig = model.cfg
        self.context_length = processor.context_length
        self.engine = Engine(model, tokenizer, set(generation.eos_token_ids), self.context_length, **engine_options)

    # ------------------------------------------------------------------ building blocks
    def prepare(self, conversation: list[dict], *, max_crops: int | None = None, max_pixels: int | None = None,
                image_loader: Callable[[Any], Any] | None = None) -> Prompt:
        """Load images and build the prompt (cheap: no model compute)."""
        return self.processor(conversation, max_crops=max_crops, max_pixels=max_pixels, image_loader=image_loader)

    def submit(self, prompt: Prompt, params: SamplingParams, index: int = 0) -> RequestHandle:
        return self.engine.submit(prompt, params, index)

    # ------------------------------------------------------------------ the public call
    def chat(
        self,
        conversation: Sequence[dict] | Sequence[Sequence[dict]],
        *,
        stream: bool = False,
        max_new_tokens: int = 512,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        repetition_penalty: float = 1.0,
        presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0,
        stop: str | list[str] | None = None,
        max_crops: int | None = None,
        max_pixels: int | None = None,
        logprobs: bool = False,
        top_logprobs: int = 0,
    ) -> ChatResult | list[ChatResult] | Iterator[ChatDelta]:
        """Answer one conversation, or a batch of them decoded together.

        Args:
            conversation: a list (or tuple) of messages (``{"role", "content"}``, content a string or a list of
                ``{"type": "text", "text"}`` / ``{"type": "image", "image": path | URL | data URI | bytes | PIL}``
                parts), or a list of such conversations (a batch).
            stream: return an iterator of ``ChatDelta`` (with ``.index`` telling the conversation apart)
                instead of results.
            max_crops / max_pixels: image tiling options for this call only.
            others: sampling (temperature 0 = greedy), stop strings, logprobs.

        Returns:
            a ``ChatResult`` (one conversation), a list of them (a batch), or an iterator of deltas.
            Every problem with the input raises a ``jvlm.errors`` exception before any model compute.
        """
        if not isinstance(stream, bool):  # a truthy "no" would otherwise return an iterator
            raise InvalidRequestError(f"stream must be True or False, got {stream!r}")
        conversations, batch = _conversations(conversation)
        if isinstance(stop, str):
            stop = [stop]
        if stop is not None and not isinstance(stop, (list, tuple)):
            raise InvalidRequestError(f"stop must be a string or a list of strings, got {type(stop).__name__}")
        params = SamplingParams(
            max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
            repetition_penalty=repetition_penalty, presence_penalty=presence_penalty,
            frequency_penalty=frequency_penalty, stop=tuple(stop or ()), logprobs=logprobs, top_logprobs=top_logprobs,
        )
        prompts = [self.prepare(c, max_crops=max_crops, max_pixels=max_pixels) for c in conversations]
        handles = [self.submit(p, params, i) for i, p in enumerate(prompts)]
        if stream:
            return _merge_streams(handles)
        results = [h.result() for h in handles]
        return results if batch else results[0]

    def score(self, conversation: list[dict], candidates: list[str], *, max_crops: int | None = None,
              max_pixels: int | None = None) -> ScoreResult:
        """How likely each candidate is as the assistant's answer (e.g. ``["yes", "no"]`` for a closed question).

        The conversation is prefilled once (images encoded once); every candidate is then scored as a forced
        continuation in one batched forward pass. ``probability`` is normalized among the candidates.
        """
        if (not isinstance(candidates, (list, tuple)) or not candidates
                or not all(isinstance(c, str) and c for c in candidates)):
            raise InvalidRequestError("candidates must be a non-empty list of non-empty strings")
        if len(candidates) > 256:
            raise InvalidRequestError(f"at most 256 candidates can be scored at once, got {len(candidates)}")
        prompt = self.prepare(conversation, max_crops=max_crops, max_pixels=max_pixels)
        token_lists = [self.tokenizer.encode(c) for c in candidates]
        outputs = self.model.cfg.text.vocab_size  # ids past the head (image markers…) can never be generated
        for c, tokens in zip(candidates, token_lists, strict=True):
            if any(t >= outputs for t in tokens):
                raise InvalidRequestError(f"candidate {c!r} contains special tokens the model never generates")
        per_token = self.engine.score(prompt, token_lists)
        totals = torch.tensor([sum(lp) for lp in per_token], dtype=torch.float64)
        probs = torch.softmax(totals, dim=0).tolist()
        scored = [CandidateScore(c, float(t), len(lp), p, lp)
                  for c, t, lp, p in zip(candidates, totals.tolist(), per_token, probs, strict=True)]
        usage = Usage(len(prompt.ids), prompt.image_tokens, 0)
        return ScoreResult(scored, usage)

    def close(self) -> None:
        """Cancel what is still running and stop the engine's thread (if ``start``ed)."""
        self.engine.stop()

    def __enter__(self) -> VLM:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _conversations(conversation: Any) -> tuple[list, bool]:
    """(the conversations, whether it is a batch): a sequence whose first item is itself a sequence of
    messages is a batch, and then every item must be one (each conversation is checked later)."""
    if not (is_sequence(conversation) and conversation and is_sequence(conversation[0])):
        return [conversation], False
    for i, c in enumerate(conversation):
        if not is_sequence(c):
            raise InvalidRequestError(
                f"conversation {i} of the batch must be a list of messages, got {type(c).__name__}")
    return list(conversation), True


def _merge_streams(handles: list[RequestHandle]) -> Iterator[ChatDelta]:
    """Interleave the deltas of several requests as they are produced."""
    iterators = [iter(h) for h in handles]
    try:
        while iterators:
            for it in list(iterators):
                try:
                    yield next(it)
                except StopIteration:
                    iterators.remove(it)
    finally:
        for h in handles:
            if not h.finished:
                h.cancel()


def load(
    model: str | os.PathLike = DEFAULT_MODEL,
    dtype: str | torch.dtype = "float32",
    *,
    progress: Callable[[int, int], None] | None = None,
    image_limits: ImageLimits | None = None,
    url_policy: UrlPolicy | None = None,
    threads: int | None = None,
    **engine_options,
) -> VLM:
    """Load jina-vlm from a snapshot directory or a hub repo id (resolved through the HF cache).

    Args:
        model: a snapshot directory or a hub repo id.
        dtype: the weight format: "float32" (default, the reference numerics), "bfloat16", or "int8"
            (int8 linears, bfloat16 elsewhere: the fastest; its measured error is in the README).
            Weights are converted tensor by tensor while loading, never via a float32 copy of the model.
        progress: called with (bytes done, bytes total) while loading.
        image_limits: byte / pixel limits for images.
        url_policy: which image URLs may be fetched (default: public ``http(s)`` hosts, ``data:`` URIs and
            local paths; ``UrlPolicy(allow_private=True)`` on a trusted network).
        threads: torch's intra-op threads, for the whole process (default: torch's own, the number of
            physical cores: on CPUs with two hardware threads per core, more threads only compete for the
            same vector units).
        engine_options: passed to ``Engine`` (max_batch, max_waiting, feature_cache_bytes,
            prefix_cache_bytes, prefill_slice_s, sliced_prefill_chunk).
    """
    if not isinstance(model, (str, os.PathLike)) or (isinstance(model, str) and not model.strip()):
        raise InvalidRequestError(f"load expects a model: a snapshot directory path or a hub repo id such as "
                                  f"'{DEFAULT_MODEL}', got {model!r}")
    try:
        fmt = resolve_format(dtype)
    except ValueError as e:
        raise InvalidRequestError(str(e)) from None
    if threads is not None:
        check_positive_int("threads", threads)
        torch.set_num_threads(threads)
    snapshot = resolve_snapshot(model)
    cfg = JinaVLMConfig.from_file(snapshot / "config.json")
    tokenizer = TextTokenizer(snapshot)
    image_config = ImageProcessorConfig.from_dict(_read_json(snapshot / "preprocessor_config.json"))
    generation = GenerationConfig.from_snapshot(snapshot, tokenizer)
    tune_allocator(loading=True)  # the loader's big temporaries go straight back to the system
    net = load_model(snapshot, cfg, fmt, progress=progress)
    tune_allocator()  # from now on big activations stay in the heap instead of being re-mapped per op
    processor = Processor(tokenizer, image_config, cfg.text.max_sequence_length, image_limits, url_policy)
    return VLM(net, tokenizer, processor, generation, snapshot, fmt.dtype, **engine_options)
