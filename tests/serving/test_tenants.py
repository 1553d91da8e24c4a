"""Tenants (``serving.tenants``): the file and its errors, API keys, budgets, reloads, labels."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from lmi_core.config import ServerConfig
from lmi_core.engine import GenerationRequest
from lmi_core.errors import ConfigError, TenantBudgetError
from lmi_core.serving import tenants as tenants_module
from lmi_core.serving.tenants import (
    DEFAULT,
    OTHER,
    PRIORITY_RANGE,
    Tenant,
    Tenants,
    TenantSpec,
    TokenBucket,
    estimate_prompt_tokens,
    key_digest,
    parse_tenants,
)

KEY_A, KEY_B = "key-of-a", "key-of-b"
FILE = f"""\
# two teams
tenants:
  a:
    api_keys: ["{key_digest(KEY_A)}"]
    weight: 2
    priority: [0, 10]
    max_concurrency: 4
    tokens_per_minute: 6000
  b:
    api_keys:
      - {key_digest(KEY_B)}
"""


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_a_yaml_file_gives_each_tenant_its_settings_and_defaults() -> None:
    a, b = parse_tenants(FILE, "t.yaml")
    assert a == TenantSpec("a", (key_digest(KEY_A),), 2.0, (0, 10), 4, 6000)
    assert b == TenantSpec("b", (key_digest(KEY_B),))
    assert b.priority == PRIORITY_RANGE and b.max_concurrency is None and b.tokens_per_minute is None


def test_a_json_file_is_read_as_json() -> None:
    data = {
        "tenants": {"a": {"api_keys": [key_digest(KEY_A).upper().replace("SHA256", "sha256")], "weight": 1e1}}
    }
    (a,) = parse_tenants(json.dumps(data, indent="\t"), "t.json")  # tabs: JSON's, not YAML's
    assert a.weight == 10.0 and a.api_keys == (key_digest(KEY_A),)  # digests compare in lower case


@pytest.mark.parametrize(
    ("text", "line", "names"),
    [
        (FILE.replace("weight: 2", "weight: -2"), 5, "tenants.a.weight=-2: expected input should be greater"),
        (FILE.replace("weight: 2", "wieght: 2"), 5, "tenants.a.wieght"),
        (FILE.replace("priority: [0, 10]", "priority: [10, 0]"), 6, "tenants.a.priority"),
        (FILE.replace("max_concurrency: 4", "max_concurrency: four"), 7, "tenants.a.max_concurrency"),
        (FILE.replace(f"- {key_digest(KEY_B)}", "- plain-text-key"), 11, "expected a key digest 'sha256:"),
        (FILE.replace(f"- {key_digest(KEY_B)}", f"- {key_digest(KEY_A)}"), 11, "tenant a has it"),
        (FILE.replace("  b:\n", "  a:\n"), 9, "a"),  # a tenant twice
        (FILE.replace("  b:\n", "  other:\n"), 9, "tenants.other"),  # the reserved label
        (FILE.replace("weight: 2", "weight: [2"), 6, "valid YAML"),  # where the parser finds it
        ("tenants:\n  - a\n", 2, "tenants"),
        ("", None, "the file"),
    ],
)
def test_a_bad_file_is_a_config_error_naming_its_line(text: str, line: int | None, names: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_tenants(text, "t.yaml")
    message = str(caught.value)
    assert message.startswith("invalid configuration tenants_file t.yaml"), message
    if line is not None:
        assert f"t.yaml, line {line}" in message, message
    assert names in message, message


def test_a_json_syntax_error_names_its_line() -> None:
    with pytest.raises(ConfigError, match=r"t.json, line 3.*valid JSON"):
        parse_tenants('{"tenants": {\n  "a": {},\n  "b": {,}\n}}', "t.json")


def test_a_token_bucket_refills_by_the_minute_and_may_go_into_debt() -> None:
    bucket = TokenBucket(600, now=0.0)  # 10 tokens a second
    assert bucket.take(500, 0.0) is None
    assert bucket.take(200, 0.0) == pytest.approx(10.0)  # 100 left: 100 more take 10 s
    assert bucket.take(200, 10.0) is None
    bucket.give(-300, 10.0)  # used 300 more than charged
    assert bucket.level == pytest.approx(-300.0)
    bucket.give(10_000, 20.0)
    assert bucket.level == 600.0  # never above a minute's worth


def test_max_concurrency_counts_the_requests_in_flight_and_refuses_the_next_with_429() -> None:
    tenant = Tenant(TenantSpec("a", max_concurrency=2), "a", now=0.0)
    leases = [tenant.admit(1, 1, 0.0), tenant.admit(1, 1, 0.0)]
    with pytest.raises(TenantBudgetError) as caught:
        tenant.admit(1, 1, 0.0)
    assert caught.value.status == 429 and caught.value.param == "max_concurrency"
    assert caught.value.retry_after == 1 and "2 of 2 requests in flight" in str(caught.value)
    leases[0].release(2, 0.0)
    leases[0].release(2, 0.0)  # twice: counted once
    assert tenant.in_flight == 1
    tenant.admit(1, 1, 0.0)


def test_tokens_per_minute_charges_prompt_plus_max_tokens_and_refunds_to_actual_use() -> None:
    tenant = Tenant(TenantSpec("a", tokens_per_minute=600), "a", now=0.0)
    lease = tenant.admit(100, 400, 0.0)  # 500 charged, 100 left
    with pytest.raises(TenantBudgetError) as caught:
        tenant.admit(100, 100, 0.0)  # 200 needed: 10 s at 10 tokens/s
    assert caught.value.param == "tokens_per_minute" and caught.value.retry_after == 10
    assert tenant.in_flight == 1  # the refused one is not counted
    lease.release(150, 0.0)  # used 150 of 500: 350 back
    tenant.admit(100, 100, 0.0)
    big = Tenant(TenantSpec("b", tokens_per_minute=600), "b", now=0.0)
    assert big.admit(10, 2**31, 0.0).charge == 600.0  # at most a full bucket: it can run


def test_the_prompt_estimate_is_exact_for_token_ids_and_counts_characters_otherwise() -> None:
    assert estimate_prompt_tokens(GenerationRequest("r", prompt_ids=[1, 2, 3])) == 3
    assert estimate_prompt_tokens(GenerationRequest("r", prompt="x" * 40)) == 11
    messages = [{"role": "user", "content": "x" * 20}, {"role": "assistant", "content": "y" * 20}]
    assert estimate_prompt_tokens(GenerationRequest("r", messages=messages)) == 11


def test_priorities_are_clamped_to_the_tenants_range() -> None:
    spec = TenantSpec("a", priority=(0, 10))
    assert [spec.clamp(p) for p in (-5, 0, 7, 99)] == [0, 0, 7, 10]


def test_keys_name_tenants_and_every_request_needs_one_when_some_tenant_has_keys(tmp_path: Path) -> None:
    tenants = Tenants(write(tmp_path / "t.yaml", FILE))
    assert tenants.identify([KEY_A], None) is not None and tenants.identify([KEY_A], None).name == "a"  # type: ignore[union-attr]
    assert tenants.identify(["unknown"], None) is None
    assert tenants.identify((), None) is None
    assert tenants.identify(["server-key"], None, api_key="server-key") is tenants.default


def test_without_keys_the_tenant_is_default_or_the_trusted_fairness_header(tmp_path: Path) -> None:
    path = write(tmp_path / "t.yaml", "tenants:\n  batch: {weight: 0.5}\n")
    untrusted = Tenants(path)
    assert untrusted.identify((), "batch") is untrusted.default
    assert untrusted.identify((), None, api_key="k") is None  # a server key is still needed
    trusted = Tenants.from_config(ServerConfig(tenants_file=path, trust_tenant_header=True))
    batch = trusted.identify((), "batch")
    assert batch is not None and batch.spec.weight == 0.5 and batch.label == "batch"
    flow = trusted.identify((), "some-flow")
    assert flow is not None and flow.name == "some-flow" and flow.label == OTHER
    assert trusted.identify((), "some-flow") is flow  # its service and budgets are its own
    assert trusted.identify((), None) is trusted.default and trusted.default.label == DEFAULT


def test_a_tenant_named_default_configures_the_default_tenant(tmp_path: Path) -> None:
    tenants = Tenants(write(tmp_path / "t.yaml", "tenants:\n  default: {max_concurrency: 1}\n"))
    assert tenants.identify((), None) is tenants.default
    assert tenants.default.spec.max_concurrency == 1


def test_a_reload_swaps_settings_keeps_whats_in_flight_and_a_bad_file_changes_nothing(tmp_path: Path) -> None:
    path = write(tmp_path / "t.yaml", FILE)
    tenants = Tenants(path)
    a = tenants.identify([KEY_A], None)
    assert a is not None
    lease = a.admit(10, 10, 0.0)
    write(tmp_path / "t.yaml", FILE.replace("weight: 2", "weight: 3").replace("  b:\n", "  c:\n"))
    assert tenants.reload()
    assert tenants.identify([KEY_A], None) is a and a.spec.weight == 3.0 and a.in_flight == 1
    assert tenants.identify([KEY_B], None).name == "c"  # type: ignore[union-attr]
    write(tmp_path / "t.yaml", "tenants: [")
    assert not tenants.reload()
    assert tenants.identify([KEY_A], None) is a and a.spec.weight == 3.0
    write(tmp_path / "t.yaml", "tenants: {}\n")
    assert tenants.reload()
    assert tenants.identify([KEY_A], None) is tenants.default  # no keys any more: no key needed
    lease.release(20, 0.0)  # the removed tenant's request still ends cleanly
    assert a.in_flight == 0


def test_a_changed_file_is_reloaded_at_the_next_look(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tenants_module, "RELOAD_CHECK", 0.0)
    path = write(tmp_path / "t.yaml", FILE)
    tenants = Tenants(path)
    assert tenants.identify(["new-key"], None) is None
    replacement = tmp_path / "new.yaml"
    replacement.write_text(FILE + f"  c:\n    api_keys: ['{key_digest('new-key')}']\n")
    os.replace(replacement, path)  # as an editor or a config map swaps it
    found = tenants.identify(["new-key"], None)
    assert found is not None and found.name == "c"


def test_a_bad_file_at_start_up_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="line 5"):
        Tenants(write(tmp_path / "t.yaml", FILE.replace("weight: 2", "weight: 0")))
    with pytest.raises(ConfigError, match="readable"):
        Tenants(str(tmp_path / "missing.yaml"))


def test_metric_labels_are_capped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tenants_module, "MAX_LABELS", 2)
    path = write(tmp_path / "t.yaml", "tenants:\n  x: {}\n  y: {}\n  z: {}\n")
    tenants = Tenants(path, trust_header=True)
    labels = [tenants.identify((), name).label for name in ("x", "y", "z")]  # type: ignore[union-attr]
    assert labels == ["x", "y", OTHER]


def test_lmi_serve_refuses_to_start_with_a_bad_tenants_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from lmi_core.cli import main

    path = write(tmp_path / "t.yaml", FILE.replace("max_concurrency: 4", "max_concurrency: 0"))
    assert main(["serve", "--model-id", str(tmp_path), "--tenants-file", path]) == 2
    assert f"tenants_file {path}, line 7: tenants.a.max_concurrency=0" in capsys.readouterr().err
