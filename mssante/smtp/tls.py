"""TLS for the SMTP listeners, and development certificates for the Quick start.

Server side (DOMAIN.md 6): TLS 1.2 and 1.3 only, forward-secret AEAD
ciphers, no compression or renegotiation.  When trust anchors are
configured the server asks for a client certificate and OpenSSL checks it
during the handshake: chain to the anchors only (never the system store),
validity dates, and revocation against the configured CRLs.  A failing
certificate ends the handshake with the precise TLS alert (RFC 8446 6.2:
``unknown_ca``, ``certificate_expired``, ``certificate_revoked``); the
reason is logged.  A session without a certificate continues, and is
refused at MAIL (routing/trust.py).

Production reads certificates, anchors and CRLs from configuration; with
none configured a development CA, server certificate, operator client
certificate and whitelist are generated once into the data directory.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# TLS 1.2 suites: ECDHE key exchange and AEAD only (TLS 1.3 suites are all fine).
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"

# Why a server-side handshake failed, as a bounded label (metrics, logs):
# OpenSSL's X509_V_ERR_* verify codes for the client certificate...
_VERIFY_REASONS = {
    2: "unknown_ca",  # UNABLE_TO_GET_ISSUER_CERT
    3: "crl_unavailable",  # UNABLE_TO_GET_CRL
    7: "bad_signature",  # CERT_SIGNATURE_FAILURE (a forged chain)
    9: "certificate_not_yet_valid",
    10: "certificate_expired",
    11: "crl_unavailable",  # CRL_NOT_YET_VALID
    12: "crl_unavailable",  # CRL_HAS_EXPIRED
    18: "unknown_ca",  # DEPTH_ZERO_SELF_SIGNED_CERT
    19: "unknown_ca",  # SELF_SIGNED_CERT_IN_CHAIN
    20: "unknown_ca",  # UNABLE_TO_GET_ISSUER_CERT_LOCALLY
    21: "unknown_ca",  # UNABLE_TO_VERIFY_LEAF_SIGNATURE
    23: "certificate_revoked",
    26: "certificate_purpose",  # INVALID_PURPOSE: not a client certificate
}
# ...and the library reasons of other handshake errors.
_SSL_REASONS = {
    "UNSUPPORTED_PROTOCOL": "protocol_version",
    "WRONG_VERSION_NUMBER": "protocol_version",
    "VERSION_TOO_LOW": "protocol_version",
    "UNKNOWN_PROTOCOL": "protocol_version",
    "TLSV1_ALERT_PROTOCOL_VERSION": "protocol_version",
    "NO_PROTOCOLS_AVAILABLE": "protocol_version",
    "NO_SHARED_CIPHER": "no_shared_cipher",
    "NO_SUITABLE_KEY_SHARE": "no_shared_cipher",
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": "no_client_certificate",
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": "no_client_certificate",
    "HTTP_REQUEST": "not_tls",
}
HANDSHAKE_FAILURE_REASONS = frozenset(
    {*_VERIFY_REASONS.values(), *_SSL_REASONS.values()}
    | {"certificate_invalid", "alert_from_client", "connection_lost", "timeout", "other"}
)


def handshake_failure(exc: BaseException | None) -> tuple[str, str]:
    """(bounded reason, OpenSSL's short text) for a failed server-side handshake.

    The text is OpenSSL's ("certificate has expired"): it never names the
    peer, so it can be logged.
    """
    if isinstance(exc, ssl.SSLCertVerificationError):
        code = exc.verify_code
        return _VERIFY_REASONS.get(code, "certificate_invalid"), str(exc.verify_message)
    if isinstance(exc, ssl.SSLError):
        name = str(exc.reason or "")
        reason = _SSL_REASONS.get(name)
        if reason is None:
            # The client refused our certificate (or something else) and said so.
            alert = name.startswith(("TLSV1_ALERT_", "SSLV3_ALERT_", "TLSV13_ALERT_"))
            reason = "alert_from_client" if alert else "other"
        return reason, name or type(exc).__name__
    if isinstance(exc, TimeoutError | ConnectionAbortedError):
        return "timeout", type(exc).__name__  # asyncio aborts a handshake that takes too long
    if isinstance(exc, ConnectionError | EOFError):
        return "connection_lost", type(exc).__name__
    return "other", type(exc).__name__ if exc is not None else "unknown"


def server_context(
    cert: Path,
    key: Path,
    *,
    anchors: Path | None = None,
    crls: tuple[Path, ...] = (),
) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(TLS12_CIPHERS)
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    context.options |= ssl.OP_NO_RENEGOTIATION
    context.load_cert_chain(cert, key)
    if anchors is not None:
        # Only the configured anchors (IGC-Sante in production), never the
        # system store: a public CA must not vouch for a health operator.
        context.load_verify_locations(cafile=str(anchors))
        context.verify_mode = ssl.CERT_OPTIONAL
        for crl in crls:
            context.load_verify_locations(cafile=str(crl))
        if crls:
            context.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    return context


def client_context(
    anchors: Path | None,
    cert: Path | None = None,
    key: Path | None = None,
    *,
    crls: tuple[Path, ...] = (),
) -> ssl.SSLContext:
    """For our own clients (send-test, outbound): verify the server, present ours.

    ``crls`` (outbound to operators): the server certificate is also checked
    against these revocation lists.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if anchors is not None:
        context.load_verify_locations(cafile=str(anchors))
    else:
        context.load_default_certs()
    if cert is not None:
        context.load_cert_chain(cert, key)
    for crl in crls:
        context.load_verify_locations(cafile=str(crl))
    if crls:
        context.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    return context


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COUNTRY_NAME, "FR"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "mssante development"),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


DEV_OPERATOR_DN = "CN=smtp.chu-exemple.fr,O=CHU Exemple (developpement),C=FR"
DEV_OPERATOR_DOMAINS = ("chu-exemple.mssante.fr", "medecin.operateur-exemple.fr")


def _dev_whitelist(domains: tuple[str, ...], dn: str) -> str:
    entries = "".join(
        f"  <Domaine>\n    <Nom>{d}</Nom>\n    <Description>Developpement</Description>\n"
        f"    <DNCertificatOperateur>{dn}</DNCertificatOperateur>\n"
        f"    <ResponsableContact>rssi@example.org</ResponsableContact>\n"
        f"    <SupportContact>support@example.org</SupportContact>\n"
        f"    <DateMAJ>2026-11-23</DateMAJ>\n  </Domaine>\n"
        for d in domains
    )
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        '<ListeBlanche xmlns="https://listeblanche.mssante.fr/schema">\n'
        f"  <DateDeGeneration>2026-11-23T00:00:00+01:00</DateDeGeneration>\n{entries}"
        "</ListeBlanche>\n"
    )


def ensure_dev_certificate(directory: Path, hostname: str) -> tuple[Path, Path, Path]:
    """(CA certificate, server chain, server key) in ``directory``, made on first use.

    Also makes a development operator: ``dev-operator.pem``/``.key``, a client
    certificate with subject :data:`DEV_OPERATOR_DN`, and ``dev-whitelist.xml``
    listing it for :data:`DEV_OPERATOR_DOMAINS`, so the Quick start exercises
    the whole trust-space path.
    """
    ca_path = directory / "dev-ca.pem"
    cert_path = directory / "dev-server.pem"
    key_path = directory / "dev-server.key"
    made = (
        ca_path,
        cert_path,
        key_path,
        directory / "dev-operator.pem",
        directory / "dev-whitelist.xml",
    )
    if all(p.exists() for p in made):
        return ca_path, cert_path, key_path
    directory.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name("mssante development CA")
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(hostname))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=825))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName(hostname),
                    x509.DNSName("localhost"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                ]
            ),
            critical=False,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    op_key = ec.generate_private_key(ec.SECP256R1())
    operator = (
        x509.CertificateBuilder()
        .subject_name(x509.Name.from_rfc4514_string(DEV_OPERATOR_DN))
        .issuer_name(ca_name)
        .public_key(op_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=825))
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    pkcs8 = serialization.PrivateFormat.PKCS8
    ca_path.write_bytes(ca.public_bytes(pem))
    cert_path.write_bytes(cert.public_bytes(pem) + ca.public_bytes(pem))
    _write_private(key_path, key.private_bytes(pem, pkcs8, serialization.NoEncryption()))
    (directory / "dev-operator.pem").write_bytes(operator.public_bytes(pem))
    _write_private(
        directory / "dev-operator.key",
        op_key.private_bytes(pem, pkcs8, serialization.NoEncryption()),
    )
    (directory / "dev-whitelist.xml").write_text(
        _dev_whitelist(DEV_OPERATOR_DOMAINS, DEV_OPERATOR_DN), encoding="utf-8"
    )
    return ca_path, cert_path, key_path
