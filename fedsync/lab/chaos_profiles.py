"""Link profiles and fault schedules of the chaos proxy: the deterministic part, no I/O, no clock.

A :class:`LinkProfile` says how one simulated link misbehaves (latency, jitter,
bandwidth, random resets and stalls, blackouts); :data:`PROFILES` names the ones the
CLI and the field test use. A :class:`Scenario` is what one field test injects besides
its link (device kills, a coordinator crash; for ``hostile``: poisoning and flooding
devices and a broker kill), :func:`hostile_roles` who plays which part. The schedules are pure functions: the k-th accepted
connection's resets and stalls are :func:`fault_schedule` over the first stream of
:func:`connection_streams` ``(seed, k)``, and the blackouts are
:func:`blackout_schedule` of ``(profile, seed)``, so a run's faults can be listed
before it starts. :class:`TokenBucket` is the bandwidth cap's arithmetic (its only
state is the token count and the time of the last ``take``). The proxy that applies
all this to real sockets is :mod:`fedsync.lab.chaos`; one shaped connection is
:mod:`fedsync.lab.chaos_link`.
"""

from __future__ import annotations

import heapq
import itertools  # noqa: F401 - used by the doctest of fault_schedule
import math
import random
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal


# -- profiles ------------------------------------------------------------------------------------

def _span(name: str, value: tuple[float, float]) -> None:
    lo, hi = value
    if not (0.0 <= lo <= hi and math.isfinite(hi)):
        raise ValueError(f"LinkProfile.{name}: need 0 <= min <= max (finite), got {value!r}")


@dataclass(frozen=True, slots=True)
class LinkProfile:
    """How one simulated link misbehaves. Every field defaults to "no fault".

    Probabilities are per second per connection: ``reset_prob_per_s = 1/30``
    means a given second contains a reset with probability 1/30 (a Poisson
    process with rate ``-ln(1 - p)``, so a mean gap of ~29.5 s).

    >>> LinkProfile(latency_ms=50, jitter_ms=30, bandwidth_bytes_per_s=2_000_000).latency_ms
    50
    """

    name: str = "custom"
    latency_ms: float = 0.0  # mean one-way delay added per direction
    jitter_ms: float = 0.0  # delay drawn uniformly from latency +- jitter (never below 0)
    bandwidth_bytes_per_s: int | None = None  # cap per direction; None = unlimited
    burst_bytes: int = 16 * 1024  # token bucket depth
    reset_prob_per_s: float = 0.0
    stall_prob_per_s: float = 0.0
    stall_s: tuple[float, float] = (0.0, 0.0)  # stall duration, uniform in [min, max]
    blackout_every_s: float = 0.0  # mean up-time between periodic blackouts (x U(0.8, 1.2)); 0 = none
    blackout_first_s: float | None = None  # start of the first periodic blackout; None = after one up-time
    blackout_s: tuple[float, float] = (0.0, 0.0)  # periodic blackout duration, uniform in [min, max]
    blackout_windows: tuple[tuple[float, float], ...] = ()  # extra fixed (start_s, duration_s) from start()
    blackout_new: Literal["blackhole", "refuse"] = "blackhole"  # what a connect during a blackout gets

    def __post_init__(self) -> None:
        for name in ("latency_ms", "jitter_ms", "blackout_every_s"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ValueError(f"LinkProfile.{name}: need a finite number >= 0, got {v!r}")
        if self.bandwidth_bytes_per_s is not None and not self.bandwidth_bytes_per_s > 0:
            raise ValueError(f"LinkProfile.bandwidth_bytes_per_s: need > 0 or None, got {self.bandwidth_bytes_per_s!r}")
        if not (isinstance(self.burst_bytes, int) and self.burst_bytes >= 512):
            raise ValueError(f"LinkProfile.burst_bytes: need an int >= 512, got {self.burst_bytes!r}")
        for name in ("reset_prob_per_s", "stall_prob_per_s"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and 0.0 <= v < 1.0):
                raise ValueError(f"LinkProfile.{name}: need a probability in [0, 1), got {v!r}")
        _span("stall_s", self.stall_s)
        _span("blackout_s", self.blackout_s)
        if self.blackout_first_s is not None and not (0 <= self.blackout_first_s < math.inf):
            raise ValueError(f"LinkProfile.blackout_first_s: need a finite number >= 0, got {self.blackout_first_s!r}")
        if self.blackout_every_s and self.blackout_s[1] <= 0:
            raise ValueError("LinkProfile.blackout_s: periodic blackouts need a duration > 0")
        for start, seconds in self.blackout_windows:
            if not (0.0 <= start and 0.0 < seconds and math.isfinite(start + seconds)):
                raise ValueError(f"LinkProfile.blackout_windows: need (start >= 0, duration > 0), "
                                 f"got {(start, seconds)!r}")
        if self.blackout_new not in ("blackhole", "refuse"):
            raise ValueError(f"LinkProfile.blackout_new: 'blackhole' or 'refuse', got {self.blackout_new!r}")


PROFILES: Mapping[str, LinkProfile] = MappingProxyType({
    "clean": LinkProfile("clean"),
    "wifi-flaky": LinkProfile("wifi-flaky", latency_ms=50, jitter_ms=30, bandwidth_bytes_per_s=2_000_000,
                              reset_prob_per_s=1 / 30, stall_prob_per_s=1 / 90, stall_s=(2.0, 5.0)),
    "cellular-3g": LinkProfile("cellular-3g", latency_ms=275, jitter_ms=125, bandwidth_bytes_per_s=100_000,
                               reset_prob_per_s=1 / 300, stall_prob_per_s=1 / 45, stall_s=(2.0, 8.0)),
    # the first blackout comes early (3 s), so even a short demo meets one
    "blackout": LinkProfile("blackout", latency_ms=20, jitter_ms=10, blackout_every_s=30.0, blackout_first_s=3.0,
                            blackout_s=(5.0, 10.0)),
})


def get_profile(name: str) -> LinkProfile:
    """The named profile (``clean``, ``wifi-flaky``, ``cellular-3g``, ``blackout``).

    >>> get_profile("wifi-flaky").bandwidth_bytes_per_s
    2000000
    """
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown link profile {name!r}; known: {', '.join(PROFILES)}") from None


# -- fieldtest scenarios: a link profile plus hostile devices and crashes ----------------------------

@dataclass(frozen=True, slots=True)
class Scenario:
    """What one ``fedsync fieldtest --profile NAME`` run injects besides the link's faults.

    A plain link profile's scenario kills ``--kill-fraction`` of the devices mid-upload and
    crashes the coordinator once (``device_kills``, ``coordinator_crash``). ``hostile`` adds
    devices that attack: ``poisoners`` send the issue-12 poison every round (every value
    3.0e38, 10,000,000 samples), ``flooders`` are registered accounts that never train and
    publish junk and oversized shards on their own upload topics at ``flood_per_s``, and
    ``broker_kill`` SIGKILLs the broker once mid-run (a round open, updates held) and starts
    it again on its persistence file.

    >>> get_scenario("hostile").poisoners, get_scenario("wifi-flaky").link.name
    (1, 'wifi-flaky')
    """

    name: str
    link: LinkProfile
    poisoners: int = 0
    flooders: int = 0
    broker_kill: bool = False
    device_kills: bool = True
    coordinator_crash: bool = True
    flood_per_s: float = 100.0


SCENARIOS: Mapping[str, Scenario] = MappingProxyType({
    # The attacks and the broker crash, on a mild link, without device kills or a coordinator crash
    # (the link profiles cover those), so that each outcome has one cause.
    "hostile": Scenario("hostile", LinkProfile("hostile", latency_ms=20, jitter_ms=10), poisoners=1, flooders=1,
                        broker_kill=True, device_kills=False, coordinator_crash=False),
})


def get_scenario(name: str) -> Scenario:
    """The named scenario: ``hostile``, or a link profile's (``clean``, ``wifi-flaky``, ...)."""
    if name in SCENARIOS:
        return SCENARIOS[name]
    try:
        return Scenario(name, get_profile(name))
    except ValueError:
        raise ValueError(f"unknown fieldtest profile {name!r}; known: {', '.join([*PROFILES, *SCENARIOS])}") from None


def hostile_roles(devices: int, scenario: Scenario) -> tuple[list[str], list[str], list[str]]:
    """``(honest, poisoners, flooders)`` device ids of a run of ``devices``: the flooders are the
    last ids, the poisoners the ones before them (agents run ``dev-0 .. dev-{honest+poisoners-1}``).

    >>> hostile_roles(10, get_scenario("hostile"))
    (['dev-0', 'dev-1', 'dev-2', 'dev-3', 'dev-4', 'dev-5', 'dev-6', 'dev-7'], ['dev-8'], ['dev-9'])
    """
    ids = [f"dev-{i}" for i in range(devices)]
    hostile = scenario.poisoners + scenario.flooders
    if devices - hostile < 1:
        raise ValueError(f"profile {scenario.name!r} needs more than {hostile} devices, got {devices}")
    honest = ids[:devices - hostile]
    return honest, ids[len(honest):len(honest) + scenario.poisoners], ids[len(honest) + scenario.poisoners:]


# -- the deterministic part (no I/O, no clock) -------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Fault:
    """One scheduled fault, ``at`` seconds after the connection was accepted."""

    at: float
    kind: Literal["reset", "stall"]
    duration: float = 0.0


def _poisson_rate(p: float) -> float:
    return -math.log1p(-p) if p > 0 else 0.0


def connection_streams(seed: int, index: int) -> tuple[random.Random, random.Random, random.Random]:
    """The k-th connection's own RNGs: (faults, latency up, latency down).

    Separate streams, so how much traffic a connection carries (which draws
    latency samples) never shifts its fault schedule.

    >>> a, b = connection_streams(1, 0)[0], connection_streams(1, 0)[0]; a.random() == b.random()
    True
    """
    root = random.Random(f"fedsync.chaos/{seed}/{index}")
    return random.Random(root.getrandbits(64)), random.Random(root.getrandbits(64)), random.Random(root.getrandbits(64))


def fault_schedule(profile: LinkProfile, rng: random.Random) -> Iterator[Fault]:
    """Resets and stalls of one connection, in time order (infinite, or empty for no faults).

    >>> p = get_profile("wifi-flaky"); rng = connection_streams(1, 0)[0]
    >>> [(round(f.at, 1), f.kind) for f in itertools.islice(fault_schedule(p, rng), 3)]
    [(7.7, 'reset'), (8.7, 'reset'), (12.3, 'stall')]
    """
    r_reset, r_stall = _poisson_rate(profile.reset_prob_per_s), _poisson_rate(profile.stall_prob_per_s)
    total = r_reset + r_stall
    t = 0.0
    while total > 0:
        t += rng.expovariate(total)
        if rng.random() * total < r_reset:
            yield Fault(t, "reset")
        else:
            yield Fault(t, "stall", rng.uniform(*profile.stall_s))


def blackout_schedule(profile: LinkProfile, rng: random.Random) -> Iterator[tuple[float, float]]:
    """(start_s, duration_s) of every blackout after ``start()``, in start order.

    >>> list(blackout_schedule(LinkProfile(blackout_windows=((5.0, 2.0),)), random.Random(0)))
    [(5.0, 2.0)]
    """
    def periodic() -> Iterator[tuple[float, float]]:
        t, first = 0.0, profile.blackout_first_s
        while profile.blackout_every_s > 0:
            t += profile.blackout_every_s * rng.uniform(0.8, 1.2) if first is None else first
            first = None
            d = rng.uniform(*profile.blackout_s)
            yield (t, d)
            t += d

    return heapq.merge(sorted(profile.blackout_windows), periodic())


class TokenBucket:
    """Bandwidth cap: ``take(n, now)`` returns how long to wait before sending n bytes.

    Debt is allowed, so the long-run rate is exact whatever the slice sizes.

    >>> b = TokenBucket(1000, 500, now=0.0); b.take(500, 0.0), b.take(500, 0.0), b.take(500, 1.0)
    (0.0, 0.5, 0.0)
    """

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate, self.burst, self.tokens, self.last = float(rate), burst, float(burst), now

    def take(self, n: int, now: float) -> float:
        self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate) - n
        self.last = now
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate

