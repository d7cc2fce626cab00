"""The engine: admits requests, prefills them (vision + prompt), decodes all running ones together.

Continuous batching: every ``step()`` first prefills newly submitted requests, then runs one decode
step over every running sequence at once (a ragged batch: no padding, each sequence attends only to
its own cache). A request joins at the next step and leaves as soon as it finishes or is cancelled.
While other requests are decoding, a new prompt's prefill runs in slices (a crop of the vision tower, a
chunk of prompt tokens) between their decode steps, so their streams slow down instead of stopping
for the whole vision + prefill time (~14 s for one photo at the released size on a 2-core CPU).

The same engine serves every face. Without a background thread, whoever iterates a handle drives
``step()`` (the library, the CLI); with ``start()`` a single thread owns the model and handles only
read their own event queue (the server).
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Generator, Iterator
from dataclasses import dataclass, field

import torch

from ..errors import ContextLengthError, InvalidRequestError, OverloadedError, check_positive_int
from ..models.decoder import Segment
from ..models.jina_vlm import JinaVLM
from ..processor import Prompt
from ..tokenizer import TextTokenizer
from .kv_cache import FeatureCache, KVCache, PrefixCache
from .sampling import Sampler, SamplingParams
from .types import ChatDelta, ChatResult, Timings, TokenLogprob, TopLogprob, Usage


@dataclass
class EngineStats:
    requests: int = 0
    finished: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0
    forward_passes: int = 0
    ttft_sum_s: float = 0.0
    decode_tokens: int = 0
    decode_s: float = 0.0


@dataclass(eq=False)  # compared by identity: `r in self._running` must not compare prompts (and their tensors)
class _Request:
    index: int
    prompt: Prompt
    params: SamplingParams
    sampler: Sampler
    events: queue.Queue
    budget: int  # max new tokens after clamping to the context
    cache: KVCache | None = None
    prefill: Generator | None = None  # the prefill still under way (Engine._prompt_work)
    generated: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    emitted: int = 0  # characters of text already sent
    text: str = ""
    committed: str = ""  # the text of generated[:detok_read], ending on a whole character (Engine._text)
    detok_context: int = 0  # generated[detok_context:detok_read] is decoded again with each new token
    detok_read: int = 0
    finish_reason: str | None = None
    error: str | None = None
    cancelled: bool = False
    cached_tokens: int = 0
    t_submit: float = 0.0
    t_prefill: float = 0.0
    t_first: float = 0.0
    vision_s: float = 0.0
    prefill_s: float = 0.0


class RequestHandle:
    """Iterate for ``ChatDelta``s; ``result()`` waits for the end; ``cancel()`` stops generation."""

    def __init__(self, engine: Engine, request: _Request):
        self._engine, self._request = engine, request
        self._result: ChatResult | None = None

    @property
    def finished(self) -> bool:
        return self._result is not None

    def cancel(self) -> None:
        """Stop generating; the KV cache is freed now (or at the engine thread's next step)."""
        self._request.cancelled = True
        self._engine._cancel(self._request)

    def __iter__(self) -> Iterator[ChatDelta]:
        while self._result is None:
            delta = self._next_event()
            if delta.result is not None:
                self._result = delta.result
            yield delta

    def result(self) -> ChatResult:
        for _ in self:
            pass
        assert self._result is not None
        return self._result

    def _next_event(self, timeout: float | None = None) -> ChatDelta:
        events = self._request.events
        while True:
            if self._engine.running_in_background:
                return events.get(timeout=timeout)
            try:
                return events.get_nowait()
            except queue.Empty:
                self._engine.step()


class Engine:
    def __init__(
        self,
        model: JinaVLM,
        tokenizer: TextTokenizer,
        eos_ids: set[int],
        context_length: int,
        max_batch: int = 16,
        max_waiting: int = 256,
        feature_cache_bytes: int = 256 << 20,
        prefix_cache_bytes: int = 1 << 30,
        prefill_slice_s: float = 0.5,
        sliced_prefill_chunk: int = 256,
    ):
        for name, value in (("max_batch", max_batch), ("max_waiting", max_waiting),
                            ("sliced_prefill_chunk", sliced_prefill_chunk)):
            check_positive_int(name, value)
        if isinstance(prefill_slice_s, bool) or not isinstance(prefill_slice_s, (int, float)) or \
                not prefill_slice_s >= 0:
            raise InvalidRequestError(f"prefill_slice_s must be a number of seconds >= 0 (inf: never slice), "
                                      f"got {prefill_slice_s!r}")
        self.model, self.tokenizer = model, tokenizer
        self.eos_ids = set(eos_ids)
        self.context_length = context_length
        self.max_batch, self.max_waiting = max_batch, max_waiting
        self.features = FeatureCache(feature_cache_bytes)
        self.prefixes = PrefixCache(prefix_cache_bytes)
        self.stats = EngineStats()
        self._waiting: deque[_Request] = deque()
        self._running: list[_Request] = []
        self._lock = threading.Lock()  # guards the waiting queue
        self._step_lock = threading.RLock()  # one driver of the model at a time
        self._cond = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.on_vision_progress = None  # optional callback (crops_done, crops_total), e.g. for a CLI bar
        self.vision_chunk = 1
        # prompt tokens per forward pass: a long prompt (several images) runs in equal chunks, so its activations
        # stay bounded (~0.2 GB per 1k tokens at the released geometry). Each chunk streams the weights again:
        # for the 1074-token image prompt, chunks of ≤ 512 cost +6% prefill time and ≤ 1024 +3-4%, so a prompt
        # of one or two images still runs in one pass
        self.prefill_chunk = 2048
        # while others decode, a new prompt's prefill gets about this many seconds per step (at least one unit
        # of work: a crop of the vision tower, or a chunk of at most ``sliced_prefill_chunk`` prompt tokens).
        # Measured at the released size (int8, one photo of 7 crops + 1074 tokens, another request decoding):
        # its longest wait for a token 14 s → 1.4-1.6 s, the photo's first token 0.6-1.9 s later (the other's
        # decode steps in between, and the 256-token chunks)
        self.prefill_slice_s = prefill_slice_s
        self.sliced_prefill_chunk = sliced_prefill_chunk
        self._slicing = False

    # ------------------------------------------------------------------ submission / threads
    @property
    def running_in_background(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._running)

    def submit(self, prompt: Prompt, params: SamplingParams, index: int = 0) -> RequestHandle:
        prompt_len = len(prompt.ids)
        if prompt_len >= self.context_length:
            raise ContextLengthError(
                f"the prompt is {prompt_len} tokens, which does not fit the model's context of "
                f"{self.context_length} tokens")
        budget = min(params.max_new_tokens, self.context_length - prompt_len)
        request = _Request(index=index, prompt=prompt, params=params, sampler=Sampler(params),
                           events=queue.Queue(), budget=budget, t_submit=time.perf_counter())
        with self._cond:
            if len(self._waiting) >= self.max_waiting:
                raise OverloadedError(f"the engine queue is full ({self.max_waiting} requests waiting)")
            self._waiting.append(request)
            self.stats.requests += 1
            self._cond.notify()
        return RequestHandle(self, request)

    def _cancel(self, request: _Request) -> None:
        if self.running_in_background:
            self._wake()
            return
        with self._step_lock:  # nobody else is stepping: finish it here instead of waiting for a step
            with self._lock:
                if request in self._waiting:
                    self._waiting.remove(request)
            self._finish(request, "cancelled")

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify()

    def start(self) -> None:
        """Run the step loop in one background thread that owns the model."""
        if self.running_in_background:
            return
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="jvlm-engine", daemon=True)
        self._thread.start()

    def stop(self, cancel: bool = True, timeout: float | None = 30) -> None:
        if cancel:
            self.cancel_all()
        self._stopping = True
        self._wake()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def cancel_all(self) -> None:
        with self._lock:
            for r in list(self._waiting) + list(self._running):
                r.cancelled = True
        self._wake()

    def _loop(self) -> None:
        while not self._stopping:
            with self._cond:
                while not self._waiting and not self._running and not self._stopping:
                    self._cond.wait(timeout=1.0)
            if self._stopping:
                break
            try:
                self.step()
            except Exception as e:  # a bug must not stop the thread every request waits on: fail the batch
                for r in list(self._running):
                    r.error = f"{type(e).__name__}: {e}"
                    self._finish(r, "error")
        # drain: anything left gets a final event so no client waits forever
        for r in list(self._waiting) + list(self._running):
            self._finish(r, "cancelled")
        self._waiting.clear()
        self._running.clear()

    # ------------------------------------------------------------------ the step
    def step(self) -> bool:
        with self._step_lock, torch.inference_mode():
            for r in [r for r in self._running if r.cancelled]:
                self._finish(r, "cancelled")
            with self._lock:  # a cancelled request leaves the queue now, even when the batch is full
                dropped = [r for r in self._waiting if r.cancelled]
                for r in dropped:
                    self._waiting.remove(r)
            for r in dropped:
                self._finish(r, "cancelled")
            decoding = [r for r in self._running if r.prefill is None]  # those with a token before this step
            while len(self._running) < self.max_batch:
                with self._lock:
                    if not self._waiting:
                        break
                    r = self._waiting.popleft()
                if r.cancelled:
                    self._finish(r, "cancelled")
                    continue
                r.prefill = self._prompt_work(r.prompt, len(r.prompt.ids) + r.budget)
                self._running.append(r)
            prefilling = [r for r in self._running if r.prefill is not None]
            # nobody waiting on a token: every prefill runs through (one pass per prompt, as fast as it gets)
            self._slicing = bool(decoding)
            deadline = time.perf_counter() + self.prefill_slice_s if decoding else float("inf")
            for r in prefilling:
                self._advance_prefill(r, deadline)
                if time.perf_counter() >= deadline:
                    break
            decoding = [r for r in decoding if r.finish_reason is None]
            if decoding:
                self._decode(decoding)
            return bool(prefilling or decoding)

    def _advance_prefill(self, r: _Request, deadline: float) -> None:
        """Run units of ``r``'s prefill until it is done (its first token) or the deadline has passed."""
        r.t_prefill = r.t_prefill or time.perf_counter()
        try:
            while True:
                next(r.prefill)
                if time.perf_counter() >= deadline:
                    return
        except StopIteration as done:
            r.prefill = None
            r.cache, logits, r.cached_tokens, r.vision_s = done.value
            r.prefill_s = time.perf_counter() - r.t_prefill
            self._accept(r, logits)
        except Exception as e:  # one broken request must not take the others down
            r.prefill = None
            r.error = f"{type(e).__name__}: {e}"
            self._finish(r, "error")

    def _image_features(self, prompt: Prompt, start: int) -> Generator[None, None, tuple]:
        """Features and their positions (relative to ``start``) for image tokens at or after ``start``,
        plus the seconds spent in the vision tower (0 when every image came from the feature cache).
        A unit of work per ``vision_chunk`` crops (see ``_prompt_work``)."""
        feats, positions, vision_s = [], [], 0.0
        for image in prompt.images:
            pos = image.positions  # (N, 196)
            wanted = pos >= start
            if not bool(wanted.any()):
                continue
            features = self.features.get(image.key)
            if features is None:
                crops, masks, parts = image.inputs.crops, image.inputs.masks, []
                for i in range(0, len(crops), self.vision_chunk):
                    t0 = time.perf_counter()
                    parts.append(self.model.encode_images(crops[i:i + self.vision_chunk],
                                                          masks[i:i + self.vision_chunk]))
                    vision_s += time.perf_counter() - t0
                    if self.on_vision_progress is not None:
                        self.on_vision_progress(min(i + self.vision_chunk, len(crops)), len(crops))
                    yield
                features = torch.cat(parts)
                self.features.put(image.key, features)
            feats.append(features[wanted])
            positions.append(pos[wanted] - start)
        if not feats:
            return None, None, vision_s
        return torch.cat(feats), torch.cat(positions), vision_s

    def _prompt_work(self, prompt: Prompt, capacity: int) -> Generator[None, None, tuple]:
        """Prefill a prompt into a new cache (reusing a cached prefix) → (cache, last logits, cached, vision_s).

        A generator that yields between units of work (a crop of the vision tower, a chunk of prompt
        tokens), so that ``step`` can run decode steps of other requests in between; ``_run_through``
        runs it in one go. While ``_slicing``, chunks hold at most ``sliced_prefill_chunk`` tokens;
        otherwise the prompt runs in equal chunks of at most ``prefill_chunk`` (one pass for one or two
        images: every chunk streams the weights again).
        """
        ids = prompt.ids
        source, n_cached = self.prefixes.lookup(prompt.cache_key())
        n_cached = min(n_cached, len(ids) - 1)  # always run at least the last token
        cache = KVCache(self.model.cfg.text, capacity, self.model.cache_dtype)
        if source is not None and n_cached > 0:
            cache.copy_prefix(source, n_cached)
        else:
            n_cached = 0
        features, feature_pos, vision_s = yield from self._image_features(prompt, n_cached)
        new = torch.tensor(ids[n_cached:], dtype=torch.long)
        a = 0
        while a < len(new):
            left = len(new) - a
            if self._slicing:
                size = min(left, max(1, self.sliced_prefill_chunk))
            else:
                size = -(-left // -(-left // max(1, self.prefill_chunk)))  # equal chunks of ≤ prefill_chunk
            b = a + size
            inside = None if features is None else (feature_pos >= a) & (feature_pos < b)
            logits = self.model(
                new[a:b], torch.arange(n_cached + a, n_cached + b), [Segment(cache, n_cached + a, b - a)],
                image_features=None if inside is None else features[inside],
                image_positions=None if inside is None else feature_pos[inside] - a,
                logits_at=torch.tensor([b - a - 1]) if b == len(new) else torch.tensor([], dtype=torch.long),
            )
            self.stats.forward_passes += 1
            a = b
            if a < len(new):
                yield
        cache.length = len(ids)
        self.stats.prompt_tokens += len(ids)
        self.stats.cached_prompt_tokens += n_cached
        return cache, logits[0], n_cached, vision_s

    @staticmethod
    def _run_through(work: Generator):
        while True:
            try:
                next(work)
            except StopIteration as done:
                return done.value

    def score(self, prompt: Prompt, candidates: list[list[int]]) -> list[list[float]]:
        """Log-probabilities of each candidate's tokens as the continuation of ``prompt``.

        One prefill of the prompt (its image encoded once) is shared: each candidate then gets a copy of
        that cache and all candidates run together in one ragged forward pass.
        """
        if any(not c for c in candidates):
            raise ValueError("every candidate needs at least one token")
        longest = max(len(c) for c in candidates)
        if len(prompt.ids) + longest > self.context_length:
            raise ContextLengthError(
                f"the prompt ({len(prompt.ids)} tokens) plus the longest candidate ({longest} tokens) does not fit "
                f"the model's context of {self.context_length} tokens")
        with self._step_lock, torch.inference_mode():
            self._slicing = False
            shared, first, _, _ = self._run_through(self._prompt_work(prompt, len(prompt.ids)))
            first_logp = torch.log_softmax(first.float(), dim=-1)
            out = [[float(first_logp[c[0]])] for c in candidates]
            rest = [(i, c) for i, c in enumerate(candidates) if len(c) > 1]
            if rest:
                ids, positions, segments, rows, offset = [], [], [], [], 0
                for _, c in rest:
                    cache = KVCache(self.model.cfg.text, len(prompt.ids) + len(c) - 1, self.model.cache_dtype)
                    cache.copy_prefix(shared, len(prompt.ids))
                    feed = c[:-1]  # the logits after token j score token j + 1
                    ids += feed
                    positions += range(len(prompt.ids), len(prompt.ids) + len(feed))
                    segments.append(Segment(cache, len(prompt.ids), len(feed)))
                    rows.append((offset, len(feed)))
                    offset += len(feed)
                logits = self.model(torch.tensor(ids), torch.tensor(positions), segments,
                                    logits_at=torch.arange(offset))
                self.stats.forward_passes += 1
                logp = torch.log_softmax(logits.float(), dim=-1)
                for (i, c), (start, n) in zip(rest, rows, strict=True):
                    out[i] += [float(logp[start + j, c[j + 1]]) for j in range(n)]
            self.prefixes.store(prompt.cache_key(), shared)  # a follow-up or a re-score starts from here
            return out

    def _decode(self, batch: list[_Request]) -> None:
        t0 = time.perf_counter()
        ids = torch.tensor([r.generated[-1] for r in batch], dtype=torch.long)
        positions = torch.tensor([r.cache.length for r in batch], dtype=torch.long)
        segments = [Segment(r.cache, r.cache.length, 1) for r in batch]
        try:
            logits = self.model(ids, positions, segments)
        except Exception as e:
            for r in batch:
                r.error = f"{type(e).__name__}: {e}"
                self._finish(r, "error")
            return
        self.stats.forward_passes += 1
        self.stats.decode_tokens += len(batch)
        self.stats.decode_s += time.perf_counter() - t0
        for r, row in zip(batch, logits, strict=True):
            r.cache.length += 1
            try:
                self._accept(r, row)
            except Exception as e:  # e.g. its sampler failing: only this request ends
                r.error = f"{type(e).__name__}: {e}"
                self._finish(r, "error")

    # ------------------------------------------------------------------ tokens → text → events
    def _accept(self, r: _Request, logits: torch.Tensor) -> None:
        token = r.sampler(logits, r.prompt.ids, r.generated)
        if not r.generated:
            r.t_first = time.perf_counter()
            self.stats.ttft_sum_s += r.t_first - r.t_submit
        r.generated.append(token)
        new_logprobs = None
        if r.params.logprobs:
            entry = self._logprob_entry(logits, token, r.params.top_logprobs)
            r.logprobs.append(entry)
            new_logprobs = [entry]

        finish = None
        if token in self.eos_ids:
            finish = "stop"
        searched = len(r.committed)  # text before this never changes and held no stop string
        text = self._text(r)
        if r.params.stop:
            hits = [i for i in (text.find(s, max(0, searched - len(s) + 1)) for s in r.params.stop) if i >= 0]
            if hits:
                text, finish = text[: min(hits)], "stop"
        if finish is None and len(r.generated) >= r.budget:
            finish = "length"
        r.text = text
        if finish is None:
            safe = len(text.rstrip("\ufffd"))  # an incomplete UTF-8 sequence waits for its next byte
            for s in r.params.stop:  # hold back a possible start of a stop string
                for k in range(min(len(s) - 1, safe), 0, -1):
                    if text[:safe].endswith(s[:k]):
                        safe -= k
                        break
            delta = text[r.emitted : max(safe, r.emitted)]
            r.emitted = max(safe, r.emitted)
            r.events.put(ChatDelta(r.index, delta, [token], new_logprobs))
        else:
            self._finish(r, finish, last_token=token, last_logprobs=new_logprobs)

    def _text(self, r: _Request) -> str:
        """The answer's text so far, decoded incrementally: each step decodes only the tokens after the last
        whole character plus the few before them (their context), not the whole answer again (which made
        a long answer's steps O(n) each). A trailing partial UTF-8 sequence reads as U+FFFD until its last
        byte arrives; only then is the text committed."""
        def decode(ids: list[int]) -> str:
            return self.tokenizer.decode([t for t in ids if t not in self.eos_ids])

        before, full = decode(r.generated[r.detok_context:r.detok_read]), decode(r.generated[r.detok_context:])
        if not full.startswith(before):  # a decoder that rewrites across tokens: decode everything again
            r.committed, r.detok_context, r.detok_read = "", 0, 0
            before, full = "", decode(r.generated)
        text = r.committed + full[len(before):]
        if not full.endswith("\ufffd"):
            r.committed, r.detok_context, r.detok_read = text, r.detok_read, len(r.generated)
        return text

    def _logprob_entry(self, logits: torch.Tensor, token: int, k: int) -> TokenLogprob:
        logp = torch.log_softmax(logits.float(), dim=-1)
        top = []
        if k:
            values, ids = torch.topk(logp, k)
            top = [TopLogprob(int(i), self.tokenizer.token_text(int(i)), float(v))
                   for v, i in zip(values, ids, strict=True)]
        return TokenLogprob(token, self.tokenizer.token_text(token), float(logp[token]), top)

    def _finish(self, r: _Request, reason: str, last_token: int | None = None, last_logprobs=None) -> None:
        if r.finish_reason is not None:
            return
        r.finish_reason = reason
        now = time.perf_counter()
        if r.prefill is not None:  # cancelled mid-prefill: its cache and features go now
            r.prefill.close()
            r.prefill = None
        if r in self._running:
            self._running.remove(r)
        if r.cache is not None:
            if reason in ("stop", "length") and r.cache.length:
                self.prefixes.store(r.prompt.cache_key() + r.generated, r.cache)
            r.cache = None
        self.stats.finished += 1
        self.stats.completion_tokens += len(r.generated)
        started = r.t_prefill or now
        timings = Timings(
            queued_s=started - r.t_submit,
            vision_s=r.vision_s,
            prefill_s=r.prefill_s,
            decode_s=(now - r.t_first) if r.t_first else 0.0,
            time_to_first_token_s=(r.t_first - r.t_submit) if r.t_first else 0.0,
            total_s=now - r.t_submit,
        )
        usage = Usage(len(r.prompt.ids), r.prompt.image_tokens, len(r.generated), r.cached_tokens)
        result = ChatResult(r.text, list(r.generated), reason, usage, timings,
                            r.logprobs if r.params.logprobs else None, r.error)
        delta = r.text[r.emitted:]
        r.emitted = len(r.text)
        r.events.put(ChatDelta(r.index, delta, [last_token] if last_token is not None else [], last_logprobs,
                               reason, result))
