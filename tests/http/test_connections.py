"""The connection guard's pure parts: the bound under a file-descriptor limit, the refusal, the options."""

from __future__ import annotations

import pytest

from lmi_core.config import build_server_config
from lmi_core.errors import ConfigError
from lmi_core.http.connections import FD_RESERVE, connection_bound, refusal


def test_the_bound_leaves_the_servers_own_descriptors_free() -> None:
    assert connection_bound(4096, 20_000, 1) == 4096
    assert connection_bound(4096, 1024, 1) == 1024 - FD_RESERVE  # ulimit -n 1024: lowered
    assert connection_bound(4096, 1024, 2) == (1024 - FD_RESERVE) // 2  # two listeners share it
    assert connection_bound(4096, 100, 1) == 1


def test_the_refusal_is_a_whole_http_response_that_closes() -> None:
    head, body = refusal(7).split(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503 ") and b"connection: close" in head
    assert f"content-length: {len(body)}".encode() in head and b"SERVING_MAX_CONNECTIONS=7" in body


def test_the_options_come_from_the_environment_and_are_checked() -> None:
    config = build_server_config(
        environ={"SERVING_REQUEST_HEAD_TIMEOUT": "2.5", "SERVING_MAX_CONNECTIONS": "9"}
    )
    assert (config.request_head_timeout, config.max_connections) == (2.5, 9)
    for name, value in (("SERVING_REQUEST_HEAD_TIMEOUT", "0"), ("SERVING_MAX_CONNECTIONS", "0")):
        with pytest.raises(ConfigError, match=name):
            build_server_config(environ={name: value})
