"""A generated corpus of awkward, broken and hostile image files, each with its expected outcome.

Nothing binary is checked in: every file is made here with Pillow plus byte surgery. Each case is
loaded as bytes, as a file and as a data URI, and must give the same outcome: an RGB image that
passes the case's checks, or exactly the listed error class. Images that load also go through the
full ``preprocess_image`` path, where they either work (with ``count_image_tokens`` agreeing) or
raise ``ImageError`` (aspect ratio over 200, as in the official processor).
"""

from __future__ import annotations

import base64
import io
import struct
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pytest
from PIL import Image, features

from jvlm.errors import ImageError, ImageTooLargeError
from jvlm.images.fetch import ImageLimits, load_image
from jvlm.images.tiling import ImageProcessorConfig, ImageTokenIds, count_image_tokens, preprocess_image

RED, GREEN, BLUE, WHITE, GREY = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255), (128, 128, 128)
CONFIG = ImageProcessorConfig()
TOKEN_IDS = ImageTokenIds(patch=1, start=2, end=3, col=4)


# --------------------------------------------------------------------------------------------
# generators


def enc(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def solid(color=RED, size=(16, 12), mode="RGB") -> Image.Image:
    return Image.new(mode, size, color)


def noise(size=(64, 48)) -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), np.uint8))


def frames(fmt: str, **kw) -> bytes:
    first, *rest = [solid(c, (8, 8)) for c in (RED, GREEN, BLUE)]
    return enc(first, fmt, save_all=True, append_images=rest, **kw)


def corner_marked(size=(40, 20)) -> Image.Image:
    """Grey with a red 12x12 block in the stored top-left corner: shows where EXIF rotation puts it."""
    a = np.full((size[1], size[0], 3), 128, np.uint8)
    a[:12, :12] = RED
    return Image.fromarray(a)


def with_orientation(value: int, fmt: str = "JPEG") -> bytes:
    exif = Image.Exif()
    exif[0x0112] = value
    return enc(corner_marked(), fmt, exif=exif, **({"quality": 95} if fmt == "JPEG" else {}))


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_declaring(width: int, height: int, idat: bytes = b"", depth: int = 8, color_type: int = 2) -> bytes:
    """A PNG whose valid IHDR declares width x height, with (by default) no pixel data at all."""
    ihdr = struct.pack(">IIBBBBB", width, height, depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + (chunk(b"IDAT", idat) if idat else b"") + chunk(b"IEND", b"")


def png_bomb_with_data(width: int, height: int) -> bytes:
    """A complete, valid 1-bit PNG of zeros: a few hundred KB that would decode to width x height RGB pixels."""
    row = b"\x00" * (1 + -(-width // 8))
    z = zlib.compressobj(1)
    data = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    return png_declaring(width, height, data, depth=1, color_type=0)


def gif_declaring(width: int, height: int) -> bytes:
    screen = struct.pack("<HHBBB", width, height, 0x80, 0, 0) + b"\x00\x00\x00\xff\xff\xff"
    image = b"," + struct.pack("<HHHHB", 0, 0, width, height, 0) + b"\x02\x02\x4c\x01\x00"
    return b"GIF89a" + screen + image + b";"


def bmp_declaring(width: int, height: int) -> bytes:
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 2835, 2835, 0, 0)
    return b"BM" + struct.pack("<IHHI", 14 + len(info), 0, 0, 14 + len(info)) + info


def tiff_declaring(width: int, height: int) -> bytes:
    """Little-endian baseline TIFF header: 8-bit greyscale, one strip of 1 byte."""
    tags = [(256, 4, width), (257, 4, height), (258, 3, 8), (259, 3, 1), (262, 3, 1), (273, 4, 0),
            (277, 3, 1), (278, 4, height), (279, 4, 1)]
    ifd_size = 2 + 12 * len(tags) + 4
    data_offset = 8 + ifd_size
    tags[5] = (273, 4, data_offset)
    ifd = struct.pack("<H", len(tags)) + b"".join(struct.pack("<HHII", t, k, 1, v) for t, k, v in tags)
    return b"II*\x00" + struct.pack("<I", 8) + ifd + struct.pack("<I", 0) + b"\x00"


def jpeg_declaring(width: int, height: int) -> bytes:
    """A small valid JPEG whose SOF0 frame header is patched to claim width x height."""
    data = bytearray(enc(solid(RED, (8, 8)), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def webp_declaring(width: int, height: int) -> bytes:
    """A lossless 1x1 WebP whose VP8L header is patched to claim width x height (14 bits each)."""
    data = bytearray(enc(solid(RED, (1, 1)), "WEBP", lossless=True))
    at = data.index(b"VP8L") + 9  # fourcc, chunk size, 0x2f signature
    bits = struct.unpack("<I", data[at : at + 4])[0] & ~((1 << 28) - 1)
    data[at : at + 4] = struct.pack("<I", bits | (width - 1) | ((height - 1) << 14))
    return bytes(data)


def truncated(data: bytes, fraction: float) -> bytes:
    return data[: max(1, int(len(data) * fraction))]


def zeroed(data: bytes, fraction: float, count: int = 16) -> bytes:
    out = bytearray(data)
    at = int(len(out) * fraction)
    out[at : at + count] = bytes(count)
    return bytes(out)


def gif_bad_lzw() -> bytes:
    """A GIF whose LZW minimum code size (after the 0,0 image descriptor) is an impossible 12."""
    data = bytearray(enc(noise(), "GIF"))
    data[data.index(b"\x2c\x00\x00\x00\x00") + 10] = 12
    return bytes(data)


def bad_png_crc() -> bytes:
    data = bytearray(enc(noise(), "PNG"))
    data[29] ^= 0xFF  # last byte of the IHDR CRC
    return bytes(data)


def jpeg_with_garbage_exif() -> bytes:
    data = enc(corner_marked(), "JPEG", quality=95)
    junk = b"Exif\x00\x00" + b"MM\x00\x2a\x00\x00\x00\x08" + b"\xff" * 40
    return data[:2] + b"\xff\xe1" + struct.pack(">H", len(junk) + 2) + junk + data[2:]


def transparent_gif() -> bytes:
    image = Image.new("P", (4, 4), 1)
    image.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    return enc(image, "GIF", transparency=1)


def palette_png(transparent: bool = False) -> bytes:
    image = Image.new("P", (4, 4), 1)
    image.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    return enc(image, "PNG", **({"transparency": 1} if transparent else {}))


def la_png() -> bytes:
    image = Image.new("LA", (2, 1))
    image.putpixel((0, 0), (100, 255))
    image.putpixel((1, 0), (100, 0))
    return enc(image, "PNG")


def i16(fmt: str) -> bytes:
    return enc(Image.fromarray(np.array([[0, 32896, 65535]], dtype=np.uint16)), fmt)


# --------------------------------------------------------------------------------------------
# the table


@dataclass
class Case:
    id: str
    make: Callable[[], bytes]
    error: type[Exception] | None = None  # None: must load
    size: tuple[int, int] | None = None  # (width, height) of the loaded image
    pixels: dict[tuple[int, int], tuple[int, int, int]] = field(default_factory=dict)  # (x, y) -> RGB
    tol: int = 0
    limits: ImageLimits | None = None
    preprocess_error: type[Exception] | None = None  # expected from preprocess_image (None: works)
    needs: str | None = None  # a Pillow feature / codec the case needs
    fast: bool = False  # must be refused in well under a second (bombs: by declared size, before decoding)


# (x, y) pixel checks for a 40x20 corner_marked() image shown per EXIF orientation: where the red block goes
_W, _H = 40, 20
_CORNERS = {
    1: ((_W, _H), (2, 2)),  # stored as displayed
    2: ((_W, _H), (_W - 3, 2)),  # mirrored left-right
    3: ((_W, _H), (_W - 3, _H - 3)),  # rotated 180
    4: ((_W, _H), (2, _H - 3)),  # mirrored top-bottom
    5: ((_H, _W), (2, 2)),  # transposed
    6: ((_H, _W), (_H - 3, 2)),  # rotated 90 clockwise
    7: ((_H, _W), (_H - 3, _W - 3)),  # transversed
    8: ((_H, _W), (2, _W - 3)),  # rotated 90 counter-clockwise
}


def _orientation_case(value: int, fmt: str = "JPEG") -> Case:
    size, red_at = _CORNERS[value]
    w, h = size
    far = (w - 1 - red_at[0], h - 1 - red_at[1])  # the opposite corner stays grey
    return Case(f"exif-orientation-{value}-{fmt.lower()}", lambda: with_orientation(value, fmt), size=size,
                pixels={red_at: RED, far: GREY}, tol=40)


CASES = [
    # ---- valid files of every supported format
    Case("png-rgb", lambda: enc(solid(), "PNG"), size=(16, 12), pixels={(0, 0): RED}),
    Case("jpeg-rgb", lambda: enc(solid(), "JPEG", quality=95), size=(16, 12), pixels={(5, 5): RED}, tol=6),
    Case("webp-lossy", lambda: enc(solid(), "WEBP"), size=(16, 12), pixels={(5, 5): RED}, tol=12, needs="webp"),
    Case("webp-lossless", lambda: enc(solid(), "WEBP", lossless=True), size=(16, 12), pixels={(0, 0): RED},
         needs="webp"),
    Case("gif", lambda: enc(solid(), "GIF"), size=(16, 12), pixels={(0, 0): RED}),
    Case("bmp", lambda: enc(solid(), "BMP"), size=(16, 12), pixels={(0, 0): RED}),
    Case("tiff-raw", lambda: enc(solid(), "TIFF"), size=(16, 12), pixels={(0, 0): RED}),
    Case("tiff-lzw", lambda: enc(solid(), "TIFF", compression="tiff_lzw"), size=(16, 12), pixels={(0, 0): RED},
         needs="libtiff"),
    Case("tiff-deflate", lambda: enc(solid(), "TIFF", compression="tiff_adobe_deflate"), size=(16, 12),
         pixels={(0, 0): RED}, needs="libtiff"),
    Case("avif", lambda: enc(solid(), "AVIF", quality=90), size=(16, 12), pixels={(5, 5): RED}, tol=20, needs="avif"),
    Case("ppm", lambda: enc(solid(), "PPM"), size=(16, 12), pixels={(0, 0): RED}),
    Case("ico", lambda: enc(solid(RED, (32, 32)), "ICO", sizes=[(32, 32)]), size=(32, 32), pixels={(0, 0): RED}),
    # ---- animated / multi-page: the first frame
    Case("gif-animated", lambda: frames("GIF", duration=50, loop=0), size=(8, 8), pixels={(4, 4): RED}),
    Case("webp-animated", lambda: frames("WEBP", lossless=True, duration=50), size=(8, 8), pixels={(4, 4): RED},
         needs="webp"),
    Case("apng", lambda: frames("PNG", duration=50), size=(8, 8), pixels={(4, 4): RED}),
    Case("tiff-multipage", lambda: frames("TIFF"), size=(8, 8), pixels={(4, 4): RED}),
    # ---- modes
    Case("cmyk-jpeg", lambda: enc(solid((0, 255, 255, 0), (8, 8), "CMYK"), "JPEG", quality=100), size=(8, 8),
         pixels={(4, 4): RED}, tol=3),
    Case("cmyk-tiff", lambda: enc(solid((0, 255, 255, 0), (8, 8), "CMYK"), "TIFF"), pixels={(4, 4): RED}),
    Case("p-png", lambda: palette_png(), pixels={(0, 0): (10, 200, 30)}),
    Case("p-png-transparent", lambda: palette_png(True), pixels={(0, 0): WHITE}),
    Case("p-gif-transparent", transparent_gif, pixels={(0, 0): WHITE}),
    Case("la-png", la_png, size=(2, 1), pixels={(0, 0): (100, 100, 100), (1, 0): WHITE}),
    Case("rgba-png", lambda: enc(solid((255, 0, 0, 128), (2, 2), "RGBA"), "PNG"), pixels={(0, 0): (255, 127, 127)},
         tol=1),
    Case("rgba-webp-clear", lambda: enc(solid((0, 0, 255, 0), (4, 4), "RGBA"), "WEBP", lossless=True),
         pixels={(1, 1): WHITE}, needs="webp"),
    Case("i16-png", lambda: i16("PNG"), size=(3, 1), pixels={(0, 0): (0, 0, 0), (1, 0): (128,) * 3,
                                                           (2, 0): WHITE}),
    Case("i16-tiff", lambda: i16("TIFF"), size=(3, 1), pixels={(1, 0): (128,) * 3, (2, 0): WHITE}),
    Case("f-tiff", lambda: enc(Image.fromarray(np.array([[0.0, 1.0]], np.float32), "F"), "TIFF"),
         pixels={(0, 0): (0, 0, 0), (1, 0): WHITE}),
    Case("1bit-png", lambda: enc(solid(1, (9, 9), "1"), "PNG"), pixels={(4, 4): WHITE}),
    Case("1bit-bmp", lambda: enc(solid(0, (9, 9), "1"), "BMP"), pixels={(4, 4): (0, 0, 0)}),
    Case("1bit-tiff-group4", lambda: enc(solid(1, (9, 9), "1"), "TIFF", compression="group4"),
         pixels={(4, 4): WHITE}, needs="libtiff"),
    Case("l-jpeg", lambda: enc(solid(77, (8, 8), "L"), "JPEG", quality=100), pixels={(4, 4): (77, 77, 77)}, tol=2),
    Case("lab-tiff", lambda: enc(solid((50, 0, 0), (4, 4), "LAB"), "TIFF"), size=(4, 4)),
    # ---- EXIF orientation
    *[_orientation_case(v) for v in range(1, 9)],
    _orientation_case(6, "PNG"),
    _orientation_case(8, "WEBP"),
    Case("exif-orientation-9-invalid", lambda: with_orientation(9), size=(40, 20), pixels={(2, 2): RED}, tol=40),
    Case("exif-garbage", jpeg_with_garbage_exif, size=(40, 20), pixels={(2, 2): RED}, tol=40),
    # ---- sizes and aspect ratios
    Case("1x1", lambda: enc(solid(RED, (1, 1)), "PNG"), size=(1, 1), pixels={(0, 0): RED}),
    Case("1x1-gif", lambda: enc(solid(RED, (1, 1)), "GIF"), size=(1, 1)),
    Case("200x1", lambda: enc(solid(RED, (200, 1)), "PNG"), size=(200, 1)),
    Case("2000x10", lambda: enc(solid(RED, (2000, 10)), "PNG"), size=(2000, 10)),
    Case("201x1", lambda: enc(solid(RED, (201, 1)), "PNG"), size=(201, 1), preprocess_error=ImageError),
    Case("10000x10", lambda: enc(solid(RED, (10000, 10)), "PNG"), size=(10000, 10), preprocess_error=ImageError),
    Case("10x10000", lambda: enc(solid(RED, (10, 10000)), "PNG"), size=(10, 10000), preprocess_error=ImageError),
    Case("65500x1-jpeg", lambda: enc(solid(RED, (65500, 1)), "JPEG"), size=(65500, 1), preprocess_error=ImageError),
    # ---- decompression bombs: refused by declared size, before any pixel is decoded
    Case("bomb-png-50000x50000", lambda: png_declaring(50000, 50000), ImageTooLargeError, fast=True),
    Case("bomb-png-with-data", lambda: png_bomb_with_data(20000, 20000), ImageTooLargeError, fast=True),
    Case("bomb-gif-65535x65535", lambda: gif_declaring(65535, 65535), ImageTooLargeError, fast=True),
    Case("bomb-bmp-50000x50000", lambda: bmp_declaring(50000, 50000), ImageTooLargeError, fast=True),
    Case("bomb-bmp-top-down", lambda: bmp_declaring(50000, -50000), ImageTooLargeError, fast=True),
    Case("bomb-tiff-50000x50000", lambda: tiff_declaring(50000, 50000), ImageTooLargeError, fast=True),
    Case("bomb-jpeg-65000x65000", lambda: jpeg_declaring(65000, 65000), ImageTooLargeError, fast=True),
    Case("bomb-webp-16384x16384", lambda: webp_declaring(16384, 16384), ImageTooLargeError, fast=True,
         needs="webp"),
    Case("bomb-under-own-limit", lambda: enc(noise((64, 64)), "PNG"), ImageTooLargeError,
         limits=ImageLimits(max_pixels=64 * 64 - 1), fast=True),
    Case("at-own-pixel-limit", lambda: enc(noise((64, 64)), "PNG"), size=(64, 64),
         limits=ImageLimits(max_pixels=64 * 64)),
    Case("over-own-byte-limit", lambda: enc(noise((64, 64)), "PNG"), ImageTooLargeError,
         limits=ImageLimits(max_bytes=1000), fast=True),
    # ---- truncated files
    *[Case(f"truncated-{name}-{frac}", lambda fmt=fmt, frac=frac, kw=kw: truncated(enc(noise(), fmt, **kw), frac),
           ImageError, needs=need)
      for name, fmt, kw, need in [("jpeg", "JPEG", {}, None), ("png", "PNG", {}, None), ("webp", "WEBP", {}, "webp"),
                                  ("gif", "GIF", {}, None), ("bmp", "BMP", {}, None), ("tiff", "TIFF", {}, None),
                                  ("tiff-lzw", "TIFF", {"compression": "tiff_lzw"}, "libtiff")]
      for frac in (0.02, 0.5, 0.95)],
    # ---- corrupt files
    Case("corrupt-png-idat", lambda: zeroed(enc(noise(), "PNG"), 0.5), ImageError),
    Case("corrupt-png-ihdr-crc", bad_png_crc, ImageError),
    Case("corrupt-jpeg-header", lambda: bytes(b ^ 0xFF if 2 <= i < 40 else b
                                              for i, b in enumerate(enc(noise(), "JPEG"))), ImageError),
    Case("corrupt-gif-lzw", gif_bad_lzw, ImageError),
    Case("corrupt-tiff-lzw", lambda: zeroed(enc(noise(), "TIFF", compression="tiff_lzw"), 0.3), ImageError,
         needs="libtiff"),
    Case("corrupt-webp-riff", lambda: b"RIFF\xff\xff\xff\xffWEBPVP8 " + b"\x00" * 40, ImageError, needs="webp"),
    Case("corrupt-bmp-header", lambda: enc(solid(), "BMP")[:14] + b"\xff" * 40, ImageError),
    Case("corrupt-zero-size-png", lambda: png_declaring(0, 0), ImageError),
    Case("declared-but-empty-png", lambda: png_declaring(65535, 1), ImageError),
    # tolerant decoders: damage inside the entropy-coded / raw pixel data still gives an image
    Case("damaged-jpeg-scan", lambda: zeroed(enc(noise(), "JPEG"), 0.6), size=(64, 48)),
    Case("damaged-bmp-pixels", lambda: zeroed(enc(noise(), "BMP"), 0.6), size=(64, 48)),
    # ---- not images, or formats deliberately not decoded
    Case("empty-file", lambda: b"", ImageError),
    Case("png-signature-only", lambda: b"\x89PNG\r\n\x1a\n", ImageError),
    Case("text", lambda: b"hello, I am not an image\n", ImageError),
    Case("svg", lambda: b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>', ImageError),
    Case("html", lambda: b"<!doctype html><html><body>hi</body></html>", ImageError),
    Case("eps-needs-ghostscript", lambda: b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n", ImageError),
    Case("psd-not-accepted", lambda: b"8BPS\x00\x01" + b"\x00" * 6 + struct.pack(">HIIHH", 3, 8, 8, 8, 3)
         + b"\x00" * 64, ImageError),
    Case("jpeg-when-only-png-accepted", lambda: enc(solid(), "JPEG"), ImageError, limits=ImageLimits(formats=("PNG",))),
]


def _available(need: str | None) -> bool:
    if need is None:
        return True
    if need == "libtiff":
        return features.check_codec("libtiff")
    return bool(features.check(need))


def _params(cases: list[Case]) -> list:
    return [pytest.param(c, id=c.id, marks=pytest.mark.skipif(not _available(c.needs), reason=f"needs {c.needs}"))
            for c in cases]


# Pillow warns (UserWarning) about some of the damage it works around, e.g. corrupt EXIF blocks.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:PIL")


def _sources(data: bytes, tmp_path) -> dict[str, object]:
    path = tmp_path / "image.bin"
    path.write_bytes(data)
    return {"bytes": data, "path": path, "data-uri": "data:image/png;base64," + base64.b64encode(data).decode()}


@pytest.mark.parametrize("case", _params(CASES))
def test_corpus_case(case: Case, tmp_path):
    data = case.make()
    for kind, source in _sources(data, tmp_path).items():
        start = time.perf_counter()
        if case.error is not None:
            with pytest.raises(ImageError) as info:
                load_image(source, limits=case.limits)
            assert type(info.value) is case.error, f"{kind}: {type(info.value).__name__}: {info.value}"
            if case.error is ImageTooLargeError:  # jvlm's own limit is named, never Pillow's bomb message
                assert "over the limit of" in str(info.value) and "decompression" not in str(info.value), info.value
            if case.fast:
                assert time.perf_counter() - start < 0.5, kind
            continue
        image = load_image(source, limits=case.limits)
        assert image.mode == "RGB", kind
        if case.size:
            assert image.size == case.size, kind
        a = np.asarray(image).astype(int)
        for (x, y), rgb in case.pixels.items():
            assert np.abs(a[y, x] - rgb).max() <= case.tol, f"{kind}: pixel {(x, y)} is {a[y, x]}, expected {rgb}"


@pytest.mark.parametrize("case", _params([c for c in CASES if c.error is None]))
def test_corpus_preprocess(case: Case):
    """Whatever loads also goes through the full processor: it works, or it is a clear ImageError."""
    image = load_image(case.make(), limits=case.limits)
    if case.preprocess_error is not None:
        with pytest.raises(ImageError) as info:
            preprocess_image(image, CONFIG, TOKEN_IDS)
        assert type(info.value) is case.preprocess_error and "aspect ratio" in str(info.value)
        with pytest.raises(ImageError):
            count_image_tokens(*image.size, CONFIG)
        return
    inputs = preprocess_image(image, CONFIG, TOKEN_IDS, max_crops=4)
    assert len(inputs.tokens) == count_image_tokens(*image.size, CONFIG, max_crops=4)
    assert inputs.crops.shape[0] == inputs.tiling[0] * inputs.tiling[1] + 1
    assert bool(inputs.crops.isfinite().all())


def test_eps_never_reaches_ghostscript(monkeypatch):
    """EPS is outside the default formats, so Pillow's Ghostscript call cannot be reached with hostile bytes."""
    from PIL import EpsImagePlugin

    def fail(*args, **kwargs):
        raise AssertionError("Ghostscript was invoked")

    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", fail)
    with pytest.raises(ImageError, match="not a recognised image format"):
        load_image(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n")
