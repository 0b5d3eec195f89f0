"""Time-ordered identifiers: UUIDv7 (RFC 9562, section 5.7) with letta-bus prefixes."""

from __future__ import annotations

import os
import time


def uuid7_hex() -> str:
    """A UUIDv7 as 32 lowercase hex digits: 48-bit Unix time in milliseconds, version 7, variant 10, 74 random bits.

    Sorted lexically, ids sort by creation millisecond (RFC 9562 section 5.7).
    """
    ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")  # 80 random bits; 74 are used
    value = (ms & 0xFFFF_FFFF_FFFF) << 80
    value |= 0x7 << 76  # version
    value |= ((rand >> 68) & 0xFFF) << 64  # rand_a: 12 bits
    value |= 0b10 << 62  # variant
    value |= rand & 0x3FFF_FFFF_FFFF_FFFF  # rand_b: 62 bits
    return f"{value:032x}"


def new_event_id() -> str:
    """A new event id: ``evt_<uuid7 hex>`` (DESIGN.md, "Events")."""
    return "evt_" + uuid7_hex()


def new_endpoint_id() -> str:
    """A new endpoint id: ``ep_<uuid7 hex>``; usable as a NATS subject token."""
    return "ep_" + uuid7_hex()
