"""``tocsin api``: serve the HTTP API against the configured broker and Redis."""

from __future__ import annotations

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
    from ops.logging import configure_logging, logging_config
    from ops.settings import get_settings

    settings = get_settings()
    missing = [name for name, value in (("KAFKA_BOOTSTRAP_SERVERS",
                                         settings.kafka_bootstrap_servers),
                                        ("REDIS_URL", settings.redis_url)) if not value]
    if missing:
        err.print(f"[red]error:[/] {' and '.join(missing)} not set (or run `tocsin dev` for "
                  "the embedded stack)")
        raise typer.Exit(2)
    configure_logging(settings.log_level, settings.log_format)
    app = create_app(settings)
    uvicorn.run(app, host=host or settings.api_host,
                port=settings.api_port if port is None else port,
                log_level=settings.log_level.lower(), proxy_headers=False,
                # uvicorn's loggers too: JSON lines, contact details scrubbed
                log_config=logging_config(settings.log_level, settings.log_format))
