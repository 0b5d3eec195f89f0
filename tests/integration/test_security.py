"""Secrets at rest and their rotation, and the SSRF guard in the running sender."""

from __future__ import annotations

import asyncio
import socket

from sqlalchemy import select
from standardwebhooks.webhooks import Webhook

from bus.publisher import EventPublisher
from dispatcher.cli.receiver import verify_letta, verify_standard
from dispatcher.store.database import Store
from dispatcher.store.models import Attempt, Delivery, Endpoint
from dispatcher.store.secrets import SecretBox, generate_key
from tests.helpers import wait_until

RUN = {"run_id": "run-1", "status": "completed"}


async def test_rotated_secret_signs_with_both_during_the_window(settings, nc, store, receiver, dispatcher):
    _, old = await store.set_agent_webhook("agent-1", url=receiver.url("/h"))
    new = await store.rotate_secret("agent-1", window_s=3600)
    assert new != old and new.startswith("whsec_")
    await dispatcher.endpoints.refresh()
    await EventPublisher(settings, nc).publish_event("agent-1", "agent.run.completed", RUN, strict=True)
    (got,) = await receiver.wait_for(1, timeout_s=10)
    headers = {k.lower(): v for k, v in got.headers.items()}
    assert len(headers["webhook-signature"].split(" ")) == 2
    # Receivers on either secret verify; X-Letta-Signature uses the new one only.
    assert Webhook(new).verify(got.body, headers) and Webhook(old).verify(got.body, headers)
    assert verify_letta(new, got.body, got.headers["X-Letta-Signature"])
    assert not verify_letta(old, got.body, got.headers["X-Letta-Signature"])


async def test_rotated_out_secret_stops_signing_after_the_window(settings, nc, store, receiver, dispatcher):
    _, old = await store.set_agent_webhook("agent-1", url=receiver.url("/h"))
    new = await store.rotate_secret("agent-1", window_s=0)
    await dispatcher.endpoints.refresh()
    await EventPublisher(settings, nc).publish_event("agent-1", "agent.run.completed", RUN, strict=True)
    (got,) = await receiver.wait_for(1, timeout_s=10)
    h = got.headers
    assert verify_standard(new, got.body, h["webhook-id"], h["webhook-timestamp"], h["webhook-signature"])
    assert not verify_standard(old, got.body, h["webhook-id"], h["webhook-timestamp"], h["webhook-signature"])


async def test_key_rotation_reencrypts_every_secret(settings, tmp_path):
    old_key, new_key = generate_key(), generate_key()
    url = f"sqlite+aiosqlite:///{tmp_path}/keys.db"
    old_store = Store(url, secret_box=SecretBox([old_key]))
    await old_store.create_schema()
    _, secret = await old_store.set_agent_webhook("agent-1", url="https://hooks.example.com/a")
    await old_store.rotate_secret("agent-1", window_s=3600)
    await old_store.close()

    both = Store(url, secret_box=SecretBox([new_key, old_key]))
    assert await both.reencrypt_secrets() == 2
    assert await both.reencrypt_secrets() == 0
    await both.close()
    only_new = Store(url, secret_box=SecretBox([new_key]))
    (row,) = await only_new.endpoints()
    assert only_new.secret_box.decrypt(row.previous_secret) == secret
    await only_new.close()


async def test_ssrf_guard_refuses_private_targets_without_connecting(settings, nc, dispatcher_nc, provisioned, tmp_path):
    """With no allowlist, a webhook written before the guard (or pointing at a name that now resolves to a
    private address) is refused at send time: recorded with the reason, no TCP connection, no retry."""
    from dispatcher.delivery.service import Dispatcher

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.setblocking(False)
    port = listener.getsockname()[1]
    strict = settings.model_copy(update={"ssrf_allow_cidrs": []})
    store = Store.from_settings(strict)
    await store.create_schema()
    # Bypass the write-time check to model an endpoint stored before the rules changed.
    async with store.session.begin() as s:
        s.add(Endpoint(id="ep_private", scope="agent", agent_id="agent-1", url=f"http://127.0.0.1:{port}/h",
                       secret=store.secret_box.encrypt("x" * 32), events=[], enabled=True))
    d = Dispatcher(strict, dispatcher_nc, store)
    await d.start()
    try:
        await EventPublisher(strict, nc).publish_event("agent-1", "agent.run.completed", RUN, strict=True)

        async def failed():
            async with store.session() as s:
                return (await s.execute(select(Delivery).where(Delivery.status == "failed"))).scalars().all()

        (row,) = await wait_until(failed)
        assert "SSRF guard" in row.last_error and "loopback" in row.last_error
        async with store.session() as s:
            (attempt,) = (await s.execute(select(Attempt))).scalars().all()
        assert attempt.status_code is None and "127.0.0.1" in attempt.error
        await asyncio.sleep(0.5)
        try:
            listener.accept()
            connected = True
        except BlockingIOError:
            connected = False
        assert not connected, "the guard must refuse before any TCP connection"
        assert d.sender.blocked == 1
    finally:
        await d.stop()
        await store.close()
        listener.close()


async def test_write_time_guard_refuses_private_urls(settings, tmp_path):
    store = Store.from_settings(settings.model_copy(update={"ssrf_allow_cidrs": []}))
    await store.create_schema()
    try:
        for url in ("http://127.0.0.1/h", "http://169.254.169.254/latest", "http://[::1]/", "http://0x7f.1/",
                    "http://localhost:8080/"):
            try:
                await store.set_agent_webhook("agent-1", url=url)
            except ValueError as exc:
                assert str(exc).startswith(f"url {url!r}")
            else:
                raise AssertionError(f"{url} was accepted")
        assert await store.endpoints() == []
    finally:
        await store.close()
