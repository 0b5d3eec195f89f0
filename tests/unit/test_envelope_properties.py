"""Property-based tests (hypothesis) of the envelope codec (bus.envelope).

* Round trip: any envelope whose ``data`` JSON can carry (strings, integers of any size, finite floats, booleans,
  null, lists and objects, nested) encodes to JSON that decodes back to an equal envelope, and ``decode_head``
  keeps ``data`` as the exact raw JSON; ids with a control character (they travel in headers) are refused (the
  whole id grammar, and that it is the publisher's, is tested in tests/unit/test_names.py).
* Robustness: ``decode`` and ``decode_head`` of arbitrary bytes (random, JSON documents of any shape, envelope
  bodies with one byte changed, deep nesting) either return an envelope or raise one of msgspec's errors, never
  anything else: a consumer that catches ``msgspec.DecodeError`` / ``msgspec.ValidationError`` can term poison
  without crashing.
"""

from __future__ import annotations

import json
from datetime import timezone

import msgspec
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from bus import envelope as env
from bus.catalog import CATALOG, EVENT_TYPE_RE
from bus.names import AGENT_ID_MAX, EVENT_ID_MAX, EVENT_TYPE_MAX, ORGANIZATION_ID_MAX, id_pattern

PROPS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False), st.text(),
)
json_values = st.recursive(
    json_scalars, lambda inner: st.one_of(st.lists(inner, max_size=5), st.dictionaries(st.text(), inner, max_size=5)),
    max_leaves=30,
)
#: at most EVENT_TYPE_MAX characters (deliveries.event_type), as publishers and decoding require since issue 10
event_types = st.one_of(st.sampled_from(sorted(CATALOG)),
                        st.from_regex(EVENT_TYPE_RE, fullmatch=True).filter(lambda t: len(t) <= EVENT_TYPE_MAX))
#: Ids travel in headers: the grammar of bus.names (ASCII letters, digits, ``_ . : -``), which is what decoding
#: accepts (until issue 10 any printable text was, non-ASCII and 5,000 characters included).
event_ids = st.from_regex(id_pattern(EVENT_ID_MAX), fullmatch=True)
agent_ids = st.from_regex(id_pattern(AGENT_ID_MAX), fullmatch=True)
envelopes = st.builds(
    env.Envelope,
    event_id=event_ids,
    event_type=event_types,
    timestamp=st.datetimes(timezones=st.just(timezone.utc)).map(env.utc_timestamp),
    agent_id=agent_ids,
    organization_id=st.none() | st.from_regex(id_pattern(ORGANIZATION_ID_MAX), fullmatch=True),
    data=st.dictionaries(st.text(), json_values, max_size=8),
)


def _nested(depth: int) -> bytes:
    return (b'{"event_id":"e","event_type":"agent.step.completed","timestamp":"t","agent_id":"a","data":{"x":'
            + b"[" * depth + b"]" * depth + b"}}")


@PROPS
@given(envelopes)
def test_encode_decode_round_trip(envelope):
    body = env.encode(envelope)
    assert env.decode(body) == envelope
    assert json.loads(body) == msgspec.to_builtins(envelope)  # plain JSON, readable by any consumer
    head = env.decode_head(body)
    assert (head.event_id, head.event_type, head.timestamp, head.agent_id, head.organization_id) == (
        envelope.event_id, envelope.event_type, envelope.timestamp, envelope.agent_id, envelope.organization_id)
    assert msgspec.json.decode(bytes(head.data)) == envelope.data
    headers = env.headers_for(envelope)
    assert headers[env.H_MSG_ID] == envelope.event_id == headers["ce-id"]


@PROPS
@given(envelopes, st.sampled_from(["event_id", "agent_id"]), st.characters(whitelist_categories=("Cc",)), st.data())
def test_an_id_with_a_control_character_is_refused(envelope, field, control, data):
    value = getattr(envelope, field)
    at = data.draw(st.integers(0, len(value)))
    body = env.encode(msgspec.structs.replace(envelope, **{field: value[:at] + control + value[at:]}))
    for decode in (env.decode, env.decode_head):
        with pytest.raises(msgspec.ValidationError, match=field):
            decode(body)


@PROPS
@given(st.binary(max_size=2048))
@example(b"")
@example(b"\xff\xfe")
@example(b"[" * 5000)
@example(_nested(1500))
@example(b'{"event_id":"e","event_type":"agent.step.completed","timestamp":"t","agent_id":"a","data":[1]}')
@example(b'{"event_id":"\x80","event_type":"agent.step.completed","timestamp":"t","agent_id":"a"}')
@example(b'{"event_id":"e","event_type":"agent.step.completed","timestamp":"t","agent_id":"a","data":{"k":"\xff"}}')
@example(b'{"event_id":"e","event_type":"agent.step.completed","timestamp":"t","agent_id":"a","data":{"k":6.9e+917}}')
def test_decode_of_arbitrary_bytes_raises_only_msgspec_errors(body):
    _decode_or_msgspec_error(body)


@PROPS
@given(json_values)
def test_decode_of_any_json_document_raises_only_msgspec_errors(value):
    _decode_or_msgspec_error(json.dumps(value).encode())


@PROPS
@given(envelopes, st.data())
def test_decode_of_a_corrupted_envelope_raises_only_msgspec_errors(envelope, data):
    body = bytearray(env.encode(envelope))
    index = data.draw(st.integers(0, len(body) - 1))
    body[index] = data.draw(st.integers(0, 255))
    _decode_or_msgspec_error(bytes(body))


@pytest.mark.parametrize("depth", [900, 1000, 1500, 20_000])
def test_deep_nesting_is_a_decode_error_not_a_recursion_error(depth):
    body = _nested(depth)
    if depth < 1000:
        assert env.decode_head(body).agent_id == "a"
        return
    for decode in (env.decode, env.decode_head):
        with pytest.raises(msgspec.DecodeError, match="nested too deeply"):
            decode(body)


def test_encoding_data_nested_too_deeply_is_a_type_error():
    deep: list = []
    for _ in range(1500):
        deep = [deep]
    envelope = env.Envelope(event_id="evt_1", event_type="agent.step.completed", timestamp="t", agent_id="a",
                            data={"x": deep})
    with pytest.raises(TypeError, match="nested too deeply"):
        env.encode(envelope)


def _decode_or_msgspec_error(body: bytes) -> None:
    for decode in (env.decode, env.decode_head):
        try:
            decoded = decode(body)
        except (msgspec.DecodeError, msgspec.ValidationError):
            continue
        # whatever decodes is a usable envelope: the fields routing needs, data an object
        assert decoded.event_id and decoded.agent_id
        assert decoded.event_type in CATALOG or EVENT_TYPE_RE.fullmatch(decoded.event_type)
        # decode_head keeps data as raw JSON; json.loads, not msgspec: a corrupted byte may leave a number out of
        # msgspec's range (6.9e+917), which is still JSON and is delivered as published
        data = decoded.data if isinstance(decoded.data, dict) else json.loads(bytes(decoded.data))
        assert isinstance(data, dict)
