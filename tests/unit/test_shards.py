"""A shard's live delta and background rebuild answer exactly like a fresh index."""

from __future__ import annotations

import asyncio
import random

from shapely.geometry import box

from geofencing.matcher import SubscriptionIndex
from streams.records import Subscription, encode
from streams.shards import Shard, ShardSet

AREA = box(-1.0, -1.0, 1.0, 1.0)


def place(sid: str, lon: float, lat: float) -> bytes:
    return encode(Subscription(id=sid, kind="place", lon=lon, lat=lat, channels=["sms"]))


def ids(subs: list[Subscription]) -> set[str]:
    return {s.id for s in subs}


def fresh_answer(shard: Shard) -> set[str]:
    index = SubscriptionIndex.build(list(shard.subscriptions.values()))
    return set(index.match(AREA))


async def test_upserts_and_tombstones_are_visible_before_any_rebuild() -> None:
    shard = Shard()
    shard.apply("a", place("a", 0, 0))
    shard.apply("b", place("b", 5, 5))
    view = await shard.view(None)  # type: ignore[arg-type]
    assert ids(view.match(AREA)) == {"a"} and shard.rebuilds == 1
    shard.apply("b", place("b", 0.5, 0.5))  # moved into the area
    shard.apply("a", None)  # erased
    shard.apply("c", place("c", -0.5, 0.2))
    view = await shard.view(None)  # type: ignore[arg-type]
    assert ids(view.match(AREA)) == {"b", "c"}
    assert shard.rebuilds == 1, "the delta answered without a full rebuild"


async def test_changes_made_while_a_rebuild_runs_survive_the_swap() -> None:
    shard = Shard()
    for i in range(2000):
        shard.apply(f"s{i}", place(f"s{i}", random.uniform(-3, 3), random.uniform(-3, 3)))
    await shard.view(None)  # type: ignore[arg-type]
    rebuild = asyncio.create_task(shard.rebuild(None))  # type: ignore[arg-type]
    await asyncio.sleep(0)  # let it take its snapshot
    shard.apply("late", place("late", 0, 0))
    shard.apply("s1", None)
    await rebuild
    assert "late" in shard.changed and "s1" in shard.changed
    view = await shard.view(None)  # type: ignore[arg-type]
    assert ids(view.match(AREA)) == fresh_answer(shard)


async def test_random_churn_with_rebuilds_matches_a_fresh_index() -> None:
    rng = random.Random(11)
    shard = Shard()
    shard.caught_up.set()
    for step in range(3000):
        sid = f"s{rng.randrange(400)}"
        if rng.random() < 0.2:
            shard.apply(sid, None)
        else:
            shard.apply(sid, place(sid, rng.uniform(-2, 2), rng.uniform(-2, 2)))
        if step % 700 == 0:
            await shard.rebuild(None)  # type: ignore[arg-type]
        if step % 250 == 0:
            view = await shard.view(None)  # type: ignore[arg-type]
            assert ids(view.match(AREA)) == fresh_answer(shard)
    assert shard.needs_rebuild(now=float("inf"))


def test_standby_shards_are_kept_warm_but_answer_only_once_owned() -> None:
    shards = ShardSet(None, standbys=2, partitions=4)  # type: ignore[arg-type]
    added, _ = shards.assign({0, 1})
    assert added == {0, 1, 2, 3}  # owned 0-1, standbys 2-3: everything read and indexed
    assert shards.shard(2) is None  # a standby does not answer match requests
    shards.shards[2].apply("a", place("a", 0, 0))
    warm = shards.shards[2]
    added, removed = shards.assign({2, 3})  # a rebalance hands 2 and 3 over
    assert not added and not removed  # nothing to re-read: 0-1 are now the standbys
    assert shards.shard(2) is warm and "a" in warm.subscriptions
    assert shards.shard(0) is None


def test_an_empty_assignment_mid_rebalance_keeps_the_standbys_warm() -> None:
    """Faust may hand a worker none of the topic for a moment while a peer leaves; the
    standbys must survive it, or the takeover re-reads everything."""
    shards = ShardSet(None, standbys=3, partitions=4)  # type: ignore[arg-type]
    shards.assign({0, 1})
    warm = dict(shards.shards)
    assert shards.assign(set()) == (set(), set()) and shards.shards == warm
    assert all(shards.shard(p) is None for p in range(4))  # owns nothing meanwhile
    added, removed = shards.assign({0, 1, 2, 3})
    assert not added and not removed and shards.shards == warm


def test_without_standbys_revoked_shards_are_dropped() -> None:
    shards = ShardSet(None)  # type: ignore[arg-type]
    shards.assign({0, 1})
    added, removed = shards.assign({1, 2})
    assert (added, removed) == ({2}, {0}) and set(shards.shards) == {1, 2}
