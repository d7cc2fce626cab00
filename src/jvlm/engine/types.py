"""Public types shared by the library, the CLI and the server (torch-free: the CLI checks its flags with
them before importing torch)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..errors import InvalidRequestError


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 512
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None
    repetition_penalty: float = 1.0  # HF-style, over prompt and generated tokens
    presence_penalty: float = 0.0  # OpenAI-style, over generated tokens
    frequency_penalty: float = 0.0
    stop: tuple[str, ...] = ()
    logprobs: bool = False
    top_logprobs: int = 0

    def __post_init__(self):
        def bad(name, value, rule):
            raise InvalidRequestError(f"{name} must be {rule}, got {value!r}")

        def number(name, value):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                bad(name, value, "a finite number")

        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            bad("max_new_tokens", self.max_new_tokens, "an integer >= 1")
        for name in ("temperature", "top_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
            number(name, getattr(self, name))
        if self.temperature < 0:
            bad("temperature", self.temperature, ">= 0")
        if not 0 < self.top_p <= 1:
            bad("top_p", self.top_p, "in (0, 1]")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            bad("top_k", self.top_k, "an integer >= 0")
        if self.repetition_penalty <= 0:
            bad("repetition_penalty", self.repetition_penalty, "> 0")
        if not -2 <= self.presence_penalty <= 2:
            bad("presence_penalty", self.presence_penalty, "in [-2, 2]")
        if not -2 <= self.frequency_penalty <= 2:
            bad("frequency_penalty", self.frequency_penalty, "in [-2, 2]")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not -(2**63) <= self.seed < 2**64):
            bad("seed", self.seed, "a 64-bit integer")
        if not isinstance(self.stop, tuple) or not all(isinstance(s, str) and s for s in self.stop):
            bad("stop", self.stop, "a tuple of non-empty strings")
        if not isinstance(self.logprobs, bool):  # "no" or "false" would otherwise switch them on
            bad("logprobs", self.logprobs, "True or False")
        k = self.top_logprobs
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= 20:
            bad("top_logprobs", self.top_logprobs, "an integer in [0, 20]")
        if self.top_logprobs and not self.logprobs:
            raise InvalidRequestError("top_logprobs requires logprobs=True")


@dataclass
class Usage:
    prompt_tokens: int  # text + image tokens of the prompt
    image_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class Timings:
    queued_s: float = 0.0  # submit → prefill start
    vision_s: float = 0.0  # image encoding (0 when every image came from the feature cache)
    prefill_s: float = 0.0  # prompt forward incl. vision
    decode_s: float = 0.0  # first token → last token
    time_to_first_token_s: float = 0.0  # submit → first token
    total_s: float = 0.0


@dataclass
class TopLogprob:
    token_id: int
    token: str
    logprob: float


@dataclass
class TokenLogprob:
    token_id: int
    token: str
    logprob: float
    top_logprobs: list[TopLogprob] = field(default_factory=list)


@dataclass
class ChatResult:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" | "length" | "cancelled" | "error"
    usage: Usage
    timings: Timings
    logprobs: list[TokenLogprob] | None = None
    error: str | None = None

    @property
    def tokens_per_s(self) -> float:
        n = self.usage.completion_tokens - 1
        return n / self.timings.decode_s if n > 0 and self.timings.decode_s > 0 else 0.0


@dataclass
class ChatDelta:
    """One streamed increment. The last delta of a conversation has ``finish_reason`` and ``result`` set."""

    index: int  # which conversation of the batch
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None
    result: ChatResult | None = None


@dataclass
class CandidateScore:
    text: str
    logprob: float  # total log-probability of the candidate's tokens as the assistant's answer
    num_tokens: int
    probability: float  # normalized among the candidates: softmax of their total logprobs
    token_logprobs: list[float] = field(default_factory=list)


@dataclass
class ScoreResult:
    candidates: list[CandidateScore]
    usage: Usage

    @property
    def best(self) -> CandidateScore:
        return max(self.candidates, key=lambda c: c.logprob)
