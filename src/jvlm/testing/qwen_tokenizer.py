"""A real Qwen3 byte-level BPE tokenizer, rebuilt offline for tiny test checkpoints.

The jina-vlm checkpoint (and its ``tokenizer.json``) cannot be downloaded here, but the
``dashscope`` package ships ``qwen.tiktoken``: the Qwen2/Qwen3 base vocabulary as
``<base64 bytes> <rank>`` lines. We convert it to Hugging Face ``tokenizer.json`` format
so tests run against the same ids the real model uses.

Id gap: Qwen3's added tokens end at 151668 and jina-vlm's image tokens start at 151936.
``tokenizers`` ignores explicit added-token ids on load and numbers added tokens
consecutively after the model vocab, so a gap would silently shift the image tokens.
We therefore fill 151669..151935 with placeholder special tokens ``<|jvlm_unused_N|>``
(N = id); they never match ordinary text.

Building takes a few seconds (deriving ~151k merges), so the JSON text is cached on disk
under ``$XDG_CACHE_HOME/jvlm`` (default ``~/.cache/jvlm``), keyed by the ranks file's hash
and ``FORMAT_VERSION``.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import os
import tempfile
from importlib import resources
from pathlib import Path

# Bump whenever the generated JSON changes, so stale disk caches are ignored.
FORMAT_VERSION = 1

QWEN_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

NUM_BASE_TOKENS = 151643
ENDOFTEXT = "<|endoftext|>"

# (id, content, special) - Qwen3's added tokens; tool/think markers are special=false there.
_QWEN3_ADDED = [
    (151643, ENDOFTEXT, True),
    (151644, "<|im_start|>", True),
    (151645, "<|im_end|>", True),
    (151646, "<|object_ref_start|>", True),
    (151647, "<|object_ref_end|>", True),
    (151648, "<|box_start|>", True),
    (151649, "<|box_end|>", True),
    (151650, "<|quad_start|>", True),
    (151651, "<|quad_end|>", True),
    (151652, "<|vision_start|>", True),
    (151653, "<|vision_end|>", True),
    (151654, "<|vision_pad|>", True),
    (151655, "<|image_pad|>", True),
    (151656, "<|video_pad|>", True),
    (151657, "<tool_call>", False),
    (151658, "</tool_call>", False),
    (151659, "<|fim_prefix|>", True),
    (151660, "<|fim_middle|>", True),
    (151661, "<|fim_suffix|>", True),
    (151662, "<|fim_pad|>", True),
    (151663, "<|repo_name|>", True),
    (151664, "<|file_sep|>", True),
    (151665, "<tool_response>", False),
    (151666, "</tool_response>", False),
    (151667, "<think>", False),
    (151668, "</think>", False),
]

# jina-vlm's image tokens, placed after Qwen3's padded embedding size (151936).
IMAGE_TOKENS = {
    "<im_start>": 151936,
    "<im_end>": 151937,
    "<im_patch>": 151938,
    "<im_col>": 151939,
    "<|image|>": 151940,
    "<im_slice>": 151941,
}


def added_tokens() -> list[tuple[int, str, bool]]:
    """All added tokens as (id, content, special), consecutive ids including gap placeholders."""
    tokens = list(_QWEN3_ADDED)
    first_image_id = min(IMAGE_TOKENS.values())
    tokens += [(i, f"<|jvlm_unused_{i}|>", True) for i in range(tokens[-1][0] + 1, first_image_id)]
    tokens += [(i, content, True) for content, i in sorted(IMAGE_TOKENS.items(), key=lambda kv: kv[1])]
    assert [t[0] for t in tokens] == list(range(NUM_BASE_TOKENS, NUM_BASE_TOKENS + len(tokens)))
    return tokens


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by byte-level BPE."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def ranks_path() -> Path:
    try:
        import dashscope  # noqa: F401
    except ImportError as exc:
        raise ImportError(
            "The Qwen test tokenizer is built from dashscope's qwen.tiktoken: "
            "pip install dashscope==2.0.2 (or pip install -e .[tiny])"
        ) from exc
    return Path(str(resources.files("dashscope") / "resources" / "qwen.tiktoken"))


def load_ranks(path: Path | None = None) -> dict[bytes, int]:
    ranks: dict[bytes, int] = {}
    for line in (path or ranks_path()).read_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def _merge_pair(token: bytes, ranks: dict[bytes, int]) -> tuple[bytes, bytes]:
    """Run byte-pair merging on ``token`` with only lower-ranked tokens; the two parts left
    are the pair whose merge creates it (what tiktoken's encoder would do)."""
    max_rank = ranks[token]
    parts = [token[i : i + 1] for i in range(len(token))]
    while len(parts) > 2:
        best_rank, best_i = max_rank, -1
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1], max_rank)
            if r < best_rank:
                best_rank, best_i = r, i
        if best_i < 0:
            raise ValueError(f"token {token!r} (rank {max_rank}) is unreachable by merges")
        parts[best_i : best_i + 2] = [parts[best_i] + parts[best_i + 1]]
    return parts[0], parts[1]


def _build(ranks: dict[bytes, int]) -> str:
    byte_map = bytes_to_unicode()

    def to_str(b: bytes) -> str:
        return "".join(byte_map[x] for x in b)

    by_rank = sorted(ranks.items(), key=lambda kv: kv[1])
    assert [r for _, r in by_rank] == list(range(NUM_BASE_TOKENS)), "ranks must be 0..151642"
    vocab = {to_str(tok): rank for tok, rank in by_rank}
    # Pairs, not "a b" strings: the form tokenizers >= 0.20 writes (it still reads both).
    merges = []
    for tok, _ in by_rank:
        if len(tok) >= 2:
            left, right = _merge_pair(tok, ranks)
            merges.append([to_str(left), to_str(right)])

    # Byte-level with its own regex off: splitting is done by the Qwen pattern above it.
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    tokenizer = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {
                "id": i,
                "content": content,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": special,
            }
            for i, content, special in added_tokens()
        ],
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {
                    "type": "Split",
                    "pattern": {"Regex": QWEN_PATTERN},
                    "behavior": "Isolated",
                    "invert": False,
                },
                byte_level,
            ],
        },
        "post_processor": byte_level,  # adds no tokens; kept because Qwen's own file has it
        "decoder": byte_level,
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": "",
            "end_of_word_suffix": "",
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": merges,
        },
    }
    return json.dumps(tokenizer, ensure_ascii=False)


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "jvlm"


def cache_file(ranks_data: bytes) -> Path:
    digest = hashlib.sha256(ranks_data + f"\0format={FORMAT_VERSION}".encode()).hexdigest()[:16]
    return cache_dir() / f"qwen3-tokenizer-{digest}.json"


@functools.lru_cache(maxsize=1)
def build_tokenizer_json() -> str:
    """The tokenizer.json text; from the disk cache when possible (a cold build takes seconds)."""
    path = ranks_path()
    data = path.read_bytes()
    cached = cache_file(data)
    try:
        return cached.read_text(encoding="utf-8")
    except OSError:
        pass
    text = _build(load_ranks(path))
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cached.parent, prefix=cached.name, suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
            os.replace(tmp, cached)  # atomic: concurrent builders never see a partial file
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError:
        pass  # a read-only cache only costs speed
    return text


def write_tokenizer_files(directory: str | os.PathLike[str]) -> None:
    """Write tokenizer.json and a Qwen3-base-like tokenizer_config.json into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "tokenizer.json").write_text(build_tokenizer_json(), encoding="utf-8")
    config = {
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(i): {
                "content": content,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": special,
            }
            for i, content, special in added_tokens()
        },
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": ENDOFTEXT,
        "errors": "replace",
        "model_max_length": 40960,
        "pad_token": ENDOFTEXT,
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
