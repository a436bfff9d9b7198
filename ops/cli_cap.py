"""``tocsin cap ...``: CAP tooling for agencies and integrators."""

from __future__ import annotations

import typer

app = typer.Typer(help="CAP tools: validate messages before publishing them.", no_args_is_help=True)
