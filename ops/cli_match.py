"""``tocsin match``: who would an area reach? (offline, against a subscriber file)."""

from __future__ import annotations

import typer


def match() -> None:
    """Print the subscriber ids an area matches (stub: being built)."""
    raise typer.Exit(1)
