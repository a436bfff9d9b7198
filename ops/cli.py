"""The ``tocsin`` command line (typer).

Every command exits 0 on success and, on bad input or a missing service, exits non-zero
with one line saying what was wrong.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import redis.asyncio as aioredis
import typer
from rich.console import Console
from rich.progress import track

from ops.settings import Settings, get_settings

app = typer.Typer(
    help="Tocsin: emergency alerting from CAP to push, SMS and email.",
    no_args_is_help=True,
    add_completion=False,
)
subscribers_app = typer.Typer(help="Manage citizens' subscriptions.", no_args_is_help=True)
app.add_typer(subscribers_app, name="subscribers")
console = Console()
err = Console(stderr=True)


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print one line of explanation and return the Exit to raise."""
    err.print(f"[red]error:[/] {message}")
    return typer.Exit(code)


def _require(settings: Settings, *, kafka: bool = True, redis: bool = False) -> None:
    if kafka and not settings.kafka_bootstrap_servers:
        raise fail(
            "KAFKA_BOOTSTRAP_SERVERS is not set (or run `tocsin dev` for the embedded stack)"
        )
    if redis and not settings.redis_url:
        raise fail("REDIS_URL is not set (or run `tocsin dev` for the embedded stack)")


@app.command()
def dev(
    citizens: int = typer.Option(3000, min=1, help="synthetic citizens to load"),
    exit_after_replay: bool = typer.Option(
        False, "--exit-after-replay", help="stop once the replayed alerts are delivered"
    ),
) -> None:
    """Start the embedded stack, load demo data, replay real CAP alerts and show delivery."""
    from ops.dev import DevError, run_dev
    from ops.devstack import ServiceError

    try:
        code = run_dev(
            get_settings(), citizens=citizens, exit_after_replay=exit_after_replay, console=console
        )
    except (DevError, ServiceError) as exc:
        raise fail(str(exc), 1) from exc
    raise typer.Exit(code)


@app.command()
def worker() -> None:
    """Run a stream worker (all agents) against the configured broker and Redis."""
    settings = get_settings()
    _require(settings, redis=True)
    from faust import Worker

    from ops.logging import configure_logging, logging_config
    from streams.app import build_app
    from streams.topics import ensure_topics

    configure_logging(settings.log_level, settings.log_format)
    asyncio.run(
        ensure_topics(
            settings.kafka_bootstrap_servers,
            partitions=settings.partitions,
            replication=settings.replication_factor,
            prefix=settings.topic_prefix,
        )
    )
    faust_app = build_app(settings)
    Worker(
        faust_app, loglevel=settings.log_level, quiet=True,
        logging_config=logging_config(settings.log_level, settings.log_format),
    ).execute_from_commandline()  # fmt: skip


@app.command()
def topics() -> None:
    """Create the pipeline's topics on the configured broker (idempotent)."""
    settings = get_settings()
    _require(settings)
    from streams.topics import ensure_topics

    created = asyncio.run(
        ensure_topics(
            settings.kafka_bootstrap_servers,
            partitions=settings.partitions,
            replication=settings.replication_factor,
            prefix=settings.topic_prefix,
        )
    )
    console.print(f"created {len(created)} topic(s): {', '.join(created) or '-'}")


@app.command()
def publish(
    files: list[Path] = typer.Argument(..., help="CAP XML, GeoJSON or JSON hazard files"),
    source: str = typer.Option("cli", help="the source header recorded with each message"),
    rebase_time: bool = typer.Option(
        False, "--rebase-time", help="shift CAP times so `sent` is now (exercise replays)"
    ),
) -> None:
    """Produce hazard events to ``hazards.raw``, content type detected per file."""
    from datetime import UTC, datetime

    from streams.publish import content_type_for, hazard_record, produce, rebase_cap_times
    from streams.topics import HAZARDS_RAW

    settings = get_settings()
    _require(settings)
    records = []
    for path in files:
        try:
            payload = path.read_bytes()
        except OSError as exc:
            raise fail(f"{path}: {exc.strerror}") from exc
        ctype = content_type_for(path, payload)
        if rebase_time and ctype.endswith("xml"):
            payload = rebase_cap_times(payload, datetime.now(UTC))
        records.append(hazard_record(payload, ctype, source, time.time()))
    count = asyncio.run(
        produce(settings.kafka_bootstrap_servers, settings.topic(HAZARDS_RAW), records)
    )
    console.print(f"published {count} message(s) to {settings.topic(HAZARDS_RAW)}")


@subscribers_app.command("load")
def subscribers_load(
    file: Path = typer.Argument(..., help="GeoJSON FeatureCollection or CSV of subscribers"),
) -> None:
    """Store contacts in the contact vault and produce subscriptions to ``subscriptions``."""
    from channels.contacts import ContactStore
    from ops.subscribers import SubscriberFileError, read_subscribers
    from streams.publish import produce, subscription_records
    from streams.topics import SUBSCRIPTIONS

    settings = get_settings()
    _require(settings, redis=True)
    try:
        rows = list(track(read_subscribers(file), description="reading subscribers"))
    except SubscriberFileError as exc:
        raise fail(str(exc)) from exc
    except OSError as exc:
        raise fail(f"{file}: {exc.strerror}") from exc

    async def load() -> int:
        client = aioredis.Redis.from_url(settings.redis_url)
        try:
            await ContactStore(client).put_many({s.id: c for s, c in rows})
        finally:
            await client.aclose()
        return await produce(
            settings.kafka_bootstrap_servers,
            settings.topic(SUBSCRIPTIONS),
            subscription_records(s for s, _ in rows),
        )

    count = asyncio.run(load())
    console.print(f"loaded {count} subscription(s) into {settings.topic(SUBSCRIPTIONS)}")


def _register_subcommands() -> None:
    """Command groups that live in their own modules (kept small, one concern each)."""
    from ops import cli_api, cli_cap, cli_match

    app.add_typer(cli_cap.app, name="cap")
    app.command("api")(cli_api.api)
    app.command("match")(cli_match.match)


_register_subcommands()


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
