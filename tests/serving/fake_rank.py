"""A fake rank for the server-side tests: a ``RankConnection`` whose other end the test drives."""

from __future__ import annotations

import asyncio
from pathlib import Path

from lmi_core.serving.connection import RankConnection


async def rank_pair(tmp_path: Path) -> tuple[RankConnection, asyncio.StreamReader, asyncio.StreamWriter]:
    """A RankConnection to a fake rank, and the rank's ends of the socket (read, write)."""
    path = str(tmp_path / "rank.0")
    accepted: asyncio.Future[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = asyncio.Future()
    server = await asyncio.start_unix_server(lambda r, w: accepted.set_result((r, w)), path)
    conn = await RankConnection.connect(0, f"unix:{path}", deadline=1e18, alive=lambda: True)
    reader, writer = await accepted
    server.close()
    return conn, reader, writer
