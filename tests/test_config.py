"""serving.properties parsing, environment mapping, precedence and validation errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmi_core.config import (
    build_model_config,
    build_server_config,
    env_model_properties,
    load_model_config,
    parse_properties,
)
from lmi_core.errors import ConfigError


def test_parse_properties_syntax() -> None:
    text = "# comment\n! also comment\nengine=Python\noption.model_id = /m\nkey: value\nlong=a\\\n  b\n\n"
    assert parse_properties(text) == {
        "engine": "Python",
        "option.model_id": "/m",
        "key": "value",
        "long": "ab",
    }


def test_option_env_mapping_follows_djl_rules() -> None:
    env = {
        "OPTION_TENSOR_PARALLEL_DEGREE": "2",
        "OPTION_ENGINE": "MPI",
        "OPTION_ENTRYPOINT": "x.py",
        "OPTION_maxRollingBatch": "4",
        "OPTION_EMPTY": "",
        "OTHER": "1",
    }
    assert env_model_properties(env) == {
        "option.tensor_parallel_degree": "2",
        "engine": "MPI",
        "option.entryPoint": "x.py",
        "option.maxRollingBatch": "4",
    }


def test_file_wins_over_option_env() -> None:
    config = build_model_config(
        {"option.model_id": "/m", "option.max_rolling_batch_size": "8"},
        environ={"OPTION_MAX_ROLLING_BATCH_SIZE": "64", "OPTION_DTYPE": "fp16"},
    )
    assert config.max_rolling_batch_size == 8
    assert config.dtype == "fp16"  # env fills what the file lacks


def test_typed_fields_and_backend_options() -> None:
    config = build_model_config(
        {
            "option.model_id": "/m",
            "option.mpi_mode": "true",
            "option.tensor_parallel_degree": "max",
            "gpu.maxWorkers": "3",
            "option.predict_timeout": "5",
            "option.max_model_len": "128",
        },
        environ={},
    )
    assert config.mpi_mode is True
    assert config.tensor_parallel_degree == "max"
    assert config.max_workers == 3
    assert config.predict_timeout == 5.0
    assert config.options == {"max_model_len": "128"}


@pytest.mark.parametrize(
    ("properties", "key"),
    [
        ({"option.tensor_parallel_degree": "two"}, "option.tensor_parallel_degree"),
        ({"option.tensor_parallel_degree": "0"}, "option.tensor_parallel_degree"),
        ({"option.mpi_mode": "maybe"}, "option.mpi_mode"),
        ({"engine": "Rust"}, "engine"),
        ({"maxWorkers": "-1"}, "maxWorkers"),
        ({"option.predict_timeout": "soon"}, "option.predict_timeout"),
        ({"job_queue_size": "0"}, "job_queue_size"),
        ({"unknown_key": "1"}, "unknown_key"),
        ({"minWorkers": "3", "maxWorkers": "2"}, "minWorkers"),
    ],
)
def test_bad_values_name_the_key_and_value(properties: dict[str, str], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        build_model_config({"option.model_id": "/m", **properties}, environ={})
    assert info.value.key == key
    message = str(info.value)
    assert key in message and "expected" in message
    assert str(properties.get(key, "")) in message


def test_model_id_defaults_to_model_dir(tmp_path: Path) -> None:
    (tmp_path / "serving.properties").write_text("engine=Python\n")
    config = load_model_config(tmp_path, environ={})
    assert config.model_id == str(tmp_path.resolve())
    assert config.name == tmp_path.name


def test_missing_model_dir_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="model_dir"):
        load_model_config(tmp_path / "nope", environ={})


def test_no_model_at_all_is_an_error() -> None:
    with pytest.raises(ConfigError, match=r"option\.model_id"):
        build_model_config({}, environ={})


def test_server_env_overrides_properties_and_rejects_bad_values() -> None:
    config = build_server_config({"job_queue_size": "5"}, environ={"SERVING_JOB_QUEUE_SIZE": "7"})
    assert config.job_queue_size == 7
    with pytest.raises(ConfigError, match="SERVING_JOB_QUEUE_SIZE"):
        build_server_config(environ={"SERVING_JOB_QUEUE_SIZE": "lots"})
    # Unknown SERVING_* variables belong to other tools: ignored, not fatal.
    assert build_server_config(environ={"SERVING_FEATURES": "vllm"}).job_queue_size == 1000
    with pytest.raises(ConfigError, match="bogus"):
        build_server_config({"bogus": "1"}, environ={})


def test_worker_ports_are_up_to_8_distinct_ports_and_a_clean_error_names_the_key() -> None:
    assert build_server_config(environ={"SERVING_WORKER_PORTS": "8001, 8002"}).worker_ports == (8001, 8002)
    assert build_server_config(environ={}).worker_ports == ()
    for bad in ("8001,8001", ",".join(str(8001 + i) for i in range(9)), "8001,x", "0"):
        with pytest.raises(ConfigError, match="SERVING_WORKER_PORTS"):
            build_server_config(environ={"SERVING_WORKER_PORTS": bad})
    with pytest.raises(ConfigError, match="SERVING_METRICS_PORT"):
        build_server_config(environ={"SERVING_METRICS_PORT": "70000"})
    assert build_model_config({"option.model_id": "m", "option.gie_metrics": "true"}, environ={}).gie_metrics


def test_residency_settings_of_a_model_and_the_server() -> None:
    config = build_model_config(
        {
            "option.model_id": "/m",
            "option.load_on_startup": "false",
            "option.idle_timeout": "2",
            "option.pinned": "true",
        },
        environ={},
    )
    assert (config.load_on_startup, config.idle_timeout, config.pinned) == (False, 2.0, True)
    assert "idle_timeout" not in config.options  # the core's keys, not the backend's
    server = build_server_config(
        environ={"SERVING_MAX_LOADED_MODELS": "3", "SERVING_LOAD_ON_STARTUP": "false"}
    )
    assert server.max_loaded_models == 3 and not config.loads_on_startup(server)
    default = build_model_config({"option.model_id": "/m"}, environ={})
    assert not default.loads_on_startup(server) and default.loads_on_startup(build_server_config(environ={}))
    with pytest.raises(ConfigError, match=r"option\.idle_timeout"):
        build_model_config({"option.model_id": "/m", "option.idle_timeout": "0"}, environ={})


@pytest.mark.parametrize(
    ("text", "fraction", "size"),
    [
        ("0.9", 0.9, None),
        ("1", 1.0, None),
        ("24GiB", None, 24 * 1024**3),
        ("500MB", None, 500 * 1000**2),
        ("1.5gi", None, int(1.5 * 1024**3)),
        ("2000000", None, 2_000_000),  # above 1, a bare number is bytes
    ],
)
def test_the_memory_budget_is_a_fraction_of_each_device_or_a_size(
    text: str, fraction: float | None, size: int | None
) -> None:
    budget = build_server_config(environ={"SERVING_MEMORY_BUDGET": text}).memory_budget
    assert budget is not None and (budget.fraction, budget.size) == (fraction, size)
    assert budget.of(1000) == (size if size is not None else int(1000 * (fraction or 0)))


@pytest.mark.parametrize("text", ["0", "lots", "-1GiB", "1.5", "5 TB"])
def test_a_bad_memory_budget_names_its_variable(text: str) -> None:
    with pytest.raises(ConfigError, match="SERVING_MEMORY_BUDGET"):
        build_server_config(environ={"SERVING_MEMORY_BUDGET": text})
