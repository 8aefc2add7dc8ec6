"""The cluster's certificate authority: a CA per cluster, and certificates carrying a name and a role.

Keys are EC P-256 and are written with mode 0600; the CA directory is 0700. Everything is done with the
`cryptography` package, so no openssl binary is needed. Only `discovery ca`, the local cluster and
tests issue certificates; agents and clients only load them (`overlay.wire.tls`).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from overlay.wire.tls import ROLES, Identity, TLSError

NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?$")
CA_DAYS = 3650
CLOCK_SKEW = datetime.timedelta(minutes=5)
"""Certificates start this long in the past, so a peer whose clock lags a little still accepts them."""


def init_ca(directory: Path, name: str = "discovery-ca") -> Path:
    """Create a new CA in `directory` (ca.pem, ca.key) and return the path of ca.pem.

    Refuses if a CA key is already there: overwriting it would silently invalidate every
    certificate in the cluster.
    """
    directory = Path(directory)
    key_path, cert_path = directory / "ca.key", directory / "ca.pem"
    if key_path.exists():
        raise TLSError(f"a CA already exists in {directory}: refusing to overwrite {key_path}")
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    directory.chmod(0o700)  # mkdir's mode is masked by the umask and ignored if the directory existed

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (
        _builder(subject, subject, key, CA_DAYS, ca=True)
        .sign(key, hashes.SHA256())
    )
    _write_key(key_path, key, exclusive=True)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path


def issue(
    ca_dir: Path, name: str, role: str = "node", out_dir: Path | None = None, days: int = 825
) -> Identity:
    """Sign a leaf certificate for `name` with `role`; write <name>.pem and <name>.key; return its Identity.

    The certificate is good for both ends of a connection (serverAuth and clientAuth) because an
    agent both accepts and dials. The SAN lists the name, localhost and 127.0.0.1 so ordinary
    tools can still verify it by hostname, even though our own clients check the CN instead.
    An existing certificate of the same name is replaced (that is how one renews).
    """
    ca_dir = Path(ca_dir)
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise TLSError(f"invalid name {name!r}: use 1-63 of a-z 0-9 . _ -, starting and ending alphanumeric")
    if role not in ROLES:
        raise TLSError(f"invalid role {role!r}: expected one of {', '.join(ROLES)}")
    if days < 1:
        raise TLSError(f"invalid validity of {days} days: must be at least 1")
    out = Path(out_dir) if out_dir is not None else ca_dir
    if name == "ca" and out.resolve() == ca_dir.resolve():
        raise TLSError(f"name 'ca' would overwrite the CA itself in {ca_dir}")
    ca_cert, ca_key = _load_ca(ca_dir)

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([
        x509.NameAttribute(NameOID.COMMON_NAME, name),
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role),
    ])
    san = x509.SubjectAlternativeName([
        x509.DNSName(name),
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
    ])
    cert = (
        _builder(subject, ca_cert.subject, key, days, ca=False)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(san, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    out.mkdir(mode=0o700, parents=True, exist_ok=True)
    identity = Identity(cert=out / f"{name}.pem", key=out / f"{name}.key", ca=ca_dir / "ca.pem")
    _write_key(identity.key, key, exclusive=False)
    identity.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return identity


def _builder(subject: x509.Name, issuer: x509.Name, key: ec.EllipticCurvePrivateKey, days: int, *,
             ca: bool) -> x509.CertificateBuilder:
    """What a CA and a leaf certificate share; they differ in CA-ness and the key usages that follow."""
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=not ca, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=ca, crl_sign=ca,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )


def _load_ca(ca_dir: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert_path, key_path = ca_dir / "ca.pem", ca_dir / "ca.key"
    if not (cert_path.is_file() and key_path.is_file()):
        raise TLSError(f"no CA in {ca_dir}: run 'discovery ca init {ca_dir}' first")
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as err:
        raise TLSError(f"cannot read the CA in {ca_dir}: {err}") from err
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise TLSError(f"the CA key in {ca_dir} is not an EC key")
    return cert, key


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey, *, exclusive: bool) -> None:
    """Write a private key that is never readable by others, not even for an instant.

    The file is created with mode 0600 (rather than written and chmod-ed afterwards), and fchmod
    covers the umask and a pre-existing file with looser permissions.
    """
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    flags = os.O_WRONLY | os.O_CREAT | (os.O_EXCL if exclusive else os.O_TRUNC)
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError as err:
        raise TLSError(f"refusing to overwrite existing key {path}") from err
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), 0o600)
        f.write(pem)
