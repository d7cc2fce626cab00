"""Public result types shared by the library, the CLI and the server."""

from __future__ import annotations

from dataclasses import dataclass, field


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
