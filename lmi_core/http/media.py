"""Images of a chat request, read on the server before the request is queued: ``data:`` URLs, and
``http(s)`` URLs from the model's ``option.allowed_media_domains`` only.

Invariant: the server opens a connection only to an address it has checked. A URL's host must be
on the model's allow list; the name is resolved once and every address it resolves to must be
public (``blocked`` refuses loopback, private, link-local, multicast, reserved and unspecified
addresses, IPv4 ones inside IPv6 included); the connection goes to that checked address (the name
is never resolved again, so a DNS answer that changes cannot move it), and a redirect is a new URL
that passes the same checks before it is followed. Each image is at most ``MAX_IMAGE_BYTES``, a
fetch at most ``FETCH_TIMEOUT`` seconds in all, and the bytes must decode (Pillow) as PNG or JPEG;
any failure is a 400 naming the content part. The engine gets the checked file bytes.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import http.client
import io
import ipaddress
import socket
import ssl
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

from lmi_core.errors import BadRequestError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# vLLM's defaults are of the same order (VLLM_IMAGE_FETCH_TIMEOUT 5 s, VLLM_MEDIA_URL_... ); an image
# is one frame of the worker socket, whose frames are at most 64 MB (wire.DEFAULT_MAX_FRAME).
MAX_IMAGE_BYTES = 16 * 2**20
MAX_IMAGE_PIXELS = 50_000_000  # a decompression bomb is refused before it is decoded
FETCH_TIMEOUT = 10.0  # seconds for one image, every redirect and the whole body included
MAX_REDIRECTS = 3
READ_CHUNK = 64 * 1024
IMAGE_FORMATS = frozenset({"PNG", "JPEG"})
REDIRECTS = frozenset({301, 302, 303, 307, 308})


@dataclass(frozen=True)
class ImageRef:
    """One image content part: its URL and the request field that names it
    (``messages.0.content.1.image_url``)."""

    url: str
    param: str


def blocked(address: IPAddress) -> str | None:
    """Why the server may not connect to ``address`` (a non-public one), or None when it may."""
    if isinstance(address, ipaddress.IPv6Address):
        inner = address.ipv4_mapped or address.sixtofour
        if inner is not None:  # ::ffff:127.0.0.1 reaches 127.0.0.1
            return blocked(inner)
    for reason, hit in (
        ("loopback", address.is_loopback),
        ("link-local", address.is_link_local),
        ("multicast", address.is_multicast),
        ("unspecified", address.is_unspecified),
        ("private", address.is_private),
        ("reserved", address.is_reserved),
        ("not globally reachable", not address.is_global),
    ):
        if hit:
            return f"a {reason} address"
    return None


def literal_address(host: str) -> IPAddress | None:
    """``host`` as an IP address when it is one in any spelling the C resolver accepts (``127.1``,
    ``2130706433``, ``0x7f000001``, ``[::1]``), else None (a name)."""
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        return ipaddress.ip_address(bare)
    except ValueError:
        pass
    try:  # inet_aton's forms: fewer parts, decimal, octal and hex numbers
        return ipaddress.IPv4Address(socket.inet_aton(bare))
    except OSError:
        return None


def resolve(host: str, port: int) -> list[IPAddress]:
    """Every address ``host`` names (a literal, or each answer of the resolver)."""
    literal = literal_address(host)
    if literal is not None:
        return [literal]
    answers = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in answers]


Policy = Callable[[IPAddress], str | None]


def checked_address(url: str, allowed: frozenset[str], param: str, policy: Policy = blocked) -> IPAddress:
    """The address to connect to for ``url``: its host allowed and every address it resolves to
    passing ``policy``; else a 400 naming ``param``, before any connection."""
    parts = urlsplit(url)
    host = (parts.hostname or "").rstrip(".")
    if parts.scheme not in ("http", "https") or not host:
        raise BadRequestError("an image URL is a data: URL or an http(s) URL with a host", param=param)
    if not allowed:
        raise BadRequestError(
            "this model fetches no image URLs (option.allowed_media_domains is unset): send a data: URL",
            param=param,
        )
    if host not in allowed:
        raise BadRequestError(f"host {host!r} is not in option.allowed_media_domains", param=param)
    try:
        addresses = resolve(host, parts.port or (443 if parts.scheme == "https" else 80))
    except (OSError, ValueError):
        raise BadRequestError(f"host {host!r} does not resolve", param=param) from None
    for address in addresses:
        reason = policy(address)
        if reason is not None:
            raise BadRequestError(f"host {host!r} resolves to {reason}, which is refused", param=param)
    if not addresses:
        raise BadRequestError(f"host {host!r} does not resolve", param=param)
    return addresses[0]


class _PinnedHTTP(http.client.HTTPConnection):
    """HTTP to ``address`` (checked), with the URL's host in the ``Host`` header."""

    def __init__(self, host: str, port: int, address: IPAddress, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self.address = address

    def connect(self) -> None:
        self.sock = socket.create_connection((str(self.address), self.port), self.timeout)


class _PinnedHTTPS(_PinnedHTTP):
    """HTTPS to ``address``, the certificate checked against the URL's host."""

    default_port = 443
    tls = ssl.create_default_context()

    def connect(self) -> None:
        super().connect()
        self.sock = self.tls.wrap_socket(self.sock, server_hostname=self.host)


def fetch(url: str, allowed: frozenset[str], param: str, policy: Policy = blocked) -> bytes:
    """The body of ``url`` (blocking: on a thread), each hop checked first (``checked_address``), at
    most ``MAX_REDIRECTS`` redirects, ``MAX_IMAGE_BYTES`` and ``FETCH_TIMEOUT`` seconds in all."""
    deadline = time.monotonic() + FETCH_TIMEOUT
    for _ in range(MAX_REDIRECTS + 1):
        address = checked_address(url, allowed, param, policy)
        parts = urlsplit(url)
        kind = _PinnedHTTPS if parts.scheme == "https" else _PinnedHTTP
        conn = kind(parts.hostname or "", parts.port or kind.default_port, address, _left(deadline, param))
        try:
            target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            conn.request("GET", target, headers={"Accept": "image/png, image/jpeg"})
            response = conn.getresponse()
            if response.status in REDIRECTS and response.getheader("Location"):
                url = urljoin(url, response.getheader("Location", ""))
                continue
            if response.status != 200:
                raise BadRequestError(f"fetching the image answered HTTP {response.status}", param=param)
            return _read(response, deadline, param)
        except (OSError, http.client.HTTPException) as exc:
            raise BadRequestError(f"cannot fetch the image: {exc.__class__.__name__}", param=param) from None
        finally:
            conn.close()
    raise BadRequestError(f"more than {MAX_REDIRECTS} redirects", param=param)


def _left(deadline: float, param: str) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise BadRequestError(f"fetching the image took more than {FETCH_TIMEOUT:g} s", param=param)
    return left


def _read(response: http.client.HTTPResponse, deadline: float, param: str) -> bytes:
    """The body, at most ``MAX_IMAGE_BYTES``; ``read1`` returns after one receive (each bounded by the
    socket's timeout), so the deadline is checked at least that often."""
    length = response.getheader("Content-Length")
    if length is not None and length.isdigit() and int(length) > MAX_IMAGE_BYTES:
        raise BadRequestError(f"the image is larger than {MAX_IMAGE_BYTES} bytes", param=param)
    body = bytearray()
    while chunk := response.read1(READ_CHUNK):
        body += chunk
        if len(body) > MAX_IMAGE_BYTES:
            raise BadRequestError(f"the image is larger than {MAX_IMAGE_BYTES} bytes", param=param)
        _left(deadline, param)
    return bytes(body)


def data_url_bytes(url: str, param: str) -> bytes:
    """The bytes of a base64 ``data:`` URL; a 400 naming ``param`` when it is not one."""
    header, comma, payload = url.partition(",")
    if not comma or not header.startswith("data:") or not header.endswith(";base64"):
        raise BadRequestError("a data: URL is data:image/<format>;base64,<data>", param=param)
    if len(payload) > (MAX_IMAGE_BYTES * 4) // 3 + 4:
        raise BadRequestError(f"the image is larger than {MAX_IMAGE_BYTES} bytes", param=param)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequestError("the data: URL's data is not valid base64", param=param) from None


def check_image(data: bytes, param: str) -> bytes:
    """``data`` when it is a whole PNG or JPEG image of at most ``MAX_IMAGE_PIXELS``; else a 400."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                if image.format not in IMAGE_FORMATS:
                    raise BadRequestError(f"the image is {image.format}, not PNG or JPEG", param=param)
                if image.width * image.height > MAX_IMAGE_PIXELS:
                    raise BadRequestError(f"the image has more than {MAX_IMAGE_PIXELS} pixels", param=param)
                image.load()  # a truncated or corrupt file fails here, not in the worker
    except BadRequestError:
        raise
    except Exception as exc:
        raise BadRequestError(f"the image cannot be decoded: {exc}", param=param) from None
    return data


def check_url(ref: ImageRef) -> None:
    """A 400 for an image URL of a scheme that is never read (``file:``...), before anything is fetched."""
    scheme = urlsplit(ref.url).scheme.lower()
    if scheme not in ("data", "http", "https"):
        raise BadRequestError("an image URL is a data: URL or an http(s) URL", param=ref.param)


def image_bytes(ref: ImageRef, allowed: frozenset[str]) -> bytes:
    """The checked image of ``ref`` (blocking: decoding and fetching run on a thread)."""
    raw = (
        data_url_bytes(ref.url, ref.param)
        if ref.url.startswith("data:")
        else fetch(ref.url, allowed, ref.param)
    )
    if len(raw) > MAX_IMAGE_BYTES:
        raise BadRequestError(f"the image is larger than {MAX_IMAGE_BYTES} bytes", param=ref.param)
    return check_image(raw, ref.param)


async def load_images(refs: Sequence[ImageRef], allowed: frozenset[str]) -> list[bytes]:
    """Every image of a request, in order, read concurrently off the event loop; a fetch that runs past
    its time (a server that trickles bytes) is a 400 at once, its thread ends with its socket's timeout."""

    async def one(ref: ImageRef) -> bytes:
        try:
            return await asyncio.wait_for(asyncio.to_thread(image_bytes, ref, allowed), FETCH_TIMEOUT + 1)
        except asyncio.TimeoutError:
            raise BadRequestError(
                f"fetching the image took more than {FETCH_TIMEOUT:g} s", param=ref.param
            ) from None

    return list(await asyncio.gather(*(one(ref) for ref in refs)))
