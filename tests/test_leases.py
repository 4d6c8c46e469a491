"""Leases (mqmq/broker/leases.py): each ends once, at its time, oldest first;
one timer per lease length, whatever the number of leases."""

from __future__ import annotations

from twisted.internet import task

from mqmq.broker.leases import Leases


def leases() -> tuple[task.Clock, Leases[str], list[tuple[float, str]]]:
    clock = task.Clock()
    ended: list[tuple[float, str]] = []
    return clock, Leases(clock, lambda holder: ended.append((clock.seconds(), holder))), ended


def test_each_lease_ends_at_its_time_oldest_first_with_one_timer_per_length() -> None:
    clock, running, ended = leases()
    running.start("a", 10)
    clock.advance(1)
    running.start("b", 10)
    running.start("c", 3)
    running.start("d", 10)
    assert len(clock.getDelayedCalls()) == 2 and len(running) == 4
    clock.advance(3)
    assert ended == [(4, "c")]
    clock.advance(6)
    assert ended[1:] == [(10, "a")]
    clock.advance(1)
    assert ended[2:] == [(11, "b"), (11, "d")]
    assert clock.getDelayedCalls() == [] and len(running) == 0


def test_an_ended_lease_never_runs_out_and_a_touched_one_starts_again() -> None:
    clock, running, ended = leases()
    for holder in ("a", "b", "c"):
        running.start(holder, 5)
    running.end("a")  # the oldest: its length's timer waits on for b
    running.end("a")  # (twice: nothing)
    clock.advance(4)
    running.start("b", 5)  # Touch: 5 s from now
    clock.advance(1)
    assert ended == [(5, "c")]
    clock.advance(4)
    assert ended[1:] == [(9, "b")]
    running.start("e", 5)
    running.end("e")  # the last of its length: its timer stays until due...
    running.start("f", 5)  # ...and serves the next lease of that length
    running.end("f")
    assert len(clock.getDelayedCalls()) == 1
    clock.advance(5)  # then goes, with nothing to do
    assert clock.getDelayedCalls() == [] and ended[2:] == []


def test_a_lease_started_as_one_runs_out_makes_no_second_timer() -> None:
    clock = task.Clock()
    ended: list[str] = []

    def run_out(holder: str) -> None:
        ended.append(holder)
        if holder == "a":
            running.start("again", 2)  # (a released message reserved again at once)

    running: Leases[str] = Leases(clock, run_out)
    running.start("a", 2)
    running.start("b", 2)
    clock.advance(2)
    assert ended == ["a", "b"]
    assert len(clock.getDelayedCalls()) == 1
    clock.advance(2)
    assert ended == ["a", "b", "again"] and clock.getDelayedCalls() == []


def test_leases_of_a_fraction_of_a_second_end_on_time_however_the_clock_rounds() -> None:
    clock, running, ended = leases()
    running.start("a", 0.1)
    clock.advance(0.07)
    running.start("b", 0.1)
    clock.advance(0.03)
    assert [holder for _, holder in ended] == ["a"]
    clock.advance(0.07)
    assert [holder for _, holder in ended] == ["a", "b"]
    assert clock.getDelayedCalls() == []
