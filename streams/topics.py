"""Topic names, their shapes, and idempotent creation through the Kafka admin API.

faust only creates its own internal topics (table changelogs), so Tocsin declares every
topic of the pipeline here and creates them before any worker or producer starts.
``subscriptions`` and ``match.requests`` share one partition count: partition p of both
is owned by the same worker (faust's co-partitioned assignment), which is what lets each
matcher shard answer only for the subscriptions it holds.
"""

from __future__ import annotations

from dataclasses import dataclass

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

HAZARDS_RAW = "hazards.raw"
HAZARDS_DLQ = "hazards.dlq"
ALERTS = "alerts"
SUBSCRIPTIONS = "subscriptions"
MATCH_REQUESTS = "match.requests"
DELIVERIES = {"push": "deliveries.push", "sms": "deliveries.sms", "email": "deliveries.email"}
# Extreme or Immediate alerts travel on their own topics, consumed by their own agents,
# so they overtake routine deliveries already queued instead of waiting behind them.
URGENT_DELIVERIES = {c: f"{name}.urgent" for c, name in DELIVERIES.items()}
RECEIPTS = "receipts"
# Append-only audit log of the HTTP API (issue 6): one partition keeps the hash chain in order.
AUDIT = "audit"

# Kafka record headers used across stages.
H_CONTENT_TYPE = "content-type"
H_SOURCE = "source"
H_PRODUCED_AT = "tocsin-produced-at"
# On receipts: when the sender picked the delivery batch up (fan-out queueing ends).
H_SEND_STARTED_AT = "tocsin-send-started-at"


@dataclass(frozen=True)
class TopicSpec:
    """One topic to create: its base name, whether it is compacted, and partitions."""

    name: str
    compacted: bool = False
    sharded: bool = True  # uses the shard partition count (else 1 partition)


def pipeline_topics() -> list[TopicSpec]:
    """Every topic of the pipeline, in flow order."""
    return [
        TopicSpec(HAZARDS_RAW),
        TopicSpec(HAZARDS_DLQ),
        TopicSpec(ALERTS),
        TopicSpec(SUBSCRIPTIONS, compacted=True),
        TopicSpec(MATCH_REQUESTS),
        *(TopicSpec(name) for name in DELIVERIES.values()),
        *(TopicSpec(name) for name in URGENT_DELIVERIES.values()),
        TopicSpec(RECEIPTS),
        TopicSpec(AUDIT, compacted=False, sharded=False),
    ]


async def ensure_topics(
    bootstrap: str, *, partitions: int, replication: int = 1, prefix: str = ""
) -> list[str]:
    """Create the pipeline's topics that do not exist yet; return the names created."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        wanted = []
        for spec in pipeline_topics():
            name = prefix + spec.name
            if name in existing:
                continue
            configs = {"cleanup.policy": "compact"} if spec.compacted else {}
            wanted.append(
                NewTopic(
                    name,
                    num_partitions=partitions if spec.sharded else 1,
                    replication_factor=replication,
                    topic_configs=configs,
                )
            )
        if wanted:
            try:
                await admin.create_topics(wanted)
            except TopicAlreadyExistsError:
                pass  # another process won the race; the topic is there either way
        return [t.name for t in wanted]
    finally:
        await admin.close()
