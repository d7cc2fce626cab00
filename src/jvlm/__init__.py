"""jvlm: run small multilingual vision-language models (jina-vlm) fast on ordinary machines.

    import jvlm
    vlm = jvlm.load("jinaai/jina-vlm")
    out = vlm.chat([{"role": "user", "content": [{"type": "image", "image": "photo.jpg"},
                                                 {"type": "text", "text": "Describe this image"}]}])
    print(out.text)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .errors import (
    CheckpointError,
    ContextLengthError,
    ImageError,
    ImageFetchError,
    ImageTooLargeError,
    InvalidRequestError,
    JvlmError,
    ModelNotFoundError,
    OverloadedError,
)

if TYPE_CHECKING:
    from .api import VLM, load
    from .engine.types import (
        CandidateScore,
        ChatDelta,
        ChatResult,
        SamplingParams,
        ScoreResult,
        Timings,
        TokenLogprob,
        TopLogprob,
        Usage,
    )
    from .images.fetch import ImageLimits, UrlPolicy

# Imported on first use, so that `import jvlm` (and `jvlm --help`, error paths) does not pay for torch.
_LAZY = {
    "VLM": "api", "load": "api", "SamplingParams": "engine.types", "ImageLimits": "images.fetch",
    "UrlPolicy": "images.fetch", **dict.fromkeys(
        ["CandidateScore", "ChatDelta", "ChatResult", "ScoreResult", "Timings", "TokenLogprob", "TopLogprob", "Usage"],
        "engine.types"),
}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    else:  # a submodule (jvlm.testing, jvlm.tokenizer, ...) reached as an attribute
        try:
            value = importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise  # the submodule exists but needs something missing: say that
            raise AttributeError(f"module 'jvlm' has no attribute {name!r}") from None
    globals()[name] = value
    return value


__version__ = "0.1.0"
__all__ = [
    "VLM", "load", "SamplingParams", "ImageLimits", "UrlPolicy", "CandidateScore", "ScoreResult", "ChatDelta",
    "ChatResult", "Timings", "TokenLogprob", "TopLogprob", "Usage", "CheckpointError", "ContextLengthError",
    "ImageError", "ImageFetchError", "ImageTooLargeError", "InvalidRequestError", "JvlmError", "ModelNotFoundError",
    "OverloadedError",
]
