"""Turn any image source (path, URL, data URI, bytes, PIL image) into a fully loaded RGB image.

Everything that can go wrong raises a typed error from ``jvlm.errors`` naming the source, so the
CLI and the server can report it without inspecting PIL or network exceptions. Size limits are
checked before pixels are decoded: byte counts from the file size / streamed body, pixel counts
from the header that ``Image.open`` reads lazily. Only a short list of common decoders is tried
(``ImageLimits.formats``), which keeps rarely exercised parsers (and EPS, which runs Ghostscript)
away from untrusted bytes. Which URLs and files may be reached is a ``UrlPolicy`` (see ``safe_http``).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import os
import re
import stat
import urllib.parse
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from jvlm.errors import ImageError, ImageTooLargeError, InvalidRequestError, JvlmError, check_positive_int
from jvlm.images import safe_http
from jvlm.images.safe_http import UrlPolicy

__all__ = ["DEFAULT_FORMATS", "ImageLimits", "ImageSource", "UrlPolicy", "image_digest", "load_image", "to_rgb"]

ImageSource = str | os.PathLike | bytes | bytearray | memoryview | Image.Image

# A URI scheme needs 2+ characters so that Windows drive letters ("C:\\x.png") stay paths.
_SCHEME_RE = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.\-]+):")
# Web and camera formats. Unknown names are skipped (AVIF / HEIF need a recent Pillow or a plugin).
DEFAULT_FORMATS = ("JPEG", "MPO", "PNG", "GIF", "WEBP", "BMP", "TIFF", "AVIF", "HEIF", "ICO", "PPM")
_DEFAULT_POLICY = UrlPolicy()
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}


@dataclass(frozen=True)
class ImageLimits:
    """Caps that protect the process from hostile or accidental huge inputs."""

    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 50_000_000  # declared width x height, checked before decoding (Pillow refuses > ~179M itself)
    fetch_timeout: float = 10.0  # seconds, for the whole download: DNS, connect, redirects, body
    max_redirects: int = 5
    formats: tuple[str, ...] | None = DEFAULT_FORMATS  # Pillow decoders tried; None = every installed one

    def __post_init__(self) -> None:  # a bad setting is a bad argument: InvalidRequestError, a ValueError
        for name in ("max_bytes", "max_pixels"):
            check_positive_int(f"ImageLimits.{name}", getattr(self, name))
        timeout = self.fetch_timeout
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
            raise InvalidRequestError(f"ImageLimits.fetch_timeout must be a number of seconds > 0, got {timeout!r}")
        if isinstance(self.max_redirects, bool) or not isinstance(self.max_redirects, int) or self.max_redirects < 0:
            raise InvalidRequestError(f"ImageLimits.max_redirects must be an integer >= 0, got {self.max_redirects!r}")
        if self.formats is not None:
            if isinstance(self.formats, str) or not self.formats or not all(isinstance(f, str) for f in self.formats):
                raise InvalidRequestError(f"ImageLimits.formats must be format names or None, got {self.formats!r}")
            object.__setattr__(self, "formats", tuple(f.upper() for f in self.formats))


def load_image(
    source: ImageSource, *, limits: ImageLimits | None = None, policy: UrlPolicy | None = None
) -> Image.Image:
    """Load ``source`` as an RGB, EXIF-oriented, fully decoded ``PIL.Image.Image``.

    Args:
        source: a filesystem path (``str`` / ``os.PathLike``), an ``http(s)://`` URL, a
            ``data:image/...;base64,...`` URI, a ``file:`` URL (only under ``policy.allow_file_dir``),
            raw encoded bytes, or a ``PIL.Image.Image`` (copied, never modified).
        limits: byte / pixel / time / format caps; defaults to ``ImageLimits()``.
        policy: what may be reached; defaults to ``UrlPolicy()``: public http(s) hosts only (loopback,
            private, link-local... refused), no ``file:`` URLs, local paths allowed.

    Raises:
        ImageError: unreadable, missing or malformed source, unsupported scheme, type or format.
        ImageTooLargeError: over ``max_bytes`` or ``max_pixels``.
        ImageFetchError: a URL that is refused by the policy or cannot be fetched (network, time,
            HTTP status, redirects, content type, size).
    """
    limits = limits or ImageLimits()
    policy = policy or _DEFAULT_POLICY
    if isinstance(source, Image.Image):
        return _from_pil(source, limits)
    if isinstance(source, bytes | bytearray | memoryview):
        data = bytes(source)
        return _decode(data, f"<{len(data)} bytes>", limits)
    if isinstance(source, os.PathLike):
        return _from_local_path(Path(source), limits, policy)
    if isinstance(source, str):
        return _from_string(source, limits, policy)
    raise ImageError(
        f"unsupported image source type {type(source).__name__}: expected a path, URL, data URI, "
        "bytes or PIL.Image.Image"
    )


def image_digest(image: Image.Image) -> str:
    """sha256 hex of (mode, size, raw pixel bytes): a content key for caching image features."""
    h = hashlib.sha256()
    h.update(f"{image.mode}:{image.size[0]}x{image.size[1]}:".encode())
    h.update(image.tobytes())
    return h.hexdigest()


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB; always returns a new image.

    Transparency is composited onto white (as transformers' ``convert_to_rgb`` does); 16/32-bit
    integer and float modes are rescaled to 8 bits instead of being clipped.
    """
    mode = image.mode
    if mode in _ALPHA_MODES or image.has_transparency_data:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if mode.startswith("I;16") or mode in ("I", "F"):
        return Image.fromarray(_to_uint8(image), mode="L").convert("RGB")
    try:
        return image.convert("RGB")
    except ValueError as exc:  # e.g. LAB, which PIL cannot convert without a colour profile
        raise ImageError(f"cannot convert image mode {mode} to RGB: {exc}") from exc


# --------------------------------------------------------------------------------------------
# sources


def _from_string(source: str, limits: ImageLimits, policy: UrlPolicy) -> Image.Image:
    if not source:
        raise ImageError("empty image source string")
    match = _SCHEME_RE.match(source)
    if not match:
        return _from_local_path(Path(source), limits, policy)
    scheme = match.group(1).lower()
    if scheme == "data":
        return _from_data_uri(source, limits)
    if scheme in ("http", "https"):
        data = safe_http.fetch(
            source, policy=policy, max_bytes=limits.max_bytes, timeout=limits.fetch_timeout,
            max_redirects=limits.max_redirects,
        )
        return _decode(data, _short(source), limits)
    if scheme == "file" and policy.allow_file_dir is not None:
        return _from_file_url(source, limits, policy.allow_file_dir)
    raise ImageError(
        f"unsupported image URL scheme {match.group(1)!r} in {_short(source)}: use http(s)://, "
        "data:image/... or a local path (file: URLs only inside an allowed directory)"
    )


def _from_local_path(path: Path, limits: ImageLimits, policy: UrlPolicy) -> Image.Image:
    if not policy.allow_local_paths:
        raise ImageError(
            f"local file paths are not accepted here ({_short(str(path))}): use http(s):// or data:image/... URLs"
        )
    try:
        path = path.expanduser()
    except (RuntimeError, ValueError) as exc:  # "~name" of an unknown user, no home, unencodable name
        raise ImageError(f"cannot read image file {_short(str(path))}: {exc}") from exc
    return _from_path(path, limits)


def _from_file_url(url: str, limits: ImageLimits, root: Path) -> Image.Image:
    """A ``file:`` URL, served only if the file resolves (symlinks, ``..``) inside ``root``."""
    label = _short(url)
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError as exc:  # "file://[x"
        raise ImageError(f"malformed file: URL {label}: {exc}") from exc
    if parts.netloc not in ("", "localhost"):
        raise ImageError(f"file: URL {label} names a remote host {parts.netloc!r}")
    path = Path(urllib.parse.unquote(parts.path))
    if not path.is_absolute():
        raise ImageError(f"file: URL {label} does not name an absolute path")
    try:
        resolved, base = path.resolve(strict=True), root.resolve(strict=True)
    except FileNotFoundError:
        raise ImageError(f"image file not found: {label}") from None
    except (OSError, ValueError, RuntimeError) as exc:  # NUL in the name, symlink loop, permissions
        raise ImageError(f"cannot read image file {label}: {exc}") from exc
    if not resolved.is_relative_to(base):  # after resolving: "..", symlinks and %2e%2e cannot escape
        raise ImageError(f"file: URL {label} is outside the allowed image directory")
    return _from_path(resolved, limits)


def _from_path(path: Path, limits: ImageLimits) -> Image.Image:
    label = _short(str(path))
    try:
        if path.is_dir():
            raise ImageError(f"image path is a directory, not a file: {label}")
        if not path.exists():
            raise ImageError(f"image file not found: {label}")
        st = path.stat()
        if not stat.S_ISREG(st.st_mode):  # a FIFO or device would block or never end
            raise ImageError(f"image path is not a regular file: {label}")
        size = st.st_size
        if size > limits.max_bytes:
            raise ImageTooLargeError(
                f"image file {label} is {size:,} bytes, over the limit of {limits.max_bytes:,} bytes"
            )
        with path.open("rb") as f:
            data = f.read(limits.max_bytes + 1)
    except JvlmError:
        raise
    except (OSError, ValueError) as exc:  # permissions, NUL in the name, name too long, ...
        raise ImageError(f"cannot read image file {label}: {exc}") from exc
    return _decode(data, label, limits)


def _from_data_uri(uri: str, limits: ImageLimits) -> Image.Image:
    label = _short(uri)
    header, sep, payload = uri[5:].partition(",")
    if not sep:
        raise ImageError(f"malformed data URI (no comma): {label}")
    params = [p.strip() for p in header.split(";")]
    media_type = params[0].lower()
    if not media_type.startswith("image/"):
        raise ImageError(f"data URI is not an image (media type {media_type or 'missing'!r}): {label}")
    if "base64" in (p.lower() for p in params[1:]):
        payload = re.sub(r"\s+", "", payload)
        if len(payload) * 3 // 4 > limits.max_bytes + 3:
            raise ImageTooLargeError(
                f"image data URI {label} holds about {len(payload) * 3 // 4:,} bytes, over the limit "
                f"of {limits.max_bytes:,} bytes"
            )
        payload += "=" * (-len(payload) % 4)  # tolerate stripped padding
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ImageError(f"invalid base64 in data URI {label}: {exc}") from exc
    else:  # RFC 2397 allows percent-encoded payloads
        try:
            data = urllib.parse.unquote_to_bytes(payload)
        except UnicodeEncodeError as exc:  # lone surrogates (JSON "\ud800") are not URI text
            raise ImageError(f"invalid characters in data URI {label}: {exc.reason}") from exc
    return _decode(data, label, limits)


def _from_pil(image: Image.Image, limits: ImageLimits) -> Image.Image:
    label = f"<PIL.Image {image.mode} {image.size[0]}x{image.size[1]}>"
    _check_pixels(image.size, label, limits)
    try:
        image.load()  # a lazily opened caller image: decode errors become ours
        out = _orient(image)  # exif_transpose returns a new image (a copy when nothing to do)
        rgb = to_rgb(out)
    except JvlmError:
        raise
    except Exception as exc:
        raise ImageError(f"cannot decode image {label}: {exc}") from exc
    rgb.load()
    return rgb


# --------------------------------------------------------------------------------------------
# decoding


def _decode(data: bytes, label: str, limits: ImageLimits) -> Image.Image:
    if not data:
        raise ImageError(f"image {label} is empty")
    if len(data) > limits.max_bytes:
        raise ImageTooLargeError(
            f"image {label} is {len(data):,} bytes, over the limit of {limits.max_bytes:,} bytes"
        )
    try:
        # Our own max_pixels check replaces PIL's bomb *warning*; its hard error is mapped below.
        # (catch_warnings is process-global; at worst a racing thread keeps this ignore filter.)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=_formats(limits))  # reads the header only
            _check_pixels(image.size, label, limits)
            image.load()  # frame 0 of animated images
            _check_pixels(image.size, label, limits)  # a few decoders only know the final size now
            rgb = to_rgb(_orient(image))
    except JvlmError:
        raise
    except Image.DecompressionBombError as exc:  # Pillow's own hard limit (~179M pixels) hit before ours
        size = re.search(r"\((\d+) pixels\)", str(exc))
        pixels = f"{int(size.group(1)):,} pixels" if size else "more pixels than Pillow opens"
        raise ImageTooLargeError(
            f"image {label} is {pixels}, over the limit of {limits.max_pixels:,} pixels") from exc
    except Image.UnidentifiedImageError as exc:
        known = "" if limits.formats is None else f"; accepted: {', '.join(_formats(limits))}"
        raise ImageError(f"image {label} is not a recognised image format (or its header is damaged{known})") from exc
    except Exception as exc:  # truncated or corrupt data: OSError, SyntaxError, ValueError, ...
        raise ImageError(f"cannot decode image {label}: {type(exc).__name__}: {exc}") from exc
    rgb.load()
    return rgb


def _formats(limits: ImageLimits) -> list[str] | None:
    if limits.formats is None:
        return None
    Image.init()
    return [f for f in limits.formats if f in Image.OPEN]


def _check_pixels(size: tuple[int, int], label: str, limits: ImageLimits) -> None:
    width, height = size
    if width <= 0 or height <= 0:
        raise ImageError(f"image {label} has zero size ({width}x{height})")
    if width * height > limits.max_pixels:
        raise ImageTooLargeError(
            f"image {label} is {width}x{height} = {width * height:,} pixels, over the limit of "
            f"{limits.max_pixels:,} pixels"
        )


def _orient(image: Image.Image) -> Image.Image:
    """Apply the EXIF orientation; a corrupt EXIF block leaves the pixels as stored."""
    try:
        return ImageOps.exif_transpose(image)
    except Exception:  # noqa: BLE001 - metadata problems must not reject a decodable image
        return image.copy()


def _to_uint8(image: Image.Image) -> np.ndarray:
    """Map a 16-bit, 32-bit integer or float single-channel image to uint8 [H, W]."""
    a = np.asarray(image).astype(np.float64)
    if image.mode.startswith("I;16"):
        scale = 65535.0
    else:
        finite = a[np.isfinite(a)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
        if lo >= 0 and hi <= 1.0 and image.mode == "F":
            scale = 1.0  # float images in [0, 1]
        elif lo >= 0 and hi <= 255:
            scale = 255.0  # 8-bit values stored in a wide mode (e.g. L converted to I or F)
        elif lo >= 0 and hi <= 65535:
            scale = 65535.0  # 16-bit data
        else:  # anything else (negative, > 16 bits): stretch the observed range
            a = (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)
            scale = 1.0
    a = np.nan_to_num(a / scale, nan=0.0, posinf=1.0, neginf=0.0)
    return np.rint(np.clip(a, 0.0, 1.0) * 255.0).astype(np.uint8)


def _short(text: str, limit: int = 80) -> str:
    """A source string short enough for an error message (data URIs can be megabytes)."""
    if len(text) <= limit:
        return text
    return f"{text[: limit - 20]}...({len(text):,} chars)"
