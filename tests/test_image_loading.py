"""load_image: every source kind, EXIF, mode conversion, and each failure as a typed error.

All images are generated here; URLs are served by a local http.server thread.
"""

from __future__ import annotations

import base64
import io
import socket
import struct
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jvlm.errors import ImageError, ImageFetchError, ImageTooLargeError, InvalidRequestError
from jvlm.images.fetch import ImageLimits, UrlPolicy, image_digest, load_image


def encode(image: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def sample(width: int = 24, height: int = 16) -> Image.Image:
    a = np.zeros((height, width, 3), np.uint8)
    a[..., 0] = np.arange(width)[None] * 10
    a[..., 1] = np.arange(height)[:, None] * 15
    a[..., 2] = 200
    return Image.fromarray(a, "RGB")


def png_header_only(width: int, height: int) -> bytes:
    """A PNG with a valid IHDR (correct CRC) declaring width x height and no pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def assert_rgb_equal(image: Image.Image, expected: Image.Image) -> None:
    assert image.mode == "RGB" and image.size == expected.size
    assert np.array_equal(np.asarray(image), np.asarray(expected))


# --------------------------------------------------------------------------------------------
# local sources


def test_path_str_and_pathlib(tmp_path: Path):
    img = sample()
    path = tmp_path / "a.png"
    path.write_bytes(encode(img))
    assert_rgb_equal(load_image(str(path)), img)
    loaded = load_image(path)
    assert_rgb_equal(loaded, img)
    path.unlink()  # fully loaded: the file is no longer needed
    assert loaded.tobytes() == img.tobytes()


def test_bytes_and_data_uri():
    img = sample()
    data = encode(img)
    assert_rgb_equal(load_image(data), img)
    assert_rgb_equal(load_image(bytearray(data)), img)
    uri = "data:image/png;base64," + base64.b64encode(data).decode()
    assert_rgb_equal(load_image(uri), img)
    b64 = base64.b64encode(data).decode()
    wrapped = "data:image/png;base64," + "\n".join(b64[i : i + 60] for i in range(0, len(b64), 60))
    assert_rgb_equal(load_image(wrapped), img)  # MIME-style line breaks are tolerated
    assert_rgb_equal(load_image("DATA:image/PNG;BASE64," + b64.rstrip("=")), img)  # no padding


def test_pil_input_is_copied_not_mutated():
    rgb = sample()
    out = load_image(rgb)
    assert out is not rgb
    assert_rgb_equal(out, rgb)
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    before = rgba.tobytes()
    out = load_image(rgba)
    assert out.mode == "RGB" and rgba.mode == "RGBA" and rgba.tobytes() == before


def test_exif_orientation_applied():
    a = np.zeros((20, 40, 3), np.uint8)  # stored 40 wide x 20 high
    a[:, :20] = (255, 0, 0)  # left half red
    a[:, 20:] = (0, 0, 255)  # right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    data = encode(Image.fromarray(a), "JPEG", exif=exif, quality=95)
    out = load_image(data)
    assert out.size == (20, 40)
    top, bottom = np.asarray(out)[5, 10], np.asarray(out)[35, 10]
    assert top[0] > 200 and top[2] < 60  # red went to the top
    assert bottom[2] > 200 and bottom[0] < 60


def test_mode_conversions():
    cmyk = Image.new("CMYK", (4, 4), (0, 255, 255, 0))
    assert np.asarray(load_image(cmyk))[0, 0].tolist() == [255, 0, 0]
    assert np.asarray(load_image(encode(cmyk, "JPEG", quality=100)))[0, 0].tolist() == pytest.approx(
        [255, 0, 0], abs=3
    )

    pal = Image.new("P", (4, 4), 1)
    pal.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    assert np.asarray(load_image(encode(pal)))[0, 0].tolist() == [10, 200, 30]
    pal_t = pal.copy()
    pal_t.info["transparency"] = 1
    assert np.asarray(load_image(encode(pal_t)))[0, 0].tolist() == [255, 255, 255]

    la = Image.new("LA", (2, 1))
    la.putpixel((0, 0), (100, 255))
    la.putpixel((1, 0), (100, 0))
    assert np.asarray(load_image(encode(la)))[0].tolist() == [[100] * 3, [255] * 3]

    rgba = Image.new("RGBA", (2, 2), (255, 0, 0, 128))
    assert np.asarray(load_image(encode(rgba)))[0, 0].tolist() == pytest.approx([255, 127, 127], abs=1)

    i16 = Image.fromarray(np.array([[0, 32896, 65535]], dtype=np.uint16))
    assert i16.mode.startswith("I;16")
    assert np.asarray(load_image(encode(i16)))[0, :, 0].tolist() == [0, 128, 255]  # scaled, not clipped

    i32 = Image.fromarray(np.array([[0, 32896, 65535]], dtype=np.int32), "I")
    assert np.asarray(load_image(i32))[0, :, 0].tolist() == [0, 128, 255]
    f32 = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32), "F")
    assert np.asarray(load_image(encode(f32, "TIFF")))[0, :, 0].tolist() == [0, 128, 255]

    one = Image.new("1", (3, 3), 1)
    assert np.asarray(load_image(encode(one)))[1, 1].tolist() == [255, 255, 255]
    assert np.asarray(load_image(Image.new("L", (2, 2), 77)))[0, 0].tolist() == [77, 77, 77]


def test_animated_gif_first_frame():
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert Image.open(io.BytesIO(data)).n_frames == 3
    out = load_image(data)
    assert out.mode == "RGB" and np.asarray(out)[4, 4].tolist() == [255, 0, 0]


def test_image_digest():
    a, b = sample(), sample()
    assert image_digest(a) == image_digest(b)
    b.putpixel((0, 0), (1, 2, 3))
    assert image_digest(a) != image_digest(b)
    assert image_digest(Image.new("RGB", (4, 2))) != image_digest(Image.new("RGB", (2, 4)))
    assert len(image_digest(a)) == 64


# --------------------------------------------------------------------------------------------
# local failures


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated(fmt):
    data = encode(Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8)), fmt)
    with pytest.raises(ImageError, match="bytes"):
        load_image(data[: len(data) // 2])


@pytest.mark.parametrize("data", [b"", b"\x00" * 10, np.random.default_rng(1).bytes(4096)])
def test_not_an_image(data):
    with pytest.raises(ImageError):
        load_image(data)


def test_zero_size():
    with pytest.raises(ImageError, match="zero size"):
        load_image(Image.new("RGB", (0, 0)))
    with pytest.raises(ImageError):
        load_image(png_header_only(0, 0))


def test_missing_path_and_directory(tmp_path: Path):
    missing = tmp_path / "nope.png"
    with pytest.raises(ImageError, match="image file not found: .*nope.png"):
        load_image(str(missing))
    with pytest.raises(ImageError, match="directory"):
        load_image(tmp_path)


def test_bad_data_uris():
    with pytest.raises(ImageError, match="base64"):
        load_image("data:image/png;base64,!!!not*base64!!!")
    with pytest.raises(ImageError, match="not an image"):
        load_image("data:text/plain;base64,aGVsbG8=")
    long_uri = "data:image/png;base64," + "A" * 1_000_000 + "*"
    with pytest.raises(ImageError) as info:
        load_image(long_uri)
    assert len(str(info.value)) < 300  # the message quotes a truncated source


@pytest.mark.parametrize("source", [42, {"url": "x"}, None, [b"x"]])
def test_wrong_type(source):
    with pytest.raises(ImageError, match=type(source).__name__):
        load_image(source)


@pytest.mark.parametrize("source", ["ftp://example.com/a.png", "file:///tmp/a.png", "s3://b/k.png"])
def test_unsupported_scheme(source):
    with pytest.raises(ImageError, match=repr(source.split(":")[0])):
        load_image(source)


def test_huge_declared_size_rejected_before_decoding():
    for width, height in [(50000, 50000), (10000, 10000), (8000, 8000)]:
        start = time.perf_counter()
        with pytest.raises(ImageTooLargeError):
            load_image(png_header_only(width, height))
        assert time.perf_counter() - start < 0.5
    with pytest.raises(ImageTooLargeError, match="64,000,000 pixels.*50,000,000"):
        load_image(png_header_only(8000, 8000))
    with pytest.raises(ImageTooLargeError, match="384 pixels"):
        load_image(encode(sample()), limits=ImageLimits(max_pixels=100))
    with pytest.raises(ImageTooLargeError):
        load_image(sample(), limits=ImageLimits(max_pixels=100))


def test_byte_limit(tmp_path: Path):
    data = encode(sample())
    limits = ImageLimits(max_bytes=len(data) - 1)
    path = tmp_path / "a.png"
    path.write_bytes(data)
    for source in (data, path, "data:image/png;base64," + base64.b64encode(data).decode()):
        with pytest.raises(ImageTooLargeError, match=f"{limits.max_bytes:,}"):
            load_image(source, limits=limits)
    assert load_image(data, limits=ImageLimits(max_bytes=len(data))).size == (24, 16)


@pytest.mark.parametrize(("setting", "value"), [
    ("max_bytes", -1), ("max_bytes", True), ("max_pixels", 0), ("fetch_timeout", "5"), ("fetch_timeout", 0),
    ("max_redirects", -1), ("formats", "PNG"),
])
def test_bad_limits_are_typed_errors_naming_the_setting(setting, value):
    with pytest.raises(InvalidRequestError, match=f"ImageLimits.{setting}"):  # still a ValueError, as before
        ImageLimits(**{setting: value})


# --------------------------------------------------------------------------------------------
# URLs


PNG = encode(sample())
LOCAL = UrlPolicy(allow_private=True)  # the test server listens on loopback, refused by the default policy


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):  # keep test output clean
        pass

    def _send(self, status: int, ctype: str, body: bytes, length: bool = True) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        if length:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):  # noqa: N802 - http.server API
        try:
            self._route()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client hung up on purpose (size / time limits)

    def _route(self):
        path = self.path
        if path == "/img.png":
            self._send(200, "image/png", PNG)
        elif path == "/octet":
            self._send(200, "application/octet-stream", PNG, length=False)
        elif path == "/redirect":
            self.send_response(302)
            self.send_header("Location", "/img.png")
            self.end_headers()
        elif path == "/loop":
            self.send_response(302)
            self.send_header("Location", "/loop")
            self.end_headers()
        elif path == "/page":
            self._send(200, "text/html; charset=utf-8", b"<html>hi</html>")
        elif path == "/big":
            self._send(200, "image/png", PNG + b"\x00" * 200_000)
        elif path == "/endless":  # no Content-Length: only the streamed byte count can stop it
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()
            self.wfile.write(PNG)
            for _ in range(100_000):
                self.wfile.write(b"\x00" * 16384)
        elif path == "/slow":
            time.sleep(3)
            self._send(200, "image/png", PNG)
        else:
            self._send(404, "text/plain", b"not found")


@pytest.fixture(scope="module")
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_url_ok(server):
    assert_rgb_equal(load_image(f"{server}/img.png", policy=LOCAL), sample())
    assert_rgb_equal(load_image(f"{server}/redirect", policy=LOCAL), sample())
    assert_rgb_equal(load_image(f"{server}/octet", policy=LOCAL), sample())  # generic type: decoded by content


def test_url_http_errors(server):
    with pytest.raises(ImageFetchError, match="404"):
        load_image(f"{server}/missing.png", policy=LOCAL)
    with pytest.raises(ImageFetchError, match="text/html"):
        load_image(f"{server}/page", policy=LOCAL)
    with pytest.raises(ImageFetchError, match="redirect"):
        load_image(f"{server}/loop", limits=ImageLimits(max_redirects=3), policy=LOCAL)


def test_url_size_cap(server):
    limits = ImageLimits(max_bytes=100_000, fetch_timeout=5)
    with pytest.raises(ImageFetchError, match="100,000 bytes"):
        load_image(f"{server}/big", limits=limits, policy=LOCAL)
    start = time.perf_counter()
    with pytest.raises(ImageFetchError, match="over the limit of 100,000 bytes"):
        load_image(f"{server}/endless", limits=limits, policy=LOCAL)  # would be a timeout if it kept reading
    assert time.perf_counter() - start < 3


def test_url_timeout(server):
    start = time.perf_counter()
    with pytest.raises(ImageFetchError, match="timed out"):
        load_image(f"{server}/slow", limits=ImageLimits(fetch_timeout=0.3), policy=LOCAL)
    assert time.perf_counter() - start < 2


def test_url_connection_refused():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again when the block ends: nothing listens there
    with pytest.raises(ImageFetchError, match=f"127.0.0.1:{port}.*(ConnectError|refused)"):
        load_image(f"http://127.0.0.1:{port}/x.png", limits=ImageLimits(fetch_timeout=2), policy=LOCAL)
