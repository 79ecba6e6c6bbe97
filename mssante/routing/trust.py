"""The MSSanté trust space (DOMAIN.md 6): who may write, and from which domains.

The published whitelist (``listeblanche``) lists every trusted domain with
the subject DN of its operator's certificate.  Our rule (DOMAIN.md 6, our
choice): a peer may send mail from domain D only if its TLS client
certificate chains to the trust anchors (checked during the handshake,
smtp/tls.py) and its subject DN equals the ``DNCertificatOperateur`` listed
for D.

The same list answers whether an address is an MSSanté address (Reply-To
contacts, DOMAIN.md 4).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import NameOID

from mssante.routing.verdict import Refuse
from mssante.smtp import replies

WHITELIST_NS = "https://listeblanche.mssante.fr/schema"

# A DN as an order-free set of (attribute OID dotted string, value): tools
# print DNs in either order (RFC 4514 reverses the ASN.1 sequence; OpenSSL
# does not), and attribute names vary in case.
DnKey = frozenset[tuple[str, str]]


class WhitelistError(ValueError):
    """The whitelist file cannot be used (the previous one stays in force)."""


def dn_key(name: x509.Name) -> DnKey:
    return frozenset((a.oid.dotted_string, str(a.value).strip()) for a in name)


# Attribute names in any case (whitelists and tools vary: "CN", "cn").
_NAMES = {
    "cn": NameOID.COMMON_NAME,
    "c": NameOID.COUNTRY_NAME,
    "st": NameOID.STATE_OR_PROVINCE_NAME,
    "l": NameOID.LOCALITY_NAME,
    "o": NameOID.ORGANIZATION_NAME,
    "ou": NameOID.ORGANIZATIONAL_UNIT_NAME,
    "street": NameOID.STREET_ADDRESS,
    "dc": NameOID.DOMAIN_COMPONENT,
    "uid": NameOID.USER_ID,
    "serialnumber": NameOID.SERIAL_NUMBER,
    "e": NameOID.EMAIL_ADDRESS,
    "emailaddress": NameOID.EMAIL_ADDRESS,
}
_OVERRIDES = {**_NAMES, **{k.upper(): v for k, v in _NAMES.items()}}


def parse_dn(text: str) -> DnKey:
    try:
        return dn_key(x509.Name.from_rfc4514_string(text.strip(), _OVERRIDES))
    except ValueError as exc:
        raise WhitelistError(f"unreadable DN {text!r}: {exc}") from exc


def read_whitelist(path: Path) -> dict[str, DnKey]:
    """Domain -> operator DN of a listeblanche XML file, whatever its root is called."""
    try:
        root = ET.parse(path).getroot()  # noqa: S314
    except (OSError, ET.ParseError) as exc:
        raise WhitelistError(f"{path}: {exc}") from exc
    out: dict[str, DnKey] = {}
    for node in root.iter(f"{{{WHITELIST_NS}}}Domaine"):
        name = (node.findtext(f"{{{WHITELIST_NS}}}Nom") or "").strip().lower()
        dn = (node.findtext(f"{{{WHITELIST_NS}}}DNCertificatOperateur") or "").strip()
        if not name or not dn:
            raise WhitelistError(f"{path}: a Domaine without Nom or DNCertificatOperateur")
        out[name] = parse_dn(dn)
    if not out:
        raise WhitelistError(f"{path}: no Domaine element in namespace {WHITELIST_NS}")
    return out


@dataclass(frozen=True)
class TrustSpace:
    patient_domain: str
    suffix: str = ".mssante.fr"
    operators: Mapping[str, DnKey] = field(default_factory=dict)

    @property
    def domains(self) -> frozenset[str]:
        return frozenset(self.operators)

    def is_mssante(self, address: str) -> bool:
        _, at, domain = address.rpartition("@")
        domain = domain.lower()
        if not at or not domain or domain == self.patient_domain:
            return False
        return domain in self.operators or domain.endswith(self.suffix)

    def check_sender(self, sender: str, peer_dn: DnKey | None) -> Refuse | None:
        """May this peer send mail from ``sender``'s domain?  None when yes."""
        if peer_dn is None:
            return Refuse(replies.CLIENT_CERT_REQUIRED, "no client certificate", "no_certificate")
        if sender in ("", "<>"):
            # Null sender (bounces, DSNs): any listed operator may send them.
            if peer_dn in set(self.operators.values()):
                return None
            return Refuse(
                replies.NOT_AN_OPERATOR, "null sender from a non-operator", "not_operator"
            )
        domain = sender.rpartition("@")[2].lower()
        listed = self.operators.get(domain)
        if listed is None:
            return Refuse(
                replies.DOMAIN_NOT_TRUSTED.format(domain=domain),
                f"sender domain {domain!r} not in the whitelist",
                "domain_not_trusted",
            )
        if listed != peer_dn:
            return Refuse(
                replies.WRONG_OPERATOR.format(domain=domain),
                f"certificate is not the operator of {domain!r}",
                "wrong_operator",
            )
        return None
