"""A pooling model's settings (``option.task``, ``pooling``, ``normalize``), the kit its engines share
(vectors on the wire, cosine scores, inputs and pairs encoded), and several models per ``lmi serve``."""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from lmi_core import prompts
from lmi_core.cli import build_parser, model_configs
from lmi_core.config import build_model_config, model_directories
from lmi_core.errors import BadRequestError, ConfigError
from lmi_core.operations import Embed, Score
from lmi_core.pooling import (
    PoolingSettings,
    check_dimensions,
    cosine_scores,
    distinct_texts,
    pooling_settings,
    unpack_vectors,
    vector_bytes,
)


@pytest.mark.parametrize(
    ("options", "settings"),
    [
        ({}, PoolingSettings()),
        ({"task": "generate"}, PoolingSettings()),
        ({"task": "text-embedding"}, PoolingSettings("text-embedding")),
        (
            {"task": "embed", "pooling": "CLS", "normalize": "false"},
            PoolingSettings("text-embedding", "cls", False),
        ),
        ({"task": "score"}, PoolingSettings("rerank")),
        ({"task": "rerank", "pooling": "last"}, PoolingSettings("rerank", "last")),
    ],
)
def test_settings_read_the_task_and_its_aliases(options: dict[str, str], settings: PoolingSettings) -> None:
    assert pooling_settings(options) == settings


@pytest.mark.parametrize(
    ("options", "key"),
    [
        ({"task": "summarize"}, "option.task"),
        ({"task": "text-embedding", "pooling": "max"}, "option.pooling"),
        ({"task": "text-embedding", "normalize": "yes"}, "option.normalize"),
        ({"pooling": "mean"}, "option.pooling"),  # a generation model pools nothing
    ],
)
def test_a_bad_setting_fails_the_config_naming_its_key(options: dict[str, str], key: str) -> None:
    properties = {f"option.{k}": v for k, v in options.items()}
    with pytest.raises(ConfigError) as info:
        build_model_config({"option.model_id": "/m", **properties}, environ={})
    assert info.value.key == key


def test_vectors_travel_as_little_endian_float32_cut_and_normalized() -> None:
    vectors = torch.tensor([[3.0, 4.0, 12.0], [1.0, 0.0, 0.0]])
    data, width = vector_bytes(vectors, 2, normalize=True)
    assert width == 2 and len(data) == 16
    assert unpack_vectors(data, 2) == [[0.6000000238418579, 0.800000011920929], [1.0, 0.0]]
    raw, _ = vector_bytes(vectors, None, normalize=False)
    assert unpack_vectors(raw, 3) == vectors.tolist()


def test_pairs_embed_each_text_once_and_score_by_cosine() -> None:
    texts, first, second = distinct_texts([("q", "a"), ("q", "b"), ("a", "q")])
    assert (texts, first, second) == (["q", "a", "b"], [0, 0, 1], [1, 2, 0])
    vectors = torch.tensor([[1.0, 0.0], [2.0, 0.0], [1.0, 1.0]])
    scores = cosine_scores(vectors, first, second)
    assert scores[0] == pytest.approx(1.0) and scores[1] == pytest.approx(math.sqrt(0.5))


def test_dimensions_past_the_models_width_are_a_400() -> None:
    check_dimensions(None, 8)
    check_dimensions(8, 8)
    with pytest.raises(BadRequestError) as info:
        check_dimensions(9, 8)
    assert info.value.param == "dimensions"


class CharTokenizer:
    """One id per character, CLS=1 and SEP=2 around each text; pairs get type ids."""

    def __call__(self, first: list[str], second: list[str] | None = None, **kwargs: Any) -> dict[str, Any]:
        limit, truncation = kwargs["max_length"], kwargs["truncation"]
        ids, types = [], []
        for i, text in enumerate(first):
            one = [1] + [ord(c) for c in text] + [2]
            if second is None:
                ids.append(one[:limit] if truncation else one)
                continue
            two = [ord(c) for c in second[i]] + [2]
            if truncation == "only_second":
                two = two[: max(0, limit - len(one))]
            ids.append(one + two)
            types.append([0] * len(one) + [1] * len(two))
        return {"input_ids": ids, "token_type_ids": types} if second is not None else {"input_ids": ids}


def test_inputs_are_encoded_checked_and_cut_only_when_asked() -> None:
    tokenizer = CharTokenizer()
    assert prompts.pooling_inputs(Embed(["ab"]), tokenizer, 200, 8) == [[1, 97, 98, 2]]
    assert prompts.pooling_inputs(Embed([[5, 6]]), tokenizer, 200, 8) == [[5, 6]]
    assert prompts.pooling_inputs(Embed(["abcdefghij"], truncate=True), tokenizer, 200, 4) == [
        [1, 97, 98, 99]
    ]
    for operation, message in [
        (Embed(["abcdefghij"], param="inputs"), "input 0 has 12 tokens"),
        (Embed([[5, 500]], param="inputs"), "500"),
        (Embed(["a", []], param="inputs"), "input 1 is empty"),  # type: ignore[list-item]
    ]:
        with pytest.raises(BadRequestError, match=message) as info:
            prompts.pooling_inputs(operation, tokenizer, 200, 8)
        assert info.value.param == "inputs"


def test_pairs_carry_type_ids_and_truncate_cuts_the_document() -> None:
    tokenizer = CharTokenizer()
    ((ids, types),) = prompts.pooling_pairs(Score([("a", "bc")]), tokenizer, 16)
    assert ids == [1, 97, 2, 98, 99, 2] and types == [0, 0, 0, 1, 1, 1]
    ((cut, _),) = prompts.pooling_pairs(Score([("a", "bcdef")], truncate=True), tokenizer, 5)
    assert cut == [1, 97, 2, 98, 99]
    with pytest.raises(BadRequestError, match="pair 0 has 9 tokens") as info:
        prompts.pooling_pairs(Score([("a", "bcdef")], param="texts"), tokenizer, 5)
    assert info.value.param == "texts"


def write_model(directory: Path, properties: str = "") -> Path:
    directory.mkdir(parents=True)
    (directory / "serving.properties").write_text(f"option.model_id={directory}\n{properties}")
    return directory


def serve_args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["serve", *argv])


def test_a_directory_of_model_directories_serves_each_with_its_own_name(tmp_path: Path) -> None:
    write_model(tmp_path / "store" / "chat")
    write_model(tmp_path / "store" / "embed", "option.task=text-embedding\n")
    (tmp_path / "store" / "notes").mkdir()  # no model in it: not a model
    assert model_directories(tmp_path / "store") == [str(tmp_path / "store" / n) for n in ("chat", "embed")]
    models = model_configs(serve_args("--model-dir", str(tmp_path / "store")))
    assert [(m.name, m.pooling.task) for m in models] == [
        ("chat", "text-generation"),
        ("embed", "text-embedding"),
    ]


def test_model_dir_repeats_and_names_must_differ(tmp_path: Path) -> None:
    one = write_model(tmp_path / "a" / "m")
    two = write_model(tmp_path / "b" / "m")
    three = write_model(tmp_path / "c", "option.served_model_name=other\n")
    models = model_configs(serve_args("--model-dir", str(one), "--model-dir", str(three)))
    assert [m.name for m in models] == ["m", "other"]
    with pytest.raises(ConfigError) as info:
        model_configs(serve_args("--model-dir", str(one), "--model-dir", str(two)))
    assert info.value.key == "option.served_model_name"
    with pytest.raises(ConfigError) as info:
        model_configs(serve_args("--model-dir", str(one), "--model-dir", str(three), "--model-name", "x"))
    assert info.value.key == "--model-name"
