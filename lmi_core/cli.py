"""The ``lmi`` command: ``lmi serve`` runs the server, ``lmi demo-model`` builds the demo model."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from urllib.parse import urlparse

from lmi_core.config import ModelConfig, ServerConfig, build_server_config, load_model_config
from lmi_core.errors import ConfigError

logger = logging.getLogger("lmi_core")


def _address(url: str) -> tuple[str, int]:
    parsed = urlparse(url if "://" in url else f"http://{url}")
    if not parsed.hostname:
        raise ConfigError("inference_address", url, "http://HOST:PORT")
    return parsed.hostname, parsed.port or 8080


def _models(args: argparse.Namespace) -> list[ModelConfig]:
    model_id = args.model_id or os.environ.get("HF_MODEL_ID")
    if args.model_dir is None and model_id is None:
        raise ConfigError("--model-dir", None, "a model directory, --model-id or HF_MODEL_ID")
    return [load_model_config(args.model_dir, model_id=model_id, name=args.model_name)]


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from lmi_core.http.app import create_app
    from lmi_core.plugins import get_plugin_manager
    from lmi_core.server import resolve_model

    address = f"http://{args.host}:{args.port}" if args.host or args.port else None
    if address and not args.host:
        address = f"http://127.0.0.1:{args.port}"
    elif address and not args.port:
        address = f"http://{args.host}:8080"
    config: ServerConfig = build_server_config(inference_address=address, api_key=args.api_key)
    models = _models(args)
    pm = get_plugin_manager()
    for model in models:
        resolve_model(model, pm)  # fail fast on a bad backend or option, before binding the port
    host, port = _address(config.inference_address)
    failures: list[Exception] = []
    server: uvicorn.Server | None = None

    def on_load_failure(exc: Exception) -> None:
        failures.append(exc)
        if server is not None:
            server.should_exit = True

    app = create_app(config, models, on_load_failure=on_load_failure)
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=host,
            port=port,
            log_level=config.log_level,
            timeout_graceful_shutdown=int(config.drain_timeout),
            access_log=args.access_log,
        )
    )
    logger.info("serving on http://%s:%d (models: %s)", host, port, ", ".join(m.name for m in models))
    server.run()
    if failures:
        print(f"lmi: error: model failed to load: {failures[0]}", file=sys.stderr)
        return 1
    return 0


def demo_model(args: argparse.Namespace) -> int:
    from lmi_core.demo_model import build_demo_model

    path = build_demo_model(args.directory)
    print(f"demo model written to {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmi", description="lmi-core large model inference server")
    commands = parser.add_subparsers(dest="command", required=True)
    p_serve = commands.add_parser("serve", help="serve a model directory over HTTP")
    p_serve.add_argument("--model-dir", help="directory with the model and its serving.properties")
    p_serve.add_argument("--model-id", help="option.model_id (a local path here; also env HF_MODEL_ID)")
    p_serve.add_argument("--model-name", help="the model's name in the API (default: the directory name)")
    p_serve.add_argument("--host", help="bind address (default 127.0.0.1; env SERVING_INFERENCE_ADDRESS)")
    p_serve.add_argument("--port", type=int, help="port (default 8080)")
    p_serve.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (env SERVING_API_KEY)")
    p_serve.add_argument("--access-log", action="store_true", help="log every HTTP request")
    p_serve.set_defaults(func=serve)
    p_demo = commands.add_parser("demo-model", help="build the tiny offline demo model into DIRECTORY")
    p_demo.add_argument("directory")
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
