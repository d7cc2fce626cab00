"""Fetch a remote image without becoming a way into the host's network (SSRF protection).

Why it is built this way:

* The host name is resolved once, *every* address is checked against the blocked ranges, and the
  connection then goes to one of those checked addresses: a custom ``httpcore`` network backend
  ignores the host name httpcore asks for. A second, different DNS answer (DNS rebinding) is never
  used, while the Host header, TLS SNI and certificate verification keep the URL's own host name.
* Redirects are followed here, hop by hop: each target is parsed, re-resolved and re-checked, and
  their number is capped.
* One deadline bounds everything (DNS, connect, TLS, each read and write), not just each socket
  operation, so a server dripping one byte a second cannot hold a worker for long.
* ``httpcore`` is used directly: it never reads proxy settings (``HTTP(S)_PROXY``, ``ALL_PROXY``)
  from the environment, which would send the request through a proxy that resolves the name again.
* The body is counted as it arrives (``Accept-Encoding: identity``, compressed bodies refused), so
  ``max_bytes`` bounds memory, and a non-image content type is refused before the body is read.
"""

from __future__ import annotations

import functools
import ipaddress
import re
import socket
import ssl
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from pathlib import Path

import httpcore
import httpx

from jvlm.errors import ImageError, ImageFetchError, InvalidRequestError

__all__ = ["UrlPolicy", "address_block_reason", "fetch"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_REDIRECT_STATUSES = {301, 302, 303, 307, 308}
# Content types some servers use for images although they are not image/*.
_GENERIC_CONTENT_TYPES = {"application/octet-stream", "binary/octet-stream"}
_USER_AGENT = "jvlm-image-fetcher/1"
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_METADATA = {ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254")}
# Special-purpose networks named in refusals; flags such as is_private cover them too, with vaguer names
# (and with answers that changed between Python releases).
_NAMED_NETWORKS = [
    (ipaddress.ip_network(net), name)
    for net, name in [
        ("0.0.0.0/8", "this-network (0.0.0.0/8)"),
        ("100.64.0.0/10", "carrier-grade NAT (100.64.0.0/10)"),
        ("192.0.0.0/24", "IETF protocol assignment (192.0.0.0/24)"),
        ("192.0.2.0/24", "documentation (TEST-NET-1)"),
        ("198.51.100.0/24", "documentation (TEST-NET-2)"),
        ("203.0.113.0/24", "documentation (TEST-NET-3)"),
        ("198.18.0.0/15", "benchmarking (198.18.0.0/15)"),
        ("255.255.255.255/32", "broadcast"),
        ("240.0.0.0/4", "reserved (240.0.0.0/4)"),
        ("2001:db8::/32", "documentation (2001:db8::/32)"),
        ("2001::/32", "Teredo (2001::/32)"),
        ("64:ff9b:1::/48", "local-use NAT64 (64:ff9b:1::/48)"),
        ("100::/64", "discard-only (100::/64)"),
    ]
]
# getaddrinfo has no timeout of its own: it runs here so that the fetch deadline can stop waiting for it.
_RESOLVER = ThreadPoolExecutor(max_workers=16, thread_name_prefix="jvlm-resolve")


# --------------------------------------------------------------------------------------------
# policy


@dataclass(frozen=True)
class UrlPolicy:
    """Which outside resources ``load_image`` may reach.

    The default suits a server facing strangers: public ``http(s)`` addresses only, ``data:`` URIs,
    no ``file:`` URLs. Local paths (plain strings / ``os.PathLike``) are the library user's own files
    and are allowed unless ``allow_local_paths`` is false (a server must set it false).

    Attributes:
        allow_private: fetch from every address, private and loopback included (trusted networks only).
        allowed_hosts: the allow-list. A host name (``"images.internal"``), a wildcard for its
            subdomains (``"*.example.com"``), an IP address or a CIDR network (``"10.1.0.0/16"``).
            A listed name may resolve to any address; a listed address / network admits it
            whatever name led there.
        allow_file_dir: serve ``file:`` URLs, but only for files that resolve (symlinks and ``..``
            resolved) inside this directory. ``None`` refuses every ``file:`` URL.
        allow_local_paths: accept plain filesystem paths as image sources.
    """

    allow_private: bool = False
    allowed_hosts: tuple[str, ...] = ()
    allow_file_dir: Path | None = None
    allow_local_paths: bool = True
    _names: frozenset[str] = field(default=frozenset(), init=False, repr=False, compare=False)
    _suffixes: tuple[str, ...] = field(default=(), init=False, repr=False, compare=False)
    _networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = field(
        default=(), init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:  # a bad setting is a bad argument: InvalidRequestError, a ValueError
        hosts = (self.allowed_hosts,) if isinstance(self.allowed_hosts, str) else tuple(self.allowed_hosts)
        names, suffixes, networks = set(), [], []
        for entry in hosts:
            if not isinstance(entry, str) or not entry.strip():
                raise InvalidRequestError(f"UrlPolicy.allowed_hosts entries must be non-empty strings, got {entry!r}")
            text = entry.strip().lower().rstrip(".")
            if text.startswith("[") and text.endswith("]"):
                text = text[1:-1]
            try:
                networks.append(ipaddress.ip_network(text, strict=False))
                continue
            except ValueError as e:
                if "/" in text:  # meant as a network: never fall back to reading it as a host name
                    raise InvalidRequestError(f"UrlPolicy.allowed_hosts entry {entry!r} is not a valid network "
                                              f"({e})") from None
            if text.startswith("*."):
                suffixes.append("." + _ascii_host(text[2:], entry))
            else:
                names.add(_ascii_host(text, entry))
        object.__setattr__(self, "allowed_hosts", hosts)
        object.__setattr__(self, "_names", frozenset(names))
        object.__setattr__(self, "_suffixes", tuple(suffixes))
        object.__setattr__(self, "_networks", tuple(networks))
        if self.allow_file_dir is not None:
            object.__setattr__(self, "allow_file_dir", Path(self.allow_file_dir))

    def host_listed(self, host: str) -> bool:
        """Whether the URL host (ASCII / punycode, lowercase) is on the allow-list by name."""
        host = host.lower().rstrip(".")
        return host in self._names or any(host.endswith(s) for s in self._suffixes)

    def address_listed(self, address: str | IPAddress) -> bool:
        ip = _ip(address)
        return any(ip.version == net.version and ip in net for net in self._networks)


def _ascii_host(text: str, entry: str) -> str:
    """The form a URL's host takes after parsing (lowercase, IDNA / punycode), so that lookups compare equal."""
    try:
        host = httpx.URL(f"http://{text}/").raw_host.decode("ascii")
    except (httpx.InvalidURL, UnicodeError):
        host = ""
    if not re.fullmatch(r"[a-z0-9_-]+(\.[a-z0-9_-]+)*", host):
        raise InvalidRequestError(f"UrlPolicy.allowed_hosts entry {entry!r} is not a host name, address or network")
    return host


# --------------------------------------------------------------------------------------------
# addresses


def _ip(address: str | IPAddress) -> IPAddress:
    if isinstance(address, ipaddress.IPv4Address | ipaddress.IPv6Address):
        return address
    return ipaddress.ip_address(str(address).split("%", 1)[0])  # drop an IPv6 zone ("fe80::1%eth0")


def address_block_reason(address: str | IPAddress) -> str | None:
    """Why a connection to ``address`` must be refused by default (e.g. ``"loopback"``), or None if public.

    IPv6 forms that carry an IPv4 address (IPv4-mapped ``::ffff:a.b.c.d``, NAT64 ``64:ff9b::a.b.c.d``,
    6to4 ``2002:AABB:CCDD::``) are judged by the IPv4 address they reach.
    """
    ip = _ip(address)
    if ip.version == 6:
        if ip.ipv4_mapped is not None or ip in _NAT64:  # routed to the embedded IPv4 address
            embedded = ip.ipv4_mapped or ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
            reason = address_block_reason(embedded)
            return f"{reason} (IPv4 {embedded} inside {ip})" if reason else None
        if ip.sixtofour is not None and (reason := address_block_reason(ip.sixtofour)):
            return f"{reason} (6to4 {ip.sixtofour} inside {ip})"
    if ip in _METADATA:
        return "cloud metadata service (link-local)" if ip.version == 4 else "cloud metadata service (unique local)"
    if ip.is_unspecified:
        return "unspecified"
    if ip.is_loopback:
        return "loopback"
    if ip.is_link_local:
        return "link-local"
    if ip.is_multicast:
        return "multicast"
    if ip.version == 6 and ip.is_site_local:
        return "site-local"
    for net, name in _NAMED_NETWORKS:
        if ip.version == net.version and ip in net:
            return name
    if ip.is_private:
        return "unique local (private)" if ip.version == 6 and ip in ipaddress.IPv6Network("fc00::/7") else "private"
    if ip.is_reserved:
        return "reserved"
    if not ip.is_global:
        return "non-global"
    return None


# --------------------------------------------------------------------------------------------
# fetching


def fetch(url: str, *, policy: UrlPolicy, max_bytes: int, timeout: float, max_redirects: int) -> bytes:
    """GET an image URL under ``policy``; return the body (at most ``max_bytes``).

    Raises:
        ImageError: not an http(s) URL, or a malformed one.
        ImageFetchError: refused by the policy, unreachable, timed out, HTTP error status, too many
            redirects, not an image content type, over ``max_bytes``.
    """
    label = _short(url)
    deadline = time.monotonic() + timeout
    current = _parse(url, label)
    for hop in range(max_redirects + 1):
        where = label if hop == 0 else f"{label} (redirected to {_short(str(current))})"
        host = current.raw_host.decode("ascii")
        port = current.port or (443 if current.scheme == "https" else 80)
        addresses = _resolve(host, port, deadline, where, timeout)
        _check_addresses(host, addresses, policy, where)
        try:
            with _pool(addresses, deadline) as pool:
                with pool.stream("GET", _core_url(current), headers=_headers(current),
                                 extensions=_extensions(current, timeout)) as response:
                    location = _header(response, b"location")
                    if response.status in _REDIRECT_STATUSES and location:
                        current = _redirect(current, location, where)
                        continue
                    _check_response(response, where, max_bytes)
                    return _read_body(response, where, max_bytes)
        except httpcore.TimeoutException as exc:
            raise ImageFetchError(f"fetching image {where} timed out after {timeout:g}s ({exc})") from exc
        except (httpcore.NetworkError, httpcore.ProtocolError, httpcore.UnsupportedProtocol, OSError) as exc:
            raise ImageFetchError(f"fetching image {where} failed: {type(exc).__name__}: {exc}") from exc
    raise ImageFetchError(f"fetching image {label} exceeded {max_redirects} redirects")


def _parse(url: str, label: str) -> httpx.URL:
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError, UnicodeError) as exc:
        raise ImageError(f"malformed image URL {label}: {exc}") from exc
    if parsed.scheme not in ("http", "https"):
        raise ImageError(f"unsupported image URL scheme {parsed.scheme!r} in {label}: only http(s) can be fetched")
    if not parsed.raw_host:
        raise ImageError(f"image URL {label} has no host")
    if parsed.userinfo:  # credentials would be sent to whoever the URL names; refuse rather than drop silently
        raise ImageError(f"image URL {label} contains credentials (user:password@), which are not supported")
    return parsed


def _redirect(current: httpx.URL, location: str, where: str) -> httpx.URL:
    try:
        target = current.join(location)
    except (httpx.InvalidURL, TypeError, UnicodeError) as exc:
        raise ImageFetchError(f"fetching image {where} failed: bad redirect target {_short(location)!r}") from exc
    if target.scheme not in ("http", "https"):
        raise ImageFetchError(
            f"fetching image {where} failed: redirect to unsupported scheme {target.scheme!r} ({_short(location)})"
        )
    try:
        return _parse(str(target), _short(str(target)))
    except ImageError as exc:  # e.g. credentials or no host in the target: still a failed fetch
        raise ImageFetchError(f"fetching image {where} failed: bad redirect target: {exc}") from exc


def _resolve(host: str, port: int, deadline: float, where: str, timeout: float) -> list[str]:
    """All addresses of ``host``, resolved exactly once per hop (IP literals need no lookup)."""
    try:
        return [str(_ip(host))]
    except ValueError:
        pass
    future = _RESOLVER.submit(socket.getaddrinfo, host, port, type=socket.SOCK_STREAM)
    try:
        infos = future.result(timeout=max(0.0, deadline - time.monotonic()))
    except FutureTimeout:
        future.cancel()
        raise ImageFetchError(f"fetching image {where} timed out after {timeout:g}s (resolving {host})") from None
    except (OSError, UnicodeError, ValueError) as exc:  # socket.gaierror: unknown name, no network
        raise ImageFetchError(f"fetching image {where} failed: cannot resolve {host}: {exc}") from exc
    addresses = list(dict.fromkeys(str(_ip(info[4][0])) for info in infos
                                   if info[0] in (socket.AF_INET, socket.AF_INET6)))
    if not addresses:
        raise ImageFetchError(f"fetching image {where} failed: {host} has no IPv4 or IPv6 address")
    return addresses


def _check_addresses(host: str, addresses: Iterable[str], policy: UrlPolicy, where: str) -> None:
    """Refuse if *any* address is blocked: a name that also points inside is never safe to use."""
    if policy.allow_private or policy.host_listed(host):
        return
    for address in addresses:
        reason = address_block_reason(address)
        if reason and not policy.address_listed(address):
            shown = f"{host} resolves to {address}, which is" if host != address else f"{address} is"
            raise ImageFetchError(
                f"refusing to fetch image URL {where}: {shown} a {reason} address; private and special-purpose "
                "addresses are refused unless allowed (UrlPolicy allow_private / allowed_hosts; "
                "--allow-private-urls / --allowed-hosts on the server)"
            )


class _PinnedBackend(httpcore.NetworkBackend):
    """Connects only to the pre-checked addresses, whatever host name it is asked for, and bounds every
    socket operation by the fetch deadline."""

    def __init__(self, addresses: list[str], deadline: float):
        self._addresses = addresses
        self._deadline = deadline
        self._inner = httpcore.SyncBackend()

    def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None):
        error: Exception = httpcore.ConnectError("no address to connect to")
        for address in self._addresses:  # in resolver order; the next one only if this one is unreachable
            try:
                budget = _budget(timeout, self._deadline, httpcore.ConnectTimeout)
                stream = self._inner.connect_tcp(address, port, budget, local_address, socket_options)
                return _DeadlineStream(stream, self._deadline)
            except httpcore.ConnectError as exc:
                error = exc
        raise error

    def connect_unix_socket(self, path, timeout=None, socket_options=None):
        raise httpcore.ConnectError("unix sockets are never used for image URLs")

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


class _DeadlineStream(httpcore.NetworkStream):
    def __init__(self, inner: httpcore.NetworkStream, deadline: float):
        self._inner = inner
        self._deadline = deadline

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._inner.read(max_bytes, _budget(timeout, self._deadline, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._inner.write(buffer, _budget(timeout, self._deadline, httpcore.WriteTimeout))

    def close(self) -> None:
        self._inner.close()

    def start_tls(self, ssl_context, server_hostname=None, timeout=None) -> httpcore.NetworkStream:
        budget = _budget(timeout, self._deadline, httpcore.ConnectTimeout)
        return _DeadlineStream(self._inner.start_tls(ssl_context, server_hostname, budget), self._deadline)

    def get_extra_info(self, info: str):
        return self._inner.get_extra_info(info)


def _budget(timeout: float | None, deadline: float, error: type[Exception]) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise error("the overall fetch deadline passed")
    return left if timeout is None else min(timeout, left)


@functools.cache
def _ssl_context() -> ssl.SSLContext:
    """httpx's verifying context (certifi, or SSL_CERT_FILE / SSL_CERT_DIR), built once."""
    return httpx.create_ssl_context()


def _pool(addresses: list[str], deadline: float) -> httpcore.ConnectionPool:
    return httpcore.ConnectionPool(
        ssl_context=_ssl_context(), network_backend=_PinnedBackend(addresses, deadline), max_connections=1
    )


def _core_url(url: httpx.URL) -> httpcore.URL:
    return httpcore.URL(scheme=url.raw_scheme, host=url.raw_host, port=url.port, target=url.raw_path)


def _headers(url: httpx.URL) -> list[tuple[bytes, bytes]]:
    return [
        (b"Host", url.netloc),  # host[:port], IPv6 in brackets: what the server expects, not the pinned address
        (b"Accept", b"image/*"),
        (b"Accept-Encoding", b"identity"),
        (b"User-Agent", _USER_AGENT.encode()),
    ]


def _extensions(url: httpx.URL, timeout: float) -> dict:
    ext: dict = {"timeout": {"connect": timeout, "read": timeout, "write": timeout, "pool": timeout}}
    if url.scheme == "https":
        ext["sni_hostname"] = url.raw_host.decode("ascii")  # also the name the certificate must match
    return ext


def _header(response: httpcore.Response, name: bytes) -> str:
    for key, value in response.headers:
        if key.lower() == name:
            return value.decode("latin-1").strip()
    return ""


def _check_response(response: httpcore.Response, where: str, max_bytes: int) -> None:
    status = response.status
    if not 200 <= status < 300:
        reason = response.extensions.get("reason_phrase", b"").decode("latin-1")
        raise ImageFetchError(f"fetching image {where} failed: HTTP {status} {reason}".rstrip())
    ctype = _header(response, b"content-type").split(";")[0].strip().lower()
    if ctype and not ctype.startswith("image/") and ctype not in _GENERIC_CONTENT_TYPES:
        raise ImageFetchError(f"URL {where} did not return an image (content-type {ctype!r})")
    encoding = _header(response, b"content-encoding").lower()
    if encoding not in ("", "identity"):
        raise ImageFetchError(f"URL {where} sent a {encoding!r}-encoded body although identity was asked for")
    declared = _header(response, b"content-length")
    if declared.isdigit() and int(declared) > max_bytes:
        raise ImageFetchError(f"image at {where} is {int(declared):,} bytes, over the limit of {max_bytes:,} bytes")


def _read_body(response: httpcore.Response, where: str, max_bytes: int) -> bytes:
    chunks, total = [], 0
    for chunk in response.iter_stream():
        total += len(chunk)
        if total > max_bytes:
            raise ImageFetchError(
                f"image at {where} is over the limit of {max_bytes:,} bytes (stopped reading after {total:,})"
            )
        chunks.append(chunk)
    return b"".join(chunks)


def _short(text: str, limit: int = 80) -> str:
    """A source string short enough for an error message."""
    if len(text) <= limit:
        return text
    return f"{text[: limit - 20]}...({len(text):,} chars)"
