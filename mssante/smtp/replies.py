"""Every SMTP reply the gateway sends, in one table (STYLE.md 4).

Each refusal gives the French cause first, then a short English explanation.
Reply text is ASCII on purpose: RFC 5321 4.2 replies are US-ASCII, and
clients without SMTPUTF8 may choke on anything else, so French words appear
without accents here (the DSNs of the outbound issue carry proper French).

Code and tests import these names; no reply literal lives elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Reply:
    code: int
    enhanced: str
    text: str

    def format(self, **fields: object) -> Reply:
        """A copy with ``{name}`` placeholders filled in."""
        return Reply(self.code, self.enhanced, self.text.format(**fields))

    @property
    def is_success(self) -> bool:
        return 200 <= self.code < 400

    @property
    def is_temporary(self) -> bool:
        return 400 <= self.code < 500

    def __str__(self) -> str:
        # RFC 2034 4: the enhanced status code follows the basic code on
        # 2xx, 4xx and 5xx replies; intermediate 3xx replies have none.
        if not self.enhanced:
            return f"{self.code} {self.text}"
        return f"{self.code} {self.enhanced} {self.text}"


# --- success -----------------------------------------------------------------
SENDER_OK = Reply(250, "2.1.0", "Expediteur accepte / Sender OK")
RECIPIENT_OK = Reply(250, "2.1.5", "Destinataire accepte / Recipient OK")
START_DATA = Reply(
    354, "", "Envoyez le message, terminez par <CR><LF>.<CR><LF> / End data with <CR><LF>.<CR><LF>"
)
MESSAGE_STORED = Reply(
    250, "2.0.0", "Message enregistre, ref {ref} / Message stored durably as {ref}"
)

# --- recipient verdicts (DOMAIN.md 3) -----------------------------------------
RELAY_DENIED = Reply(
    550,
    "5.7.1",
    "Relais refuse : seul le domaine {domain} est servi ici"
    " / Relay denied: this server only accepts mail for {domain}",
)
INVALID_ADDRESS = Reply(
    550,
    "5.1.3",
    "Adresse invalide : la partie locale n'est pas un INS valide ({why})"
    " / Invalid address: the local part is not a valid INS",
)
PATIENT_NOT_FOUND = Reply(550, "5.1.1", "Patient non trouve / No patient mailbox for this INS")
MAILBOX_CLOSED = Reply(
    550,
    "5.2.1",
    "Messagerie fermee : le patient a ferme ou refuse sa messagerie"
    " / Mailbox closed: the patient closed or refused the messaging service",
)

# --- sequence and syntax ------------------------------------------------------
NEED_MAIL = Reply(503, "5.5.1", "Commande MAIL attendue d'abord / Need MAIL command first")
NEED_RCPT = Reply(503, "5.5.1", "Aucun destinataire accepte / No valid recipients, need RCPT first")
NESTED_MAIL = Reply(503, "5.5.1", "Commande MAIL deja recue / Nested MAIL command")
DATA_SYNTAX = Reply(501, "5.5.4", "Syntaxe : DATA sans argument / Syntax: DATA takes no argument")
BAD_SIZE_PARAMETER = Reply(501, "5.5.4", "Parametre SIZE invalide / Invalid SIZE parameter")

# --- size (RFC 1870) -------------------------------------------------------------
SIZE_DECLARED_TOO_BIG = Reply(
    552,
    "5.3.4",
    "Message trop volumineux : limite {limit} octets"
    " / Declared message size exceeds the fixed maximum of {limit} octets",
)
SIZE_EXCEEDED = Reply(
    552,
    "5.3.4",
    "Message trop volumineux : limite {limit} octets"
    " / Message size exceeds the fixed maximum of {limit} octets",
)

# --- content framing (RFC 5321 2.3.8, 4.1.1.4, 4.5.3.1.6) ---------------------------
BARE_LINE_ENDING = Reply(
    554,
    "5.6.0",
    "Fin de ligne invalide : CR ou LF isole dans le message"
    " / Bare CR or LF in message data is not allowed (RFC 5321 2.3.8, SMTP smuggling)",
)
NUL_IN_DATA = Reply(
    554, "5.6.0", "Caractere NUL dans le message / NUL octet in message data is not allowed"
)
LINE_TOO_LONG = Reply(
    554,
    "5.6.0",
    "Ligne trop longue : 998 octets au plus"
    " / Message line longer than 998 octets (RFC 5321 4.5.3.1.6)",
)

# --- temporary failures ------------------------------------------------------------
INTERNAL_ERROR = Reply(
    451,
    "4.3.0",
    "Erreur temporaire du serveur, reessayez plus tard (ref {log_id})"
    " / Temporary server error, try again later",
)
STORAGE_FULL = Reply(
    452,
    "4.3.1",
    "Espace de stockage insuffisant, reessayez plus tard (ref {log_id})"
    " / Insufficient system storage, try again later",
)
