"""The ``lmi`` command: ``lmi serve`` runs the server, ``lmi demo-model`` builds the demo model."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Iterator
from urllib.parse import urlparse

import uvicorn
from starlette.types import ASGIApp

from lmi_core.config import (
    ModelConfig,
    ServerConfig,
    build_server_config,
    load_model_config,
    model_directories,
)
from lmi_core.errors import ConfigError

logger = logging.getLogger("lmi_core")


def _address(url: str, key: str = "inference_address") -> tuple[str, int]:
    parsed = urlparse(url if "://" in url else f"http://{url}")
    if not parsed.hostname:
        raise ConfigError(key, url, "http://HOST:PORT")
    return parsed.hostname, parsed.port or 8080


def model_configs(args: argparse.Namespace) -> list[ModelConfig]:
    """One model per ``--model-dir`` (a model store's subdirectories each), or ``--model-id``'s."""
    model_id = args.model_id or os.environ.get("HF_MODEL_ID")
    directories = [d for given in args.model_dir or [] for d in model_directories(given)]
    if not directories and model_id is None:
        raise ConfigError("--model-dir", None, "a model directory, --model-id or HF_MODEL_ID")
    if len(directories) > 1:
        for flag, value in (("--model-id", args.model_id), ("--model-name", args.model_name)):
            if value is not None:
                raise ConfigError(flag, value, f"unset with several models ({', '.join(directories)})")
        models = [load_model_config(d) for d in directories]
        names = [m.name for m in models]
        for name in names:
            if names.count(name) > 1:
                raise ConfigError("option.served_model_name", name, "a name no other model has")
        return models
    directory = directories[0] if directories else None
    return [load_model_config(directory, model_id=model_id, name=args.model_name)]


def serve(args: argparse.Namespace) -> int:
    from lmi_core.backends import resolve_model
    from lmi_core.http.app import create_app
    from lmi_core.http.connections import fd_bound, guarded_protocol
    from lmi_core.http.listeners import MetricsListener, WorkerPortListener
    from lmi_core.http.security import ListenerFilter
    from lmi_core.launch.hosts import job_hosts
    from lmi_core.plugins import get_plugin_manager
    from lmi_core.serving.tenants import Tenants

    address = f"http://{args.host}:{args.port}" if args.host or args.port else None
    if address and not args.host:
        address = f"http://127.0.0.1:{args.port}"
    elif address and not args.port:
        address = f"http://{args.host}:8080"
    config: ServerConfig = build_server_config(
        inference_address=address,
        management_address=args.management_address,
        api_key=args.api_key,
        cors_allowed_origins=args.cors_allowed_origins,
        metrics_port=args.metrics_port,
        worker_ports=args.worker_ports,
        request_head_timeout=args.request_head_timeout,
        max_connections=args.max_connections,
        tenants_file=args.tenants_file,
    )
    tenants = Tenants.from_config(config)  # a bad file stops the start here, naming its line
    models = model_configs(args)
    pm = get_plugin_manager()
    for model in models:
        resolve_model(model, pm)  # fail fast on a bad backend or option, before binding the port
        if model.mode == "mpi":
            job_hosts(model)  # and on a bad host list (the load reads it again, in ModelServer.plan)
    inference = _address(config.inference_address)
    address = config.management_address
    management = _address(address, "management_address") if address else None
    management = management if management != inference else None  # one listener serves both
    extra = [("metrics_port", config.metrics_port)] if config.metrics_port else []
    extra += [("worker_ports", port) for port in config.worker_ports]
    taken = [inference[1], *([management[1]] if management is not None else [])]
    for key, port in extra:
        if port in taken:
            raise ConfigError(key, port, "a port no other listener of this server uses")
        taken.append(port)
    failures: list[Exception] = []
    servers: list[uvicorn.Server] = []

    def on_load_failure(exc: Exception) -> None:
        failures.append(exc)
        for server in servers:
            server.should_exit = True

    app = create_app(config, models, on_load_failure=on_load_failure, tenants=tenants)
    # One app, one lifespan (the first listener's): the models load once, every listener serves them.
    serving = ListenerFilter(app, management=False) if management is not None else app
    listeners: list[tuple[tuple[str, int], ASGIApp]] = [(inference, serving)]
    if management is not None:
        listeners.append((management, ListenerFilter(app, management=True)))
    if config.metrics_port:
        listeners.append(((inference[0], config.metrics_port), MetricsListener(app.state.metrics.registry)))
    for slot, port in enumerate(config.worker_ports):
        listeners.append(((inference[0], port), WorkerPortListener(serving, app.state.lmi.server, slot)))
    protocol = guarded_protocol(config.request_head_timeout, fd_bound(config.max_connections, len(listeners)))
    for index, ((host, port), listener_app) in enumerate(listeners):
        uv_config = uvicorn.Config(
            listener_app,
            host=host,
            port=port,
            log_level=config.log_level,
            lifespan="on" if index == 0 else "off",
            timeout_graceful_shutdown=config.drain_timeout,  # type: ignore[arg-type]  # float works
            access_log=args.access_log,
            http=protocol,  # httptools', with a request-head deadline and a connection bound
        )
        servers.append(_Server(uv_config))
    names = ", ".join(m.name for m in models)
    addresses = ", ".join(f"http://{h}:{p}" for (h, p), _ in listeners)
    logger.info("serving on %s (models: %s)", addresses, names)
    asyncio.run(_serve_all(servers, tenants.reload))
    if failures:
        print(f"lmi: error: model failed to load: {failures[0]}", file=sys.stderr)
        return 1
    return 0


class _Server(uvicorn.Server):
    """A uvicorn server that leaves signals to ``_serve_all``: several servers share the process."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def _serve_all(servers: list[uvicorn.Server], on_hangup: Callable[[], object] | None = None) -> None:
    """Run the listeners until a signal or one of them stops; then all drain (uvicorn's graceful
    shutdown: stop accepting, finish in-flight requests up to drain_timeout) and the models stop.
    SIGHUP calls ``on_hangup`` (reread the tenants file) and serving goes on."""
    loop = asyncio.get_running_loop()
    if on_hangup is not None:
        loop.add_signal_handler(signal.SIGHUP, on_hangup)

    def on_signal(sig: signal.Signals) -> None:
        logger.info("received %s: draining in-flight requests, then stopping", sig.name)
        for server in servers:
            if server.should_exit and sig is signal.SIGINT:
                server.force_exit = True  # a second Ctrl-C: stop now
            server.should_exit = True

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)
    tasks = [asyncio.ensure_future(server.serve()) for server in servers]
    await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    for server in servers:
        server.should_exit = True
    await asyncio.gather(*tasks)


def backends(args: argparse.Namespace) -> int:
    from lmi_core.backends import list_backends
    from lmi_core.plugins import get_plugin_manager

    installed = list_backends(get_plugin_manager())
    rows = [
        {
            "backend": b.spec.name,
            "default_mode": b.spec.default_mode,
            "rolling_batch": ",".join(b.spec.rolling_batch),
            "distribution": b.distribution or b.plugin,
            "description": b.spec.description,
        }
        for b in installed
    ]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no backend installed: pip install lmi-hf, lmi-vllm or lmi-trtllm", file=sys.stderr)
        return 1
    columns = [c for c in rows[0] if c != "description"]
    widths = {c: max(len(c), *(len(r[c]) for r in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns).rstrip())
    for row in rows:
        print("  ".join(row[c].ljust(widths[c]) for c in columns).rstrip())
        if row["description"]:
            print(f"    {row['description']}")
    return 0


def doctor(args: argparse.Namespace) -> int:
    from lmi_core.launch.hosts import job_hosts
    from lmi_core.launch.preflight import doctor as run_doctor

    config = model_configs(args)[0]
    return run_doctor(config, job_hosts(config))


def demo_model(args: argparse.Namespace) -> int:
    from lmi_core.demo_encoder import build_demo_encoder
    from lmi_core.demo_model import build_demo_model
    from lmi_core.demo_vision import build_demo_vision

    if args.kind == "llm":
        path = build_demo_model(args.directory)
    elif args.kind == "vision":
        path = build_demo_vision(args.directory)
    else:
        path = build_demo_encoder(args.directory, args.kind)
    print(f"demo {args.kind} model written to {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmi", description="lmi-core large model inference server")
    commands = parser.add_subparsers(dest="command", required=True)
    p_serve = commands.add_parser("serve", help="serve a model directory over HTTP")
    p_serve.add_argument(
        "--model-dir",
        action="append",
        help="directory with the model and its serving.properties; repeat it (or name a directory of "
        "model directories) to serve several models, each with its own workers",
    )
    p_serve.add_argument("--model-id", help="option.model_id (a local path here; also env HF_MODEL_ID)")
    p_serve.add_argument("--model-name", help="the model's name in the API (default: the directory name)")
    p_serve.add_argument("--host", help="bind address (default 127.0.0.1; env SERVING_INFERENCE_ADDRESS)")
    p_serve.add_argument("--port", type=int, help="port (default 8080)")
    p_serve.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (env SERVING_API_KEY)")
    p_serve.add_argument(
        "--management-address",
        help="serve the management API and /metrics only here, e.g. http://127.0.0.1:8081 "
        "(env SERVING_MANAGEMENT_ADDRESS; default: with inference)",
    )
    p_serve.add_argument(
        "--cors-allowed-origins",
        help="comma-separated origins browsers may call from, '*' for any (env SERVING_CORS_ALLOWED_ORIGINS)",
    )
    p_serve.add_argument(
        "--metrics-port",
        type=int,
        help="also serve /metrics, with no API key, on this port of --host (the endpoint picker's "
        "scrape; env SERVING_METRICS_PORT)",
    )
    p_serve.add_argument(
        "--worker-ports",
        help="comma-separated ports of --host, at most 8: the i-th serves the API with each model's "
        "i-th worker preferred, and /metrics of that worker alone (an InferencePool's targetPorts; "
        "env SERVING_WORKER_PORTS)",
    )
    p_serve.add_argument(
        "--request-head-timeout",
        type=float,
        help="seconds a connection has to send a request head before it is closed "
        "(default 10; env SERVING_REQUEST_HEAD_TIMEOUT)",
    )
    p_serve.add_argument(
        "--max-connections",
        type=int,
        help="open HTTP connections per listener; more are refused with 503 "
        "(default 4096; env SERVING_MAX_CONNECTIONS)",
    )
    p_serve.add_argument(
        "--tenants-file",
        help="tenants: API keys, budgets, weights, priorities (YAML or JSON; env SERVING_TENANTS_FILE; "
        "reread on SIGHUP or change)",
    )
    p_serve.add_argument("--access-log", action="store_true", help="log every HTTP request")
    p_serve.set_defaults(func=serve)
    p_backends = commands.add_parser("backends", help="list the installed engine backends")
    p_backends.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p_backends.set_defaults(func=backends)
    p_doctor = commands.add_parser("doctor", help="check every host of a multi-host MPI job (preflight)")
    p_doctor.add_argument(
        "--model-dir", action="append", help="directory with the model and its serving.properties"
    )
    p_doctor.add_argument("--model-id", help="option.model_id (also env HF_MODEL_ID)")
    p_doctor.add_argument("--model-name", help="the model's name (default: the directory name)")
    p_doctor.set_defaults(func=doctor)
    p_demo = commands.add_parser("demo-model", help="build the tiny offline demo model into DIRECTORY")
    p_demo.add_argument("directory")
    p_demo.add_argument(
        "--kind",
        choices=("llm", "embedding", "reranker", "vision"),
        default="llm",
        help="a random Llama (default), a BERT embedding model, a BERT cross-encoder reranker, or a LLaVA "
        "(a CLIP vision tower over the Llama)",
    )
    p_demo.set_defaults(func=demo_model)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=os.environ.get("LMI_LOG_LEVEL", "INFO").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    os.environ.setdefault("HF_HUB_OFFLINE", "1") if args.command == "demo-model" else None
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"lmi: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
