"""``python -m lmi_core.worker``: one rank of a worker (``rank_server.main``)."""

from __future__ import annotations

from lmi_core.worker.rank_server import main

main()
