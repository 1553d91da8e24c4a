"""The application's lifespan: what it prepares before the first request."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

# In a fresh interpreter: nothing else in a test session may have imported anyio's backend first.
STARTUP = """
import asyncio, sys
from lmi_core.config import ServerConfig
from lmi_core.http.app import create_app

BACKEND = "anyio._backends._asyncio"

async def main() -> None:
    app = create_app(ServerConfig(runtime_dir=sys.argv[1]))
    print("before", BACKEND in sys.modules)
    async with app.router.lifespan_context(app):
        print("started", BACKEND in sys.modules)

asyncio.run(main())
"""


def test_startup_imports_anyio_backend_before_the_first_stream(tmp_path: Path) -> None:
    """Starlette's first StreamingResponse would import it (270 ms of the first request's TTFT)."""
    done = subprocess.run(
        [sys.executable, "-c", STARTUP, str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["before", "False", "started", "True"]
