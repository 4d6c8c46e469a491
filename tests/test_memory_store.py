"""The memory store's queue against a plain deque: packing must never change FIFO order."""

from __future__ import annotations

from collections import deque

from hypothesis import given, settings
from hypothesis import strategies as st

from mqmq.stores.memory import PACK_BELOW, SEGMENT_BYTES, MemoryQueue

_messages = st.one_of(
    st.binary(max_size=PACK_BELOW - 1),
    st.binary(min_size=PACK_BELOW, max_size=PACK_BELOW + 64),
)
_operations = st.lists(
    st.one_of(
        st.tuples(st.just("push"), _messages),
        st.tuples(st.just("push_front"), _messages),
        st.tuples(st.just("pop"), st.none()),
        st.tuples(st.just("burst"), st.integers(min_value=1, max_value=3000)),
    ),
    max_size=60,
)


@settings(max_examples=150, deadline=None)
@given(_operations)
def test_queue_behaves_as_a_deque(operations: list[tuple[str, object]]) -> None:
    queue = MemoryQueue(b"q")
    model: deque[bytes] = deque()
    counter = 0
    for operation, argument in operations:
        if operation == "push":
            assert isinstance(argument, bytes)
            queue.push(argument)
            model.append(argument)
        elif operation == "push_front":
            assert isinstance(argument, bytes)
            queue.push_front(argument)
            model.appendleft(argument)
        elif operation == "burst":
            # Enough short messages to fill several packed segments.
            assert isinstance(argument, int)
            for _ in range(argument):
                message = b"m%d" % counter
                counter += 1
                queue.push(message)
                model.append(message)
        else:
            assert queue.pop() == (model.popleft() if model else None)
        assert len(queue) == len(model)
        assert queue.num_bytes == sum(map(len, model))
    while model:
        assert queue.pop() == model.popleft()
    assert queue.pop() is None
    assert queue.num_bytes == 0


def test_short_messages_are_packed_into_segments() -> None:
    queue = MemoryQueue(b"q")
    message = b"x" * 100
    count = 3 * SEGMENT_BYTES // len(message)
    for _ in range(count):
        queue.push(message)
    assert len(queue._packed) >= 2
    assert all(not isinstance(entry, bytes) for entry in queue._packed)
    assert [queue.pop() for _ in range(count)] == [message] * count
    assert queue.pop() is None


def test_long_messages_are_kept_as_they_are() -> None:
    queue = MemoryQueue(b"q")
    long_message = b"y" * PACK_BELOW
    queue.push(b"short")
    queue.push(long_message)
    assert queue._packed[-1] is long_message
    assert queue.pop() == b"short"
    assert queue.pop() is long_message
