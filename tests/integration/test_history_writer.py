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
    """While the database cannot take the batch (a missing table: unavailable, not a refusal of these rows), no ack
    goes out (the sender stops at max_ack_pending); when it accepts again, the rows are written, then acked, and
    nothing is counted lost or refused."""
    writer = HistoryWriter(store, flush_s=0.01, pending_hold_s=0.0)
    writer.start()
    await rename_attempts_table(store, "attempts", "attempts_away")
    msg = FakeMsg(store, "dlv_" + "1".zfill(32))
    writer.add(attempt(1, msg))
    await asyncio.sleep(1.0)
    assert msg.rows_at_ack is None, "acked while its history could not be written"
    await rename_attempts_table(store, "attempts_away", "attempts")
    await wait_until(lambda: msg.rows_at_ack is not None, 10, what="the ack after the database came back")
    await writer.stop()
    assert writer.lost == 0 and writer.refused == 0 and await count(store, Attempt) == 1


class KeptAlive:
    """A JetStream message stand-in: counts ``in_progress()`` and records when ``ack()`` came."""

    def __init__(self) -> None:
        self.in_progress_at: list[float] = []
        self.acked_at: float | None = None

    async def in_progress(self) -> None:
        self.in_progress_at.append(asyncio.get_running_loop().time())

    async def ack(self) -> None:
        self.acked_at = asyncio.get_running_loop().time()


async def test_while_the_database_is_unavailable_the_waiting_messages_are_kept_alive_and_nothing_is_lost(store):
    """Issue 10, "no silent loss": by default nothing is settled without its row; every waiting record's message
    (``ack`` or ``msg``) gets ``in_progress()`` at once and then every ``keepalive_s`` seconds, so JetStream does not
    redeliver it; when the database is back every row is written, then every ack and callback runs."""
    writer = HistoryWriter(store, flush_s=0.01, pending_hold_s=0.0, keepalive_s=0.4)
    writer.start()
    await rename_attempts_table(store, "attempts", "attempts_away")
    loop = asyncio.get_running_loop()
    msgs = [KeptAlive() for _ in range(6)]
    called: list[float] = []

    def then(m: KeptAlive):  # noqa: ANN202 - the sender's retry/dead-letter callback settles the message itself
        async def settle() -> None:
            called.append(loop.time())
            await m.ack()
        return settle

    for i, m in enumerate(msgs):
        r = attempt(i, m) if i % 2 else attempt(i, None)
        if not i % 2:
            r.then, r.msg, r.status = then(m), m, DeliveryStatus.RETRYING
        writer.add(r)
    await wait_until(lambda: all(len(m.in_progress_at) >= 4 for m in msgs), 15, what="four keep-alives each")
    assert all(m.acked_at is None for m in msgs) and not called, "settled while its history could not be written"
    assert writer.database_down_s > 1.0 and writer.backlog == 6
    back = loop.time()
    await rename_attempts_table(store, "attempts_away", "attempts")
    await wait_until(lambda: all(m.acked_at is not None for m in msgs), 10, what="every ack after the outage")
    await writer.stop()
    assert writer.lost == 0 and writer.refused == 0 and writer.database_down_s == 0.0
    assert await count(store, Attempt) == 6 and await count(store, Delivery) == 6
    assert len(called) == 3 and all(t >= back for t in called)
    for m in msgs:
        gaps = [b - a for a, b in zip(m.in_progress_at, m.in_progress_at[1:])]
        assert m.in_progress_at[0] - back < 0 and max(gaps) < 0.4 * 3, gaps  # kept alive throughout


async def test_stop_during_an_outage_leaves_the_waiting_records_unsettled(store):
    """Stopping while the database is unavailable retries for ``stop_give_up_s`` seconds, then leaves the records
    unsettled: no ack without a row (JetStream redelivers them after ack_wait, and the next dispatcher records them)."""
    writer = HistoryWriter(store, flush_s=0.01, pending_hold_s=0.0, stop_give_up_s=0.5)
    writer.start()
    await rename_attempts_table(store, "attempts", "attempts_away")
    try:
        msg = KeptAlive()
        writer.add(attempt(1, msg))
        await wait_until(lambda: writer.database_down_s > 0, 5, what="the first failed write")
        await asyncio.wait_for(writer.stop(), 10)
    finally:
        await rename_attempts_table(store, "attempts_away", "attempts")
    assert msg.acked_at is None and writer.unsettled == 1 and writer.lost == 0
    assert await count(store, Attempt) == 0


async def test_with_history_give_up_s_a_database_down_past_it_settles_the_acks_and_counts_the_rows_lost(store):
    """The optional hard bound (``LETTA_BUS_HISTORY_GIVE_UP_S``, unset by default): past ``give_up_s`` the ack goes
    out without its row, counted in ``letta_bus_history_records_lost_total``."""
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
