"""Tokenizer (``tokenizer.json``) plus chat-template rendering (the snapshot's ``chat_template.jinja``).

The template is rendered in a sandboxed Jinja2 environment configured like transformers'
(trim_blocks, lstrip_blocks, ``raise_exception``), with the two extra variables jina-vlm's
processor passes: ``always_start_with_space`` and ``image_prompt_token``.
"""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from .errors import CheckpointError, InvalidRequestError

IMAGE_PROMPT_TOKEN = "<|image|>"
IMAGE_TOKENS = ("<im_patch>", "<im_start>", "<im_end>", "<im_col>", IMAGE_PROMPT_TOKEN)


def _token_content(value) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value


class TextTokenizer:
    def __init__(self, snapshot: Path):
        path = snapshot / "tokenizer.json"
        if not path.exists():
            raise CheckpointError(f"{snapshot} is not a jina-vlm snapshot: tokenizer.json is missing")
        try:
            self.tokenizer = Tokenizer.from_file(str(path))
        except Exception as e:
            raise CheckpointError(f"{path}: cannot be loaded by `tokenizers` ({e})") from None
        cfg_path = snapshot / "tokenizer_config.json"
        self.config = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
        proc_path = snapshot / "processor_config.json"
        proc = json.loads(proc_path.read_text()) if proc_path.exists() else {}
        self.always_start_with_space = bool(proc.get("always_start_with_space", True))
        self.model_max_length = int(self.config.get("model_max_length") or 0) or None

        self.eos_token = _token_content(self.config.get("eos_token")) or "<|endoftext|>"
        self.bos_token = _token_content(self.config.get("bos_token"))
        self.eos_token_id = self._id(self.eos_token)
        # the official processor prepends `bos_token_id or eos_token_id` (Qwen has no BOS)
        self.bos_token_id = self._id(self.bos_token) if self.bos_token else self.eos_token_id
        self.image_ids = {t: self._id(t) for t in IMAGE_TOKENS}

        template_path = snapshot / "chat_template.jinja"
        if template_path.exists():
            source = template_path.read_text(encoding="utf-8")
        elif isinstance(self.config.get("chat_template"), str):
            source = self.config["chat_template"]
        else:
            raise CheckpointError(f"{snapshot}: no chat_template.jinja (and no chat_template in tokenizer_config.json)")
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise_exception
        env.filters["tojson"] = lambda v, indent=None: json.dumps(v, ensure_ascii=False, indent=indent)
        try:
            self.template = env.from_string(source)
        except TemplateError as e:
            raise CheckpointError(f"{snapshot}: chat template does not compile ({e})") from None

    def _id(self, token: str) -> int:
        i = self.tokenizer.token_to_id(token)
        if i is None:
            raise CheckpointError(f"tokenizer.json has no token {token!r}")
        return i

    @property
    def image_prompt_id(self) -> int:
        return self.image_ids[IMAGE_PROMPT_TOKEN]

    @cached_property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_text(self, token_id: int) -> str:
        """The text of one token as it reads on its own (may be a partial UTF-8 sequence → U+FFFD)."""
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def token_bytes(self, token_id: int) -> bytes:
        """Exact bytes of one token (byte-level BPE), for OpenAI's `bytes` field."""
        piece = self.tokenizer.id_to_token(token_id)
        if piece is None:
            return b""
        table = _unicode_to_byte()
        if all(ch in table for ch in piece):
            return bytes(table[ch] for ch in piece)
        return piece.encode("utf-8")  # added/special tokens are stored verbatim

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        try:
            return self.template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                always_start_with_space=self.always_start_with_space,
                image_prompt_token=IMAGE_PROMPT_TOKEN,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token,
            )
        except TemplateError as e:
            raise InvalidRequestError(f"the chat template rejected the conversation: {e}") from None


def _raise_exception(message):
    raise TemplateError(message)


_BYTE_TABLE: dict[str, int] | None = None


def _unicode_to_byte() -> dict[str, int]:
    """Inverse of the GPT-2 byte→unicode alphabet used by byte-level BPE."""
    global _BYTE_TABLE
    if _BYTE_TABLE is None:
        bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
            range(ord("®"), ord("ÿ") + 1))
        cs = bs[:]
        n = 0
        for b in range(256):
            if b not in bs:
                bs.append(b)
                cs.append(256 + n)
                n += 1
        _BYTE_TABLE = {chr(c): b for b, c in zip(bs, cs, strict=True)}
    return _BYTE_TABLE
