"""The worker side stays light: with every plugin loaded, a worker imports no server or GPU package.

A worker may run in another virtual environment than the server (``option.pythonExecutable``), one
that has the engine but not the HTTP stack; and every worker process pays for what it imports.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PLUGIN_DIRS = [ROOT / "plugins" / "lmi_hf", ROOT / "plugins" / "lmi_trtllm", ROOT / "plugins" / "lmi_vllm"]
PLUGIN_DIRS.append(ROOT / "examples" / "lmi_echo")
PLUGINS = ["lmi_hf.plugin", "lmi_trtllm.plugin", "lmi_vllm.plugin", "lmi_echo"]
# OpenTelemetry too: a worker imports it on its first traced request only (lmi_core.worker.tracing).
HEAVY = ["starlette", "uvicorn", "pydantic", "prometheus_client", "torch", "lmi_core.config", "opentelemetry"]

# What the worker does before it loads an engine: import itself, build its plugin manager (every
# plugin, as entry points or LMI_EXTRA_PLUGINS), and look at the worker hooks.
SCRIPT = """
import json, sys
import lmi_core.worker.rank_server
from lmi_core.plugins import new_plugin_manager
pm = new_plugin_manager()
names = [getattr(p, "__name__", "") for p in pm.get_plugins()]
hooks = [impl.plugin_name for impl in pm.hook.handle_request.get_hookimpls()]
print(json.dumps({"plugins": sorted(names), "hooks": hooks, "modules": sorted(sys.modules)}))
"""


def test_worker_with_every_plugin_imports_no_server_or_gpu_package() -> None:
    path = [
        str(ROOT),
        *map(str, PLUGIN_DIRS),
        *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep)),
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path), "LMI_EXTRA_PLUGINS": ",".join(PLUGINS)}
    env.pop("LMI_PLUGINS", None)
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, check=True
    ).stdout
    report = json.loads(out)
    assert set(PLUGINS) <= set(report["plugins"])
    assert report["hooks"] == ["lmi_core.worker.engine_hooks"]  # no plugin needs its own handle_request
    modules = set(report["modules"])
    loaded = [m for m in HEAVY if m in modules or any(n.startswith(m + ".") for n in modules)]
    assert loaded == []
