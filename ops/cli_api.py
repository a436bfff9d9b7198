"""``tocsin api``: serve the HTTP API against the configured broker and Redis."""

from __future__ import annotations

import logging

import typer
from rich.console import Console

err = Console(stderr=True)


def api(
    host: str | None = typer.Option(None, "--host", help="interface to bind (default: api_host)"),
    port: int | None = typer.Option(None, "--port", min=0, max=65535,
                             help="TCP port (default: api_port)"),
) -> None:
    """Serve the HTTP API (OpenAPI at /openapi.json, docs at /docs)."""
    import uvicorn

    from ops.api import create_app
    from ops.settings import get_settings

    settings = get_settings()
    missing = [name for name, value in (("KAFKA_BOOTSTRAP_SERVERS",
                                         settings.kafka_bootstrap_servers),
                                        ("REDIS_URL", settings.redis_url)) if not value]
    if missing:
        err.print(f"[red]error:[/] {' and '.join(missing)} not set (or run `tocsin dev` for "
                  "the embedded stack)")
        raise typer.Exit(2)
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(settings)
    uvicorn.run(app, host=host or settings.api_host,
                port=settings.api_port if port is None else port,
                log_level=settings.log_level.lower(), proxy_headers=False)
