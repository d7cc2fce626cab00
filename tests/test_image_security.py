"""SSRF and local-file protection of ``load_image`` (``jvlm.images.safe_http``).

Every server here listens on 127.0.0.1. Host names such as ``images.test`` are mapped by patching
``socket.getaddrinfo``, and ``socket.create_connection`` is watched so that the tests can prove a
refusal happened before any connection and that nothing ever goes to another address.
"""

from __future__ import annotations

import io
import ipaddress
import os
import socket
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

from jvlm.errors import ImageError, ImageFetchError, InvalidRequestError
from jvlm.images import safe_http
from jvlm.images.fetch import ImageLimits, UrlPolicy, load_image
from jvlm.images.safe_http import address_block_reason


def _png(color=(10, 200, 30), size=(6, 4)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


PNG = _png()
LOCAL = UrlPolicy(allow_private=True)
REAL_GETADDRINFO = socket.getaddrinfo
REAL_CREATE_CONNECTION = socket.create_connection


def is_test_png(image: Image.Image) -> bool:
    return image.size == (6, 4) and np.asarray(image)[0, 0].tolist() == [10, 200, 30]


# --------------------------------------------------------------------------------------------
# servers


class Handler(BaseHTTPRequestHandler):
    log: list[tuple[str, str]]  # (path, Host header), set per server class

    def log_message(self, *args):
        pass

    def _send(self, status: int, body: bytes = b"", ctype: str = "image/png", **headers: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for key, value in headers.items():
            self.send_header(key.replace("_", "-"), value)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):  # noqa: N802 - http.server API
        self.log.append((self.path, self.headers.get("Host", "")))
        try:
            self._route()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client hung up on purpose (limits)

    def _route(self):
        path, _, query = self.path.partition("?")
        if path == "/img.png":
            self._send(200, PNG)
        elif path == "/to":  # redirect to the URL in the query string
            self._send(302, b"", "text/plain", Location=query)
        elif path.startswith("/chain/"):  # /chain/3 -> /chain/2 -> ... -> /chain/0 = the image
            n = int(path.rsplit("/", 1)[1])
            self._send(302, b"", "text/plain", Location=f"/chain/{n - 1}") if n else self._send(200, PNG)
        elif path == "/drip":  # headers at once, then one byte every 0.1 s: only a total deadline stops it
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", "100000")
            self.end_headers()
            for _ in range(100):
                self.wfile.write(b"\x00")
                self.wfile.flush()
                time.sleep(0.1)
        elif path == "/gzip":
            self._send(200, PNG, Content_Encoding="gzip")
        elif path == "/big":
            self._send(200, PNG + b"\x00" * 50_000)
        else:
            self._send(404, b"not found", "text/plain")


def _serve(tls: ssl.SSLContext | None = None):
    handler = type("H", (Handler,), {"log": []})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    if tls is not None:
        httpd.socket = tls.wrap_socket(httpd.socket, server_side=True)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    return httpd, handler.log


@pytest.fixture(scope="module")
def server():
    httpd, log = _serve()
    httpd.log = log
    yield httpd
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def port(server):
    server.log.clear()
    return server.server_address[1]


@pytest.fixture
def net(monkeypatch):
    """Fake DNS for ``*.test`` names and a record of every outgoing TCP connection."""

    class Net:
        names: dict[str, list] = {}  # name -> list of answers (one per lookup; the last one repeats)
        lookups: list[str] = []
        connects: list[tuple[str, int]] = []

    def getaddrinfo(host, port, *args, **kwargs):
        if isinstance(host, str) and host.endswith(".test"):
            Net.lookups.append(host)
            answers = Net.names.get(host)
            if answers is None:
                raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
            answer = answers[min(Net.lookups.count(host), len(answers)) - 1]
            if callable(answer):
                answer = answer()
            return [(socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port))
                    for a in answer]
        return REAL_GETADDRINFO(host, port, *args, **kwargs)

    def create_connection(address, *args, **kwargs):
        Net.connects.append((address[0], address[1]))
        if not ipaddress.ip_address(address[0]).is_loopback:  # never let a test reach another machine
            raise ConnectionRefusedError(111, "test: outside addresses are never contacted")
        return REAL_CREATE_CONNECTION(address, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(socket, "create_connection", create_connection)
    return Net


# --------------------------------------------------------------------------------------------
# the address checker


@pytest.mark.parametrize(
    "address, reason",
    [
        ("127.0.0.1", "loopback"),
        ("127.255.255.254", "loopback"),
        ("::1", "loopback"),
        ("::ffff:127.0.0.1", "loopback"),
        ("::ffff:7f00:1", "loopback"),
        ("64:ff9b::7f00:1", "loopback"),  # NAT64
        ("2002:7f00:1::", "loopback"),  # 6to4
        ("169.254.169.254", "cloud metadata"),
        ("::ffff:169.254.169.254", "cloud metadata"),
        ("fd00:ec2::254", "cloud metadata"),
        ("169.254.1.1", "link-local"),
        ("fe80::1", "link-local"),
        ("fe80::1%eth0", "link-local"),
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("0.1.2.3", "this-network"),
        ("10.0.0.1", "private"),
        ("172.16.5.4", "private"),
        ("172.31.255.255", "private"),
        ("192.168.1.1", "private"),
        ("::ffff:10.0.0.1", "private"),
        ("::ffff:192.168.0.1", "private"),
        ("100.64.0.1", "carrier-grade NAT"),
        ("198.18.0.1", "benchmarking"),
        ("192.0.0.8", "IETF"),
        ("192.0.2.1", "documentation"),
        ("203.0.113.9", "documentation"),
        ("2001:db8::1", "documentation"),
        ("fc00::1", "unique local"),
        ("fd12:3456::1", "unique local"),
        ("fec0::1", "site-local"),
        ("224.0.0.1", "multicast"),
        ("239.255.255.250", "multicast"),
        ("ff02::1", "multicast"),
        ("ff0e::1", "multicast"),
        ("255.255.255.255", "broadcast"),
        ("240.0.0.1", "reserved"),
        ("::127.0.0.1", "reserved"),  # deprecated IPv4-compatible form
        ("2001::1", "Teredo"),
        ("64:ff9b:1::1", "NAT64"),
        ("100::1", "discard-only"),
    ],
)
def test_blocked_addresses(address, reason):
    got = address_block_reason(address)
    assert got is not None and reason in got, got


@pytest.mark.parametrize(
    "address",
    ["8.8.8.8", "1.1.1.1", "93.184.216.34", "2606:4700:4700::1111", "::ffff:8.8.8.8", "64:ff9b::808:808",
     "2002:808:808::1", "172.32.0.1", "100.128.0.1", "11.0.0.1"],
)
def test_public_addresses(address):
    assert address_block_reason(address) is None
    assert address_block_reason(ipaddress.ip_address(address.split("%")[0])) is None


# --------------------------------------------------------------------------------------------
# URL-level refusals: fast, before any connection


@pytest.mark.parametrize(
    "url, reason",
    [
        ("http://127.0.0.1:9/x.png", "loopback"),
        ("http://[::1]/x.png", "loopback"),
        ("http://[::ffff:127.0.0.1]/x.png", "loopback"),
        ("http://169.254.169.254/latest/meta-data/", "metadata"),
        ("http://[fd00:ec2::254]/", "metadata"),
        ("http://0.0.0.0:8000/", "unspecified"),
        ("http://10.1.2.3/a.png", "private"),
        ("https://192.168.0.1/a.png", "private"),
        ("http://[fc00::1]/", "unique local"),
        ("http://[fe80::1]/", "link-local"),
        ("http://224.0.0.1/", "multicast"),
        ("http://localhost:9/x.png", "loopback"),
        ("HTTP://LOCALHOST:9/x.png", "loopback"),
        ("http://2130706433/", "loopback"),  # 127.0.0.1 in decimal: the resolver's answer is checked
        ("http://0x7f.1/", "loopback"),
        ("http://127.1/", "loopback"),
        ("http://public.test@127.0.0.1/", "credentials"),  # userinfo trick: refused outright
    ],
)
def test_refused_before_connecting(net, url, reason):
    start = time.perf_counter()
    with pytest.raises(ImageError, match=reason) as info:
        load_image(url)
    assert time.perf_counter() - start < 1
    assert net.connects == []
    if isinstance(info.value, ImageFetchError) and "credentials" not in reason:
        assert "allow_private" in str(info.value) and "--allow-private-urls" in str(info.value)


def test_any_blocked_address_refuses_the_name(net):
    net.names["mixed.test"] = [["93.184.216.34", "127.0.0.1"]]
    with pytest.raises(ImageFetchError, match=r"mixed.test resolves to 127.0.0.1, which is a loopback"):
        load_image("http://mixed.test/x.png")
    assert net.connects == [] and net.lookups == ["mixed.test"]


def test_unknown_host(net):
    with pytest.raises(ImageFetchError, match="cannot resolve nowhere.test"):
        load_image("http://nowhere.test/x.png")


@pytest.mark.parametrize(
    "url",
    ["ftp://example.com/a.png", "gopher://127.0.0.1:70/_x", "dict://127.0.0.1:11211/stat", "ldap://h/x",
     "jar:http://h/a!/b", "s3://bucket/key.png", "javascript:alert(1)", "ws://h/socket", "netdoc:///etc/passwd"],
)
def test_other_schemes_refused(net, url):
    with pytest.raises(ImageError, match="unsupported image URL scheme"):
        load_image(url, policy=LOCAL)
    assert net.connects == []


@pytest.mark.parametrize("url", ["http:///x.png", "http://", "http:\\\\127.0.0.1\\x.png", "http://[::1/x"])
def test_malformed_urls(net, url):
    with pytest.raises(ImageError):
        load_image(url, policy=LOCAL)
    assert net.connects == []


# --------------------------------------------------------------------------------------------
# opening the policy deliberately


def test_loopback_refused_by_default_then_allowed(port, net):
    url = f"http://127.0.0.1:{port}/img.png"
    with pytest.raises(ImageFetchError, match="127.0.0.1 is a loopback address"):
        load_image(url)
    assert net.connects == []
    for policy in (LOCAL, UrlPolicy(allowed_hosts=("127.0.0.1",)), UrlPolicy(allowed_hosts=("127.0.0.0/8",))):
        assert is_test_png(load_image(url, policy=policy))


def test_allowed_host_names(port, server, net):
    net.names["images.test"] = [["127.0.0.1"]]
    net.names["cdn.images.test"] = [["127.0.0.1"]]
    assert is_test_png(load_image(f"http://localhost:{port}/img.png", policy=UrlPolicy(allowed_hosts=("localhost",))))
    with pytest.raises(ImageFetchError, match="images.test resolves to 127.0.0.1"):
        load_image(f"http://images.test:{port}/img.png", policy=UrlPolicy(allowed_hosts=("other.test",)))
    assert is_test_png(load_image(f"http://images.test:{port}/img.png",
                                  policy=UrlPolicy(allowed_hosts=("IMAGES.test.",))))
    wildcard = UrlPolicy(allowed_hosts=("*.images.test",))
    assert is_test_png(load_image(f"http://cdn.images.test:{port}/img.png", policy=wildcard))
    with pytest.raises(ImageFetchError, match="loopback"):  # the wildcard covers subdomains only
        load_image(f"http://images.test:{port}/img.png", policy=wildcard)
    # the request went to the pinned address but named the URL's host
    assert (("/img.png", f"images.test:{port}") in server.log) and (("/img.png", f"localhost:{port}") in server.log)


def test_policy_validation(tmp_path):
    for bad in ("", "bad host!", "a..b", 3, "10.0.0.0/33", "10.0.0.0/8x", "a.test/x"):
        with pytest.raises(InvalidRequestError, match="allowed_hosts"):  # a ValueError too, as before
            UrlPolicy(allowed_hosts=(bad,))
    with pytest.raises(InvalidRequestError, match=r"'10\.0\.0\.0/33' is not a valid network"):
        UrlPolicy(allowed_hosts=("10.0.0.0/33",))  # not silently the host name "10.0.0.0"
    assert UrlPolicy(allowed_hosts=("10.1.0.0/16",)).address_listed("10.1.2.3")
    policy = UrlPolicy(allowed_hosts=["A.test"], allow_file_dir=str(tmp_path))
    assert policy.allowed_hosts == ("A.test",) and policy.allow_file_dir == tmp_path
    assert UrlPolicy(allowed_hosts="a.test").allowed_hosts == ("a.test",)
    assert UrlPolicy() == UrlPolicy() and hash(UrlPolicy(allowed_hosts=("x.test",))) is not None


# --------------------------------------------------------------------------------------------
# redirects


def test_redirect_to_blocked_address_refused(port, server, net):
    net.names["images.test"] = [["127.0.0.1"]]
    policy = UrlPolicy(allowed_hosts=("images.test",))
    target = f"http://127.0.0.2:{port}/img.png"
    with pytest.raises(ImageFetchError, match=r"redirected to http://127.0.0.2.*127.0.0.2 is a loopback address"):
        load_image(f"http://images.test:{port}/to?{target}", policy=policy)
    assert [c[0] for c in net.connects] == ["127.0.0.1"]  # the second hop was never contacted
    assert [p for p, _ in server.log] == [f"/to?{target}"]
    # a redirect that stays on the allowed host is followed
    assert is_test_png(load_image(f"http://images.test:{port}/to?/img.png", policy=policy))


def test_redirect_to_other_host_is_rechecked(port, net):
    net.names["a.test"] = [["127.0.0.1"]]
    net.names["b.test"] = [["10.0.0.7"]]
    policy = UrlPolicy(allowed_hosts=("a.test",))
    with pytest.raises(ImageFetchError, match="b.test resolves to 10.0.0.7, which is a private address"):
        load_image(f"http://a.test:{port}/to?http://b.test/img.png", policy=policy)
    assert net.lookups == ["a.test", "b.test"] and [c[0] for c in net.connects] == ["127.0.0.1"]


@pytest.mark.parametrize("target", ["file:///etc/passwd", "ftp://127.0.0.1/x.png", "gopher://127.0.0.1/",
                                    "data:image/png;base64,AAAA"])
def test_redirect_to_other_scheme_refused(port, target):
    with pytest.raises(ImageFetchError, match="redirect to unsupported scheme"):
        load_image(f"http://127.0.0.1:{port}/to?{target}", policy=LOCAL)


def test_max_redirects(port):
    assert is_test_png(load_image(f"http://127.0.0.1:{port}/chain/3", limits=ImageLimits(max_redirects=3),
                                  policy=LOCAL))
    with pytest.raises(ImageFetchError, match="exceeded 2 redirects"):
        load_image(f"http://127.0.0.1:{port}/chain/3", limits=ImageLimits(max_redirects=2), policy=LOCAL)
    with pytest.raises(ImageFetchError, match="exceeded 0 redirects"):
        load_image(f"http://127.0.0.1:{port}/chain/1", limits=ImageLimits(max_redirects=0), policy=LOCAL)


# --------------------------------------------------------------------------------------------
# DNS rebinding: one resolution, and the connection goes to the address that was checked


def test_dns_answer_is_pinned(port, server, net):
    # first answer: where the server is; any later answer: an address where nothing listens
    net.names["rebind.test"] = [["127.0.0.1"], ["127.0.0.2"]]
    assert is_test_png(load_image(f"http://rebind.test:{port}/img.png", policy=LOCAL))
    assert net.lookups == ["rebind.test"]
    assert net.connects == [("127.0.0.1", port)]
    assert server.log == [("/img.png", f"rebind.test:{port}")]


def test_rebinding_to_loopback_never_connects_there(net):
    # the classic attack: public when checked, loopback when the HTTP client looks the name up again
    net.names["evil.test"] = [["93.184.216.34"], ["127.0.0.1"]]
    with pytest.raises(ImageFetchError, match="ConnectError"):  # the fake network refuses outside addresses
        load_image("http://evil.test:8080/x.png")
    assert net.lookups == ["evil.test"]
    assert net.connects == [("93.184.216.34", 8080)]


def test_next_checked_address_when_first_is_unreachable(port, net):
    net.names["dual.test"] = [["127.0.0.2", "127.0.0.1"]]  # nothing listens on 127.0.0.2
    assert is_test_png(load_image(f"http://dual.test:{port}/img.png", policy=LOCAL))
    assert net.connects == [("127.0.0.2", port), ("127.0.0.1", port)] and net.lookups == ["dual.test"]


# --------------------------------------------------------------------------------------------
# time, bytes, content


def test_total_deadline_against_a_drip_feed(port):
    start = time.perf_counter()
    with pytest.raises(ImageFetchError, match="timed out after 0.5s"):
        load_image(f"http://127.0.0.1:{port}/drip", limits=ImageLimits(fetch_timeout=0.5), policy=LOCAL)
    assert time.perf_counter() - start < 1.2  # each read is quick: only the total deadline stops this


def test_slow_dns_is_bounded(net):
    net.names["slow.test"] = [lambda: time.sleep(1.5) or ["127.0.0.1"]]
    start = time.perf_counter()
    with pytest.raises(ImageFetchError, match="timed out.*resolving slow.test"):
        load_image("http://slow.test/x.png", limits=ImageLimits(fetch_timeout=0.3), policy=LOCAL)
    assert time.perf_counter() - start < 1.0


def test_byte_cap_and_encoding(port):
    with pytest.raises(ImageFetchError, match="over the limit of 10,000 bytes"):
        load_image(f"http://127.0.0.1:{port}/big", limits=ImageLimits(max_bytes=10_000), policy=LOCAL)
    with pytest.raises(ImageFetchError, match="gzip"):
        load_image(f"http://127.0.0.1:{port}/gzip", policy=LOCAL)
    with pytest.raises(ImageFetchError, match="HTTP 404"):
        load_image(f"http://127.0.0.1:{port}/missing", policy=LOCAL)


def test_proxy_environment_is_ignored(port, monkeypatch, net):
    proxy, proxy_log = _serve()
    try:
        proxy_url = f"http://127.0.0.1:{proxy.server_address[1]}"
        for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
            monkeypatch.setenv(name, proxy_url)
        monkeypatch.delenv("NO_PROXY", raising=False)
        monkeypatch.delenv("no_proxy", raising=False)
        assert is_test_png(load_image(f"http://127.0.0.1:{port}/img.png", policy=LOCAL))
        with pytest.raises(ImageFetchError, match="private"):
            load_image("http://10.0.0.1/x.png")  # a proxy would have fetched it without any address check
        assert proxy_log == [] and {c[1] for c in net.connects} == {port}
    finally:
        proxy.shutdown()
        proxy.server_close()


# --------------------------------------------------------------------------------------------
# https: the pinned address still gets SNI and certificate checks for the URL's host name


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory):
    x509 = pytest.importorskip("cryptography.x509")
    import datetime

    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "images.test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("images.test")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    folder = tmp_path_factory.mktemp("tls")
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    (folder / "cert.pem").write_bytes(cert_pem)
    (folder / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                       serialization.NoEncryption()))
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(folder / "cert.pem", folder / "key.pem")
    sni: list[str | None] = []
    server_ctx.sni_callback = lambda sock, server_name, ctx: sni.append(server_name)
    httpd, _ = _serve(server_ctx)
    client_ctx = ssl.create_default_context(cadata=cert_pem.decode())
    yield httpd.server_address[1], client_ctx, sni
    httpd.shutdown()
    httpd.server_close()


def test_https_keeps_sni_and_hostname_verification(tls_server, net, monkeypatch):
    port, client_ctx, sni = tls_server
    monkeypatch.setattr(safe_http, "_ssl_context", lambda: client_ctx)
    net.names["images.test"] = [["127.0.0.1"]]
    net.names["other.test"] = [["127.0.0.1"]]
    policy = UrlPolicy(allowed_hosts=("images.test",))
    assert is_test_png(load_image(f"https://images.test:{port}/img.png", policy=policy))
    assert sni[-1] == "images.test" and net.connects[-1] == ("127.0.0.1", port)
    for url in (f"https://other.test:{port}/img.png", f"https://127.0.0.1:{port}/img.png"):
        with pytest.raises(ImageFetchError, match="CERTIFICATE_VERIFY_FAILED|certificate"):
            load_image(url, policy=LOCAL)


# --------------------------------------------------------------------------------------------
# local files


@pytest.fixture
def files(tmp_path):
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    allowed.mkdir()
    outside.mkdir()
    (allowed / "in.png").write_bytes(PNG)
    (allowed / "sub").mkdir()
    (allowed / "sub" / "deep.png").write_bytes(PNG)
    (outside / "secret.png").write_bytes(PNG)
    (allowed / "escape.png").symlink_to(outside / "secret.png")
    (allowed / "escape_dir").symlink_to(outside)
    (allowed / "inner_link.png").symlink_to(allowed / "in.png")
    return allowed, outside


def test_file_urls_refused_by_default(files):
    allowed, _ = files
    with pytest.raises(ImageError, match="unsupported image URL scheme 'file'"):
        load_image((allowed / "in.png").as_uri())


def test_file_urls_inside_allowed_dir(files):
    allowed, _ = files
    policy = UrlPolicy(allow_file_dir=allowed)
    for url in ((allowed / "in.png").as_uri(), (allowed / "sub" / "deep.png").as_uri(),
                (allowed / "inner_link.png").as_uri(), f"file://localhost{allowed}/in.png",
                f"file://{allowed}/sub/../in.png", f"FILE://{allowed}/sub%2Fdeep.png"):
        assert is_test_png(load_image(url, policy=policy)), url


@pytest.mark.parametrize(
    "make_url, match",
    [
        (lambda a: f"file://{a}/../outside/secret.png", "outside the allowed"),
        (lambda a: f"file://{a}/%2e%2e/outside/secret.png", "outside the allowed"),
        (lambda a: f"file://{a}/sub/../../outside/secret.png", "outside the allowed"),
        (lambda a: f"file://{a}/escape.png", "outside the allowed"),  # symlink out
        (lambda a: f"file://{a}/escape_dir/secret.png", "outside the allowed"),
        (lambda a: "file:///etc/passwd", "outside the allowed"),
        (lambda a: f"file://{a}/../../../../../../etc/passwd", "outside the allowed"),
        (lambda a: f"file://{a}/missing.png", "not found"),
        (lambda a: f"file://{a}/in.png%00.txt", "cannot read"),
        (lambda a: "file:in.png", "absolute"),
        (lambda a: f"file://evil.example{a}/in.png", "remote host"),
        (lambda a: f"file://{a}/sub", "directory"),
    ],
)
def test_file_url_escapes_refused(files, make_url, match):
    allowed, _ = files
    with pytest.raises(ImageError, match=match):
        load_image(make_url(allowed), policy=UrlPolicy(allow_file_dir=allowed))


def test_file_url_fifo_refused(files):
    allowed, _ = files
    os.mkfifo(allowed / "pipe.png")  # opening it would block forever
    with pytest.raises(ImageError, match="not a regular file"):
        load_image((allowed / "pipe.png").as_uri(), policy=UrlPolicy(allow_file_dir=allowed))


def test_local_paths_can_be_refused(files):
    allowed, _ = files
    no_paths = UrlPolicy(allow_local_paths=False)
    for source in (str(allowed / "in.png"), allowed / "in.png", "in.png"):
        with pytest.raises(ImageError, match="local file paths are not accepted"):
            load_image(source, policy=no_paths)
    assert is_test_png(load_image(PNG, policy=no_paths))  # bytes and data URIs are not references
    assert is_test_png(load_image(str(allowed / "in.png")))  # the library default: the user's own files
    both = UrlPolicy(allow_local_paths=False, allow_file_dir=allowed)
    assert is_test_png(load_image((allowed / "in.png").as_uri(), policy=both))
