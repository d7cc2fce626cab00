"""Typed errors: every user-facing failure is one of these, with a message that names the problem.

The CLI prints ``str(err)`` on one line; the server maps the class to an HTTP status once, at the edge.
"""


class JvlmError(Exception):
    """Base class of every error jvlm raises on purpose."""


class ModelNotFoundError(JvlmError):
    """The model id / path could not be resolved to a local snapshot (missing, or offline and uncached)."""


class CheckpointError(JvlmError):
    """A snapshot is not a valid jina-vlm checkpoint (bad config, missing / unexpected / mis-shaped tensors)."""


class InvalidRequestError(JvlmError, ValueError):
    """The request itself is malformed (bad conversation structure, bad parameter value)."""


class ImageError(InvalidRequestError):
    """An image could not be read, fetched or decoded, or breaks a configured limit."""


class ImageTooLargeError(ImageError):
    """An image exceeds the byte or pixel limit (checked before decoding pixels)."""


class ImageFetchError(ImageError):
    """A remote image (URL) could not be fetched: unreachable, timed out, refused, wrong content type."""


class ContextLengthError(InvalidRequestError):
    """The prompt (text + image tokens) does not fit the model's context."""


class OverloadedError(JvlmError):
    """The engine's queue is full; retry later."""


def check_positive_int(name: str, value: object) -> None:
    """An argument that counts something: an int ≥ 1 (not a bool, not a float), else InvalidRequestError."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidRequestError(f"{name} must be an integer >= 1, got {value!r}")
