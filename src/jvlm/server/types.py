"""OpenAI-shaped request and response models.

Requests are strict (``extra="forbid"``, no type coercion): a field jvlm does not implement, such as
``tools``, is a 400 that names it rather than something silently ignored, and ``"max_tokens": "5"`` is a 400
rather than 5.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)  # no coercion either: "5" or true is not an integer


# ---------------------------------------------------------------------------------------------- requests
class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImageURL(_Strict):
    url: str = Field(description="An http(s):// URL or a data:image/...;base64,... URI.")
    detail: Literal["auto", "low", "high"] | None = Field(
        None, description="Accepted for compatibility and ignored: use max_crops / max_pixels instead.")


class ImageURLPart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImageURLPart, Field(discriminator="type")]
StopString = Annotated[str, Field(min_length=1)]


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"] = Field(
        description="'developer' is treated as 'system'.")
    content: str | list[ContentPart]
    name: str | None = Field(None, description="Accepted and ignored.")
    # what an OpenAI SDK puts in an assistant message it returned (``message.model_dump()``), so a client can
    # replay it as history: accepted when empty, a 400 naming the field otherwise (jvlm has no tools or audio)
    refusal: str | None = Field(None, description="Accepted and ignored (an assistant turn replayed as history).")
    annotations: Annotated[list[Any], Field(max_length=0)] | None = Field(None, description="Only null or [].")
    tool_calls: Annotated[list[Any], Field(max_length=0)] | None = Field(None, description="Only null or [].")
    function_call: None = Field(None, description="Only null.")
    audio: None = Field(None, description="Only null.")

    @property
    def images(self) -> int:
        return 0 if isinstance(self.content, str) else sum(isinstance(p, ImageURLPart) for p in self.content)

    def to_jvlm(self) -> dict[str, Any]:
        role = "system" if self.role == "developer" else self.role
        if isinstance(self.content, str):
            return {"role": role, "content": self.content}
        return {"role": role, "content": [p.model_dump(exclude_none=True) for p in self.content]}


class ResponseFormat(_Strict):
    type: Literal["text"] = Field(description="Only 'text' (the default): jvlm has no JSON mode.")


class StreamOptions(_Strict):
    include_usage: bool = Field(False, description="Send a last chunk with the usage of the whole request.")


class ChatCompletionRequest(_Strict):
    model: str | None = Field(
        None, description="The served model name or the model id given to the server. Unlike OpenAI, a missing "
                          "model means the served one.")
    messages: list[Message] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1, description="Deprecated alias of max_completion_tokens.")
    max_completion_tokens: int | None = Field(
        None, ge=1, description="Most tokens to generate (clamped to what the context leaves).")
    temperature: float | None = Field(None, allow_inf_nan=False, ge=0, le=2,
                                      description="0 or unset = greedy (jvlm's default).")
    top_p: float | None = Field(None, allow_inf_nan=False, gt=0, le=1)
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1, description="A 64-bit integer.")
    stop: StopString | Annotated[list[StopString], Field(max_length=16)] | None = Field(
        None, description="A string or up to 16; the text ends before the first one found.")
    n: int = Field(1, ge=1, le=8, description="Choices to generate for the same prompt.")
    presence_penalty: float | None = Field(None, allow_inf_nan=False, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, allow_inf_nan=False, ge=-2, le=2)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20, description="Needs logprobs=true.")
    user: str | None = Field(None, description="Accepted and ignored.")
    response_format: ResponseFormat | None = None
    # jvlm extras
    top_k: int | None = Field(None, ge=0, description="0 = off.")
    repetition_penalty: float | None = Field(None, allow_inf_nan=False, gt=0,
                                             description="HF-style, over prompt and output.")
    max_crops: int | None = Field(None, ge=1, le=64, description="Most image crops (tiles) per image.")
    max_pixels: int | None = Field(None, ge=1, description="Resize each image to at most this many pixels.")


# ---------------------------------------------------------------------------------------------- responses
class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length"]


class PromptTokensDetails(BaseModel):
    cached_tokens: int = Field(description="Prompt tokens whose KV came from the prefix cache.")
    image_tokens: int = Field(description="Prompt tokens standing for images (included in prompt_tokens).")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[Choice]
    usage: Usage


class ChunkDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int
    delta: ChunkDelta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "jvlm"
    root: str = Field(description="The model id or path the server was started with.")
    max_model_len: int = Field(description="Context length in tokens (text + image tokens + output).")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail
