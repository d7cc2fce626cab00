"""jvlm: run small multilingual vision-language models (jina-vlm) fast on ordinary machines.

    import jvlm
    vlm = jvlm.load("jinaai/jina-vlm")
    out = vlm.chat([{"role": "user", "content": [{"type": "image", "image": "photo.jpg"},
                                                 {"type": "text", "text": "Describe this image"}]}])
    print(out.text)
"""

from .api import VLM, load
from .engine.sampling import SamplingParams
from .engine.types import (
    CandidateScore,
    ChatDelta,
    ChatResult,
    ScoreResult,
    Timings,
    TokenLogprob,
    TopLogprob,
    Usage,
)
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

__version__ = "0.1.0"
__all__ = [
    "VLM", "load", "SamplingParams", "CandidateScore", "ScoreResult", "ChatDelta", "ChatResult", "Timings",
    "TokenLogprob", "TopLogprob", "Usage", "CheckpointError", "ContextLengthError", "ImageError", "ImageFetchError",
    "ImageTooLargeError", "InvalidRequestError", "JvlmError", "ModelNotFoundError", "OverloadedError",
]
