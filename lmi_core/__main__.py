"""``python -m lmi_core`` = ``lmi``."""

from __future__ import annotations

import sys

from lmi_core.cli import main

sys.exit(main())
