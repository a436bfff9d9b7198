"""The one typed settings object. Only ops/ reads the environment, and only here.

Every field is read from an environment variable named ``TOCSIN_<FIELD>`` (upper case),
except the two that deployments conventionally set without a prefix:
``KAFKA_BOOTSTRAP_SERVERS`` and ``REDIS_URL``. ``Settings.env_names()`` lists every
variable this object understands; the docker-compose config test checks against it.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parent.parent

_UNPREFIXED = {
    "kafka_bootstrap_servers": "KAFKA_BOOTSTRAP_SERVERS",
    "redis_url": "REDIS_URL",
}


class Settings(BaseSettings):
    """Runtime configuration for every Tocsin process."""

    model_config = SettingsConfigDict(env_prefix="TOCSIN_", extra="ignore", frozen=True)

    # -- infrastructure ------------------------------------------------------------
    kafka_bootstrap_servers: str = Field(
        default="",
        validation_alias=AliasChoices("KAFKA_BOOTSTRAP_SERVERS", "TOCSIN_KAFKA_BOOTSTRAP_SERVERS"),
        description="host:port[,host:port]; empty means the embedded dev stack starts one.",
    )
    redis_url: str = Field(
        default="",
        validation_alias=AliasChoices("REDIS_URL", "TOCSIN_REDIS_URL"),
        description="redis://host:port/db; empty means the embedded dev stack starts one.",
    )
    app_id: str = "tocsin"
    topic_prefix: str = ""
    partitions: int = Field(default=4, ge=1, le=1024)
    replication_factor: int = Field(default=1, ge=1)
    # faust: the first group join waits for the rebalance timeout, so keep it short
    # for the embedded stack and tests; production raises it.
    broker_rebalance_timeout_s: float = 3.0
    broker_session_timeout_s: float = 10.0
    broker_heartbeat_interval_s: float = 1.0
    # /metrics, /healthz and /readyz of a worker; port 0 = not served.
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 0
    # How often a worker samples its consumer lag into tocsin_consumer_lag.
    consumer_lag_interval_s: float = Field(default=10.0, gt=0)
    log_level: str = "info"
    log_format: Literal["json", "text"] = Field(
        default="json", description="json: one object per line (ops/logging.py); text: for people"
    )
    # faust/aiokafka tuning (issue 7; benchmarks/latency.py measures what each changes).
    producer_linger_ms: int = Field(default=0, ge=0)  # latency.py: 1 ms was no better
    producer_max_batch_size: int = Field(default=16384, ge=1024)
    # tansu holds a fetch until this expires even when records arrive (faust's 1500 ms
    # cost ~0.5-1.5 s per hop); Kafka answers as soon as data arrives either way.
    consumer_fetch_max_wait_ms: int = Field(default=10, ge=0)
    broker_commit_interval_s: float = Field(default=2.8, gt=0)
    stream_buffer_maxsize: int = Field(default=4096, ge=1)
    broker_max_poll_records: int = Field(default=0, ge=0, description="0 = no limit")
    # Warm standby shards per worker: the k partitions after each owned one stay read and
    # indexed, so failover swaps instead of re-reading (k = partitions - 1: all of them).
    shard_standbys: int = Field(default=0, ge=0)

    # -- data ------------------------------------------------------------------------
    data_dir: Path = REPO_ROOT / "data"
    counties_file: str = "geodata/us_counties_fips_plotly.geojson"

    # -- ingest limits -----------------------------------------------------------------
    max_message_bytes: int = 4_000_000
    max_areas: int = 5_000
    max_polygons: int = 5_000
    max_vertices: int = 500_000
    max_depth: int = 64
    max_markup: int = 200_000  # '<' characters per message, counted before parsing
    # A YAML/JSON sender registry (see streams/authority.py); empty: open mode, every
    # sender accepted with a warning on the alert.
    senders_file: str = ""
    cap_strict_schema: bool = False  # also validate against the OASIS XSDs

    # -- fan-out and channels ----------------------------------------------------------
    delivery_batch_size: int = Field(default=500, ge=1)
    outbox_path: Path = Path("tocsin-outbox.jsonl")
    idempotency_ttl_s: int = 7 * 24 * 3600
    claim_lease_s: float = 15.0
    channel_providers: str = Field(
        default="push=outbox,sms=outbox,email=outbox",
        description="channel=provider pairs; a provider list 'a|b' means failover order",
    )
    # Provider names usable in channel_providers: outbox, fcm (push over pooled
    # aiohttp), fcm-admin (push through firebase-admin's send_each_async), sms,
    # sms-backup (a second SMS account for failover), smtp.
    fcm_base_url: str = "https://fcm.googleapis.com"
    fcm_project_id: str = Field(default="", description="empty: the credentials file's")
    fcm_credentials_file: str = Field(default="", description="service-account JSON")
    fcm_access_token: str = Field(
        default="", description="static bearer token (stand-ins/tests) instead of credentials"
    )
    fcm_max_concurrency: int = Field(default=200, ge=1, description="requests in flight")
    fcm_timeout_s: float = Field(default=10.0, gt=0)
    fcm_rate_per_s: float = Field(default=0.0, ge=0, description="0 = unlimited")
    fcm_rate_burst: int = Field(default=0, ge=0, description="0 = one second's worth")
    sms_base_url: str = "https://api.twilio.com"
    sms_account_sid: str = ""
    sms_auth_token: str = ""
    sms_from: str = ""
    sms_messaging_service_sid: str = Field(default="", description="used instead of sms_from")
    sms_status_callback_url: str = ""
    sms_max_concurrency: int = Field(default=100, ge=1)
    sms_timeout_s: float = Field(default=10.0, gt=0)
    sms_max_segments: int = Field(
        default=3, ge=1, le=10, description="SMS texts are cut to fit this many segments"
    )
    sms_rate_per_s: float = Field(default=0.0, ge=0, description="0 = unlimited")
    sms_rate_burst: int = Field(default=0, ge=0, description="0 = one second's worth")
    sms_backup_base_url: str = ""
    sms_backup_account_sid: str = ""
    sms_backup_auth_token: str = ""
    sms_backup_from: str = ""
    sms_backup_messaging_service_sid: str = ""
    sms_backup_rate_per_s: float = Field(default=0.0, ge=0, description="0 = unlimited")
    sms_backup_rate_burst: int = Field(default=0, ge=0)
    smtp_host: str = "localhost"
    smtp_port: int = 25
    smtp_username: str = ""
    smtp_password: str = ""
    smtp_starttls: bool = False
    smtp_use_tls: bool = Field(default=False, description="implicit TLS (port 465)")
    smtp_pool_size: int = Field(default=6, ge=1, le=64)
    smtp_timeout_s: float = Field(default=30.0, gt=0)
    smtp_rate_per_s: float = Field(default=0.0, ge=0, description="0 = unlimited")
    smtp_rate_burst: int = Field(default=0, ge=0)
    email_from: str = "alerts@tocsin.invalid"
    email_unsubscribe_url: str = Field(
        default="", description="https URL for one-click List-Unsubscribe (RFC 8058)"
    )
    email_unsubscribe_mailto: str = Field(
        default="", description="mailbox for List-Unsubscribe; empty: unsubscribe@<from domain>"
    )
    email_unsubscribe_secret: str = Field(
        default="", description="HMAC key signing subscriber ids in unsubscribe links"
    )

    # -- API ---------------------------------------------------------------------------
    api_host: str = "127.0.0.1"
    api_port: int = 8080

    # -- API (issue 6) -----------------------------------------------------------------
    api_token_secret: str = Field(
        default="",
        description="HMAC-SHA256 key for API/citizen token and OTP hashes; empty: a random "
        "per-process key (tokens then do not survive a restart)",
    )
    api_bootstrap_admin_token: str = Field(
        default="", description="if set, an admin user authenticating with this token exists"
    )
    api_jwt_secret: str = Field(default="", description="HS256 key; empty: JWT auth disabled")
    api_jwt_issuer: str = ""
    api_jwt_audience: str = ""
    # OIDC: RS256/ES256 JWTs from an identity provider, verified against its JWKS.
    api_oidc_issuer: str = Field(default="", description="the IdP's issuer URL; empty: off")
    api_oidc_audience: str = Field(
        default="", description="required with an issuer: this API's client id / audience"
    )
    api_oidc_jwks_url: str = Field(
        default="", description="empty: from <issuer>/.well-known/openid-configuration"
    )
    api_oidc_roles_claim: str = Field(
        default="roles", description="claim with the Tocsin roles; dotted for nested claims "
        "(realm_access.roles); a list or a space-separated string"
    )
    api_oidc_org_claim: str = Field(default="org", description="claim with the organisation id")
    api_oidc_algorithms: str = Field(default="RS256,ES256", description="accepted algorithms")
    api_oidc_leeway_s: float = Field(default=60.0, ge=0, le=600, description="clock skew")
    api_oidc_jwks_refetch_s: float = Field(
        default=30.0, ge=0, description="least time between JWKS fetches for unknown key ids"
    )
    api_oidc_jwks_max_age_s: float = Field(
        default=3600.0, gt=0, description="cached keys are refreshed after this long"
    )
    api_approval_policy: Literal["every_actual", "from_severity"] = Field(
        default="every_actual",
        description="which Actual alerts need a second person's approval",
    )
    api_approval_min_severity: str = Field(
        default="Severe", description="with from_severity: this CAP severity and above"
    )
    api_default_expiry_min: int = Field(default=60, ge=1, le=7 * 24 * 60)
    api_jurisdiction_tolerance_m: float = Field(default=2_000.0, ge=0)
    api_max_body_bytes: int = Field(default=1_000_000, ge=1024)
    api_rate_token_per_min: int = Field(default=600, ge=1)
    api_rate_public_per_min: int = Field(default=120, ge=1)
    api_rate_citizen_per_min: int = Field(default=30, ge=1)
    api_rate_webhook_per_min: int = Field(default=600, ge=1)
    api_trust_forwarded_for: bool = Field(
        default=False, description="take the client IP from X-Forwarded-For (behind a proxy)"
    )
    api_otp_ttl_s: int = Field(default=600, ge=30)
    api_otp_max_attempts: int = Field(default=5, ge=1)
    api_public_k: int = Field(default=10, ge=2, description="k-anonymity threshold")
    api_public_url: str = Field(default="", description="external base URL (feeds, webhooks)")
    api_preview_wait_s: float = Field(
        default=10.0, ge=0, description="how long a preview waits for the index to load"
    )

    def topic(self, name: str) -> str:
        """Full topic name with the configured prefix: ``<prefix>hazards.raw``."""
        return f"{self.topic_prefix}{name}"

    def providers_for(self, channel: str) -> list[str]:
        """Provider names for a channel in failover order."""
        for pair in self.channel_providers.split(","):
            key, _, value = pair.partition("=")
            if key.strip() == channel:
                return [p.strip() for p in value.split("|") if p.strip()]
        return ["outbox"]

    def to_env(self) -> dict[str, str]:
        """These settings as environment variables, to hand to a child process."""
        env = {}
        for field, value in self.model_dump().items():
            name = _UNPREFIXED.get(field, f"TOCSIN_{field.upper()}")
            env[name] = str(value).lower() if isinstance(value, bool) else str(value)
        return env

    @classmethod
    def env_names(cls) -> set[str]:
        """Every environment variable name this object reads."""
        names = set()
        for field in cls.model_fields:
            names.add(f"TOCSIN_{field.upper()}")
            if field in _UNPREFIXED:
                names.add(_UNPREFIXED[field])
        return names


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once from the environment."""
    return Settings()
