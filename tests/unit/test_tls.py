"""Tests for overlay.wire.tls: the cluster CA, leaf certificates, and mutual TLS over loopback."""

from __future__ import annotations

import datetime
import ipaddress
import ssl
import stat
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from overlay.wire import tls
from overlay.wire.ca import init_ca, issue
from overlay.wire.tls_socket import TlsSocket

NETWORK_TIMEOUT = 5.0


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def load_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


@dataclass(frozen=True)
class Pki:
    ca_dir: Path
    node_a: tls.Identity
    client_b: tls.Identity
    foreign: tls.Identity
    """Signed by another CA, but trusting ours, so only its own certificate is wrong."""


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    ca_dir = tmp_path_factory.mktemp("pki") / "ca"
    other_dir = tmp_path_factory.mktemp("pki-other") / "ca"
    init_ca(ca_dir)
    init_ca(other_dir, name="other-ca")
    stranger = issue(other_dir, "node-a", role="node")  # same name as a real member: only the CA differs
    return Pki(
        ca_dir=ca_dir,
        node_a=issue(ca_dir, "node-a", role="node"),
        client_b=issue(ca_dir, "client-b", role="client"),
        foreign=tls.Identity(cert=stranger.cert, key=stranger.key, ca=ca_dir / "ca.pem"),
    )


# -- init_ca -----------------------------------------------------------------------------------------


def test_init_ca_creates_private_files(tmp_path: Path) -> None:
    ca_dir = tmp_path / "nested" / "ca"
    ca_pem = init_ca(ca_dir, name="test-ca")

    assert ca_pem == ca_dir / "ca.pem"
    assert mode(ca_dir) == 0o700
    assert mode(ca_dir / "ca.key") == 0o600
    assert sorted(p.name for p in ca_dir.iterdir()) == ["ca.key", "ca.pem"]

    cert = load_cert(ca_pem)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "test-ca"
    assert cert.issuer == cert.subject
    key = cert.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1)
    basic = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert basic.critical and basic.value.ca and basic.value.path_length == 0
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign and usage.crl_sign and not usage.digital_signature
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert datetime.timedelta(days=3650) <= lifetime <= datetime.timedelta(days=3651)
    cert.verify_directly_issued_by(cert)


def test_init_ca_tightens_an_existing_directory(tmp_path: Path) -> None:
    ca_dir = tmp_path / "ca"
    ca_dir.mkdir(mode=0o755)
    init_ca(ca_dir)
    assert mode(ca_dir) == 0o700


def test_init_ca_refuses_to_overwrite(tmp_path: Path) -> None:
    init_ca(tmp_path / "ca")
    key_before = (tmp_path / "ca" / "ca.key").read_bytes()
    cert_before = (tmp_path / "ca" / "ca.pem").read_bytes()

    with pytest.raises(tls.TLSError, match="already exists"):
        init_ca(tmp_path / "ca")

    assert (tmp_path / "ca" / "ca.key").read_bytes() == key_before
    assert (tmp_path / "ca" / "ca.pem").read_bytes() == cert_before


# -- issue -------------------------------------------------------------------------------------------


def test_issue_writes_a_leaf_signed_by_the_ca(tmp_path: Path) -> None:
    ca_pem = init_ca(tmp_path / "ca")
    ident = issue(tmp_path / "ca", "node-1", role="operator")

    assert ident == tls.Identity(
        cert=tmp_path / "ca" / "node-1.pem", key=tmp_path / "ca" / "node-1.key", ca=ca_pem
    )
    assert mode(ident.key) == 0o600

    cert = load_cert(ident.cert)
    cert.verify_directly_issued_by(load_cert(ca_pem))
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "node-1"
    assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)[0].value == "operator"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["node-1", "localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    key = cert.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1)
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert datetime.timedelta(days=825) <= lifetime <= datetime.timedelta(days=826)


def test_issue_to_out_dir_writes_only_cert_and_key(tmp_path: Path) -> None:
    ca_pem = init_ca(tmp_path / "ca")
    ident = issue(tmp_path / "ca", "alice", role="client", out_dir=tmp_path / "out", days=30)

    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["alice.key", "alice.pem"]
    assert sorted(p.name for p in (tmp_path / "ca").iterdir()) == ["ca.key", "ca.pem"]
    assert ident.ca == ca_pem
    assert mode(ident.key) == 0o600


def test_issue_again_renews(tmp_path: Path) -> None:
    init_ca(tmp_path / "ca")
    first = issue(tmp_path / "ca", "n1")
    serial = load_cert(first.cert).serial_number
    second = issue(tmp_path / "ca", "n1")
    assert second == first
    assert load_cert(second.cert).serial_number != serial
    assert mode(second.key) == 0o600


@pytest.mark.parametrize("name", ["a", "node-1", "a.b_c", "0", "x" * 63])
def test_issue_accepts_valid_names(tmp_path: Path, name: str) -> None:
    init_ca(tmp_path / "ca")
    assert issue(tmp_path / "ca", name).cert.name == f"{name}.pem"


@pytest.mark.parametrize(
    "name", ["", "A", "Node", "-a", "a-", ".a", "a.", "x" * 64, "a b", "a/b", "../x", "é", "a\n"]
)
def test_issue_rejects_invalid_names(tmp_path: Path, name: str) -> None:
    init_ca(tmp_path / "ca")
    with pytest.raises(tls.TLSError, match="invalid name"):
        issue(tmp_path / "ca", name)
    assert sorted(p.name for p in (tmp_path / "ca").iterdir()) == ["ca.key", "ca.pem"]


@pytest.mark.parametrize("role", ["admin", "", "Node"])
def test_issue_rejects_unknown_roles(tmp_path: Path, role: str) -> None:
    init_ca(tmp_path / "ca")
    with pytest.raises(tls.TLSError, match="invalid role"):
        issue(tmp_path / "ca", "n1", role=role)


def test_issue_without_ca_fails_clearly(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(tls.TLSError) as info:
        issue(missing, "n1")
    assert str(info.value) == f"no CA in {missing}: run 'discovery ca init {missing}' first"
    assert not missing.exists()


def test_issue_refuses_to_overwrite_the_ca(tmp_path: Path) -> None:
    init_ca(tmp_path / "ca")
    before = (tmp_path / "ca" / "ca.key").read_bytes()
    with pytest.raises(tls.TLSError, match="overwrite the CA"):
        issue(tmp_path / "ca", "ca")
    assert (tmp_path / "ca" / "ca.key").read_bytes() == before


def test_issue_rejects_non_positive_validity(tmp_path: Path) -> None:
    init_ca(tmp_path / "ca")
    with pytest.raises(tls.TLSError, match="validity"):
        issue(tmp_path / "ca", "n1", days=0)


# -- contexts and peer_identity ----------------------------------------------------------------------


def test_contexts_require_tls13_and_a_peer_certificate(pki: Pki) -> None:
    server = tls.server_context(pki.node_a)
    client = tls.client_context(pki.node_a)
    for ctx in (server, client):
        assert ctx.minimum_version == ssl.TLSVersion.TLSv1_3
        assert ctx.verify_mode == ssl.CERT_REQUIRED
    assert client.check_hostname is False


def test_context_with_missing_files_raises_tls_error(tmp_path: Path) -> None:
    ident = tls.Identity(cert=tmp_path / "x.pem", key=tmp_path / "x.key", ca=tmp_path / "ca.pem")
    with pytest.raises(tls.TLSError, match="cannot load"):
        tls.server_context(ident)
    with pytest.raises(tls.TLSError, match="cannot load"):
        tls.client_context(ident)


class FakeSSLObject:
    def __init__(self, cert: dict | None) -> None:
        self.cert = cert

    def getpeercert(self) -> dict | None:
        return self.cert


@pytest.mark.parametrize(
    "cert",
    [
        None,
        {},
        {"subject": ((("organizationalUnitName", "node"),),)},
        {"subject": ((("commonName", "n1"),),)},
        {"subject": ((("commonName", "n1"),), (("organizationalUnitName", "root"),))},
    ],
)
def test_peer_identity_rejects_missing_or_incomplete_certificates(cert: dict | None) -> None:
    with pytest.raises(tls.TLSError):
        tls.peer_identity(FakeSSLObject(cert))  # type: ignore[arg-type]


# -- real handshakes over loopback -------------------------------------------------------------------


@dataclass
class Side:
    """What one end of a connection saw."""

    peer: tuple[str, str] | None = None
    received: bytes = b""
    error: BaseException | None = None


async def connect(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext) -> tuple[Side, Side]:
    """Accept one connection on 127.0.0.1 and dial it; each side handshakes (the transport's `TlsSocket`), then
    ping/pong.

    Returns what the server and the client saw. Errors are recorded, not raised, so a test can
    assert which side refused; everything runs under fail_after so a hang fails the test.
    """
    server, client = Side(), Side()
    with trio.fail_after(NETWORK_TIMEOUT):
        (listener,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listener.socket.getsockname()[1]

        async def serve() -> None:
            stream = TlsSocket(await listener.accept(), server_ctx, server_side=True)
            try:
                await stream.do_handshake()
                server.peer = tls.peer_identity(stream.ssl)
                server.received = await stream.receive_some(1024)
                await stream.send_all(b"pong")
            except (trio.BrokenResourceError, ssl.SSLError, tls.TLSError) as err:
                server.error = err
            finally:
                await trio.aclose_forcefully(stream)

        async def dial() -> None:
            stream = TlsSocket(await trio.open_tcp_stream("127.0.0.1", port), client_ctx, server_side=False)
            try:
                await stream.do_handshake()
                client.peer = tls.peer_identity(stream.ssl)
                await stream.send_all(b"ping")
                client.received = await stream.receive_some(1024)
            except (trio.BrokenResourceError, ssl.SSLError, tls.TLSError) as err:
                client.error = err
            finally:
                await trio.aclose_forcefully(stream)

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(serve)
                nursery.start_soon(dial)
        finally:
            await listener.aclose()
    return server, client


def ssl_cause(err: BaseException | None) -> ssl.SSLError:
    """The ssl.SSLError behind a trio.BrokenResourceError (or the error itself)."""
    while err is not None and not isinstance(err, ssl.SSLError):
        err = err.__cause__ or err.__context__
    assert isinstance(err, ssl.SSLError), "expected the TLS layer to refuse the connection"
    return err


def bare_client_context(ca: Path) -> ssl.SSLContext:
    """A client that trusts our CA but has no certificate of its own."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(cafile=ca)
    return ctx


async def test_mutual_tls_between_members_of_one_ca(pki: Pki) -> None:
    server, client = await connect(tls.server_context(pki.node_a), tls.client_context(pki.client_b))

    assert server.error is None and client.error is None
    assert server.peer == ("client-b", "client")
    assert client.peer == ("node-a", "node")
    assert server.received == b"ping"
    assert client.received == b"pong"


async def test_client_without_certificate_is_refused(pki: Pki) -> None:
    server, client = await connect(tls.server_context(pki.node_a), bare_client_context(pki.node_a.ca))

    assert server.peer is None and server.received == b""
    assert "CERTIFICATE" in ssl_cause(server.error).reason
    assert client.received == b""


async def test_client_with_certificate_from_another_ca_is_refused(pki: Pki) -> None:
    server, client = await connect(tls.server_context(pki.node_a), tls.client_context(pki.foreign))

    assert server.peer is None and server.received == b""
    assert ssl_cause(server.error).reason == "CERTIFICATE_VERIFY_FAILED"
    assert client.received == b""


async def test_server_with_certificate_from_another_ca_is_refused(pki: Pki) -> None:
    server, client = await connect(tls.server_context(pki.foreign), tls.client_context(pki.client_b))

    assert client.peer is None and client.received == b""
    assert ssl_cause(client.error).reason == "CERTIFICATE_VERIFY_FAILED"
    assert server.peer is None and server.received == b""


async def test_client_limited_to_tls12_is_refused(pki: Pki) -> None:
    old = tls.client_context(pki.client_b)
    old.minimum_version = ssl.TLSVersion.TLSv1_2
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    server, client = await connect(tls.server_context(pki.node_a), old)

    assert server.peer is None and server.received == b""
    assert client.peer is None and client.received == b""
    ssl_cause(server.error)
    ssl_cause(client.error)
