"""The TLS contexts every connection uses, and who the peer is (`overlay.wire.ca` issues the certificates).

Trust model: one private CA per cluster. Every agent, CLI client and operator holds a certificate
signed by it; every connection is mutual TLS 1.3, and a peer is admitted only if its certificate
chains to that CA. Who the peer is comes from its certificate, not from the address we dialled:
the subject's CN is the node (or user) name and its OU is the role (one of `ROLES`).

Only the `ssl` module here: a client that merely connects never loads `cryptography`.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

ROLES = ("node", "client", "operator")


class TLSError(Exception):
    """A CA or certificate problem, with a one-line message meant for the operator."""


@dataclass(frozen=True)
class Identity:
    """The PEM files one party presents: its certificate, its private key, and the CA it trusts."""

    cert: Path
    key: Path
    ca: Path


def server_context(identity: Identity) -> ssl.SSLContext:
    """Context for accepted connections: TLS 1.3 only, and the client must present a cert from our CA."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.verify_mode = ssl.CERT_REQUIRED
    return _load(ctx, identity)


def client_context(identity: Identity) -> ssl.SSLContext:
    """Context for dialled connections: TLS 1.3 only, the server must present a cert from our CA.

    Hostname checking is off because peers are dialled by address (often an IP learnt from gossip),
    which no certificate could list in advance. What replaces it: the chain must verify against the
    cluster CA, which signs only cluster members, and the caller reads who answered with
    `peer_identity` and decides from the (CN, role) whether it is the peer it wanted.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False  # must be cleared before verify_mode may be changed; see docstring
    ctx.verify_mode = ssl.CERT_REQUIRED
    return _load(ctx, identity)


def _load(ctx: ssl.SSLContext, identity: Identity) -> ssl.SSLContext:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    try:
        ctx.load_cert_chain(identity.cert, identity.key)
        ctx.load_verify_locations(cafile=identity.ca)
    except (OSError, ssl.SSLError) as err:
        raise TLSError(f"cannot load TLS identity {identity.cert}: {err}") from err
    return ctx


def peer_identity(ssl_object: ssl.SSLObject | ssl.SSLSocket) -> tuple[str, str]:
    """(common name, role) of the verified certificate the other side presented.

    Call only after the handshake; with CERT_REQUIRED the certificate has already been verified
    against the cluster CA, so its subject can be trusted.
    """
    cert = ssl_object.getpeercert()
    if not cert:
        raise TLSError("peer presented no certificate")
    fields: dict[str, str] = {}
    for rdn in cert.get("subject", ()):
        for key, value in rdn:  # type: ignore[str-unpack]  # typeshed types a subject too loosely
            fields.setdefault(key, value)
    cn, role = fields.get("commonName"), fields.get("organizationalUnitName")
    if not cn:
        raise TLSError("peer certificate has no common name")
    if role not in ROLES:
        raise TLSError(f"peer certificate for {cn!r} has no valid role (OU={role!r})")
    return cn, role
