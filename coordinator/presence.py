"""Who is online, and which selected devices a round should still wait for.

Theory of operation
-------------------
:class:`Presence` is fed the devices' retained ``status/{device}`` messages (``online``;
``offline`` from a clean exit or the broker's last will) and the coordinator's own
connection events, each with ``now``; it reads no clock. It answers one question for the
round core: :meth:`Presence.presumed_alive`. A device counts as alive while online, and
for a while after it was last heard of, because presence is noisy:

* an ``offline`` status stops a round waiting for its device only after
  ``max(offline_grace, OFFLINE_SETTLE)`` seconds: a broker that shuts down publishes every
  client's will an instant before it drops the coordinator's own connection too;
* right after the coordinator (re)starts, statuses are still arriving as retained
  messages, so a device not heard from yet counts as alive for ``PRESENCE_SETTLE``
  seconds (or ``offline_grace``), and a recovered round is not closed before anyone
  could say they are there;
* while the coordinator's own connection is down nothing is known (everyone is alive),
  and after it is back the wills of the outage are forgotten and devices get
  ``RECONNECT_SETTLE`` seconds to reconnect (their backoff grew while the broker was away).
"""

from __future__ import annotations

PRESENCE_SETTLE = 2.0  # seconds after start before a device never heard from counts as gone
OFFLINE_SETTLE = 1.0  # seconds after a will before its device counts as gone
RECONNECT_SETTLE = 10.0  # seconds after our own reconnect before anyone counts as gone


class Presence:
    """The online set and the evidence about everyone else.

    >>> p = Presence(offline_grace=0.0); p.started(0.0); p.came_online("pi-1")
    >>> p.went_offline("pi-1", 10.0), p.presumed_alive("pi-1", 10.5), p.presumed_alive("pi-1", 11.0)
    (True, True, False)
    """

    def __init__(self, offline_grace: float) -> None:
        self.offline_grace = offline_grace
        self.online: set[str] = set()
        self.started_at: float | None = None  # None: not started yet (presence unknown)
        self._offline_since: dict[str, float] = {}
        self._link_down = False  # our own broker connection is down: presence is unknown
        self._reconnected_at: float | None = None

    def started(self, now: float) -> None:
        """The coordinator started (or resumed a round): statuses are about to arrive."""
        self.started_at = now

    def came_online(self, device: str) -> None:
        self.online.add(device)
        self._offline_since.pop(device, None)

    def went_offline(self, device: str, now: float) -> bool:
        """An ``offline`` status; True if the device was online (a transition worth reporting)."""
        if device not in self.online:
            return False
        self.online.discard(device)
        self._offline_since[device] = now
        return True

    def link_lost(self) -> None:
        """The coordinator's own broker connection dropped: presence is unknown until it is back."""
        self._link_down = True

    def link_restored(self, now: float) -> None:
        """Connected again. Wills published while the broker went down say nothing about the
        devices (a broker restart fires them all), so they are forgotten, and the devices get
        RECONNECT_SETTLE seconds to come back online before a round stops waiting for them."""
        self._link_down = False
        self._offline_since.clear()
        self._reconnected_at = now

    def presumed_alive(self, device: str, now: float) -> bool:
        """Online, or not yet known to be gone (see the module docstring)."""
        if device in self.online or self._link_down:
            return True
        if self._reconnected_at is not None and now - self._reconnected_at < RECONNECT_SETTLE:
            return True
        since = self._offline_since.get(device)
        if since is not None:
            return now - since < max(self.offline_grace, OFFLINE_SETTLE)
        return self.started_at is not None and now - self.started_at < max(PRESENCE_SETTLE, self.offline_grace)
