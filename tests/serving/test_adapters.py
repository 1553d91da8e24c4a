"""The adapter registry and the static check of an adapter directory (no torch, no worker)."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest

from lmi_core.config import ModelConfig, build_model_config
from lmi_core.engine import LoraAdapter
from lmi_core.errors import BadRequestError, ConfigError, NotFoundError, ServiceError
from lmi_core.option_values import LoraSettings, lora_settings
from lmi_core.serving.adapters import (
    AdapterRegistry,
    adapter_registry,
    base_modules,
    check_adapter,
    missing_targets,
    safetensors_keys,
)

BASE_TENSORS = [
    "model.embed_tokens.weight",
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.0.self_attn.v_proj.weight",
    "model.layers.0.mlp.up_proj.weight",
    "lm_head.weight",
]


def write_safetensors(path: Path, names: list[str]) -> Path:
    """A safetensors file whose header lists ``names`` (the tensors' bytes are not needed)."""
    header = {
        n: {"dtype": "F32", "shape": [1], "data_offsets": [4 * i, 4 * i + 4]} for i, n in enumerate(names)
    }
    header["__metadata__"] = {"format": "pt"}  # type: ignore[dict-item]
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 4 * len(names))
    return path


def write_adapter(directory: Path, weights: bool = True, **config: Any) -> Path:
    directory.mkdir(parents=True)
    settings = {"peft_type": "LORA", "r": 8, "target_modules": ["q_proj", "v_proj"], **config}
    (directory / "adapter_config.json").write_text(json.dumps(settings))
    if weights:
        (directory / "adapter_model.safetensors").write_bytes(b"")
    return directory


@pytest.fixture
def base(tmp_path: Path) -> Path:
    directory = tmp_path / "base"
    directory.mkdir()
    write_safetensors(directory / "model.safetensors", BASE_TENSORS)
    return directory


def test_base_modules_are_read_from_the_safetensors_headers(base: Path) -> None:
    assert safetensors_keys(base / "model.safetensors") == BASE_TENSORS
    modules = base_modules(str(base))
    assert modules is not None and "model.layers.0.self_attn.q_proj" in modules and "lm_head" in modules
    assert base_modules("org/hub-model") is None  # not a local directory: the check is skipped


def test_target_modules_match_as_peft_matches_them(base: Path) -> None:
    modules = base_modules(str(base))
    assert modules is not None
    assert missing_targets(["q_proj", "up_proj"], modules) == []
    assert missing_targets(["q_proj", "k_proj"], modules) == ["k_proj"]
    assert missing_targets(r".*\.(q|v)_proj", modules) == []
    assert missing_targets(r".*\.o_proj", modules) == [r".*\.o_proj"]
    assert missing_targets("all-linear", modules) == []


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda d: d, "no such directory"),
        (lambda d: (d.mkdir(), d)[1], "no adapter_config.json"),
        (lambda d: write_adapter(d, peft_type="PREFIX_TUNING"), "not LORA"),
        (lambda d: write_adapter(d, r=32), "rank 32 is above option.max_lora_rank=16"),
        (lambda d: write_adapter(d, r="8"), "not a positive integer"),
        (lambda d: write_adapter(d, weights=False), "no weights"),
        (lambda d: write_adapter(d, target_modules=["q_proj", "gate_x"]), "['gate_x'] are not in the base"),
    ],
)
def test_a_bad_adapter_is_a_400_naming_src(tmp_path: Path, base: Path, setup: Any, message: str) -> None:
    src = setup(tmp_path / "adapter")
    with pytest.raises(BadRequestError) as failed:
        check_adapter(str(src), LoraSettings(enabled=True), base_modules(str(base)))
    assert failed.value.param == "src" and message in str(failed.value) and str(src) in str(failed.value)


def test_a_config_that_does_not_parse_is_a_400(tmp_path: Path) -> None:
    src = write_adapter(tmp_path / "a")
    (src / "adapter_config.json").write_text("{not json")
    with pytest.raises(BadRequestError, match="does not parse"):
        check_adapter(str(src), LoraSettings(enabled=True), None)


def test_a_good_adapter_passes_and_target_modules_are_not_checked_without_a_local_base(
    tmp_path: Path, base: Path
) -> None:
    check_adapter(str(write_adapter(tmp_path / "a")), LoraSettings(enabled=True), base_modules(str(base)))
    odd = write_adapter(tmp_path / "b", target_modules=["gate_x"])
    check_adapter(str(odd), LoraSettings(enabled=True), None)


def lora_model(tmp_path: Path, **options: str) -> ModelConfig:
    return ModelConfig(
        name="m", model_id=str(tmp_path / "nowhere"), options={"enable_lora": "true", **options}
    )


def test_registry_add_get_remove_and_what_it_tells_the_workers(tmp_path: Path) -> None:
    changes: list[tuple[str, LoraAdapter]] = []
    registry = AdapterRegistry(lora_model(tmp_path), lambda op, a: changes.append((op, a)))
    registry.add("a", "/a")
    registry.add("b", "/b", preload=False)
    registry.add("c", "/c", pin=True)
    assert [e.name for e in registry.entries()] == ["a", "b", "c"]
    assert changes == [("load", LoraAdapter("a", "/a")), ("load", LoraAdapter("c", "/c", pinned=True))]
    assert [a.name for a in registry.resident()] == ["a", "c"]
    with pytest.raises(ServiceError) as dup:
        registry.add("a", "/other")
    assert dup.value.status == 409 and "already exists" in str(dup.value)
    with pytest.raises(BadRequestError, match="base model"):
        registry.add("m", "/m")
    with pytest.raises(BadRequestError, match="preload to false and pin to true"):
        registry.add("d", "/d", preload=False, pin=True)
    changes.clear()
    registry.remove("a")
    assert changes == [("unload", LoraAdapter("a", "/a"))]
    with pytest.raises(NotFoundError, match="The adapter a was not found"):
        registry.get("a")


def test_registry_update_follows_djl_rules(tmp_path: Path) -> None:
    changes: list[tuple[str, str, bool]] = []
    registry = AdapterRegistry(lora_model(tmp_path), lambda op, a: changes.append((op, a.name, a.pinned)))
    registry.add("b", "/b", preload=False)
    assert registry.update("b", preload=True).preload and changes == [("load", "b", False)]
    assert registry.update("b", pin=True).pin and changes[-1] == ("load", "b", True)
    with pytest.raises(BadRequestError, match="Unpinning adapter is not supported"):
        registry.update("b", pin=False)
    with pytest.raises(BadRequestError, match="pin to true"):
        registry.update("b", preload=False)
    registry.add("c", "/c")
    registry.update("c", preload=False)
    assert changes[-1] == ("unload", "c", False)


def test_the_adapters_directory_is_registered_at_start(tmp_path: Path) -> None:
    model = tmp_path / "model"
    write_adapter(model / "adapters" / "beta")
    write_adapter(model / "adapters" / "alpha")
    (model / "adapters" / "README").write_text("not an adapter directory")
    config = ModelConfig(name="m", model_id=str(model), model_dir=str(model), options={"enable_lora": "true"})
    registry = adapter_registry(config)
    assert registry is not None
    assert [(e.name, e.source, e.preload) for e in registry.entries()] == [
        ("alpha", "directory", True),
        ("beta", "directory", True),
    ]
    assert registry.get("alpha").src == str((model / "adapters" / "alpha").resolve())
    assert adapter_registry(config.model_copy(update={"options": {}})) is None  # LoRA off: no registry


def test_a_bad_adapter_in_the_directory_fails_the_start_naming_it(tmp_path: Path) -> None:
    model = tmp_path / "model"
    write_adapter(model / "adapters" / "big", r=64)
    config = ModelConfig(name="m", model_id=str(model), model_dir=str(model), options={"enable_lora": "true"})
    with pytest.raises(ConfigError, match=r"adapters/big.*rank 64 is above option\.max_lora_rank=16"):
        adapter_registry(config)


def test_lora_settings_defaults_and_values() -> None:
    assert lora_settings({}) == LoraSettings(False, 4, 16, 4)
    assert lora_settings({"enable_lora": "True", "max_loras": "2"}) == LoraSettings(True, 2, 16, 2)
    assert lora_settings({"max_lora_rank": "64", "max_cpu_loras": "8"}) == LoraSettings(False, 4, 64, 8)


@pytest.mark.parametrize(
    ("key", "value", "allowed"),
    [
        ("enable_lora", "maybe", "true or false"),
        ("max_loras", "0", "an integer >= 1"),
        ("max_loras", "x", "an integer >= 1"),
        ("max_lora_rank", "12", "one of (1, 8, 16, 32, 64, 128, 256, 320, 512)"),
        ("max_cpu_loras", "2", "at least max_loras (4)"),
    ],
)
def test_bad_lora_settings_are_startup_errors_naming_the_key(key: str, value: str, allowed: str) -> None:
    with pytest.raises(ConfigError) as failed:
        build_model_config({"option.model_id": "/m", f"option.{key}": value}, environ={})
    assert failed.value.key == f"option.{key}" and allowed in str(failed.value)
