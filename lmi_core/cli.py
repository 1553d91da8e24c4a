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
from collections.abc import Iterator
from urllib.parse import urlparse

import uvicorn

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
    from lmi_core.http.security import ListenerFilter
    from lmi_core.launch.hosts import job_hosts
    from lmi_core.plugins import get_plugin_manager

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
    )
    models = model_configs(args)
    pm = get_plugin_manager()
    for model in models:
        resolve_model(model, pm)  # fail fast on a bad backend or option, before binding the port
        if model.mode == "mpi":
            job_hosts(model)  # and on a bad host list (the load reads it again, in ModelServer.plan)
    listeners = [_address(config.inference_address)]
    if config.management_address:
        management = _address(config.management_address, "management_address")
        if management != listeners[0]:
            listeners.append(management)
    failures: list[Exception] = []
    servers: list[uvicorn.Server] = []

    def on_load_failure(exc: Exception) -> None:
        failures.append(exc)
        for server in servers:
            server.should_exit = True

    app = create_app(config, models, on_load_failure=on_load_failure)
    for index, (host, port) in enumerate(listeners):
        # One app, one lifespan (the first listener's): the models load once, both listeners serve them.
        listener_app = ListenerFilter(app, management=index == 1) if len(listeners) > 1 else app
        uv_config = uvicorn.Config(
            listener_app,
            host=host,
            port=port,
            log_level=config.log_level,
            lifespan="on" if index == 0 else "off",
            timeout_graceful_shutdown=config.drain_timeout,  # type: ignore[arg-type]  # float works
            access_log=args.access_log,
            http="httptools",
        )
        servers.append(_Server(uv_config))
    names = ", ".join(m.name for m in models)
    logger.info("serving on %s (models: %s)", " and ".join(f"http://{h}:{p}" for h, p in listeners), names)
    asyncio.run(_serve_all(servers))
    if failures:
        print(f"lmi: error: model failed to load: {failures[0]}", file=sys.stderr)
        return 1
    return 0


class _Server(uvicorn.Server):
    """A uvicorn server that leaves signals to ``_serve_all``: several servers share the process."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def _serve_all(servers: list[uvicorn.Server]) -> None:
    """Run the listeners until a signal or one of them stops; then all drain (uvicorn's graceful
    shutdown: stop accepting, finish in-flight requests up to drain_timeout) and the models stop."""
    loop = asyncio.get_running_loop()

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

    if args.kind == "llm":
        path = build_demo_model(args.directory)
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
        choices=("llm", "embedding", "reranker"),
        default="llm",
        help="a random Llama (default), a BERT embedding model or a BERT cross-encoder reranker",
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
