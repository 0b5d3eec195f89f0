"""The delivery-history writer on a real SQLite store: pending rows held and superseded, acks only after their row
is committed and never behind a backlog of pending rows, and the fan-out's backpressure (DESIGN.md, "Storage")."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import func, select

from dispatcher.store.history import DeliveryRecord, HistoryWriter
from dispatcher.store.models import Attempt, Delivery, DeliveryStatus
from tests.helpers import wait_until

pytestmark = pytest.mark.timeout(60)


class FakeMsg:
    """What the writer calls on a record's message: ``ack()``; records the rows committed at that moment."""

    def __init__(self, store, delivery_id: str) -> None:  # noqa: ANN001
        self.store, self.delivery_id = store, delivery_id
        self.rows_at_ack: int | None = None

    async def ack(self) -> None:
        async with self.store.session() as s:
            self.rows_at_ack = (await s.execute(select(func.count()).select_from(Delivery))).scalar_one()
            row = await s.get(Delivery, self.delivery_id)
        assert row is not None and row.attempts >= 1, "acked before its history row was committed"


def pending(i: int, at: datetime | None = None) -> DeliveryRecord:
    return DeliveryRecord(delivery_id=f"dlv_{i:032d}", event_id=f"evt_{i}", endpoint_id="ep-1", agent_id="agent-1",
                          event_type="agent.step.completed", status=DeliveryStatus.PENDING, event_seq=i,
                          **({"at": at} if at else {}))


def attempt(i: int, msg: FakeMsg) -> DeliveryRecord:
    return DeliveryRecord(delivery_id=f"dlv_{i:032d}", event_id=f"evt_{i}", endpoint_id="ep-1", agent_id="agent-1",
                          event_type="agent.step.completed", status=DeliveryStatus.SUCCEEDED, attempt=1,
                          status_code=200, duration_ms=1.5, ack=msg, event_seq=i)


async def count(store, table) -> int:  # noqa: ANN001
    async with store.session() as s:
        return (await s.execute(select(func.count()).select_from(table))).scalar_one()


async def test_a_held_pending_row_is_superseded_by_the_attempt_and_keeps_its_creation_time(store):
    writer = HistoryWriter(store, flush_s=0.01, pending_hold_s=5.0)
    writer.start()
    created = datetime.now(timezone.utc) - timedelta(seconds=3)
    writer.add(pending(1, at=created))
    msg = FakeMsg(store, "dlv_" + "1".zfill(32))
    writer.add(attempt(1, msg))
    await wait_until(lambda: msg.rows_at_ack is not None, 5, what="the ack after the commit")
    await writer.stop()
    async with store.session() as s:
        row = await s.get(Delivery, msg.delivery_id)
    assert row.status == DeliveryStatus.SUCCEEDED and row.attempts == 1
    assert abs((row.created_at.replace(tzinfo=timezone.utc) - created).total_seconds()) < 0.001
    assert await count(store, Attempt) == 1


async def test_an_unanswered_pending_row_is_written_after_the_hold_and_at_stop(store):
    writer = HistoryWriter(store, flush_s=0.01, pending_hold_s=0.2)
    writer.start()
    writer.add(pending(1))
    await asyncio.sleep(0.05)
    assert await count(store, Delivery) == 0  # held
    await wait_until(lambda: writer.backlog == 0, 5, what="the held row written")
    writer.add(pending(2))
    await writer.stop()  # writes what is still held
    async with store.session() as s:
        statuses = (await s.execute(select(Delivery.status))).scalars().all()
    assert statuses == [DeliveryStatus.PENDING] * 2


async def test_acks_do_not_wait_behind_a_backlog_of_pending_rows_and_the_fanout_waits_for_room(store):
    writer = HistoryWriter(store, flush_s=0.01, batch=200, pending_hold_s=0.0, max_backlog=1000)
    for i in range(3000):
        writer.add(pending(i))
    assert not writer.has_room  # over max_backlog: the fan-out reads no more events
    msg = FakeMsg(store, "dlv_" + "5000".zfill(32))
    writer.add(attempt(5000, msg))
    writer.start()
    await wait_until(lambda: msg.rows_at_ack is not None, 10, what="the ack")
    assert msg.rows_at_ack <= 200, "the attempt's row was written in the first transaction, before the backlog"
    await asyncio.wait_for(writer.room(), 10)
    assert writer.has_room
    await writer.stop()
    assert await count(store, Delivery) == 3001


class AckRecorder:
    """A message whose ``ack()`` only records when it came."""

    def __init__(self) -> None:
        self.acked_at: float | None = None

    async def ack(self) -> None:
        self.acked_at = asyncio.get_running_loop().time()


async def rename_attempts_table(store, old: str, new: str) -> None:  # noqa: ANN001
    """Make the database refuse the writer's inserts (``attempts`` gone) or accept them again."""
    async with store.engine.begin() as conn:
        await conn.exec_driver_sql(f"ALTER TABLE {old} RENAME TO {new}")


async def test_a_failing_database_holds_the_acks_until_the_rows_are_written(store):
    """While the database refuses the batch, no ack goes out (the sender stops at max_ack_pending); when it
    accepts again, the rows are written, then acked, and nothing is counted lost."""
    writer = HistoryWriter(store, flush_s=0.01, pending_hold_s=0.0, give_up_s=30.0)
    writer.start()
    await rename_attempts_table(store, "attempts", "attempts_away")
    msg = FakeMsg(store, "dlv_" + "1".zfill(32))
    writer.add(attempt(1, msg))
    await asyncio.sleep(1.0)
    assert msg.rows_at_ack is None, "acked while its history could not be written"
    await rename_attempts_table(store, "attempts_away", "attempts")
    await wait_until(lambda: msg.rows_at_ack is not None, 10, what="the ack after the database came back")
    await writer.stop()
    assert writer.lost == 0 and await count(store, Attempt) == 1


async def test_a_database_down_past_give_up_settles_the_acks_and_counts_the_rows_lost(store):
    """Past ``give_up_s`` the ack goes out without its row (no redelivery storm), counted in
    ``letta_bus_history_records_lost_total``."""
    from dispatcher.store.history import HISTORY_LOST

    before = HISTORY_LOST._value.get()
    writer = HistoryWriter(store, flush_s=0.01, pending_hold_s=0.0, give_up_s=0.6)
    writer.start()
    await rename_attempts_table(store, "attempts", "attempts_away")
    try:
        msg = AckRecorder()
        loop = asyncio.get_running_loop()
        added = loop.time()
        writer.add(attempt(1, msg))
        await wait_until(lambda: msg.acked_at is not None, 10, what="the ack after giving up")
        assert 0.5 <= msg.acked_at - added < 5, "retried for about give_up_s seconds, then settled"
        await writer.stop()
    finally:
        await rename_attempts_table(store, "attempts_away", "attempts")
    assert writer.lost == 1 and HISTORY_LOST._value.get() == before + 1
    assert await count(store, Attempt) == 0
