"""Build a channel's providers, in failover order, from the settings.

``settings.channel_providers`` names them per channel (``push=fcm|outbox,sms=sms|
sms-backup,email=smtp``); this module knows which names exist, which channel each
serves, which settings configure it, and wraps each with its shared Redis rate limit
when one is configured (``<provider>_rate_per_s`` > 0 and a Redis client given).

Known names: ``outbox`` (any channel), ``fcm`` and ``fcm-admin`` (push), ``sms`` and
``sms-backup`` (a second SMS account with its own base URL and credentials), ``smtp``
(email). Settings are read by attribute only, so this module stays free of the
environment (only ``ops/`` reads it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import redis.asyncio as aioredis

from channels.base import Provider
from channels.ratelimit import RateLimitedProvider, RateLimiter

if TYPE_CHECKING:
    from ops.settings import Settings

__all__ = ["PROVIDER_CHANNELS", "build_provider", "build_providers"]

#: Which channels each provider name can serve.
PROVIDER_CHANNELS: dict[str, tuple[str, ...]] = {
    "outbox": ("push", "sms", "email"),
    "fcm": ("push",),
    "fcm-admin": ("push",),
    "sms": ("sms",),
    "sms-backup": ("sms",),
    "smtp": ("email",),
}


def _outbox(settings: Settings, channel: str) -> Provider:
    from channels.outbox import OutboxProvider

    return OutboxProvider(settings.outbox_path, channel)  # type: ignore[arg-type]


def _fcm_project(settings: Settings) -> str:
    if settings.fcm_project_id or not settings.fcm_credentials_file:
        return settings.fcm_project_id
    import msgspec

    # Like firebase-admin: a service account's own project is the default.
    with open(settings.fcm_credentials_file, "rb") as f:
        return str(msgspec.json.decode(f.read()).get("project_id", ""))


def _fcm(settings: Settings, channel: str) -> Provider:
    from channels.fcm import FcmProvider, token_source

    return FcmProvider(
        settings.fcm_base_url,
        _fcm_project(settings),
        token_source(settings.fcm_access_token, settings.fcm_credentials_file),
        max_concurrency=settings.fcm_max_concurrency,
        timeout_s=settings.fcm_timeout_s,
    )


def _fcm_admin(settings: Settings, channel: str) -> Provider:
    from channels.fcm_admin import FcmAdminProvider

    return FcmAdminProvider(
        settings.fcm_base_url,
        _fcm_project(settings),
        access_token=settings.fcm_access_token,
        credentials_file=settings.fcm_credentials_file,
        timeout_s=settings.fcm_timeout_s,
    )


def _sms(settings: Settings, channel: str) -> Provider:
    from channels.sms import SmsProvider

    return SmsProvider(
        settings.sms_base_url,
        settings.sms_account_sid,
        settings.sms_auth_token,
        from_=settings.sms_from,
        messaging_service_sid=settings.sms_messaging_service_sid,
        status_callback=settings.sms_status_callback_url,
        max_concurrency=settings.sms_max_concurrency,
        timeout_s=settings.sms_timeout_s,
    )


def _sms_backup(settings: Settings, channel: str) -> Provider:
    from channels.sms import SmsProvider

    if not settings.sms_backup_base_url:
        raise ValueError("sms-backup needs sms_backup_base_url")
    return SmsProvider(
        settings.sms_backup_base_url,
        settings.sms_backup_account_sid,
        settings.sms_backup_auth_token,
        from_=settings.sms_backup_from,
        messaging_service_sid=settings.sms_backup_messaging_service_sid,
        status_callback=settings.sms_status_callback_url,
        max_concurrency=settings.sms_max_concurrency,
        timeout_s=settings.sms_timeout_s,
        name="sms-backup",
    )


def _smtp(settings: Settings, channel: str) -> Provider:
    from channels.email import SmtpProvider

    return SmtpProvider(
        settings.smtp_host,
        settings.smtp_port,
        sender=settings.email_from,
        username=settings.smtp_username,
        password=settings.smtp_password,
        starttls=settings.smtp_starttls,
        use_tls=settings.smtp_use_tls,
        pool_size=settings.smtp_pool_size,
        timeout_s=settings.smtp_timeout_s,
        unsubscribe_url=settings.email_unsubscribe_url,
        unsubscribe_mailto=settings.email_unsubscribe_mailto,
        unsubscribe_secret=settings.email_unsubscribe_secret,
    )


_FACTORIES: dict[str, Callable[[Settings, str], Provider]] = {
    "outbox": _outbox,
    "fcm": _fcm,
    "fcm-admin": _fcm_admin,
    "sms": _sms,
    "sms-backup": _sms_backup,
    "smtp": _smtp,
}


# Settings prefix of each provider's <prefix>_rate_per_s / <prefix>_rate_burst.
_RATE_PREFIX = {
    "fcm": "fcm",
    "fcm-admin": "fcm",
    "sms": "sms",
    "sms-backup": "sms_backup",
    "smtp": "smtp",
}


def _rate(settings: Settings, name: str) -> tuple[float, int]:
    """``(messages/s, burst)`` configured for a provider; (0, 0) = unlimited."""
    prefix = _RATE_PREFIX.get(name)
    if prefix is None:
        return 0.0, 0
    rate = float(getattr(settings, f"{prefix}_rate_per_s", 0.0))
    return rate, int(getattr(settings, f"{prefix}_rate_burst", 0))


def build_provider(
    settings: Settings, name: str, channel: str, redis: aioredis.Redis | None = None
) -> Provider:
    """One provider by name for ``channel``, rate-limited when configured.

    ``fcm`` and ``fcm-admin`` share one bucket (one FCM project quota).
    """
    if name not in _FACTORIES:
        raise ValueError(f"unknown provider {name!r} for channel {channel!r}")
    if channel not in PROVIDER_CHANNELS[name]:
        raise ValueError(f"provider {name!r} cannot deliver on channel {channel!r}")
    provider = _FACTORIES[name](settings, channel)
    rate, burst = _rate(settings, name)
    if rate > 0 and redis is not None:
        bucket = "fcm" if name.startswith("fcm") else name
        provider = RateLimitedProvider(provider, RateLimiter(redis, bucket, rate, burst))
    return provider


def build_providers(
    settings: Settings, channel: str, redis: aioredis.Redis | None = None
) -> list[Provider]:
    """The configured providers for one channel, in failover order.

    Without ``redis`` no rate limit applies (single-process tools and tests).
    """
    return [build_provider(settings, n, channel, redis) for n in settings.providers_for(channel)]
