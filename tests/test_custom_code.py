"""A model's custom code (DJL's model.py): which file, whether it is a handle() model, its formatters,
and the djl_python names it imports."""

from __future__ import annotations

from pathlib import Path

import pytest

from djl_python import Input, Output
from lmi_core import custom_code
from lmi_core.config import build_model_config
from lmi_core.errors import ConfigError, EngineError

FORMATTERS = """
from djl_python.input_parser import input_formatter
from djl_python.output_formatter import output_formatter

@input_formatter
def rename(payload, tokenizer=None):
    if payload.get("boom"):
        raise RuntimeError("bad payload")
    if payload.get("not_a_dict"):
        return ["x"]
    payload["inputs"] = payload.pop("prompt", payload.get("inputs"))
    payload["tokenizer"] = tokenizer
    return payload

@output_formatter
def mark(response):
    response["marked"] = __name__
    return response
"""


def write(directory: Path, text: str, name: str = "model.py") -> str:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / name).write_text(text)
    return str((directory / name).resolve())


def test_the_entry_point_is_model_py_or_the_file_option_entry_point_names(tmp_path: Path) -> None:
    assert custom_code.entry_point_file(str(tmp_path), None) is None
    model_py = write(tmp_path, "x = 1\n")
    assert custom_code.entry_point_file(str(tmp_path), None) == model_py
    other = write(tmp_path, "x = 2\n", "serve.py")
    assert custom_code.entry_point_file(str(tmp_path), "serve.py") == other
    assert custom_code.entry_point_file(None, other) == other  # absolute
    # DJL's own LLM handlers: the backend serves; model.py's formatters still apply.
    assert custom_code.entry_point_file(str(tmp_path), "djl_python.lmi_vllm.vllm_async_service") == model_py
    with pytest.raises(ConfigError, match=r"option\.entryPoint.*an existing file"):
        custom_code.entry_point_file(str(tmp_path), "missing.py")
    with pytest.raises(ConfigError, match=r"option\.entryPoint.*downloads no code"):
        custom_code.entry_point_file(str(tmp_path), "https://example.com/model.py")
    with pytest.raises(ConfigError, match=r"option\.entryPoint.*a \.py file"):
        custom_code.entry_point_file(str(tmp_path), "my_package.handler")


def test_a_handle_function_makes_the_model_a_handler_model(tmp_path: Path) -> None:
    write(tmp_path, "def handle(inputs):\n    return None\n")
    config = build_model_config({}, model_dir=str(tmp_path), environ={})
    assert config.backend_name == "handler" and config.entry_point == str(tmp_path / "model.py")
    renamed = build_model_config({"option.handler": "serve"}, model_dir=str(tmp_path), environ={})
    assert renamed.backend_name is None  # model.py has no serve(): its formatters only
    with pytest.raises(ConfigError, match=r"option\.backend.*defines handle"):
        build_model_config({"option.backend": "hf"}, model_dir=str(tmp_path), environ={})
    builtin = {"option.entryPoint": "djl_python.huggingface"}
    assert build_model_config(builtin, model_dir=str(tmp_path), environ={}).backend_name is None
    env = build_model_config(
        {}, model_dir=str(tmp_path), environ={"DJL_ENTRY_POINT": "djl_python.huggingface"}
    )
    assert env.backend_name is None


def test_a_model_py_that_does_not_parse_stops_the_start(tmp_path: Path) -> None:
    write(tmp_path, "def handle(inputs)\n")
    with pytest.raises(ConfigError, match=r"option\.entryPoint.*parses"):
        build_model_config({}, model_dir=str(tmp_path), environ={})


def test_formatters_run_the_first_file_that_has_each(tmp_path: Path) -> None:
    base = write(tmp_path / "base", FORMATTERS)
    adapter = write(
        tmp_path / "adapter", FORMATTERS.split("@input_formatter")[0] + FORMATTERS.split("return payload")[1]
    )
    payload, output = custom_code.format_input([base], {"prompt": "hi"}, tokenizer="tok")
    assert payload == {"inputs": "hi", "tokenizer": "tok"} and output
    # Each file is its own module: the adapter's output formatter, the base's input formatter.
    assert (
        custom_code.format_output([adapter, base], {})["marked"]
        != custom_code.format_output([base], {})["marked"]
    )
    assert custom_code.format_input([adapter, base], {"prompt": "x"}, None)[0]["inputs"] == "x"
    assert custom_code.format_input([write(tmp_path / "plain", "x = 1\n")], {"a": 1}, None) == (
        {"a": 1},
        False,
    )


def test_a_failing_formatter_is_a_424_naming_it(tmp_path: Path) -> None:
    base = write(tmp_path, FORMATTERS)
    with pytest.raises(
        EngineError, match=r"input formatter rename \(model.py\) failed: RuntimeError: bad payload"
    ) as info:
        custom_code.format_input([base], {"boom": True}, None)
    assert info.value.status == 424 and info.value.type == "CustomFormatterException"
    with pytest.raises(EngineError, match="returned list, not a dict"):
        custom_code.format_input([base], {"not_a_dict": True}, None)
    with pytest.raises(EngineError, match="output formatter mark"):
        custom_code.format_output([base], "a string has no keys")
    broken = write(tmp_path / "broken", "import not_a_module_anywhere\n")
    with pytest.raises(EngineError, match="failed to load"):
        custom_code.format_input([broken], {}, None)


def test_djl_input_and_output() -> None:
    inputs = Input({"Content-Type": "application/json"}, [("q", b"1"), ("data", b'{"a": 1}')])
    assert inputs.get_property("content-type") == "application/json" and not inputs.is_empty()
    assert (
        inputs.get_as_json() == {"a": 1}
        and inputs.get_as_string("q") == "1"
        and inputs.get_data() == {"a": 1}
    )
    assert inputs.get_batches() == [inputs] and Input({"x": "y"}).is_empty()
    with pytest.raises(KeyError):
        inputs.get_as_bytes("nope")
    out = Output().add_property("content-type", "text/plain").add("hello")
    assert out.body() == b"hello" and out.code == 200
    error = Output().error("model error")
    assert error.code == 424 and b'"message": "invoke handler failure"' in error.body()
    assert Output().add_as_json({"b": [1]}, key="data").body() == b'{"b": [1]}'
