"""Conversation → prompt token ids with image blocks spliced in (the official processor's layout).

Steps (spec §7.3): render the chat template (one ``<|image|>`` per image part) → tokenize without
special-token handling → replace the k-th ``<|image|>`` by the k-th image's token block → prepend
BOS (``bos_token_id or eos_token_id``) → drop a trailing EOS. Image features later target the
absolute positions of the ``<im_patch>`` tokens recorded here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from .errors import ImageError, InvalidRequestError, check_positive_int
from .images.fetch import ImageLimits, UrlPolicy, image_digest, load_image
from .images.tiling import ImageInputs, ImageProcessorConfig, ImageTokenIds, preprocess_image
from .tokenizer import TextTokenizer

ROLES = ("system", "user", "assistant")


@dataclass
class PreparedImage:
    inputs: ImageInputs
    key: tuple  # (digest, max_crops, max_pixels): identifies the features this image produces
    offset: int  # absolute position of the block's first token in the prompt

    @property
    def positions(self) -> torch.Tensor:
        """Absolute prompt positions targeted by each (crop, window) feature; −1 = discarded. (N, 196)"""
        idx = self.inputs.patch_index
        return torch.where(idx >= 0, idx + self.offset, idx)


@dataclass
class Prompt:
    ids: list[int]
    images: list[PreparedImage] = field(default_factory=list)

    @property
    def image_tokens(self) -> int:
        return sum(len(im.inputs.tokens) for im in self.images)

    def cache_key(self) -> list:
        """Token ids where each image block's first token stands for the image's identity, so a cached
        prefix is only reused when the same images sit at the same places."""
        key: list[Any] = list(self.ids)
        for im in self.images:
            key[im.offset] = ("image",) + im.key
        return key


def _image_source(part: dict) -> Any:
    kind = part.get("type")
    if kind == "image_url":
        src = part.get("image_url")
        src = src.get("url") if isinstance(src, dict) else src
    else:
        src = next((part[k] for k in ("image", "url", "path") if part.get(k) is not None), None)
    if src is None:
        raise InvalidRequestError(
            f"an image part has no image (expected an 'image', 'url' or 'path' key): {part!r:.200}")
    return src


def _check_text(text: str, where: str) -> str:
    """Lone surrogates (e.g. a JSON "\\ud800" escape) are valid Python str but not text the tokenizer accepts."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidRequestError(f"{where} is not valid Unicode text (a lone surrogate at {e.start})") from None
    return text


def is_sequence(value: Any) -> bool:
    """A list, tuple… of items (a conversation, a batch of them); a string is not one."""
    return isinstance(value, Sequence) and not isinstance(value, (str, bytes, bytearray))


def normalize_conversation(conversation: Any) -> tuple[list[dict], list[Any]]:
    """Validate the list-of-messages format; return template messages (images as placeholders) and the
    image sources in order of appearance."""
    if not is_sequence(conversation) or not conversation:
        raise InvalidRequestError("a conversation must be a non-empty list of messages")
    messages, sources = [], []
    for i, message in enumerate(conversation):
        if not isinstance(message, dict):
            raise InvalidRequestError(
                f"message {i} must be a dict with 'role' and 'content', got {type(message).__name__}")
        role = message.get("role")
        if role not in ROLES:
            raise InvalidRequestError(f"message {i} has role {role!r}; expected one of {', '.join(ROLES)}")
        content = message.get("content")
        if isinstance(content, str):
            messages.append({"role": role, "content": _check_text(content, f"message {i} content")})
            continue
        if not isinstance(content, list):
            raise InvalidRequestError(f"message {i} content must be a string or a list of parts, got "
                                      f"{type(content).__name__}")
        parts = []
        for part in content:
            if isinstance(part, str):
                part = {"type": "text", "text": part}
            if not isinstance(part, dict):
                raise InvalidRequestError(f"message {i} has a content part of type {type(part).__name__}")
            kind = part.get("type")
            if kind == "text":
                if not isinstance(part.get("text"), str):
                    raise InvalidRequestError(f"message {i} has a text part without a string 'text'")
                parts.append({"type": "text", "text": _check_text(part["text"], f"message {i} text")})
            elif kind in ("image", "image_url"):
                if role == "system":
                    raise InvalidRequestError("images are not allowed in system messages")
                sources.append(_image_source(part))
                parts.append({"type": "image"})
            else:
                raise InvalidRequestError(f"message {i} has a content part of unsupported type {kind!r} "
                                          "(expected 'text', 'image' or 'image_url')")
        messages.append({"role": role, "content": parts})
    return messages, sources


class Processor:
    def __init__(self, tokenizer: TextTokenizer, image_config: ImageProcessorConfig, context_length: int,
                 image_limits: ImageLimits | None = None, url_policy: UrlPolicy | None = None):
        self.tokenizer = tokenizer
        self.image_config = image_config
        self.context_length = context_length
        self.image_limits = image_limits or ImageLimits()
        self.url_policy = url_policy or UrlPolicy()  # safe by default: public hosts only, local paths allowed
        ids = tokenizer.image_ids
        self.token_ids = ImageTokenIds(patch=ids["<im_patch>"], start=ids["<im_start>"], end=ids["<im_end>"],
                                       col=ids["<im_col>"])

    def load_images(self, sources: list[Any], loader: Callable[[Any], Image.Image] | None = None) -> list[Image.Image]:
        loader = loader or (lambda s: load_image(s, limits=self.image_limits, policy=self.url_policy))
        return [loader(s) for s in sources]

    def __call__(
        self,
        conversation: list[dict],
        *,
        max_crops: int | None = None,
        max_pixels: int | None = None,
        add_generation_prompt: bool = True,
        image_loader: Callable[[Any], Image.Image] | None = None,
    ) -> Prompt:
        for name, value in (("max_crops", max_crops), ("max_pixels", max_pixels)):
            if value is not None:
                check_positive_int(name, value)
        messages, sources = normalize_conversation(conversation)
        text = self.tokenizer.render(messages, add_generation_prompt=add_generation_prompt)
        ids = self.tokenizer.encode(text)
        placeholder = self.tokenizer.image_prompt_id
        slots = [i for i, t in enumerate(ids) if t == placeholder]
        if slots and len(slots) != len(sources):
            raise InvalidRequestError(
                f"the prompt has {len(slots)} <|image|> placeholder(s) but {len(sources)} image(s) were given")
        images = self.load_images(sources, image_loader)
        inputs = []
        for n, image in enumerate(images):
            try:
                inputs.append(preprocess_image(image, self.image_config, self.token_ids, max_crops=max_crops,
                                               max_pixels=max_pixels))
            except ImageError as e:
                raise type(e)(f"image {n + 1}: {e}") from None
        if not slots:
            slots = [-1] * len(inputs)  # official behaviour: blocks go to the very start

        out = [self.tokenizer.bos_token_id]
        prepared = []
        start = 0
        for slot, inp, image in zip(slots, inputs, images, strict=True):
            if slot >= 0:
                out.extend(ids[start:slot])
                start = slot + 1
            prepared.append(PreparedImage(inp, (image_digest(image), max_crops, max_pixels), len(out)))
            out.extend(inp.tokens)
        out.extend(ids[start:])
        if len(out) > 1 and out[-1] == self.tokenizer.eos_token_id:
            out.pop()
        if len(out) >= self.context_length:
            raise_context_error(len(out), sum(len(i.tokens) for i in inputs), self.context_length)
        return Prompt(out, prepared)


def raise_context_error(prompt_tokens: int, image_tokens: int, context: int):
    from .errors import ContextLengthError

    detail = f" ({image_tokens} of them image tokens; lower max_crops or max_pixels)" if image_tokens else ""
    raise ContextLengthError(
        f"the prompt is {prompt_tokens} tokens{detail}, which does not fit the model's context of {context} tokens")
