"""Leases of reserved messages: when each ends, with one timer per lease length.

A ``Reserve`` under a steady pipeline starts a lease, and its ``Ack`` ends
it, tens of thousands of times a second.  A timer each (``callLater``, then
``cancel``) was a tenth of the server's time for a ``Reserve`` and its
``Ack``.  Leases of one length end in the order they started (the clock
only goes forward), so each length keeps its leases in that order, and one
timer, due when the oldest ends, serves them all.  Clients use a handful of
lengths (the default 30 s, their own).  A length's timer is kept until it
comes, even once its leases have all ended: it then goes, with nothing to do.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Generic, Optional, TypeVar

from twisted.internet.interfaces import IDelayedCall, IReactorTime

Holder = TypeVar("Holder")


class _Length(Generic[Holder]):
    """The running leases of one length, oldest first, and their timer."""

    __slots__ = ("running", "timer")

    def __init__(self) -> None:
        # holder -> when its lease ends (clock seconds).
        self.running: OrderedDict[Holder, float] = OrderedDict()
        self.timer: Optional[IDelayedCall] = None


class Leases(Generic[Holder]):
    """Leases of any number of holders (reservations), each ending at most once.

    :param clock: the time (``task.Clock`` in tests).
    :param ended: called with a holder whose lease ran out (its lease is
        over by then: :meth:`end` on it does nothing).
    """

    def __init__(self, clock: IReactorTime, ended: Callable[[Holder], object]) -> None:
        self._clock = clock
        self._ended = ended
        self._lengths: dict[float, _Length[Holder]] = {}
        # holder -> its lease's length
        self._length_of: dict[Holder, float] = {}

    def __len__(self) -> int:
        return len(self._length_of)

    def start(self, holder: Holder, seconds: float) -> None:
        """Start (or start again: ``Touch``) ``holder``'s lease, ``seconds`` from now."""
        if holder in self._length_of:
            self.end(holder)
        length = self._lengths.get(seconds)
        if length is None:
            length = self._lengths[seconds] = _Length()
        length.running[holder] = self._clock.seconds() + seconds
        self._length_of[holder] = seconds
        if length.timer is None:
            length.timer = self._clock.callLater(seconds, self._run_out, seconds)

    def end(self, holder: Holder) -> None:
        """End ``holder``'s lease before it runs out (if it has one)."""
        seconds = self._length_of.pop(holder, None)
        if seconds is None:
            return
        # The timer stays, even for none left: when it comes, it waits on
        # for the oldest left, if any.  (A consumer that takes one message
        # at a time would otherwise set and cancel a timer for each.)
        del self._lengths[seconds].running[holder]

    def _run_out(self, seconds: float) -> None:
        length = self._lengths.get(seconds)
        if length is None:
            return
        # (length.timer stays the call that fired until the end: a lease of
        # this length started by a callback below makes no second timer.)
        running = length.running
        while running:
            holder, ends = next(iter(running.items()))
            now = self._clock.seconds()
            if ends > now + _SLACK:
                length.timer = self._clock.callLater(ends - now, self._run_out, seconds)
                return
            del running[holder]
            del self._length_of[holder]
            self._ended(holder)
        length.timer = None
        del self._lengths[seconds]


#: A lease due this close to now has run out (a timer set for the oldest
#: lease left comes at now + (ends - now), which may round below ends).
_SLACK = 1e-9
