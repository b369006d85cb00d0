"""Sub-commands `gateway ca ...` (placeholder until its issue lands)."""

from __future__ import annotations

import argparse
from typing import Any


def register(sub: "argparse._SubParsersAction[Any]") -> None:
    """Add the `ca` sub-commands to the CLI."""
