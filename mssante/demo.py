"""Demo data for the Quick start: one patient in each profile status, a minor.

The INS numbers are synthetic (order numbers 9xx in a fictitious commune) and
their keys are computed, so they pass every check of the gateway.
"""

from __future__ import annotations

from datetime import date

from mssante.routing.ins import with_key
from mssante.store.directory import PatientRecord
from mssante.store.models import ProfileStatus

# The webmail password of the activated demo patients (`serve --demo` only).
PASSWORD = "demo-messagerie-2026"  # noqa: S105 - printed in the Quick start banner

ACTIVATED = with_key("2840575123901")
CREATED_EMAIL = with_key("1790169123902")
CREATED_POSTAL = with_key("2920713123903")
OPPOSED = with_key("1650433123904")
CLOSED = with_key("2710892123905")
MINOR = with_key("1150575123906")
CORSICAN = with_key("28412" + "2A" + "004123")

DEMO_PATIENTS: list[PatientRecord] = [
    PatientRecord(
        ins=ACTIVATED,
        status=ProfileStatus.ACTIVATED,
        activation_email="camille.martin@example.org",
        given_name="Camille",
        family_name="Martin",
        birth_date=date(1984, 5, 3),
        postal_address="Camille Martin\n12 rue des Lilas\n75011 Paris",
    ),
    PatientRecord(
        ins=CREATED_EMAIL,
        status=ProfileStatus.CREATED,
        insurer_email="jean.dupont@example.org",
        given_name="Jean",
        family_name="Dupont",
        birth_date=date(1979, 1, 17),
        postal_address="Jean Dupont\n3 place du Marche\n69001 Lyon",
    ),
    PatientRecord(
        ins=CREATED_POSTAL,
        status=ProfileStatus.CREATED,
        given_name="Louise",
        family_name="Bernard",
        birth_date=date(1992, 7, 9),
        postal_address="Louise Bernard\n8 chemin des Vignes\n13100 Aix-en-Provence",
    ),
    PatientRecord(
        ins=OPPOSED, status=ProfileStatus.OPPOSED, given_name="Paul", family_name="Petit"
    ),
    PatientRecord(
        ins=CLOSED, status=ProfileStatus.CLOSED, given_name="Marie", family_name="Robert"
    ),
    PatientRecord(
        ins=CORSICAN,
        status=ProfileStatus.ACTIVATED,
        activation_email="ange.santoni@example.org",
        given_name="Ange",
        family_name="Santoni",
    ),
    PatientRecord(
        ins=MINOR,
        status=ProfileStatus.CREATED,
        given_name="Lucas",
        family_name="Martin",
        birth_date=date(2015, 5, 21),
        representatives=(ACTIVATED, CREATED_EMAIL),
    ),
]
