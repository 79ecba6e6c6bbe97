"""A throwaway PKI modelled on IGC-Santé: root -> organisations CA -> certificates.

Made fresh by the tests; nothing here is trusted anywhere else.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

PEM = serialization.Encoding.PEM
NOW = dt.datetime.now(dt.UTC)


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


@dataclass
class Issued:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    cert_path: Path
    key_path: Path

    @property
    def dn(self) -> str:
        return self.cert.subject.rfc4514_string()


@dataclass
class Pki:
    directory: Path
    prefix: str = "TEST"
    root: Issued = field(init=False)
    orgs: Issued = field(init=False)
    revoked: list[x509.Certificate] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.root = self._ca(f"{self.prefix} AC RACINE IGC-SANTE ELEMENTAIRE", None, "root")
        self.orgs = self._ca(
            f"{self.prefix} AC IGC-SANTE ELEMENTAIRE ORGANISATIONS", self.root, "orgs"
        )

    def _write(
        self,
        name: str,
        cert: x509.Certificate,
        key: ec.EllipticCurvePrivateKey,
        chain: list[x509.Certificate],
    ) -> Issued:
        cert_path = self.directory / f"{name}.pem"
        key_path = self.directory / f"{name}.key"
        cert_path.write_bytes(b"".join(c.public_bytes(PEM) for c in [cert, *chain]))
        key_path.write_bytes(_key_pem(key))
        return Issued(cert, key, cert_path, key_path)

    def _ca(self, cn: str, parent: Issued | None, name: str) -> Issued:
        key = _key()
        subject = x509.Name.from_rfc4514_string(f"CN={cn},OU=IGC-SANTE TEST,O=ANS TEST,C=FR")
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(parent.cert.subject if parent else subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(NOW - dt.timedelta(days=1))
            .not_valid_after(NOW + dt.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                critical=True,
            )
        )
        cert = builder.sign(parent.key if parent else key, hashes.SHA256())
        return self._write(name, cert, key, [])

    def issue(
        self,
        name: str,
        dn: str,
        *,
        server: bool = False,
        issuer: Issued | None = None,
        expired: bool = False,
    ) -> Issued:
        issuer = issuer or self.orgs
        key = _key()
        start = NOW - dt.timedelta(days=400 if expired else 1)
        end = NOW - dt.timedelta(days=2) if expired else NOW + dt.timedelta(days=365)
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name.from_rfc4514_string(dn))
            .issuer_name(issuer.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [
                        x509.DNSName("mx.test.localhost"),
                        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                    ]
                ),
                critical=False,
            )
        cert = builder.sign(issuer.key, hashes.SHA256())
        chain = [issuer.cert] if issuer is not self.root else []
        return self._write(name, cert, key, chain)

    def anchors(self) -> Path:
        """The bundle a server trusts: the root and the organisations CA."""
        path = self.directory / "anchors.pem"
        path.write_bytes(self.root.cert.public_bytes(PEM) + self.orgs.cert.public_bytes(PEM))
        return path

    def revoke(self, cert: x509.Certificate) -> None:
        self.revoked.append(cert)

    def crl(self) -> Path:
        """The organisations CA's CRL with every revoked certificate so far."""
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.orgs.cert.subject)
            .last_update(NOW - dt.timedelta(hours=1))
            .next_update(NOW + dt.timedelta(days=7))
        )
        for cert in self.revoked:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder()
                .serial_number(cert.serial_number)
                .revocation_date(NOW - dt.timedelta(minutes=30))
                .build()
            )
        path = self.directory / "orgs.crl.pem"
        path.write_bytes(builder.sign(self.orgs.key, hashes.SHA256()).public_bytes(PEM))
        return path


def whitelist_xml(entries: dict[str, str]) -> str:
    """A listeblanche file: domain -> operator DN."""
    domains = "".join(
        "<Domaine>"
        f"<Nom>{domain}</Nom><Description>test</Description>"
        f"<DNCertificatOperateur>{dn}</DNCertificatOperateur>"
        "<ResponsableContact>r@example.org</ResponsableContact>"
        "<SupportContact>s@example.org</SupportContact><DateMAJ>2026-11-01</DateMAJ>"
        "</Domaine>"
        for domain, dn in entries.items()
    )
    return (
        '<?xml version="1.0" encoding="UTF-8"?>'
        '<ListeBlanche xmlns="https://listeblanche.mssante.fr/schema">'
        f"<DateDeGeneration>2026-11-20T06:00:00+01:00</DateDeGeneration>{domains}</ListeBlanche>"
    )
