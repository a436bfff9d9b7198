"""What the sender and the rate limiter report while delivering, for whoever counts it.

channels/ stays free of any metrics library: the delivery code calls
``delivery_events()``, whose default object does nothing, and ``ops.metrics`` installs
one that feeds Prometheus (``set_delivery_events``). Every argument is a channel or
provider name, a failure kind or a number: never an address or a subscriber id.

Failure kinds: ``retriable`` and ``permanent`` (the provider said so, for one message
or for the whole call), ``invalid_address`` (the address is dead and gets pruned),
``no_result`` (the provider answered nothing for a message) and ``error`` (the
provider raised something it should not have).
"""

from __future__ import annotations

__all__ = ["DeliveryEvents", "delivery_events", "set_delivery_events"]


class DeliveryEvents:
    """The events of delivery; this base class ignores them all."""

    def attempt(self, channel: str, provider: str, messages: int, *, retry: bool) -> None:
        """``messages`` were handed to ``provider`` in one call (``retry``: not the first)."""

    def failover(self, channel: str, provider: str, messages: int) -> None:
        """``messages`` the previous providers did not deliver move on to ``provider``."""

    def failure(self, channel: str, provider: str, kind: str, messages: int = 1) -> None:
        """``messages`` failed on one call to ``provider`` (see the module doc for kinds)."""

    def rate_limit_wait(self, bucket: str, seconds: float) -> None:
        """A sender is about to sleep ``seconds`` for the tokens of ``bucket``."""


_current = DeliveryEvents()


def delivery_events() -> DeliveryEvents:
    """The installed observer (a do-nothing one unless something installed another)."""
    return _current


def set_delivery_events(events: DeliveryEvents) -> DeliveryEvents:
    """Install ``events`` for the whole process; return the one it replaces."""
    global _current
    previous, _current = _current, events
    return previous
