"""Structured logs: one JSON object per line, the alert identifier as correlation id.

Every line carries ``ts`` (UTC, ISO 8601), ``level``, ``logger``, ``msg``, ``alert_id``
and ``stage`` (``null`` outside an alert's handling), then any ``extra=`` fields and,
for exceptions, ``exc``. The agents in ``streams.app`` call :func:`bind` while they
handle a record, so everything logged meanwhile (the sender's and the providers' lines
included: they run in the agent's task or in tasks it starts) names the alert.

A redaction filter on the handler is the safety net for the privacy rule: anything
that looks like a phone number, an email address or an FCM registration token is
replaced by ``<redacted>`` in the message, the extras and the traceback, whatever
logger produced it. It errs on the side of privacy: agency sender ids shaped like
email addresses are scrubbed too; the ``alert_id`` field (a hash) never matches.
Bare digit runs are left alone: offsets and timestamps look the same, and Tocsin stores
phone numbers in E.164 (with the ``+``), which is scrubbed.

``log_format`` ``text`` gives the same fields as one readable line for a terminal.
"""

from __future__ import annotations

import contextlib
import json
import logging
import logging.config
import re
from collections.abc import Iterator
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

__all__ = [
    "JsonFormatter",
    "RedactingFilter",
    "TextFormatter",
    "bind",
    "configure_logging",
    "log_context",
    "logging_config",
    "redact",
]

_alert_id: ContextVar[str | None] = ContextVar("tocsin_alert_id", default=None)
_stage: ContextVar[str | None] = ContextVar("tocsin_stage", default=None)

REDACTED = "<redacted>"
# (pattern, substrings one of which a match must contain): the cheap ``in`` test skips
# the regex on the many lines that cannot match (the email pattern backtracks).
_PATTERNS: list[tuple[re.Pattern[str], tuple[str, ...]]] = [
    # email addresses, also URL-encoded (access logs, echoed query strings)
    (re.compile(r"[\w.+%-]+(?:@|%40)[\w-]+(?:\.[\w-]+)+"), ("@", "%40")),
    # FCM registration tokens: "<instance id>:APA91b<base64url>", and any opaque
    # base64url run long enough to be a device token
    (re.compile(r"[\w-]{8,}:APA91[\w-]{20,}"), ("APA91",)),
    (re.compile(r"(?<![\w-])[A-Za-z0-9_-]{100,}(?![\w-])"), ("",)),
    # E.164 and international numbers: +15551234567, +44 20 7946 0958, %2B15551234567
    (re.compile(r"(?<![\w+])(?:\+|%2[Bb])\d(?:[\s().-]?\d){6,16}(?!\w)"), ("+", "%2")),
    # North American formats: (555) 123-4567, 555-123-4567, 555.123.4567
    (re.compile(r"(?<![\w.-])(?:\(\d{3}\)\s?|\d{3}[\s.-])\d{3}[\s.-]\d{4}(?![\w.-])"), ("",)),
]

# Attributes every LogRecord has; anything else on a record came from ``extra=``.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "taskName",
    "color_message",  # uvicorn's ANSI-coloured copy of msg
}


def redact(text: str) -> str:
    """``text`` with everything that looks like a contact detail replaced."""
    for pattern, triggers in _PATTERNS:
        if any(t in text for t in triggers):
            text = pattern.sub(REDACTED, text)
    return text


def bind(stage: str, alert_id: str | None = None) -> None:
    """Name the stage and alert the current task is handling, until the next ``bind``.

    Meant for an agent's loop: each iteration binds its record, so nothing stale
    survives into the next; tasks started meanwhile inherit the binding.
    """
    _stage.set(stage)
    _alert_id.set(alert_id)


@contextlib.contextmanager
def log_context(stage: str | None = None, alert_id: str | None = None) -> Iterator[None]:
    """Bind ``stage`` and ``alert_id`` inside the block and restore what was before.

    ``log_context()`` with no arguments clears the binding, e.g. around starting
    long-lived tasks that must not inherit one alert's id.
    """
    stage_token = _stage.set(stage)
    alert_token = _alert_id.set(alert_id)
    try:
        yield
    finally:
        _alert_id.reset(alert_token)
        _stage.reset(stage_token)


class RedactingFilter(logging.Filter):
    """Scrubs contact details from a record and stamps it with the bound alert and stage.

    Attached to handlers (a logger's filters do not see records from its children), so
    it covers faust's, aiokafka's and every library's records alike.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = redact(record.getMessage())
        record.args = None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        for key, value in list(vars(record).items()):
            if key not in _STANDARD and isinstance(value, str):
                setattr(record, key, redact(value))
        if not hasattr(record, "alert_id"):
            record.alert_id = _alert_id.get()
        if not hasattr(record, "stage"):
            record.stage = _stage.get()
        return True


def _timestamp(record: logging.LogRecord) -> str:
    stamp = datetime.fromtimestamp(record.created, UTC)
    return stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "ts": _timestamp(record),
        "level": record.levelname.lower(),
        "logger": record.name,
        "msg": record.getMessage(),
        "alert_id": getattr(record, "alert_id", _alert_id.get()),
        "stage": getattr(record, "stage", _stage.get()),
    }
    for key, value in vars(record).items():
        if key not in _STANDARD and key not in fields:
            fields[key] = value
    return fields


def _exception_text(formatter: logging.Formatter, record: logging.LogRecord) -> str:
    if record.exc_info and not record.exc_text:
        record.exc_text = formatter.formatException(record.exc_info)
    return record.exc_text or ""


class JsonFormatter(logging.Formatter):
    """One JSON object per record (see the module doc for the fields)."""

    def format(self, record: logging.LogRecord) -> str:
        fields = _fields(record)
        exc = _exception_text(self, record)
        if exc:
            fields["exc"] = exc
        if record.stack_info:
            fields["stack"] = record.stack_info
        return json.dumps(fields, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """The same fields as one line for people: ``ts level logger [stage alert] msg k=v``."""

    def format(self, record: logging.LogRecord) -> str:
        fields = _fields(record)
        head = f"{fields.pop('ts')} {fields.pop('level').upper():7} {fields.pop('logger')}"
        stage, alert = fields.pop("stage"), fields.pop("alert_id")
        if stage or alert:
            head += f" [{stage or '-'} {alert or '-'}]"
        line = f"{head}: {fields.pop('msg')}"
        if fields:
            line += " " + " ".join(f"{k}={v}" for k, v in fields.items())
        exc = _exception_text(self, record)
        return f"{line}\n{exc}" if exc else line


def logging_config(level: str = "info", fmt: str = "json") -> dict[str, Any]:
    """A ``logging.config.dictConfig`` dict: one stderr handler, JSON or text, redacting.

    faust's worker takes it as ``logging_config`` (it replaces the root handlers at
    start-up). faust's, mode's and aiokafka's loggers lose any handlers of their own and
    propagate to it, so their lines are JSON and redacted like Tocsin's.
    """
    number = logging.getLevelName(level.upper())
    if not isinstance(number, int):
        raise ValueError(f"unknown log level {level!r}")
    formatter = JsonFormatter if fmt == "json" else TextFormatter
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"redact": {"()": RedactingFilter}},
        "formatters": {"tocsin": {"()": formatter}},
        "handlers": {
            "default": {
                "class": "logging.StreamHandler",
                "stream": "ext://sys.stderr",
                "formatter": "tocsin",
                "filters": ["redact"],
            }
        },
        "loggers": {
            name: {"handlers": [], "propagate": True, "level": level.upper()}
            for name in ("faust", "mode", "aiokafka")
        },
        "root": {"level": level.upper(), "handlers": ["default"]},
    }


def configure_logging(level: str = "info", fmt: str = "json") -> None:
    """Configure this process's logging (see :func:`logging_config`)."""
    logging.config.dictConfig(logging_config(level, fmt))
