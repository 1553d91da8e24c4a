"""DJL's output format, TGI, session and handler options: validated at start, honoured or refused by name."""

from __future__ import annotations

import logging

import pytest

from lmi_core.config import build_model_config
from lmi_core.djl_options import DjlOptions, djl_options
from lmi_core.errors import ConfigError


def test_defaults_are_djls() -> None:
    options = djl_options({})
    assert options == DjlOptions(sessions_path=options.sessions_path)
    assert options.sessions and options.sessions_expiration == 1200 and options.output_formatter is None
    assert options.sessions_path.endswith("djl_sessions")


@pytest.mark.parametrize("name", ["json", "jsonlines", "sse", "json_chat", "jsonlines_chat", "sse_chat"])
def test_every_djl_output_formatter_lmi_writes_is_accepted(name: str) -> None:
    assert djl_options({"output_formatter": name}).output_formatter == name


@pytest.mark.parametrize(
    ("key", "value", "allowed"),
    [
        ("output_formatter", "3p", "Bedrock"),
        ("output_formatter", "my_function", "@output_formatter"),
        ("bedrock_compat", "true", "not implemented"),
        ("tgi_compat", "yes", "true or false"),
        ("enable_stateful_sessions", "1", "true or false"),
        ("sessions_expiration", "0", ">= 1"),
        ("handler", "not a name", "function name"),
    ],
)
def test_bad_values_stop_the_start_naming_the_key(key: str, value: str, allowed: str) -> None:
    with pytest.raises(ConfigError, match=f"option.{key}.*{allowed}"):
        build_model_config({"option.model_id": "/m", f"option.{key}": value}, environ={})


def test_djl_keys_reach_the_model_and_no_backend_refuses_them() -> None:
    from lmi_hf.options import validate_hf_options

    properties = {
        "option.tgi_compat": "true",
        "option.output_formatter": "sse",
        "option.enable_stateful_sessions": "false",
        "option.sessions_path": "/tmp/s",
        "option.sessions_expiration": "60",
    }
    config = build_model_config({"option.model_id": "/m", **properties}, environ={})
    assert config.djl == DjlOptions("sse", True, False, "/tmp/s", 60)
    validate_hf_options(config.options, None)  # no "expected a key the hf backend knows"


def test_keys_without_effect_are_logged(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        build_model_config({"option.model_id": "/m", "option.async_mode": "true"}, environ={})
    assert "option.async_mode=true has no effect" in caplog.text
