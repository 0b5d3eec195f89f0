"""Webhook signatures (dispatcher.delivery.signing), checked by the reference ``standardwebhooks`` package and by
dispatcher.cli.receiver's verifiers."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time

import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from dispatcher.cli.receiver import verify_letta, verify_standard
from dispatcher.delivery.signing import Signer, standard_key
from dispatcher.store.secrets import SECRET_PREFIX, generate_secret

BODY = json.dumps({"event_id": "evt_0190", "event_type": "agent.step.completed", "data": {"step_id": "s"}},
                  separators=(",", ":")).encode()
MSG_ID = "evt_01900000000070008000000000000000"


def headers(signer: Signer, body: bytes = BODY, msg_id: str = MSG_ID, ts: int | None = None) -> dict[str, str]:
    ts = int(time.time()) if ts is None else ts
    return {"webhook-id": msg_id, "webhook-timestamp": str(ts),
            "webhook-signature": signer.standard_signature(msg_id, ts, body)}


def test_generated_secret_shape():
    secrets = {generate_secret() for _ in range(50)}
    assert len(secrets) == 50
    for secret in secrets:
        assert secret.startswith("whsec_") and SECRET_PREFIX == "whsec_"
        raw = base64.b64decode(secret[len("whsec_"):], validate=True)
        assert len(raw) == 32
        assert base64.b64encode(raw).decode() == secret[len("whsec_"):]
        assert standard_key(secret) == raw


def test_generated_secret_verified_by_standardwebhooks_and_receiver():
    secret = generate_secret()
    signer = Signer(secret)
    h = headers(signer)
    assert h["webhook-signature"].startswith("v1,") and " " not in h["webhook-signature"]
    assert Webhook(secret).verify(BODY, h) == json.loads(BODY)
    assert verify_standard(secret, BODY, h["webhook-id"], h["webhook-timestamp"], h["webhook-signature"])
    # X-Letta-Signature keys with the secret string's UTF-8 bytes (not the decoded key)
    letta = signer.letta_signature(BODY)
    assert letta == "sha256=" + hmac.new(secret.encode(), BODY, hashlib.sha256).hexdigest()
    assert verify_letta(secret, BODY, letta)


def test_user_supplied_secret_keys_with_its_utf8_bytes():
    secret = "my-own-secret-ünïcode-0123456789"
    signer = Signer(secret)
    h = headers(signer)
    assert Webhook(secret.encode()).verify(BODY, h) == json.loads(BODY)
    assert verify_standard(secret, BODY, h["webhook-id"], h["webhook-timestamp"], h["webhook-signature"])
    assert verify_letta(secret, BODY, signer.letta_signature(BODY))


def test_whsec_prefixed_secret_that_is_not_base64_uses_its_bytes():
    secret = "whsec_this is not base64!!"
    assert standard_key(secret) == secret.encode()
    signer = Signer(secret)
    h = headers(signer)
    assert Webhook(secret.encode()).verify(BODY, h)
    assert verify_standard(secret, BODY, h["webhook-id"], h["webhook-timestamp"], h["webhook-signature"])


def test_rotated_secret_signatures_are_space_separated_and_each_verifies():
    old, new = generate_secret(), generate_secret()
    signer = Signer(new, (old,))
    h = headers(signer)
    sigs = h["webhook-signature"].split(" ")
    assert len(sigs) == 2 and all(s.startswith("v1,") for s in sigs)
    for secret in (new, old):
        assert Webhook(secret).verify(BODY, h)
        assert verify_standard(secret, BODY, h["webhook-id"], h["webhook-timestamp"], h["webhook-signature"])
    stranger = generate_secret()
    with pytest.raises(WebhookVerificationError):
        Webhook(stranger).verify(BODY, h)
    assert not verify_standard(stranger, BODY, h["webhook-id"], h["webhook-timestamp"], h["webhook-signature"])
    # X-Letta-Signature is always the current secret's
    assert verify_letta(new, BODY, signer.letta_signature(BODY))
    assert not verify_letta(old, BODY, signer.letta_signature(BODY))


def test_tampering_is_detected():
    secret = generate_secret()
    signer = Signer(secret)
    h = headers(signer)
    tampered = BODY.replace(b'"s"', b'"t"')
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(tampered, h)
    assert not verify_standard(secret, tampered, h["webhook-id"], h["webhook-timestamp"], h["webhook-signature"])
    assert not verify_standard(secret, BODY, "evt_other", h["webhook-timestamp"], h["webhook-signature"])
    assert not verify_letta(secret, tampered, signer.letta_signature(BODY))
    assert not verify_letta(secret, BODY, None)
    assert not verify_letta(generate_secret(), BODY, signer.letta_signature(BODY))


def test_receiver_refuses_timestamps_more_than_5_minutes_away():
    secret = generate_secret()
    signer = Signer(secret)
    now = 1_800_000_000
    for skew, ok in [(0, True), (-299, True), (299, True), (-301, False), (301, False)]:
        h = headers(signer, ts=now + skew)
        assert verify_standard(secret, BODY, h["webhook-id"], h["webhook-timestamp"], h["webhook-signature"],
                               now=now) is ok, skew
    h = headers(signer, ts=now)
    assert not verify_standard(secret, BODY, h["webhook-id"], None, h["webhook-signature"], now=now)
    assert not verify_standard(secret, BODY, h["webhook-id"], "-5", h["webhook-signature"], now=now)
    assert not verify_standard(secret, BODY, h["webhook-id"], h["webhook-timestamp"], None, now=now)
    assert not verify_standard(secret, BODY, h["webhook-id"], h["webhook-timestamp"],
                               h["webhook-signature"].replace("v1,", "v2,"), now=now)
