"""Group extraction costs are noise-robust: timing repeats until the two fastest runs agree (bounded), the
fastest is kept, and no group is ever reported above 100% of all units."""
from __future__ import annotations

import pytest

import fastinf.experiment.costs as costs


class _Clock:
    """perf_counter that advances by planned durations: start/stop pairs per timed capture."""

    def __init__(self, durations):
        self.durations, self.now, self.started = list(durations), 0.0, False

    def perf_counter(self):
        if self.started:
            self.now += self.durations.pop(0)
        self.started = not self.started
        return self.now


@pytest.fixture
def calls(monkeypatch):
    n = {"calls": 0}

    def fake_capture(*a, **k):
        n["calls"] += 1

    import fastinf.extraction.capture as capture

    monkeypatch.setattr(capture, "features_for_batch", fake_capture)
    return n


@pytest.mark.parametrize("durations,repeats,want_calls,want", [
    ([1.0, 1.5, 1.2, 1.03, 9.0], 2, 4, 1.0),          # 50%, 20%, then 3% spread: stop at 4
    ([1.0, 1.01, 5.0], 2, 2, 1.0),                     # stable at once
    ([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0], 2, 6, 1.0),   # never stable: at most 3 x repeats
    ([2.0, 1.0, 3.0], 1, 1, 2.0),                      # repeats 1: a single timing, as configured
    ([3.0, 2.0, 1.0, 1.04], 3, 4, 1.0),                # at least `repeats` timings before the check
])
def test_fastest_repeats_until_the_two_fastest_agree(monkeypatch, calls, durations, repeats, want_calls, want):
    monkeypatch.setattr(costs, "time", _Clock(durations))
    assert costs._fastest(None, [], {}, {}, repeats) == pytest.approx(want)
    assert calls["calls"] == want_calls


def test_a_group_never_costs_more_than_all_units():
    assert costs._share(1.2, 1.0) == 1.0
    assert costs._share(0.25, 1.0) == 0.25
    assert costs._share(1.0, 0.0) is None
