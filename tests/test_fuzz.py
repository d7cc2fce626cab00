"""Property-based fuzzing: hostile input may only ever produce the documented exceptions.

* image loader: random bytes, mutated valid files, random source strings -> an RGB image or ``ImageError``;
* geometry: random sizes through ``preprocess_image`` agree with ``count_image_tokens`` (or both refuse);
* processor: random conversation structures through ``vlm.prepare`` -> a ``Prompt`` or ``InvalidRequestError``;
* address checker: any address -> a reason or None, consistent for IPv4-mapped IPv6.

Bounded for CI (small ``max_examples``, no example database); nothing touches the network: DNS and
TCP connects are patched to fail while strings are fuzzed.
"""

from __future__ import annotations

import io
import ipaddress
import os
import socket
import threading
import time
from unittest import mock

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from jvlm.errors import ImageError, ImageFetchError, InvalidRequestError
from jvlm.images.fetch import ImageLimits, UrlPolicy, load_image
from jvlm.images.safe_http import address_block_reason
from jvlm.images.tiling import ImageProcessorConfig, ImageTokenIds, count_image_tokens, preprocess_image
from jvlm.processor import Prompt

# Pillow warns (UserWarning) about damage it works around, e.g. corrupt EXIF or TIFF tags.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:PIL")
SCALE = max(1, int(os.environ.get("JVLM_FUZZ_SCALE", "1")))


def fuzz(examples: int) -> settings:
    """Bounded runs: no deadline (first calls warm up torch), no example database written to the repo.
    JVLM_FUZZ_SCALE=20 multiplies the examples for a deeper run outside CI."""
    return settings(max_examples=examples * SCALE, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow])


# Mutated headers may declare big sizes: keep a fuzz run's decodes small and quick.
LIMITS = ImageLimits(max_pixels=2_000_000, max_bytes=1_000_000, fetch_timeout=1.0)


def _enc(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


_RGB = Image.fromarray(np.random.default_rng(0).integers(0, 256, (12, 16, 3), np.uint8))
SEEDS = [
    _enc(_RGB, "PNG"),
    _enc(_RGB, "JPEG", quality=80),
    _enc(_RGB, "GIF"),
    _enc(_RGB, "BMP"),
    _enc(_RGB, "TIFF"),
    _enc(_RGB, "WEBP"),
    _enc(_RGB, "PPM"),
    _enc(_RGB.convert("RGBA"), "PNG"),
    _enc(_RGB.convert("P"), "PNG", transparency=0),
    _enc(_RGB.convert("CMYK"), "JPEG"),
    _enc(Image.new("1", (9, 9), 1), "TIFF", compression="group4"),
]


def _assert_rgb_or_image_error(source, limits=LIMITS, policy=None) -> None:
    try:
        image = load_image(source, limits=limits, policy=policy)
    except ImageError as exc:
        event(type(exc).__name__)  # outcome statistics: pytest --hypothesis-show-statistics
        return
    event("image")
    assert isinstance(image, Image.Image) and image.mode == "RGB"
    assert image.width >= 1 and image.height >= 1 and image.width * image.height <= limits.max_pixels


# --------------------------------------------------------------------------------------------
# image loader


@fuzz(150)
@given(st.binary(max_size=4096))
def test_random_bytes(data):
    _assert_rgb_or_image_error(data)


@st.composite
def mutated(draw) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["flip", "set", "truncate", "insert", "delete", "header"]))
        at = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and data:
            data[at] = draw(st.sampled_from([0x00, 0xFF, 0x7F, 0x80, 0x01]))
        elif op == "truncate":
            del data[at:]
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=64))
        elif op == "delete":
            del data[at : at + draw(st.integers(1, 64))]
        elif op == "header" and len(data) > 8:  # the first bytes hold sizes, modes, offsets
            i = draw(st.integers(0, min(64, len(data) - 1)))
            data[i] = draw(st.integers(0, 255))
    return bytes(data)


@fuzz(300)
@given(mutated())
def test_mutated_valid_files(data):
    _assert_rgb_or_image_error(data)


_PIECES = st.sampled_from([
    "http://", "https://", "HTTP://", "data:", "data:image/png;base64,", "data:image/png,", "file://", "file:",
    "ftp://", "gopher://", "//", "/", "\\", "..", "%2e%2e/", "%00", "@", ":", "[", "]", "::1", "127.0.0.1",
    "localhost", "169.254.169.254", "0x7f.1", "?", "#", ";base64", ",", "=", " ", "\n", "~", "\ud800", "é",
    "iVBORw0KGgo=", "AAAA", "C:\\",
])


@fuzz(200)
@given(st.lists(st.one_of(_PIECES, st.text(max_size=8)), max_size=8).map("".join))
def test_random_source_strings(tmp_path_factory, source):
    """URL / data URI / file: / path parsing with every door open, DNS and TCP refused (no traffic)."""
    root = tmp_path_factory.getbasetemp()
    policy = UrlPolicy(allow_private=True, allow_file_dir=root)
    with mock.patch("socket.getaddrinfo", side_effect=socket.gaierror("fuzz: no DNS")), \
         mock.patch("socket.create_connection", side_effect=ConnectionRefusedError("fuzz: no network")):
        _assert_rgb_or_image_error(source, policy=policy)
        _assert_rgb_or_image_error(source, policy=UrlPolicy(allow_local_paths=False))


@fuzz(100)
@given(st.one_of(st.binary(max_size=256), st.sampled_from(SEEDS)).map(lambda b: __import__("base64").b64encode(b)),
       st.sampled_from(["image/png", "image/jpeg", "IMAGE/x", "image/", "text/plain", ""]),
       st.sampled_from([";base64", ";BASE64", "", ";charset=utf-8;base64", ";base64;x"]))
def test_random_data_uris(payload, media_type, params):
    _assert_rgb_or_image_error(f"data:{media_type}{params},{payload.decode()}")


class RawServer:
    """Answers every connection on 127.0.0.1 with ``response`` (raw bytes, malformed on purpose), then closes."""

    def __init__(self):
        self.response = b""
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                try:
                    conn.settimeout(2)
                    conn.recv(65536)
                    conn.sendall(self.response)
                except OSError:
                    pass


@pytest.fixture(scope="module")
def raw_server():
    server = RawServer()
    yield server
    server.sock.close()


_HEADER = st.one_of(
    st.sampled_from([b"Content-Type: image/png", b"Content-Type: text/html", b"Content-Type: application/octet-stream",
                     b"Content-Type:", b"Content-Type: image/png; charset=\xff", b"Transfer-Encoding: chunked",
                     b"Content-Encoding: gzip", b"Content-Length: -1", b"Content-Length: 999999999999",
                     b"Content-Length: 12abc", b"Location: /again", b"Location: file:///etc/passwd",
                     b"Location: http://127.0.0.1:1/x", b"Location: //169.254.169.254/", b"Location: http://[::1",
                     b"Location: ", b"Location: \x00\xff", b"X: \r", b"no colon", b" folded: header"]),
    st.integers(0, 5000).map(lambda n: b"Content-Length: %d" % n),
    st.binary(max_size=30).map(lambda v: b"Location: " + v.replace(b"\r", b"").replace(b"\n", b"")),
)


@st.composite
def raw_response(draw) -> bytes:
    status = draw(st.sampled_from([b"HTTP/1.1 200 OK", b"HTTP/1.1 302 Found", b"HTTP/1.0 200", b"HTTP/1.1 301 M",
                                   b"HTTP/1.1 204 No Content", b"HTTP/1.1 999 X", b"HTTP/2 200", b"garbage",
                                   b"HTTP/1.1 500 Oops", b""]))
    headers = draw(st.lists(_HEADER, max_size=5))
    body = draw(st.one_of(st.just(SEEDS[0]), st.binary(max_size=512), st.sampled_from(SEEDS).map(lambda b: b[:40])))
    return b"\r\n".join([status, *headers, b"", body])


@fuzz(60)
@given(raw_response())
def test_malformed_http_responses(raw_server, response):
    """Whatever a (hostile) server answers: an image or an ImageError, within the time limit."""
    raw_server.response = response
    limits = ImageLimits(max_bytes=100_000, fetch_timeout=1.0, max_redirects=2)
    start = time.monotonic()
    _assert_rgb_or_image_error(f"http://127.0.0.1:{raw_server.port}/img.png", limits=limits,
                               policy=UrlPolicy(allowed_hosts=("127.0.0.1",)))
    assert time.monotonic() - start < 2.5


# --------------------------------------------------------------------------------------------
# geometry

CONFIG = ImageProcessorConfig()
TOKEN_IDS = ImageTokenIds(patch=1, start=2, end=3, col=4)


@st.composite
def geometry(draw):
    if draw(st.booleans()):  # anything up to a couple of thousand pixels a side
        width, height = draw(st.integers(1, 2000)), draw(st.integers(1, 2000))
    else:  # thin strips around the aspect-ratio limit of 200
        short, ratio = draw(st.integers(1, 12)), draw(st.integers(150, 260))
        width, height = (short * ratio, short) if draw(st.booleans()) else (short, short * ratio)
    max_crops = draw(st.one_of(st.none(), st.integers(1, 16)))
    max_pixels = draw(st.one_of(st.none(), st.integers(1, 64), st.integers(1, 4_000_000)))
    return width, height, max_crops, max_pixels


@fuzz(40)
@given(geometry())
def test_preprocess_agrees_with_count(args):
    width, height, max_crops, max_pixels = args
    try:
        expected = count_image_tokens(width, height, CONFIG, max_crops=max_crops, max_pixels=max_pixels)
    except ImageError:
        expected = None
    image = Image.new("RGB", (width, height), (90, 30, 200))
    try:
        inputs = preprocess_image(image, CONFIG, TOKEN_IDS, max_crops=max_crops, max_pixels=max_pixels)
    except ImageError:
        assert expected is None, f"preprocess refused {width}x{height} that count_image_tokens accepts"
        return
    assert expected == len(inputs.tokens)
    rows, cols = inputs.tiling
    assert inputs.crops.shape[0] == rows * cols + 1 <= (max_crops or CONFIG.max_crops) + 1
    n_patch = sum(t == TOKEN_IDS.patch for t in inputs.tokens)
    assert int((inputs.patch_index >= 0).sum()) == n_patch  # every <im_patch> is fed exactly once
    assert sorted(inputs.patch_index[inputs.patch_index >= 0].tolist()) == [
        i for i, t in enumerate(inputs.tokens) if t == TOKEN_IDS.patch]


# --------------------------------------------------------------------------------------------
# processor / chat template

_SPECIAL = ["<|image|>", "<|im_start|>", "<|im_end|>", "<im_patch>", "<im_start>", "<im_col>", "{{ 1 }}",
            "{% raise_exception('x') %}", "\x00", "\ud800", "\udfff", "\ufeff", "\u202e", "\r\n"]
TEXT = st.lists(st.one_of(st.text(max_size=12), st.sampled_from(_SPECIAL)), max_size=4).map("".join)
SCALAR = st.one_of(st.none(), st.booleans(), st.integers(-3, 10**12), st.floats(), TEXT, st.binary(max_size=8))
ANY = st.recursive(SCALAR, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                   st.dictionaries(st.one_of(TEXT, st.sampled_from(
                                                       ["type", "text", "image", "url", "role", "content"])), inner,
                                                       max_size=3)), max_leaves=8)


def mostly(valid: st.SearchStrategy, invalid: st.SearchStrategy, odds: int = 8) -> st.SearchStrategy:
    """`valid` about odds/(odds+1) of the time: deep structures stay mostly well formed, so that the
    fuzzer reaches the template, the tokenizer and the image path instead of stopping at the first check."""
    return st.integers(0, odds).flatmap(lambda n: invalid if n == 1 else valid)  # not 0: shrinking goes to valid


_DATA_URI = "data:image/png;base64," + __import__("base64").b64encode(SEEDS[0]).decode()
IMAGE_SOURCE = mostly(st.sampled_from([SEEDS[0], SEEDS[1], _DATA_URI, _RGB]),
                      st.one_of(st.sampled_from(["data:image/png;base64,AAAA", "", "nope.png", "ftp://x/y.png",
                                                 "http://10.0.0.1/x.png", b"junk", 0, [], {}]), ANY), odds=4)
PART = mostly(
    st.one_of(
        st.fixed_dictionaries({"type": st.just("text"), "text": TEXT}),
        st.fixed_dictionaries({"type": st.just("image"), "image": IMAGE_SOURCE}),
        st.fixed_dictionaries({"type": st.just("image"), "url": IMAGE_SOURCE}),
        st.fixed_dictionaries({"type": st.just("image_url"), "image_url": st.one_of(
            st.fixed_dictionaries({"url": IMAGE_SOURCE}), IMAGE_SOURCE)}),
        TEXT,
    ),
    st.one_of(
        st.fixed_dictionaries({"type": st.just("text"), "text": ANY}),
        st.fixed_dictionaries({"type": st.one_of(st.sampled_from(["image", "image_url", "audio", "TEXT", ""]), ANY)}),
        ANY,
    ),
)
MESSAGE = mostly(
    st.fixed_dictionaries(
        {"role": mostly(st.sampled_from(["user", "user", "assistant", "system"]),
                        st.one_of(st.sampled_from(["tool", "User", ""]), ANY)),
         "content": mostly(st.one_of(TEXT, st.lists(PART, max_size=4)), ANY)},
        optional={"name": ANY, "tool_calls": ANY},
    ),
    ANY,
)
CONVERSATION = mostly(st.lists(MESSAGE, min_size=1, max_size=4), ANY)
OPTION = mostly(st.one_of(st.none(), st.integers(1, 8)), st.one_of(st.integers(-2, 0), st.booleans(), st.floats(),
                                                                   st.text(max_size=3), st.integers(10**6, 10**9)),
                odds=20)


def _offline_loader(source):
    """The processor's images, with every remote door shut (fuzzed strings must not reach the network)."""
    if isinstance(source, str) and source[:6].lower().startswith(("http:", "https:")):
        raise ImageFetchError("fuzz: no network")
    return load_image(source, limits=LIMITS, policy=UrlPolicy(allow_local_paths=False))


@pytest.fixture(scope="module")
def fuzz_vlm(tmp_path_factory):
    import jvlm
    from jvlm.testing import write_tiny_checkpoint

    model = jvlm.load(write_tiny_checkpoint(tmp_path_factory.mktemp("fuzz") / "tiny", seed=0), dtype="float32")
    yield model
    model.close()


@fuzz(250)
@given(conversation=CONVERSATION, max_crops=OPTION, max_pixels=OPTION)
def test_random_conversations(fuzz_vlm, conversation, max_crops, max_pixels):
    try:
        prompt = fuzz_vlm.prepare(conversation, max_crops=max_crops, max_pixels=max_pixels,
                                  image_loader=_offline_loader)
    except InvalidRequestError as exc:
        event(f"{type(exc).__name__}: {str(exc)[:40]}")
        return
    event(f"prompt with {len(prompt.images)} image(s)")
    assert isinstance(prompt, Prompt) and prompt.ids and all(isinstance(t, int) for t in prompt.ids)
    for image in prompt.images:  # each block sits inside the prompt, at its recorded offset
        assert prompt.ids[image.offset : image.offset + len(image.inputs.tokens)] == image.inputs.tokens


@fuzz(60)
@given(st.lists(st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]),
                                       "content": st.one_of(TEXT, st.lists(st.one_of(
                                           st.fixed_dictionaries({"type": st.just("text"), "text": TEXT}),
                                           st.just({"type": "image", "image": SEEDS[0]})), max_size=3))}),
                min_size=1, max_size=4))
def test_well_formed_conversations(fuzz_vlm, conversation):
    """Structurally valid conversations: only the template (e.g. role order) or text content may refuse them."""
    try:
        prompt = fuzz_vlm.prepare(conversation, image_loader=_offline_loader)
    except InvalidRequestError as exc:
        assert any(word in str(exc) for word in ("template", "placeholder", "system", "Unicode", "context")), exc
        return
    n_images = sum(isinstance(m["content"], list) and sum(p.get("type") == "image" for p in m["content"])
                   for m in conversation)
    assert len(prompt.images) == n_images


# --------------------------------------------------------------------------------------------
# address checker


@fuzz(300)
@given(st.one_of(st.integers(0, 2**32 - 1).map(ipaddress.IPv4Address),
                 st.integers(0, 2**128 - 1).map(ipaddress.IPv6Address)))
def test_address_checker_total(ip):
    reason = address_block_reason(ip)
    assert reason is None or isinstance(reason, str)
    assert address_block_reason(str(ip)) == reason
    if ip.version == 4:  # the IPv4-mapped form reaches the same host: same verdict
        mapped = ipaddress.IPv6Address(f"::ffff:{ip}")
        assert (address_block_reason(mapped) is None) == (reason is None)
    if not ip.is_global or ip.is_multicast:
        assert reason is not None
