"""Model id or path → local snapshot directory (Hugging Face cache, offline-aware)."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import ModelNotFoundError

DEFAULT_MODEL = "jinaai/jina-vlm"
SNAPSHOT_PATTERNS = ["*.json", "*.jinja", "*.safetensors", "*.txt"]


def resolve_snapshot(model: str | os.PathLike) -> Path:
    """A local directory is used as is; anything else is a hub repo id looked up in the HF cache first.

    When the files are not cached and the hub cannot be reached (or HF_HUB_OFFLINE=1), raise one
    ``ModelNotFoundError`` that says how to get the files, instead of a network traceback.
    """
    path = Path(model).expanduser()
    if path.is_dir():
        return path.resolve()
    model = str(model)
    if path.exists() or model.startswith((".", "/", "~")) or model.count("/") != 1:
        raise ModelNotFoundError(f"model '{model}' is neither a snapshot directory nor a hub repo id (org/name)")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(model, allow_patterns=SNAPSHOT_PATTERNS, local_files_only=True))
    except Exception:  # not (fully) cached: try the hub below
        pass
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        raise ModelNotFoundError(
            f"model '{model}' is not in the Hugging Face cache and HF_HUB_OFFLINE is set; download it on a "
            f"connected machine with `hf download {model}` or pass a local snapshot directory"
        )
    try:
        return Path(snapshot_download(model, allow_patterns=SNAPSHOT_PATTERNS))
    except Exception as e:  # network errors, 404, gated repos: all end the same way for the user
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelNotFoundError(
            f"model '{model}' is not in the Hugging Face cache and could not be downloaded ({reason[:200]}); "
            f"connect to the internet, run `hf download {model}`, or pass a local snapshot directory"
        ) from None
