"""The deploy/ artifacts users copy: Kubernetes manifests against the API schemas, the sbatch script's
syntax, and the Grafana dashboard's queries against a running server's /metrics.

The manifests are checked offline with ``kubernetes-validate`` (PyPI; ``.ci/run`` installs it apart
from the venv). LeaderWorkerSet is a CRD the validator has no schema for: its own fields are checked
with the schema shipped in ``deploy/kubernetes/schemas``, its pod templates as core/v1 Pods.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import httpx
import jsonschema  # type: ignore[import-untyped]
import pytest
import yaml  # type: ignore[import-untyped]

from tests.conftest import ServerProcess

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
K8S_VERSION = "1.30.0"  # the oldest Kubernetes these manifests are meant for


def documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


@pytest.fixture(scope="module")
def kubernetes_validate() -> Any:
    import kubernetes_validate  # the test extra: validates offline against the Kubernetes schemas

    return kubernetes_validate


def test_python_mode_deployment_and_service_are_valid(kubernetes_validate: Any) -> None:
    docs = documents(DEPLOY / "kubernetes" / "deployment-python.yaml")
    assert [d["kind"] for d in docs] == ["Deployment", "Service"]
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    container = docs[0]["spec"]["template"]["spec"]["containers"][0]
    assert {"startupProbe", "readinessProbe", "livenessProbe"} <= set(container)
    assert container["resources"]["limits"]["nvidia.com/gpu"]


def test_leaderworkerset_and_its_pod_templates_are_valid(kubernetes_validate: Any) -> None:
    (lws,) = documents(DEPLOY / "kubernetes" / "lws-mpi.yaml")
    schema = json.loads((DEPLOY / "kubernetes" / "schemas" / "leaderworkerset-v1.json").read_text())
    jsonschema.validate(lws, schema)
    template = lws["spec"]["leaderWorkerTemplate"]
    for role in ("leaderTemplate", "workerTemplate"):
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"lws-{role.lower()}"}}
        pod["spec"] = template[role]["spec"]
        kubernetes_validate.validate(pod, K8S_VERSION, strict=True)
    leader = template["leaderTemplate"]["spec"]["containers"][0]
    assert {"startupProbe", "readinessProbe", "livenessProbe"} <= set(leader)
    script = leader["args"][0]
    assert "OPTION_MPI_HOSTS" in script and "LWS_LEADER_ADDRESS" in script and "lmi serve" in script
    run = subprocess.run(["bash", "-n"], input=script, text=True, capture_output=True, timeout=30)
    assert run.returncode == 0, run.stderr


def test_the_inference_pool_its_lmi_pods_and_its_endpoint_picker_are_valid(kubernetes_validate: Any) -> None:
    from lmi_core.config import build_server_config

    deployment, pool = documents(DEPLOY / "kubernetes" / "inferencepool.yaml")
    jsonschema.validate(
        pool, json.loads((DEPLOY / "kubernetes" / "schemas" / "inferencepool-v1.json").read_text())
    )
    kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)
    picker = documents(DEPLOY / "kubernetes" / "picker" / "endpoint-picker.yaml")
    assert [d["kind"] for d in picker] == ["ServiceAccount", "Role", "RoleBinding", "Service", "Deployment"]
    for doc in picker:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    # The pool selects the lmi pods, its ports are their worker ports, and its picker is the Service.
    template = deployment["spec"]["template"]
    assert pool["spec"]["selector"]["matchLabels"].items() <= template["metadata"]["labels"].items()
    args = template["spec"]["containers"][0]["args"]
    ports = build_server_config(environ={}, worker_ports=args[args.index("--worker-ports") + 1]).worker_ports
    assert [p["number"] for p in pool["spec"]["targetPorts"]] == list(ports)
    assert pool["spec"]["endpointPickerRef"]["name"] == picker[3]["metadata"]["name"]
    assert pool["spec"]["endpointPickerRef"]["port"]["number"] == picker[3]["spec"]["ports"][0]["port"]


def test_the_leader_builds_the_host_list_from_the_groups_pod_names() -> None:
    (lws,) = documents(DEPLOY / "kubernetes" / "lws-mpi.yaml")
    script = lws["spec"]["leaderWorkerTemplate"]["leaderTemplate"]["spec"]["containers"][0]["args"][0]
    # Run the script's host-list lines with LWS's variables for a group of 3 pods.
    match = re.search(r"^ *leader=.*?^ *export OPTION_TENSOR_PARALLEL_DEGREE=.*?$", script, re.M | re.S)
    assert match is not None
    lines = match.group(0) + "\n"
    env = {"LWS_LEADER_ADDRESS": "lmi-0.lmi.default", "LWS_GROUP_SIZE": "3", "GPUS_PER_POD": "4"}
    out = subprocess.run(
        ["bash", "-c", lines + 'echo "$OPTION_MPI_HOSTS $OPTION_TENSOR_PARALLEL_DEGREE"'],
        env={**env, "PATH": "/bin:/usr/bin"}, capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    assert out.stdout.split() == ["lmi-0.lmi.default:4,lmi-0-1.lmi.default:4,lmi-0-2.lmi.default:4", "12"]


def containers(doc: Any) -> list[dict[str, Any]]:
    """Every container spec anywhere in a manifest."""
    if isinstance(doc, dict):
        found = list(doc["containers"]) if isinstance(doc.get("containers"), list) else []
        return found + [c for value in doc.values() for c in containers(value)]
    return [c for value in doc for c in containers(value)] if isinstance(doc, list) else []


def test_the_image_copies_every_package_the_wheel_ships() -> None:
    """The Dockerfile installs lmi-core from copied sources: a package left out of its COPY lines is
    missing from the image (``djl_python`` was, and ``lmi serve`` failed at its first import)."""
    import tomllib

    project = tomllib.loads((DEPLOY.parent / "pyproject.toml").read_text())
    packages = [p.rstrip("*") for p in project["tool"]["setuptools"]["packages"]["find"]["include"]]
    dockerfile = (DEPLOY.parent / "Dockerfile").read_text()
    assert packages and all(f"COPY {p} /src/{p}\n" in dockerfile for p in packages), packages


def test_every_manifest_runs_the_image_this_repository_builds_through_tini() -> None:
    import lmi_core

    makefile = (DEPLOY.parent / "Makefile").read_text()
    assert (
        "scripts/build-image.sh" in makefile
        and "image-smoke.sh localhost/lmi-core:0.1.0-$(FLAVOUR)" in makefile
    )
    dockerfile = (DEPLOY.parent / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["/usr/bin/tini", "--", "lmi"]' in dockerfile
    for manifest in (DEPLOY / "kubernetes").glob("*.yaml"):
        specs = [c for doc in documents(manifest) for c in containers(doc)]
        assert specs, manifest
        for spec in specs:
            assert spec["image"] == f"lmi-core:{lmi_core.__version__}-cuda", (manifest.name, spec["image"])
            # The image's entrypoint unless the manifest replaces it, and then still through tini.
            assert spec.get("command", ["/usr/bin/tini"])[0] == "/usr/bin/tini", (manifest.name, spec["name"])


@pytest.mark.parametrize(
    "script",
    [
        "deploy/slurm/lmi-mpi.sbatch",
        "deploy/kubernetes/lmi-sshd.sh",
        "deploy/image/install.sh",
        "scripts/build-image.sh",
        "scripts/image-smoke.sh",
    ],
)
def test_shell_script_syntax(script: str) -> None:
    run = subprocess.run(["bash", "-n", str(DEPLOY.parent / script)], capture_output=True, timeout=30)
    assert run.returncode == 0, run.stderr


def test_every_metric_the_dashboard_queries_exists_on_a_running_server(
    demo_model: Path, tmp_path: Path
) -> None:
    dashboard = json.loads((DEPLOY / "grafana" / "lmi-core-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    variables = dashboard["templating"]["list"]
    exprs += [v["query"]["query"] for v in variables if isinstance(v.get("query"), dict)]
    queried = {m for e in exprs for m in re.findall(r"\blmi_[a-z0-9_]+", e)}
    assert len(queried) >= 10
    env = {**os.environ, "OPTION_MPI_MODE": "false"}
    server = ServerProcess(["--model-id", str(demo_model)], env, tmp_path / "server.log")
    try:
        server.wait_ready()
        body = {"inputs": "Hello", "parameters": {"max_new_tokens": 4}}
        assert httpx.post(f"{server.url}/invocations", json=body, timeout=60).status_code == 200
        text = httpx.get(f"{server.url}/metrics", timeout=30).text
    finally:
        server.stop()
    # Samples, and the families declared by "# TYPE" (a labelled counter has no sample before its
    # first event, e.g. lmi_worker_restarts_total on a server that never restarted a worker).
    exposed = {line.split("{")[0].split()[0] for line in text.splitlines() if line and line[0] != "#"}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            suffixes = ("", "_bucket", "_sum", "_count") if kind == "histogram" else ("",)
            exposed |= {name + suffix for suffix in suffixes}
    assert sorted(queried - exposed) == []
