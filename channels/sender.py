"""Channel-independent fan-out of one :class:`DeliveryBatch` through its providers.

``send_batch`` is the whole delivery path for one batch:

1. resolve every recipient's address on the batch's channel (one Redis round trip);
   recipients without one are ``no_contact``;
2. claim one idempotency key per recipient (one round trip): already ``sent`` ->
   ``duplicate``; held by another live sender -> wait (bounded) until that claim is
   marked sent (``duplicate``) or lapses (we claim it and send), so a crashed worker's
   claim delays a message by at most one lease but never loses it. A claim taken over
   from a crashed sender (``LAPSED``) on a channel whose provider acknowledges
   messages (SMS status callbacks) is first looked up in the acknowledgement records,
   waiting for late callbacks up to ``ack_wait_s`` after the lapse: a message the
   provider already accepted is marked sent instead of being sent again;
3. render once per language (the renderer caches across batches);
4. send through ``providers[0]``, retrying retriable failures with exponential
   backoff and jitter (never sooner than the provider's ``Retry-After``, capped at
   ``_RETRY_AFTER_MAX_S``), then fail over to ``providers[1]`` and so on; leases are
   kept alive while a provider call or a backoff is in progress;
5. mark each success sent as soon as its provider answer arrives (providers with
   ``streams_results`` report every answer through ``on_result``; the guard's
   :class:`~channels.idempotency.SentMarker` writes them in 5 ms / 64-key flushes), so
   a crash can re-send only what was in flight (see ``channels/idempotency.py`` for
   the bounds); release the claims of final failures so a redelivered batch can try
   again.

Privacy: addresses exist only in local variables and in the messages handed to the
providers. Logs carry counts and the alert key; receipt errors are scrubbed of every
address of the batch (providers may echo them in error texts).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import re
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from datetime import datetime

from channels.base import WITHDRAWN, OutgoingMessage, Provider, ProviderError, SendResult
from channels.contacts import ContactStore
from channels.events import delivery_events
from channels.idempotency import ClaimState, IdempotencyGuard, dedupe_token
from streams.records import Alert, DeliveryBatch, DeliveryStatus, Receipt, RecipientResult
from templates.render import RenderedMessage, Renderer, select_info

__all__ = ["send_batch"]

log = logging.getLogger("tocsin.channels.sender")

_EMAIL_RE = re.compile(r"[\w.+-]+@[\w-]+(\.[\w-]+)+")
_ERROR_MAX = 200
_MAX_TTL_S = 28 * 24 * 3600  # FCM's maximum time-to-live
# A provider asking for a longer pause than this is better served by failing over (or
# by the batch's redelivery) than by holding the batch's claims for minutes.
_RETRY_AFTER_MAX_S = 30.0


def _scrub(text: str, addresses: Iterable[str]) -> str:
    """Remove contact details from a provider's error text before it goes anywhere."""
    for address in addresses:
        if address and address in text:
            text = text.replace(address, "<address>")
    text = _EMAIL_RE.sub("<address>", text)  # belt and braces for echoed emails
    return text[:_ERROR_MAX]


def _ttl_s(expires: str | None, now: float) -> int | None:
    """Provider TTL from the CAP expiry: deliver late is fine, after expiry is not."""
    if not expires:
        return None
    try:
        dt = datetime.fromisoformat(expires)
    except ValueError:
        return None
    if dt.tzinfo is None:
        return None
    return max(0, min(_MAX_TTL_S, int(dt.timestamp() - now)))


def _failure_kind(res: SendResult | None) -> str:
    """One message's failure kind for ``channels.events`` ("" when it was sent)."""
    if res is None:
        return "no_result"
    if res.ok or res.error == WITHDRAWN:
        return ""
    if res.invalid_address:
        return "invalid_address"
    return "retriable" if res.retriable else "permanent"


def _backoff(attempt: int, base_s: float, max_s: float) -> float:
    """Exponential backoff with "equal jitter": half fixed, half random."""
    delay = min(max_s, base_s * (2**attempt))
    return delay / 2 + random.uniform(0, delay / 2)


@contextlib.asynccontextmanager
async def _keep_leases(
    guard: IdempotencyGuard, keys: Callable[[], list[str]], token: str
) -> AsyncIterator[None]:
    """Renew our claims every third of a lease while the body runs.

    A slow provider call or a long backoff must not let our lease lapse, or a
    redelivered copy of the batch would claim and send the same messages.
    """
    interval = guard.lease_s / 3

    async def beat() -> None:
        while True:
            await asyncio.sleep(interval)
            current = keys()
            if current:
                with contextlib.suppress(Exception):  # a missed beat is retried next time
                    await guard.extend_many(current, token)

    task = asyncio.create_task(beat())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


class _Delivery:
    """State of one ``send_batch`` call (kept off the module API)."""

    def __init__(
        self,
        batch: DeliveryBatch,
        alert: Alert,
        guard: IdempotencyGuard,
        providers: Sequence[Provider],
        renderer: Renderer,
        max_attempts: int,
        backoff_base_s: float,
        backoff_max_s: float,
    ) -> None:
        self.batch = batch
        self.alert = alert
        self.guard = guard
        self.providers = providers
        self.renderer = renderer
        self.max_attempts = max(1, max_attempts)
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self.token = guard.new_token()
        self.status: dict[str, RecipientResult] = {}
        self.delivered_by: dict[str, int] = {}  # provider name -> messages sent
        self.lost_leases = 0
        self.unsettled: dict[str, OutgoingMessage] = {}
        self.last_error: dict[str, str] = {}
        self.addresses: list[str] = []
        # Accepted messages whose "sent" mark is queued (subscriber -> its flush).
        self.marking: dict[str, asyncio.Future[frozenset[str]]] = {}
        self.acked = 0  # lapsed claims the provider had acknowledged: not re-sent

    def key(self, sid: str) -> str:
        return self.guard.key(self.batch.alert_key, self.batch.channel, sid)

    def result(self, sid: str, status: DeliveryStatus, error: str = "") -> None:
        self.status[sid] = RecipientResult(sid, status, error)

    def messages(self, addresses: dict[str, str], sids: list[str]) -> list[OutgoingMessage]:
        # Rendering inputs per recipient: language, time zone (the expiry is shown in
        # local time) and the matched place's name. Few distinct triples per alert.
        readers = {
            r.subscriber_id: (r.language, r.timezone, r.place) for r in self.batch.recipients
        }
        rendered: dict[tuple[str, str, str], tuple[RenderedMessage, int | None, str, str]] = {}
        now = time.time()
        out = []
        for sid in sids:
            reader = readers[sid]
            lang, tz, place = reader
            cached = rendered.get(reader)
            if cached is None:
                msg = self.renderer.render(
                    self.alert, self.batch.channel, lang, timezone=tz, place=place
                )
                info = select_info(self.alert, lang)
                severity = info.severity if info else self.alert.max_severity
                urgency = info.urgency if info else ""
                cached = rendered[reader] = (msg, _ttl_s(msg.expires, now), severity, urgency)
            msg, ttl_s, severity, urgency = cached
            out.append(
                OutgoingMessage(
                    subscriber_id=sid,
                    address=addresses[sid],
                    channel=self.batch.channel,
                    alert_key=self.batch.alert_key,
                    language=msg.language or lang,
                    subject=msg.subject,
                    body=msg.body,
                    # A newer message for the same alert replaces the older one on
                    # the device instead of stacking up.
                    collapse_key=self.batch.alert_key,
                    ttl_s=ttl_s,
                    severity=severity,
                    urgency=urgency,
                    html=msg.html,
                )
            )
        return out

    async def deliver(self, messages: list[OutgoingMessage], contacts: ContactStore) -> None:
        """Send claimed messages through the provider chain and settle their claims."""
        # Messages not yet sent, pruned or lost to another sender; the lease keeper
        # renews exactly these claims.
        self.unsettled = {m.subscriber_id: m for m in messages}
        self.last_error = {}
        self.addresses = [m.address for m in messages]
        async with _keep_leases(self.guard, self._unsettled_keys, self.token):
            for p_index, provider in enumerate(self.providers):
                if not self.unsettled:
                    break
                if p_index:
                    await self._recheck_claims()
                    if self.unsettled:
                        events = delivery_events()
                        events.failover(self.batch.channel, provider.name, len(self.unsettled))
                await self._try_provider(provider, contacts)
        failed = list(self.unsettled)
        for sid in failed:
            self.result(sid, "failed", self.last_error.get(sid, "not delivered"))
        if failed:
            log.warning(
                "alert %s: %d messages failed on every provider", self.batch.alert_key, len(failed)
            )
        await self.guard.release_many([self.key(s) for s in failed], self.token)

    def _unsettled_keys(self) -> list[str]:
        return [self.key(s) for s in self.unsettled]

    async def _try_provider(self, provider: Provider, contacts: ContactStore) -> None:
        """Up to ``max_attempts`` calls to one provider for the unsettled messages.

        Only retriable failures are retried here; others are left unsettled for the
        next provider, which may reach the address another way.
        """
        batch = dict(self.unsettled)
        retry_after: float | None = None
        for attempt in range(self.max_attempts):
            if attempt:
                if not batch:
                    return
                delay = _backoff(attempt - 1, self.backoff_base_s, self.backoff_max_s)
                if retry_after is not None:
                    # Honour the provider's Retry-After: retrying sooner only earns
                    # another 429/503 and digs the quota hole deeper.
                    delay = max(delay, min(retry_after, _RETRY_AFTER_MAX_S))
                await asyncio.sleep(delay)
                await self._recheck_claims()
                if getattr(provider, "acknowledges", False):
                    # A request that got no answer may still have been accepted: its
                    # status callback, if it came during the backoff, says so.
                    await self._settle_acknowledged(provider, list(batch))
                batch = {s: m for s, m in batch.items() if s in self.unsettled}
            if not batch:
                return
            channel = self.batch.channel
            delivery_events().attempt(channel, provider.name, len(batch), retry=attempt > 0)
            try:
                results = await self._call(provider, batch)
            except ProviderError as exc:
                await self._settle_early(provider, batch)
                kind = "retriable" if exc.retriable else "permanent"
                delivery_events().failure(channel, provider.name, kind, len(batch))
                retry_after = exc.retry_after_s
                reason = _scrub(f"{provider.name}: {exc}", self.addresses)
                self.last_error.update(dict.fromkeys(batch, reason))
                log.warning(
                    "alert %s: provider %s failed for %d messages (retriable=%s)",
                    self.batch.alert_key,
                    provider.name,
                    len(batch),
                    exc.retriable,
                )
                if not exc.retriable:
                    return  # fail over at once
                continue
            except Exception as exc:  # a provider bug must not stop the failover chain
                await self._settle_early(provider, batch)
                delivery_events().failure(channel, provider.name, "error", len(batch))
                reason = f"{provider.name}: {type(exc).__name__}"
                self.last_error.update(dict.fromkeys(batch, reason))
                log.exception(
                    "alert %s: provider %s crashed (%s)",
                    self.batch.alert_key,
                    provider.name,
                    type(exc).__name__,
                )
                return
            batch, retry_after = await self._settle(provider, batch, results, contacts)

    async def _call(
        self, provider: Provider, batch: dict[str, OutgoingMessage]
    ) -> list[SendResult]:
        """One provider call; accepted messages are queued for marking as they come."""
        if not getattr(provider, "streams_results", False):
            return await provider.send_batch(list(batch.values()))
        marker = self.guard.marker()

        def on_result(res: SendResult) -> None:
            sid = res.subscriber_id
            if res.ok and sid in batch and sid not in self.marking:
                self.marking[sid] = marker.mark(self.key(sid), self.token)

        send = provider.send_batch
        return await send(list(batch.values()), on_result=on_result)  # type: ignore[call-arg]

    async def _mark_sent(self, provider: Provider, sids: list[str]) -> None:
        """Record ``sids`` as sent: wait for their queued marks (queueing any missing)."""
        if not sids:
            return
        marker = self.guard.marker()
        flushes: dict[int, asyncio.Future[frozenset[str]]] = {}
        for sid in sids:
            self.result(sid, "sent")
            self.unsettled.pop(sid, None)
            future = self.marking.pop(sid, None) or marker.mark(self.key(sid), self.token)
            flushes[id(future)] = future
        self.delivered_by[provider.name] = self.delivered_by.get(provider.name, 0) + len(sids)
        # asyncio.wait, not gather: a flush is shared with other batches and must not be
        # cancelled by our timeout.
        done, pending = await asyncio.wait(flushes.values(), timeout=self.guard.lease_s)
        lost: set[str] = set()
        for future in done:
            lost |= future.result()  # a Redis error propagates: the batch is redelivered
        if pending:  # (only a write cancelled or stuck in the client leaves one pending)
            # Never wait forever on a write that may be stuck: record ours directly.
            log.warning(
                "alert %s: sent-marks not written within a lease; writing %d directly",
                self.batch.alert_key,
                len(sids),
            )
            self.lost_leases += await self.guard.mark_sent_many(
                [self.key(s) for s in sids], self.token
            )
        elif lost:
            self.lost_leases += sum(self.key(s) in lost for s in sids)

    async def _settle_acknowledged(self, provider: Provider, sids: list[str]) -> None:
        """Mark sent the messages among ``sids`` the provider has acknowledged."""
        sids = [s for s in sids if s in self.unsettled]
        tokens = [dedupe_token(self.batch.alert_key, self.batch.channel, s) for s in sids]
        found = await self.guard.acknowledged(tokens)
        acked = [sid for sid, ok in zip(sids, found, strict=True) if ok]
        await self._mark_sent(provider, acked)
        self.acked += len(acked)

    async def _settle_early(self, provider: Provider, batch: dict[str, OutgoingMessage]) -> None:
        """A call that raised may have had messages accepted first: they are sent."""
        early = [sid for sid in batch if sid in self.marking]
        await self._mark_sent(provider, early)

    async def _settle(
        self,
        provider: Provider,
        batch: dict[str, OutgoingMessage],
        results: list[SendResult],
        contacts: ContactStore,
    ) -> tuple[dict[str, OutgoingMessage], float | None]:
        """Apply one attempt's results; return the messages worth retrying here and
        the longest ``Retry-After`` among them."""
        by_sid = {r.subscriber_id: r for r in results}
        sent: list[str] = []
        dead: list[OutgoingMessage] = []
        retry: dict[str, OutgoingMessage] = {}
        retry_after: float | None = None
        failed: dict[str, int] = {}  # failure kind -> messages, for delivery_events()
        held: list[str] = []
        for sid, msg in batch.items():
            res = by_sid.get(sid)
            kind = _failure_kind(res)
            if kind:
                failed[kind] = failed.get(kind, 0) + 1
            if res is None:
                self.last_error[sid] = f"{provider.name}: no result"
                retry[sid] = msg
            elif res.ok:
                sent.append(sid)
            elif res.invalid_address:
                dead.append(msg)
                del self.unsettled[sid]
                self.result(sid, "failed", f"{provider.name}: invalid address")
            elif res.error == WITHDRAWN:  # the alert was cancelled: no retry, no failover
                held.append(sid)
                del self.unsettled[sid]
                self.result(sid, "cancelled", WITHDRAWN)
            else:
                error = res.error or "rejected"
                self.last_error[sid] = _scrub(f"{provider.name}: {error}", [msg.address])
                if res.retriable:
                    retry[sid] = msg
                    if res.retry_after_s is not None:
                        retry_after = max(retry_after or 0.0, res.retry_after_s)
        for kind, count in failed.items():
            delivery_events().failure(self.batch.channel, provider.name, kind, count)
        await self._mark_sent(provider, sent)
        if held:  # never sent: free the claims (a later send of this alert would not run)
            await self.guard.release_many([self.key(sid) for sid in held], self.token)
        if dead:
            # The address is gone for good (e.g. UNREGISTERED token): prune it unless
            # the citizen registered a new one meanwhile, and free the claim.
            for msg in dead:
                await contacts.invalidate(msg.subscriber_id, self.batch.channel, msg.address)
            await self.guard.release_many([self.key(m.subscriber_id) for m in dead], self.token)
        return retry, retry_after

    async def resolve_lapsed(self, lapsed: dict[str, float], ack_wait_s: float) -> list[str]:
        """Claims taken over from a crashed sender, on a channel whose provider
        acknowledges messages: those acknowledged are marked sent (not re-sent); the
        others are returned for sending once their callbacks are overdue.

        ``lapsed`` maps subscribers to how long ago the crashed sender's lease ran out;
        a callback is waited for until ``ack_wait_s`` after that, polling the records
        while our own leases are kept alive.
        """
        start = time.monotonic()
        due = {sid: start + max(0.0, ack_wait_s - age) for sid, age in lapsed.items()}
        acked: list[str] = []
        overdue: list[str] = []
        tokens = {s: dedupe_token(self.batch.alert_key, self.batch.channel, s) for s in due}
        async with _keep_leases(self.guard, lambda: [self.key(s) for s in due], self.token):
            while due:
                sids = list(due)
                found = await self.guard.acknowledged([tokens[s] for s in sids])
                now = time.monotonic()
                for sid, ok in zip(sids, found, strict=True):
                    if ok or due[sid] <= now:
                        (acked if ok else overdue).append(sid)
                        del due[sid]
                if due:
                    await asyncio.sleep(min(0.1, max(0.01, min(due.values()) - now)))
        if acked:
            provider = next(p for p in self.providers if getattr(p, "acknowledges", False))
            await self._mark_sent(provider, acked)
            self.acked += len(acked)
        return overdue

    async def _recheck_claims(self) -> None:
        """Before a retry or failover: drop messages whose claim we no longer hold."""
        sids = list(self.unsettled)
        states = await self.guard.extend_many([self.key(s) for s in sids], self.token)
        for sid, state in zip(sids, states, strict=True):
            if state is not ClaimState.CLAIMED:
                del self.unsettled[sid]
                self.result(sid, "duplicate", "handled by another sender")


async def send_batch(
    batch: DeliveryBatch,
    alert: Alert,
    *,
    contacts: ContactStore,
    guard: IdempotencyGuard,
    providers: Sequence[Provider],
    renderer: Renderer,
    busy_wait_s: float | None = None,
    max_attempts: int = 3,
    backoff_base_s: float = 0.2,
    backoff_max_s: float = 5.0,
    ack_wait_s: float | None = None,
) -> Receipt:
    """Deliver ``batch`` once per recipient; return one result per recipient.

    ``busy_wait_s`` bounds how long recipients claimed by another sender are waited
    for (default: twice the guard's lease plus a second, so a crashed sender's claim
    always lapses within the wait). Recipients still busy after it are reported
    ``failed`` with reason ``claim busy`` and left to the other sender; nothing is
    dropped silently. ``max_attempts`` is per provider. ``ack_wait_s`` (default: one
    lease) is how long after a crashed sender's lease lapsed its provider's
    acknowledgements are waited for (channels whose providers have ``acknowledges``).

    Raises ``ValueError`` when the batch and the alert disagree on the alert key, and
    lets Redis errors propagate: without the contact vault and the idempotency keys
    nothing can be sent safely, and the caller's redelivery will try again.
    """
    if not providers:
        raise ValueError("send_batch needs at least one provider")
    if batch.alert_key != alert.key:
        raise ValueError("delivery batch and alert have different alert keys")
    wait_s = 2 * guard.lease_s + 1.0 if busy_wait_s is None else busy_wait_s
    ack_wait = guard.lease_s if ack_wait_s is None else ack_wait_s
    acks = any(getattr(p, "acknowledges", False) for p in providers)
    run = _Delivery(
        batch, alert, guard, providers, renderer, max_attempts, backoff_base_s, backoff_max_s
    )
    order = list(dict.fromkeys(r.subscriber_id for r in batch.recipients))
    # Several places of one citizen share one idempotency key: the first place in the
    # batch speaks for the citizen, the others settle as duplicates.
    first_of: dict[str, str] = {}
    for sid in order:
        if first_of.setdefault(run.key(sid), sid) != sid:
            run.result(sid, "duplicate", "another place of the same citizen")
    order = [sid for sid in order if first_of[run.key(sid)] == sid]

    addresses = await contacts.get_addresses(order, batch.channel)
    for sid in order:
        if sid not in addresses:
            run.result(sid, "no_contact")
    waiting = [sid for sid in order if sid in addresses]

    deadline = time.monotonic() + wait_s
    poll_s = 0.02
    while waiting:
        states = await guard.claim_batch([run.key(s) for s in waiting], run.token)
        claimed: list[str] = []
        busy: list[str] = []
        lapsed: dict[str, float] = {}
        for sid, (state, age) in zip(waiting, states, strict=True):
            if state is ClaimState.CLAIMED or (state is ClaimState.LAPSED and not acks):
                claimed.append(sid)
            elif state is ClaimState.LAPSED:
                lapsed[sid] = age
            elif state is ClaimState.DONE:
                run.result(sid, "duplicate")
            else:
                busy.append(sid)
        if lapsed:
            claimed += await run.resolve_lapsed(lapsed, ack_wait)
        if claimed:
            await run.deliver(run.messages(addresses, claimed), contacts)
        waiting = busy
        if not waiting:
            break
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            for sid in waiting:
                run.result(sid, "failed", "claim busy")
            log.warning(
                "alert %s: %d recipients still claimed by another sender",
                batch.alert_key,
                len(waiting),
            )
            break
        # Poll: the other claim either turns "sent" or lapses after its lease.
        await asyncio.sleep(min(poll_s, remaining))
        poll_s = min(poll_s * 2, 0.5, guard.lease_s / 4)

    results = [run.status[sid] for sid in order]
    # An in-batch duplicate subscriber gets one result per occurrence.
    if len(order) != len(batch.recipients):
        seen: set[str] = set()
        results = []
        for r in batch.recipients:
            status = run.status[r.subscriber_id]
            results.append(
                status
                if r.subscriber_id not in seen
                else RecipientResult(r.subscriber_id, "duplicate", "repeated in batch")
            )
            seen.add(r.subscriber_id)
    counts: dict[str, int] = {}
    for res in results:
        counts[res.status] = counts.get(res.status, 0) + 1
    if run.acked:
        log.info(
            "alert %s: %d messages a crashed sender (or a lost answer) had handed to the "
            "provider were acknowledged by it; marked sent, not re-sent",
            batch.alert_key,
            run.acked,
        )
    if run.lost_leases:
        log.warning(
            "alert %s: %d leases lapsed before mark-sent (possible duplicates)",
            batch.alert_key,
            run.lost_leases,
        )
    log.info(
        "alert %s channel %s: %s",
        batch.alert_key,
        batch.channel,
        " ".join(f"{k}={v}" for k, v in sorted(counts.items())),
    )
    provider = "+".join(run.delivered_by) or providers[0].name
    return Receipt(
        alert_key=batch.alert_key,
        channel=batch.channel,
        provider=provider,
        results=results,
        sent_at=time.time(),
    )
