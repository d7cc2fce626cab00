"""Prometheus text exposition (format 0.0.4) without a client library: a few counters and histograms.

Server-side counters are updated on the event loop only; engine figures (queue, running, caches,
decode speed) are read from the engine when /metrics is scraped.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from ..engine.types import ChatResult

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
ROUTES = ("/v1/chat/completions", "/v1/models", "/health", "/ready", "/metrics")


class Histogram:
    def __init__(self, buckets: Sequence[float]):
        self.buckets = tuple(buckets)
        self.counts = [0] * len(self.buckets)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.sum += value
        self.count += 1
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1

    def lines(self, name: str) -> list[str]:
        out = [f'{name}_bucket{{le="{bound:g}"}} {n}' for bound, n in zip(self.buckets, self.counts, strict=True)]
        out += [f'{name}_bucket{{le="+Inf"}} {self.count}', f"{name}_sum {self.sum:.6g}", f"{name}_count {self.count}"]
        return out


class Metrics:
    def __init__(self) -> None:
        self.http = Counter()  # (route, status) → requests
        self.in_flight = 0  # chat requests between arrival and the end of their response
        self.choices = Counter()  # finish_reason → generated choices
        self.prompt_tokens = 0
        self.image_tokens = 0
        self.cached_tokens = 0
        self.completion_tokens = 0
        self.ttft = Histogram((0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
        self.tokens_per_s = Histogram((1, 2, 5, 10, 20, 50, 100, 200, 500, 1000))

    def observe_http(self, path: str, status: int) -> None:
        self.http[(path if path in ROUTES else "other", status)] += 1

    def observe_request(self, results: list[ChatResult]) -> None:
        """One chat request's choices (they share one prompt, counted once)."""
        first = results[0].usage
        self.prompt_tokens += first.prompt_tokens
        self.image_tokens += first.image_tokens
        self.cached_tokens += first.cached_tokens
        for r in results:
            self.choices[r.finish_reason] += 1
            self.completion_tokens += r.usage.completion_tokens
            if r.usage.completion_tokens:
                self.ttft.observe(r.timings.time_to_first_token_s)
            if r.tokens_per_s:
                self.tokens_per_s.observe(r.tokens_per_s)

    def render(self, engine=None, ready: bool = False) -> str:
        lines: list[str] = []

        def metric(name: str, kind: str, help: str, samples: list[str]) -> None:
            lines.extend([f"# HELP {name} {help}", f"# TYPE {name} {kind}", *samples])

        metric("jvlm_model_ready", "gauge", "1 once the model is loaded and warmed up.",
               [f"jvlm_model_ready {int(ready)}"])
        metric("jvlm_in_flight_requests", "gauge", "Chat requests being read, prepared, queued, generated or sent.",
               [f"jvlm_in_flight_requests {self.in_flight}"])
        metric("jvlm_http_requests_total", "counter", "HTTP requests by route and status.",
               [f'jvlm_http_requests_total{{route="{route}",status="{status}"}} {n}'
                for (route, status), n in sorted(self.http.items())])
        metric("jvlm_chat_choices_total", "counter", "Generated choices by finish reason.",
               [f'jvlm_chat_choices_total{{finish_reason="{reason}"}} {n}'
                for reason, n in sorted(self.choices.items())])
        for name, value, help in (
            ("jvlm_prompt_tokens_total", self.prompt_tokens, "Prompt tokens (text + image) of chat requests."),
            ("jvlm_prompt_image_tokens_total", self.image_tokens, "Prompt tokens that stand for images."),
            ("jvlm_prompt_cached_tokens_total", self.cached_tokens, "Prompt tokens served from the prefix cache."),
            ("jvlm_completion_tokens_total", self.completion_tokens, "Generated tokens."),
        ):
            metric(name, "counter", help, [f"{name} {value}"])
        metric("jvlm_time_to_first_token_seconds", "histogram", "Submit to first token, per choice.",
               self.ttft.lines("jvlm_time_to_first_token_seconds"))
        metric("jvlm_request_tokens_per_second", "histogram", "Decode speed of each choice (after its first token).",
               self.tokens_per_s.lines("jvlm_request_tokens_per_second"))
        if engine is not None:
            s = engine.stats
            # list() copies each cache's entries in one step, though the engine thread may be changing them
            prefixes = [cache for _, cache in list(engine.prefixes.entries.values())]
            features = list(engine.features.entries.values())
            for name, kind, value, help in (
                ("jvlm_queue_depth", "gauge", engine.queue_depth, "Requests waiting for a batch slot."),
                ("jvlm_running_requests", "gauge", engine.num_running, "Sequences in the decode batch."),
                ("jvlm_engine_forward_passes_total", "counter", s.forward_passes, "Model forward passes."),
                ("jvlm_engine_decode_tokens_total", "counter", s.decode_tokens, "Tokens from batched decode steps."),
                ("jvlm_engine_decode_seconds_total", "counter", round(s.decode_s, 6), "Time in decode steps."),
                ("jvlm_engine_decode_tokens_per_second", "gauge",
                 round(s.decode_tokens / s.decode_s, 3) if s.decode_s else 0, "Decode throughput, all sequences."),
                ("jvlm_image_cache_hits_total", "counter", engine.features.hits, "Image feature cache hits."),
                ("jvlm_image_cache_misses_total", "counter", engine.features.misses, "Image feature cache misses."),
                ("jvlm_prefix_cache_hits_total", "counter", engine.prefixes.hits, "Prompt prefix cache hits."),
                ("jvlm_prefix_cache_misses_total", "counter", engine.prefixes.misses, "Prompt prefix cache misses."),
                ("jvlm_prefix_cache_entries", "gauge", len(prefixes), "KV caches kept for prefix reuse."),
                ("jvlm_prefix_cache_bytes", "gauge", sum(c.nbytes for c in prefixes),
                 "Bytes of the KV caches kept for prefix reuse."),
                ("jvlm_prefix_cache_budget_bytes", "gauge", engine.prefixes.max_bytes, "Prefix cache byte budget."),
                ("jvlm_image_cache_entries", "gauge", len(features), "Images whose features are cached."),
                ("jvlm_image_cache_bytes", "gauge", sum(f.nbytes for f in features), "Bytes of cached image features."),
                ("jvlm_image_cache_budget_bytes", "gauge", engine.features.max_bytes, "Image cache byte budget."),
            ):
                metric(name, kind, help, [f"{name} {value}"])
        return "\n".join(lines) + "\n"
