"""Image parts of chat requests: the address classifier, data: URLs, the SSRF rules (a refused URL is a
400 before any connection, proven by canary listeners that must receive nothing), redirects, size
limits, the image count against the model's limit, and what reaches the engine.

Every URL sent here names a loopback address: this machine sends no traffic anywhere else. The
redirect tests allow 127.0.0.1 through an injected policy (the real one refuses every loopback
address) and check that the hop to a refused address never connects.
"""

from __future__ import annotations

import base64
import contextlib
import http.server
import io
import ipaddress
import socket
import threading
from collections.abc import Iterator
from typing import Any, ClassVar

import pytest
from PIL import Image

from lmi_core.errors import BadRequestError, ConfigError
from lmi_core.http import media
from lmi_core.http.media import IPAddress, blocked, checked_address, fetch, literal_address
from lmi_core.operations import Tokenize
from lmi_core.option_values import allowed_media_domains, image_limit
from tests.http.fakes import FakeModel, FakeModels, client, model, pool, worker


def png(size: tuple[int, int] = (8, 6)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(out, format="PNG")
    return out.getvalue()


def data_url(data: bytes, kind: str = "png") -> str:
    return f"data:image/{kind};base64,{base64.b64encode(data).decode()}"


# -- the address classifier ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "127.255.255.254",
        "10.0.0.1",
        "10.255.255.255",
        "172.16.0.1",
        "172.31.255.255",
        "192.168.1.1",
        "169.254.169.254",  # cloud metadata
        "100.64.0.1",  # shared address space
        "0.0.0.0",
        "224.0.0.1",
        "239.255.255.250",
        "255.255.255.255",
        "::1",
        "::",
        "fe80::1",
        "febf::1",
        "fc00::1",
        "fd12:3456::1",
        "ff02::1",
        "::ffff:127.0.0.1",
        "::ffff:10.0.0.1",
        "::ffff:169.254.169.254",
        "2002:7f00:1::",  # 6to4 around 127.0.0.1
    ],
)
def test_non_public_addresses_are_blocked(address: str) -> None:
    assert blocked(ipaddress.ip_address(address)) is not None


@pytest.mark.parametrize(
    "address", ["93.184.215.14", "8.8.8.8", "172.32.0.1", "2606:4700::1111", "::ffff:8.8.8.8"]
)
def test_public_addresses_pass(address: str) -> None:
    assert blocked(ipaddress.ip_address(address)) is None


@pytest.mark.parametrize(
    ("host", "address"),
    [
        ("127.1", "127.0.0.1"),
        ("127.0.1", "127.0.0.1"),
        ("2130706433", "127.0.0.1"),
        ("0x7f000001", "127.0.0.1"),
        ("0x7f.1", "127.0.0.1"),
        ("0177.0.0.1", "127.0.0.1"),  # octal
        ("[::1]", "::1"),
        ("::ffff:127.0.0.1", "::ffff:127.0.0.1"),
        ("10.1", "10.0.0.1"),
    ],
)
def test_every_spelling_of_an_address_is_read_as_the_resolver_reads_it(host: str, address: str) -> None:
    parsed = literal_address(host)
    assert parsed == ipaddress.ip_address(address)
    assert blocked(parsed) is not None


def test_names_are_not_literals() -> None:
    assert literal_address("images.example.com") is None


# -- options -------------------------------------------------------------------------------------


def test_allowed_media_domains_parse() -> None:
    assert allowed_media_domains({}) == frozenset()
    parsed = allowed_media_domains({"allowed_media_domains": " Images.Example.com., cdn.example.org ,[::1]"})
    assert parsed == {"images.example.com", "cdn.example.org", "::1"}
    for bad in ("https://example.com", "example.com:8080", "example.com/x", "user@example.com"):
        with pytest.raises(ConfigError, match=r"option\.allowed_media_domains"):
            allowed_media_domains({"allowed_media_domains": bad})


def test_limit_mm_per_prompt_parses_vllms_json_form() -> None:
    assert image_limit({}) is None
    assert image_limit({"limit_mm_per_prompt": '{"image": 2}'}) == 2
    assert image_limit({"limit_mm_per_prompt": '{"image": 3, "video": 0}'}) == 3
    assert image_limit({"limit_mm_per_prompt": '{"video": 0}'}) == 0
    for bad in ("2", '{"image": -1}', '{"image": "2"}', '{"image": true}', '{"audio": 1}', "{"):
        with pytest.raises(ConfigError, match=r"option\.limit_mm_per_prompt"):
            image_limit({"limit_mm_per_prompt": bad})


# -- data: URLs and decoding ---------------------------------------------------------------------


def test_a_data_url_is_decoded_and_checked() -> None:
    image = png()
    assert media.image_bytes(media.ImageRef(data_url(image), "p"), frozenset()) == image
    jpeg = io.BytesIO()
    Image.new("RGB", (4, 4)).save(jpeg, format="JPEG")
    assert media.check_image(jpeg.getvalue(), "p") == jpeg.getvalue()


@pytest.mark.parametrize(
    "url",
    [
        "data:image/png;base64,not base64!",
        "data:image/png,rawdata",
        "data:image/png;base64," + base64.b64encode(b"not an image").decode(),
        "data:image/png;base64," + base64.b64encode(png()[:40]).decode(),  # truncated
        "data:image/gif;base64," + base64.b64encode(b"GIF89a\x01\x00\x01\x00\x00\x00\x00;").decode(),
    ],
)
def test_malformed_images_are_a_400_naming_the_part(url: str) -> None:
    with pytest.raises(BadRequestError) as caught:
        media.image_bytes(media.ImageRef(url, "messages.0.content.1.image_url"), frozenset())
    assert caught.value.param == "messages.0.content.1.image_url"


def test_an_oversized_data_url_is_refused_before_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(media, "MAX_IMAGE_BYTES", 100)
    with pytest.raises(BadRequestError, match="larger than 100 bytes"):
        media.image_bytes(media.ImageRef(data_url(png((64, 64)) + b"\0" * 200), "p"), frozenset())


def test_a_decompression_bomb_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(media, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(BadRequestError, match="pixels"):
        media.check_image(png((100, 100)), "p")


# -- SSRF: canaries that must receive nothing ----------------------------------------------------


class Canary:
    """A listener that records every connection it accepts."""

    def __init__(self, host: str = "127.0.0.1", family: socket.AddressFamily = socket.AF_INET) -> None:
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.bind((host, 0))
        self.sock.listen(16)
        self.sock.settimeout(0.1)
        self.port = int(self.sock.getsockname()[1])
        self.accepted = 0
        self.stopping = False
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while not self.stopping:
            try:
                conn, _ = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            self.accepted += 1
            conn.close()

    def close(self) -> None:
        self.stopping = True
        self.thread.join()
        self.sock.close()


@contextlib.contextmanager
def canary(host: str = "127.0.0.1", family: socket.AddressFamily = socket.AF_INET) -> Iterator[Canary]:
    listener = Canary(host, family)
    try:
        yield listener
    finally:
        listener.close()


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
        return True
    except OSError:
        return False


LOOPBACK_SPELLINGS = [
    "127.0.0.1",
    "127.1",
    "2130706433",
    "0x7f000001",
    "0177.0.0.1",
    "localhost",
    "127.0.0.1.",
]


def image_chat(url: str) -> dict[str, Any]:
    parts = [{"type": "text", "text": "what is it"}, {"type": "image_url", "image_url": {"url": url}}]
    return {"model": "v", "messages": [{"role": "user", "content": parts}]}


def vision_models(max_images: int = 1, **options: str) -> FakeModels:
    fakes = FakeModels(model("v", pool("v", worker(0))))
    fakes.served_models["v"] = FakeModel("v", options=options, max_images=max_images)
    return fakes


def test_loopback_in_every_spelling_is_a_400_without_a_connection() -> None:
    """Allow-listed or not, a URL whose host is loopback never connects (the allow list names them all
    here, so that the address check is what refuses them)."""
    with canary() as listener, canary("::1", socket.AF_INET6) if ipv6_loopback() else canary() as six:
        hosts = [*LOOPBACK_SPELLINGS, "[::1]", "[::ffff:127.0.0.1]"]
        allowed = ",".join(h if h.startswith("[") else h.rstrip(".") for h in hosts)
        fakes = vision_models(allowed_media_domains=allowed)
        http = client(fakes)
        for host in hosts:
            port = six.port if host == "[::1]" else listener.port
            response = http.post("/v1/chat/completions", json=image_chat(f"http://{host}:{port}/cat.png"))
            assert response.status_code == 400, (host, response.text)
            error = response.json()["error"]
            assert error["param"] == "messages.0.content.1.image_url", host
            assert "refused" in error["message"], (host, error["message"])
        # Not allow-listed: refused before even resolving.
        response = http.post("/v1/chat/completions", json=image_chat(f"http://127.0.0.2:{listener.port}/"))
        assert response.status_code == 400 and "allowed_media_domains" in response.json()["error"]["message"]
        assert listener.accepted == 0 and six.accepted == 0
        assert fakes.served_models["v"].requests == []  # nothing was queued


def test_without_allowed_domains_no_url_is_fetched() -> None:
    with canary() as listener:
        response = client(vision_models()).post(
            "/v1/chat/completions", json=image_chat(f"http://127.0.0.1:{listener.port}/cat.png")
        )
        assert response.status_code == 400
        assert "allowed_media_domains" in response.json()["error"]["message"]
        assert listener.accepted == 0


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://127.0.0.1/x.png", "gopher://127.0.0.1/"])
def test_other_schemes_are_a_400(url: str) -> None:
    response = client(vision_models(allowed_media_domains="127.0.0.1")).post(
        "/v1/chat/completions", json=image_chat(url)
    )
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "messages.0.content.1.image_url"


def loopback_allowed(address: IPAddress) -> str | None:
    """The tests' policy: 127.0.0.1 passes (it stands for a public host), everything else is refused."""
    return None if str(address) == "127.0.0.1" else "a test-refused address"


class ImageServer(http.server.BaseHTTPRequestHandler):
    routes: ClassVar[dict[str, tuple[int, dict[str, str], bytes]]] = {}

    def do_GET(self) -> None:
        status, headers, body = self.routes.get(self.path, (404, {}, b""))
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextlib.contextmanager
def image_server(routes: dict[str, tuple[int, dict[str, str], bytes]]) -> Iterator[int]:
    handler = type("Routes", (ImageServer,), {"routes": routes})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()


def test_a_checked_host_is_fetched_and_redirects_are_checked_again(monkeypatch: pytest.MonkeyPatch) -> None:
    image = png()
    with canary("127.0.0.2") as refused:
        routes = {
            "/cat.png": (200, {"Content-Type": "image/png"}, image),
            "/moved": (302, {"Location": "/cat.png"}, b""),
            "/to-refused": (302, {"Location": f"http://127.0.0.2:{refused.port}/cat.png"}, b""),
            "/to-unlisted": (301, {"Location": f"http://localhost:{refused.port}/cat.png"}, b""),
            "/loop": (302, {"Location": "/loop"}, b""),
            "/big": (200, {}, image * 1000),
            "/missing": (404, {}, b""),
        }
        allowed = frozenset({"127.0.0.1", "127.0.0.2"})
        with image_server(routes) as port:
            base = f"http://127.0.0.1:{port}"
            assert fetch(f"{base}/cat.png", allowed, "p", loopback_allowed) == image
            assert fetch(f"{base}/moved", allowed, "p", loopback_allowed) == image
            with pytest.raises(BadRequestError, match="refused") as caught:
                fetch(f"{base}/to-refused", allowed, "p", loopback_allowed)
            assert caught.value.param == "p"
            with pytest.raises(BadRequestError, match=r"not in option\.allowed_media_domains"):
                fetch(f"{base}/to-unlisted", allowed, "p", loopback_allowed)
            with pytest.raises(BadRequestError, match="redirects"):
                fetch(f"{base}/loop", allowed, "p", loopback_allowed)
            with pytest.raises(BadRequestError, match="HTTP 404"):
                fetch(f"{base}/missing", allowed, "p", loopback_allowed)
            monkeypatch.setattr(media, "MAX_IMAGE_BYTES", len(image) * 10)
            with pytest.raises(BadRequestError, match="larger than"):
                fetch(f"{base}/big", allowed, "p", loopback_allowed)
        assert refused.accepted == 0


def test_a_name_is_refused_when_any_of_its_addresses_is(monkeypatch: pytest.MonkeyPatch) -> None:
    answers = [ipaddress.ip_address("8.8.8.8"), ipaddress.ip_address("10.0.0.7")]
    monkeypatch.setattr(media, "resolve", lambda host, port: answers)
    with pytest.raises(BadRequestError, match="private"):
        checked_address("https://images.example.com/a.png", frozenset({"images.example.com"}), "p")
    monkeypatch.setattr(media, "resolve", lambda host, port: answers[:1])
    assert (
        checked_address("https://images.example.com/a.png", frozenset({"images.example.com"}), "p")
        == answers[0]
    )


def test_the_connection_goes_to_the_checked_address(monkeypatch: pytest.MonkeyPatch) -> None:
    """The name is resolved once: the connection is made to the address that was checked, whatever the
    name would resolve to later (a DNS rebinding answer)."""
    image = png()
    with image_server({"/a.png": (200, {}, image)}) as port:
        checked = ipaddress.ip_address("127.0.0.1")
        calls: list[str] = []

        def resolve(host: str, port: int) -> list[IPAddress]:
            calls.append(host)
            return [checked]

        monkeypatch.setattr(media, "resolve", resolve)
        got = fetch(f"http://images.test:{port}/a.png", frozenset({"images.test"}), "p", loopback_allowed)
        assert got == image and calls == ["images.test"]


# -- the chat API ----------------------------------------------------------------------------------


def test_an_image_chat_reaches_the_engine_with_its_bytes_and_image_parts() -> None:
    fakes = vision_models()
    image = png()
    response = client(fakes).post("/v1/chat/completions", json=image_chat(data_url(image)))
    assert response.status_code == 200, response.text
    (request,) = fakes.served_models["v"].requests
    assert request.images == [image]
    assert request.messages == [
        {"role": "user", "content": [{"type": "text", "text": "what is it"}, {"type": "image"}]}
    ]


def test_text_parts_alone_stay_a_string() -> None:
    fakes = vision_models()
    body = {
        "model": "v",
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}
        ],
    }
    assert client(fakes).post("/v1/chat/completions", json=body).status_code == 200
    (request,) = fakes.served_models["v"].requests
    assert request.messages == [{"role": "user", "content": "ab"}] and request.images == []


def test_an_image_to_a_text_only_model_is_a_400_naming_the_part() -> None:
    fakes = vision_models(max_images=0)
    response = client(fakes).post("/v1/chat/completions", json=image_chat(data_url(png())))
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "messages.0.content.1.image_url" and "text-only" in error["message"]


def test_more_images_than_the_limit_is_a_400_naming_the_first_extra_part() -> None:
    fakes = vision_models(max_images=2)
    url = data_url(png())
    parts = [{"type": "image_url", "image_url": {"url": url}} for _ in range(3)]
    body = {
        "model": "v",
        "messages": [{"role": "user", "content": parts[:2]}, {"role": "user", "content": parts[2:]}],
    }
    response = client(fakes).post("/v1/chat/completions", json=body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "messages.1.content.0.image_url" and "limit_mm_per_prompt" in error["message"]
    body["messages"] = body["messages"][:1]
    assert client(fakes).post("/v1/chat/completions", json=body).status_code == 200


def test_a_malformed_image_is_a_400_naming_the_part() -> None:
    fakes = vision_models()
    response = client(fakes).post(
        "/v1/chat/completions", json=image_chat("data:image/png;base64," + base64.b64encode(b"junk").decode())
    )
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "messages.0.content.1.image_url"
    assert fakes.served_models["v"].requests == []


@pytest.mark.parametrize(
    "part",
    [
        {"type": "image_url", "image_url": {}},
        {"type": "image_url", "image_url": {"url": 3}},
        {"type": "input_audio", "input_audio": {"data": "", "format": "wav"}},
    ],
)
def test_a_malformed_part_is_a_400(part: dict[str, Any]) -> None:
    body = {"model": "v", "messages": [{"role": "user", "content": [part]}]}
    response = client(vision_models()).post("/v1/chat/completions", json=body)
    assert response.status_code == 400
    assert response.json()["error"]["param"].startswith("messages.0.content")


def test_responses_input_image_reaches_the_engine_and_is_named_by_its_input_item() -> None:
    fakes = vision_models()
    image = png()
    content = [
        {"type": "input_text", "text": "what is it"},
        {"type": "input_image", "image_url": data_url(image)},
    ]
    body = {"model": "v", "instructions": "Be brief.", "input": [{"role": "user", "content": content}]}
    response = client(fakes).post("/v1/responses", json=body)
    assert response.status_code == 200, response.text
    (request,) = fakes.served_models["v"].requests
    assert request.images == [image]
    assert request.messages is not None
    assert request.messages[-1]["content"] == [{"type": "text", "text": "what is it"}, {"type": "image"}]
    two = [*content, {"type": "input_image", "image_url": data_url(image), "detail": "low"}]
    response = client(fakes).post("/v1/responses", json={**body, "input": [{"role": "user", "content": two}]})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "input.0.content.2.image_url"


def test_tokenize_reads_image_parts_for_the_engine_to_count_as_it_generates() -> None:
    fakes = vision_models()
    http = client(fakes)
    body = image_chat(data_url(png()))
    refused = http.post("/tokenize", json={**body, "add_generation_prompt": False})
    assert refused.status_code == 400
    assert refused.json()["error"]["param"] == "messages.0.content.1.image_url"
    assert http.post("/tokenize", json=body).status_code == 200
    (operation,) = fakes.served_models["v"].operations
    assert isinstance(operation, Tokenize) and operation.request.images == [png()]
    assert client(vision_models(max_images=0)).post("/tokenize", json=body).status_code == 400
