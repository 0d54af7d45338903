"""The chaos proxy's arithmetic, without sockets or a clock: fault and blackout schedules from a
seed, and the bandwidth cap's token bucket on an injected clock (tests/test_chaos.py runs the
proxy itself and checks it uses these)."""

from __future__ import annotations

import itertools
import random

from hypothesis import given, settings
from hypothesis import strategies as st

from fedsync.lab.chaos import (ChaosProxy, TokenBucket, blackout_schedule, connection_streams, fault_schedule,
                               get_profile)


# -- schedules ---------------------------------------------------------------------------------------

def test_same_seed_gives_the_same_fault_and_blackout_schedule():
    def faults(profile, seed, index, n=50):
        return list(itertools.islice(fault_schedule(profile, connection_streams(seed, index)[0]), n))

    def blackouts(profile, seed, n=20):
        return list(itertools.islice(blackout_schedule(profile, random.Random(f"fedsync.chaos/{seed}/blackouts")), n))

    wifi, cell, dark = get_profile("wifi-flaky"), get_profile("cellular-3g"), get_profile("blackout")
    assert faults(wifi, 7, 3) == faults(wifi, 7, 3)
    assert faults(wifi, 7, 3) != faults(wifi, 8, 3)  # another seed
    assert faults(wifi, 7, 3) != faults(wifi, 7, 4)  # another connection
    assert faults(cell, 7, 3) == faults(cell, 7, 3)
    assert blackouts(dark, 7) == blackouts(dark, 7) != blackouts(dark, 8)
    assert faults(get_profile("clean"), 7, 3) == []
    # what the proxy will do to its k-th connection is exactly this generator's output
    proxy = ChaosProxy(None, ("127.0.0.1", 9), wifi, seed=7)
    assert proxy.planned_faults(3, 50) == faults(wifi, 7, 3)

    # the generator honours the profile: ~1 reset per 30 s, stalls of 2-5 s, blackouts 5-10 s every ~30 s
    many = faults(wifi, 1, 0, n=4000)
    resets = [f for f in many if f.kind == "reset"]
    stalls = [f for f in many if f.kind == "stall"]
    assert 25 <= many[-1].at / len(resets) <= 35
    assert all(2.0 <= f.duration <= 5.0 for f in stalls) and 60 <= many[-1].at / len(stalls) <= 120
    periods = blackouts(dark, 1, n=200)
    assert periods[0][0] == 3.0 and all(5.0 <= d <= 10.0 for _, d in periods)
    gaps = [b[0] - (a[0] + a[1]) for a, b in zip(periods, periods[1:])]
    assert all(24.0 <= g <= 36.0 for g in gaps)


# -- the token bucket ---------------------------------------------------------------------------------

@given(pieces=st.lists(st.tuples(st.integers(1, 4096), st.sampled_from([0.0, 0.0, 0.001, 0.02, 0.5])),
                       min_size=1, max_size=200))
@settings(max_examples=200, deadline=None)
def test_token_bucket_never_lets_more_than_burst_plus_rate_times_elapsed(pieces):
    # A sender that sends each piece the moment take() allows it, after an idle gap of its own:
    # whatever the slicing and the gaps, bytes sent by t <= burst + rate * t, and a greedy sender
    # that is never idle is held to exactly that line (debt carries over, so no rounding creeps in).
    rate, burst = 131_072.0, 8192  # powers of two: every wait below is exact in binary
    bucket, now, sent = TokenBucket(rate, burst, now=0.0), 0.0, 0
    for size, idle in pieces:
        now += idle
        now += bucket.take(size, now)  # the proxy sleeps this long, then writes the piece
        sent += size
        assert sent <= burst + rate * now
        if all(gap == 0.0 for _, gap in pieces) and sent > burst:
            assert now == (sent - burst) / rate


def test_token_bucket_exact_schedule_for_a_greedy_sender():
    bucket = TokenBucket(131_072, 8192, now=0.0)
    now, releases = 0.0, []
    for _ in range(6):
        now += bucket.take(4096, now)
        releases.append(now)
    # the burst (two pieces) at once, then one 4096-byte piece per 4096 / 131072 s = 1/32 s
    assert releases == [0.0, 0.0, 1 / 32, 2 / 32, 3 / 32, 4 / 32]
    assert TokenBucket(131_072, 8192, now=0.0).take(8192 + 131_072, 0.0) == 1.0  # debt: one second
