"""Which addresses belong to the MSSanté trust space (DOMAIN.md 6).

For now this answers one question, used for Reply-To contacts (DOMAIN.md 4):
is this an MSSanté address?  Yes when its domain is listed in the published
whitelist, or ends with the MSSanté suffix; never for the patient domain
(patients do not become each other's contacts).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

WHITELIST_NS = "https://listeblanche.mssante.fr/schema"


def read_whitelist_domains(path: Path) -> frozenset[str]:
    """Domain names of a listeblanche XML file, whatever its root is called."""
    root = ET.parse(path).getroot()  # noqa: S314
    names = {
        (node.findtext(f"{{{WHITELIST_NS}}}Nom") or "").strip().lower()
        for node in root.iter(f"{{{WHITELIST_NS}}}Domaine")
    }
    return frozenset(n for n in names if n)


@dataclass(frozen=True)
class TrustSpace:
    patient_domain: str
    suffix: str = ".mssante.fr"
    domains: frozenset[str] = field(default_factory=frozenset)

    def is_mssante(self, address: str) -> bool:
        _, at, domain = address.rpartition("@")
        domain = domain.lower()
        if not at or not domain or domain == self.patient_domain:
            return False
        return domain in self.domains or domain.endswith(self.suffix)
