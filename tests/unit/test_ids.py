"""UUIDv7 identifiers (bus.ids), RFC 9562 section 5.7."""

from __future__ import annotations

import re
import time
import uuid

from bus.ids import new_endpoint_id, new_event_id, uuid7_hex


def ms_of(hex_id: str) -> int:
    return int(hex_id[:12], 16)


def test_uuid7_layout():
    before = time.time_ns() // 1_000_000
    ids = [uuid7_hex() for _ in range(1000)]
    after = time.time_ns() // 1_000_000
    assert len(set(ids)) == 1000
    for h in ids:
        assert re.fullmatch(r"[0-9a-f]{32}", h)
        u = uuid.UUID(hex=h)
        assert u.version == 7
        assert h[12] == "7"  # version nibble
        assert u.variant == uuid.RFC_4122
        assert (int(h, 16) >> 62) & 0b11 == 0b10  # variant bits 10
        assert h[16] in "89ab"
        assert before <= ms_of(h) <= after


def test_random_bits_vary():
    ids = [int(uuid7_hex(), 16) for _ in range(200)]
    rand_a = {(i >> 64) & 0xFFF for i in ids}
    rand_b = {i & 0x3FFF_FFFF_FFFF_FFFF for i in ids}
    assert len(rand_a) > 100 and len(rand_b) == 200


def test_monotonic_across_milliseconds():
    ids = []
    for _ in range(20):
        ids.append(uuid7_hex())
        t = time.time_ns() // 1_000_000
        while time.time_ns() // 1_000_000 == t:  # next millisecond
            time.sleep(0.0002)
    assert ids == sorted(ids)
    assert [ms_of(h) for h in ids] == sorted({ms_of(h) for h in ids}), "one id per distinct, rising millisecond"
    # string ids with prefixes sort the same way
    events = []
    for _ in range(5):
        events.append(new_event_id())
        time.sleep(0.002)
    assert events == sorted(events)


def test_prefixed_ids():
    event_id, endpoint_id = new_event_id(), new_endpoint_id()
    assert re.fullmatch(r"evt_[0-9a-f]{32}", event_id)
    assert re.fullmatch(r"ep_[0-9a-f]{32}", endpoint_id)
    assert uuid.UUID(hex=event_id[4:]).version == 7 and uuid.UUID(hex=endpoint_id[3:]).version == 7
    # an endpoint id is one NATS subject token (letta_webhooks.deliveries.<endpoint_id>)
    assert not set(endpoint_id) & set(". *>\t\r\n")
