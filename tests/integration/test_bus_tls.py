"""TLS is one setting away: a nats-server with the project's config, the generated account and a ``tls`` block
(certificates made here with ``cryptography``: a CA, a server certificate for 127.0.0.1, a client certificate), and
letta-bus clients that set ``LETTA_BUS_NATS_TLS_CA_FILE`` (and the client certificate for mutual TLS)."""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from bus.connection import connect
from bus.embedded import EmbeddedServer
from bus.publisher import EventPublisher
from bus.streams import provision

STEP = {"step_id": "step-1", "status": "success", "run_id": "run-1"}


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(subject: str, key, issuer_name: x509.Name, issuer_key, *, ca: bool = False, server: bool = False):  # noqa: ANN001
    now = dt.datetime.now(dt.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(issuer_name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(hours=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ca:
        builder = builder.add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
            key_encipherment=False, data_encipherment=False, key_agreement=False, encipher_only=False,
            decipher_only=False), critical=True)
    elif server:
        builder = (builder.add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                                         critical=False)
                   .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False))
    else:
        builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write(path: Path, cert=None, key=None) -> Path:  # noqa: ANN001
    if cert is not None:
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    else:
        path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return path


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    """A CA, a server certificate (IP SAN 127.0.0.1) and a client certificate, all signed by the CA; plus an
    unrelated CA."""
    d = tmp_path_factory.mktemp("pki")
    ca_key, other_key, server_key, client_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(4))
    ca = _cert("letta-bus test CA", ca_key, _name("letta-bus test CA"), ca_key, ca=True)
    other = _cert("another CA", other_key, _name("another CA"), other_key, ca=True)
    return {
        "ca": _write(d / "ca.pem", ca), "other_ca": _write(d / "other-ca.pem", other),
        "server_cert": _write(d / "server-cert.pem", _cert("127.0.0.1", server_key, ca.subject, ca_key, server=True)),
        "server_key": _write(d / "server-key.pem", key=server_key),
        "client_cert": _write(d / "client-cert.pem", _cert("letta-bus client", client_key, ca.subject, ca_key)),
        "client_key": _write(d / "client-key.pem", key=client_key),
    }


def _tls_server(nats_auth, pki: dict[str, Path], workdir: Path, *, verify: bool) -> EmbeddedServer:
    """The generated server.conf (nats.conf + the letta-bus account) plus the tls block nats.conf shows commented."""
    block = {"cert_file": str(pki["server_cert"]), "key_file": str(pki["server_key"]), "timeout": 2}
    if verify:
        block.update(ca_file=str(pki["ca"]), verify=True)
    conf = nats_auth.directory / f"tls-{'mutual' if verify else 'server'}.conf"
    conf.write_text(f'include "server.conf"\ntls {json.dumps(block)}\n')
    return EmbeddedServer(workdir=workdir, conf=conf, port=-1, monitor_port=-1).start()


async def test_tls_with_the_ca_setting_connects_and_publishes(nats_auth, pki, settings, tmp_path):
    server = _tls_server(nats_auth, pki, tmp_path / "tls", verify=False)
    try:
        tls = settings.model_copy(update={"nats_url": server.url, "nats_tls_ca_file": pki["ca"]})
        admin = await connect(server.url, name="test-tls-admin", settings=tls, role="admin", timeout_s=5)
        try:
            await provision(admin.jetstream(), tls)
        finally:
            await admin.close()
        publisher = await EventPublisher(tls).start(wait_s=5)
        try:
            assert publisher.connected and publisher._nc.connected_url.hostname == "127.0.0.1"
            assert await publisher.publish_event("agent-1", "agent.step.completed", STEP, strict=True)
        finally:
            await publisher.close()

        with pytest.raises(ConnectionError):  # plain client: the server requires TLS
            await connect(server.url, name="test-plain", settings=settings, role="admin", timeout_s=1.5)
        wrong_ca = settings.model_copy(update={"nats_tls_ca_file": pki["other_ca"]})
        with pytest.raises(ConnectionError):  # a certificate the client's CA did not sign
            await connect(server.url, name="test-wrong-ca", settings=wrong_ca, role="admin", timeout_s=1.5)
    finally:
        server.stop()


async def test_mutual_tls_needs_the_client_certificate(nats_auth, pki, settings, tmp_path):
    server = _tls_server(nats_auth, pki, tmp_path / "mtls", verify=True)
    try:
        ca_only = settings.model_copy(update={"nats_tls_ca_file": pki["ca"]})
        with pytest.raises(ConnectionError):
            await connect(server.url, name="test-no-client-cert", settings=ca_only, role="admin", timeout_s=1.5)
        mutual = ca_only.model_copy(update={"nats_tls_cert_file": pki["client_cert"],
                                            "nats_tls_key_file": pki["client_key"]})
        nc = await connect(server.url, name="test-mtls", settings=mutual, role="publisher", timeout_s=5)
        try:
            assert nc.is_connected and nc.options["user"] == "letta-bus-publisher"  # TLS and credentials both
        finally:
            await nc.close()
    finally:
        server.stop()
