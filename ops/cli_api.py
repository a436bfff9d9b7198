"""``tocsin api``: the HTTP API and console."""

from __future__ import annotations

import typer


def api() -> None:
    """Serve the HTTP API (stub: being built)."""
    raise typer.Exit(1)
