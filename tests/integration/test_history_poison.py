"""One row cannot block a delivery-history batch (issue 10, finding 2), on SQLite and on PostgreSQL.

PostgreSQL refuses what SQLite stores: a NUL byte in TEXT, a lone surrogate (not UTF-8), an ``agent_id`` over 128
or an ``event_id`` over 64 characters. Before the fix the whole batch failed, was retried, then settled without any
of its rows. Now the writer stores those values safely (NUL and lone surrogates as U+FFFD, ids clamped to their
column), and a row the database still refuses is left out alone: the batch is split until only it is left, it is
logged with its delivery id and counted in ``letta_bus_history_records_refused_total``, and every record's ack
still runs.
"""

from __future__ import annotations

import asyncio
import logging

import pytest
from sqlalchemy import func, select

from dispatcher.store.database import Store
from dispatcher.store.history import HISTORY_REFUSED, DeliveryRecord, HistoryWriter
from dispatcher.store.models import Attempt, Delivery, DeliveryStatus

pytestmark = pytest.mark.timeout(60)

GZIP_PAGE = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03 binary"  # a gzip error page's first bytes


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request, settings) -> str:  # noqa: ANN001
    """SQLite, then a fresh PostgreSQL database (skipped without LETTA_BUS_TEST_POSTGRES_URL)."""
    return request.getfixturevalue("postgres_url") if request.param == "postgres" else settings.database_url


@pytest.fixture
async def any_store(database_url, settings):  # noqa: ANN001
    store = Store.from_settings(settings, database_url)
    await store.create_schema()
    yield store
    await store.close()


class Settled:
    """A message stand-in whose ``ack()`` records that it ran and which rows were committed at that moment."""

    def __init__(self, store: Store, delivery_id: str) -> None:
        self.store, self.delivery_id = store, delivery_id
        self.acked = asyncio.Event()
        self.row_at_ack: Delivery | None = None

    async def ack(self) -> None:
        async with self.store.session() as s:
            self.row_at_ack = await s.get(Delivery, self.delivery_id)
        self.acked.set()


def record(i: int, msg: Settled | None = None, **fields) -> DeliveryRecord:  # noqa: ANN003
    values = {"delivery_id": f"dlv_{i:032d}", "event_id": f"evt_{i}", "endpoint_id": "ep-1", "agent_id": "agent-1",
              "event_type": "agent.step.completed", "status": DeliveryStatus.SUCCEEDED, "attempt": 1,
              "status_code": 200, "duration_ms": 2.0, "response_excerpt": "ok", "ack": msg, "event_seq": i}
    return DeliveryRecord(**(values | fields))


async def rows(store: Store) -> dict[str, Delivery]:
    async with store.session() as s:
        return {d.id: d for d in (await s.execute(select(Delivery))).scalars()}


async def excerpts(store: Store) -> dict[str, str | None]:
    async with store.session() as s:
        return dict((await s.execute(select(Attempt.delivery_id, Attempt.response_excerpt))).all())


async def test_unstorable_text_and_over_long_ids_are_stored_safely_with_the_rest_of_their_batch(any_store):
    """A NUL byte, a lone surrogate, over-long ids and an over-long error in one batch of 50 good records: every
    row is written (the values made storable), every ack runs after its row is committed, nothing is refused."""
    store = any_store
    refused_before = HISTORY_REFUSED._value.get()
    writer = HistoryWriter(store, flush_s=0.01, pending_hold_s=0.0)
    bad = {
        100: {"response_excerpt": GZIP_PAGE.decode("utf-8", "replace")},  # decoded as the sender does
        101: {"response_excerpt": "caf\udce9 half-decoded"},  # a lone surrogate (decoded with surrogateescape)
        102: {"agent_id": "a" * 300, "status": DeliveryStatus.RETRYING, "status_code": 503,
              "error": "boom\x00" * 2000},
        103: {"event_id": "e" * 65},
    }
    msgs = {i: Settled(store, f"dlv_{i:032d}") for i in [*range(50), *bad]}
    for i in range(25):
        writer.add(record(i, msgs[i]))
    for i, fields in bad.items():
        writer.add(record(i, msgs[i], **fields))
    for i in range(25, 50):
        writer.add(record(i, msgs[i]))
    writer.start()
    try:
        await asyncio.wait_for(asyncio.gather(*(m.acked.wait() for m in msgs.values())), 20)
    finally:
        await writer.stop()
    assert all(m.row_at_ack is not None for m in msgs.values()), "an ack went out before its row was committed"
    written = await rows(store)
    assert len(written) == 54 and writer.lost == 0
    assert HISTORY_REFUSED._value.get() == refused_before
    texts = await excerpts(store)
    assert texts[f"dlv_{100:032d}"] == "\x1f\ufffd\x08" + "\ufffd" * 6 + "\x03 binary"  # NUL -> U+FFFD
    assert texts[f"dlv_{101:032d}"] == "caf\ufffd half-decoded"
    long_agent = written[f"dlv_{102:032d}"]
    assert long_agent.agent_id == "a" * 128 and long_agent.status == DeliveryStatus.RETRYING
    assert len(long_agent.last_error) == 2000 and "\x00" not in long_agent.last_error
    assert written[f"dlv_{103:032d}"].event_id == "e" * 64


async def test_rows_the_database_refuses_are_left_out_alone_logged_counted_and_still_acked(any_store, caplog):
    """Two records no database can store (a NOT NULL column empty, a status code past 64 bits) among 200 good ones:
    the batch is split until only those two are left out; each is logged with its delivery id and the database's
    reason and counted; all 202 acks run, the good ones after their rows are committed."""
    store = any_store
    refused_before = HISTORY_REFUSED._value.get()
    writer = HistoryWriter(store, flush_s=0.01, pending_hold_s=0.0)
    msgs = {i: Settled(store, f"dlv_{i:032d}") for i in range(202)}
    for i in range(202):
        fields = {"event_type": None} if i == 57 else {"status_code": 2 ** 70} if i == 140 else {}
        writer.add(record(i, msgs[i], **fields))
    caplog.set_level(logging.ERROR, logger="dispatcher.store.history")
    writer.start()
    try:
        await asyncio.wait_for(asyncio.gather(*(m.acked.wait() for m in msgs.values())), 20)
    finally:
        await writer.stop()
    written = await rows(store)
    assert sorted(written) == sorted(f"dlv_{i:032d}" for i in range(202) if i not in (57, 140))
    assert all(msgs[i].row_at_ack is not None for i in range(202) if i not in (57, 140))
    async with store.session() as s:
        assert (await s.execute(select(func.count()).select_from(Attempt))).scalar_one() == 200
    assert HISTORY_REFUSED._value.get() == refused_before + 2 and writer.refused == 2 and writer.lost == 0
    refusals = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(refusals) == 2
    assert any(f"dlv_{57:032d}" in m and ("null" in m.lower() or "NOT NULL" in m) for m in refusals), refusals
    assert any(f"dlv_{140:032d}" in m for m in refusals), refusals


def test_storable_text_and_the_refusal_rule():
    """The two rules the writer applies: what text is stored (U+FFFD for NUL and lone surrogates, cut to the
    column) and which errors are about the rows (split the batch) rather than the database (retry it whole)."""
    from sqlalchemy import exc as sa_exc

    from dispatcher.store.history import is_refusal, storable_text

    assert storable_text("plain") == "plain" and storable_text("ünïcode ✓") == "ünïcode ✓"
    assert storable_text("a\x00b\udcff") == "a\ufffdb\ufffd" and storable_text(b"\xff\x00ok") == "\ufffd\ufffdok"
    assert storable_text("x" * 70, 64) == "x" * 64

    class Orig(Exception):
        def __init__(self, sqlstate: str | None) -> None:
            super().__init__("driver message")
            self.sqlstate = sqlstate

    def dbapi(sqlstate: str | None) -> sa_exc.DBAPIError:
        return sa_exc.DBAPIError("INSERT ...", None, Orig(sqlstate))

    refused = [dbapi("22021"), dbapi("22001"), dbapi("23502"), dbapi("54000"),
               UnicodeEncodeError("utf-8", "", 0, 1, "x"), OverflowError("too big"),
               sa_exc.IntegrityError("INSERT", None, Orig(None)),
               sa_exc.StatementError("bad parameter", "INSERT", None, ValueError("x"))]
    unavailable = [dbapi("08006"), dbapi("57P01"), dbapi("53300"), dbapi("40P01"), dbapi("42P01"), dbapi(None),
                   sa_exc.OperationalError("INSERT", None, Orig(None)), ConnectionRefusedError(111, "refused"),
                   TimeoutError(), OSError("network down")]
    assert [is_refusal(e) for e in refused] == [True] * len(refused)
    assert [is_refusal(e) for e in unavailable] == [False] * len(unavailable)
