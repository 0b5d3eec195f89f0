"""The dispatcher's store and history writer on PostgreSQL (the production database)."""

from __future__ import annotations

from sqlalchemy import select

from bus.publisher import EventPublisher
from dispatcher.delivery.service import Dispatcher
from dispatcher.store.database import Store
from dispatcher.store.models import Attempt, Delivery
from tests.helpers import wait_until
from tests.integration.test_end_to_end import STEP


async def test_delivery_history_on_postgres(settings, nc, dispatcher_nc, provisioned, receiver, postgres_url):
    settings = settings.model_copy(update={"database_url": postgres_url})
    store = Store.from_settings(settings, postgres_url)
    await store.create_schema()
    dispatcher = Dispatcher(settings, dispatcher_nc, store)
    try:
        endpoint, secret = await store.set_agent_webhook("agent-pg", url=receiver.url("/pg"))
        receiver.secrets["/pg"] = secret
        receiver.respond("/pg", 503)
        await dispatcher.start()
        publisher = EventPublisher(settings, nc)
        event_ids = [await publisher.publish_event("agent-pg", "agent.step.completed", STEP, strict=True)
                     for _ in range(3)]
        await receiver.wait_for(4, timeout_s=15, path="/pg")

        async def all_succeeded():
            async with store.session() as s:
                rows = (await s.execute(select(Delivery))).scalars().all()
            return rows if len(rows) == 3 and all(r.status == "succeeded" for r in rows) else None

        rows = await wait_until(all_succeeded)
        assert sorted(r.event_id for r in rows) == sorted(event_ids)
        assert sorted(r.attempts for r in rows) == [1, 1, 2]
        async with store.session() as s:
            codes = sorted((a.number, a.status_code) for a in (await s.execute(select(Attempt))).scalars())
        assert codes == [(1, 200), (1, 200), (1, 503), (2, 200)]
        assert all(r.letta_verified and r.standard_verified for r in receiver.received)
    finally:
        await dispatcher.stop()
        await store.close()


async def _binary_receiver(body: bytes):  # noqa: ANN202
    """A raw HTTP server on 127.0.0.1 answering every POST 200 with ``body`` (here: gzip bytes with NULs)."""
    import asyncio

    posts: list[bytes] = []

    async def handle(reader, writer) -> None:  # noqa: ANN001
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length:")), 0)
            posts.append(await reader.readexactly(length))
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nConnection: close\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            await writer.drain()
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1], posts


async def test_a_receiver_answering_nul_bytes_loses_no_history_row_on_postgres(
        settings, nc, dispatcher_nc, provisioned, receiver, postgres_url):
    """Issue 10, finding 2, through the whole dispatcher: one endpoint answers with a gzip body (NUL bytes, which
    PostgreSQL TEXT refuses) while another answers normally; every delivery of both gets its row, the binary one's
    excerpt stored with U+FFFD for the NULs, and nothing is lost or refused."""
    from tests.helpers import wait_until as _wait

    settings = settings.model_copy(update={"database_url": postgres_url})
    store = Store.from_settings(settings, postgres_url)
    await store.create_schema()
    server, port, posts = await _binary_receiver(b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03 gzip")
    dispatcher = Dispatcher(settings, dispatcher_nc, store)
    try:
        await store.set_agent_webhook("agent-gzip", url=f"http://127.0.0.1:{port}/hook")
        _, secret = await store.set_agent_webhook("agent-plain", url=receiver.url("/plain"))
        receiver.secrets["/plain"] = secret
        await dispatcher.start()
        publisher = EventPublisher(settings, nc)
        for _ in range(5):
            for agent in ("agent-gzip", "agent-plain"):
                await publisher.publish_event(agent, "agent.step.completed", STEP, strict=True)

        async def all_succeeded():
            async with store.session() as s:
                rows = (await s.execute(select(Delivery))).scalars().all()
            return rows if len(rows) == 10 and all(r.status == "succeeded" for r in rows) else None

        rows = await _wait(all_succeeded, 20, what="all ten deliveries recorded as succeeded")
        assert sorted(r.agent_id for r in rows) == ["agent-gzip"] * 5 + ["agent-plain"] * 5
        async with store.session() as s:
            excerpts = {a.response_excerpt for a in (await s.execute(select(Attempt))).scalars()}
        assert "\x1f\ufffd\x08" + "\ufffd" * 6 + "\x03 gzip" in excerpts and len(posts) == 5
        assert dispatcher.history.lost == 0 and dispatcher.history.refused == 0
    finally:
        await dispatcher.stop()
        server.close()
        await store.close()
