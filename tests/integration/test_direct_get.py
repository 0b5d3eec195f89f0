"""Batched direct get (bus/direct_get.py) on a real nats-server: batches in stream order with their stored
sequence, subject and time; a subject filter; a start by sequence or by time; how many follow; nothing at the end;
a clear error where the stream does not allow direct gets."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from nats.js.api import StreamConfig

from bus.direct_get import DirectGetError, get_batch


@pytest.fixture
async def stream(nc):
    js = nc.jetstream()
    await js.add_stream(StreamConfig(name="DG", subjects=["dg.>"], allow_direct=True))
    for i in range(10):
        await js.publish(f"dg.{'a' if i % 2 else 'b'}", f"m{i}".encode(), headers={"X-Index": str(i)})
    return "DG"


async def test_batches_follow_the_stream_with_sequence_subject_time_and_headers(nc, stream):
    before = datetime.now(timezone.utc) - timedelta(minutes=1)
    first, pending = await get_batch(nc, stream, subject="dg.>", batch=4, start_seq=1)
    assert [m.seq for m in first] == [1, 2, 3, 4] and pending == 6
    assert [m.data for m in first] == [b"m0", b"m1", b"m2", b"m3"]
    assert first[1].subject == "dg.a" and first[1].headers == {"X-Index": "1"}
    assert before < first[0].time <= first[-1].time <= datetime.now(timezone.utc)
    rest, pending = await get_batch(nc, stream, subject="dg.>", batch=100, start_seq=5)
    assert [m.seq for m in rest] == [5, 6, 7, 8, 9, 10] and pending == 0


async def test_a_subject_filter_and_a_start_time(nc, stream):
    only_a, pending = await get_batch(nc, stream, subject="dg.a", batch=3, start_seq=1)
    assert [m.data for m in only_a] == [b"m1", b"m3", b"m5"] and pending == 2
    all_msgs, _ = await get_batch(nc, stream, subject="dg.>", batch=10, start_seq=1)
    since = all_msgs[6].time
    later, _ = await get_batch(nc, stream, subject="dg.>", batch=10, start_time=since)
    assert later[0].seq <= 7 and later[-1].seq == 10
    assert all(m.time >= since for m in later)


async def test_nothing_after_the_end_and_a_refusal_named(nc, stream):
    assert await get_batch(nc, stream, subject="dg.>", batch=5, start_seq=11) == ([], 0)
    await nc.jetstream().add_stream(StreamConfig(name="NODIRECT", subjects=["nd.>"]))
    await nc.jetstream().publish("nd.x", b"x")
    with pytest.raises(DirectGetError, match="NODIRECT refused: 503"):  # no responders: allow_direct is off
        await get_batch(nc, "NODIRECT", subject="nd.>", batch=5, start_seq=1, timeout_s=1.0)
