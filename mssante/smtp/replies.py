"""Every SMTP reply the gateway sends, in one table (STYLE.md 4).

Each refusal gives the French cause first, then a short English explanation.
Reply text is ASCII on purpose: RFC 5321 4.2 replies are US-ASCII, and
clients without SMTPUTF8 may choke on anything else, so French words appear
without accents here (the DSNs of the outbound issue carry proper French).

Code and tests import these names; no reply literal lives elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Reply:
    code: int
    enhanced: str
    text: str
    # The constant's name, lower-cased ("patient_not_found"): a stable, bounded
    # label for metrics and logs (set below for every reply of this table).
    name: str = field(default="", compare=False)

    def format(self, **fields: object) -> Reply:
        """A copy with ``{name}`` placeholders filled in."""
        return Reply(self.code, self.enhanced, self.text.format(**fields), self.name)

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
# Bounce mode (smtp.refusal = "dsn"), every recipient refused: nothing is
# stored, and the 250 says we took responsibility for telling the sender.
REPORT_QUEUED = Reply(
    250,
    "2.0.0",
    "Message non distribue, avis de non-remise envoye a l'expediteur, ref {ref}"
    " / Not delivered; a delivery status notification was queued for the sender as {ref}",
)
# RFC 3030 2: each non-final BDAT chunk gets a 250 once its octets are read.
CHUNK_RECEIVED = Reply(250, "2.0.0", "Bloc recu, {octets} octets / {octets} octets received")

# --- trust space (DOMAIN.md 6) -----------------------------------------------------
TLS_REQUIRED = Reply(
    530, "5.7.0", "STARTTLS obligatoire / Must issue a STARTTLS command first (trust space rule)"
)
CLIENT_CERT_REQUIRED = Reply(
    530,
    "5.7.0",
    "Certificat client requis (espace de confiance MSSante)"
    " / A client certificate of the MSSante trust space is required",
)
DOMAIN_NOT_TRUSTED = Reply(
    550,
    "5.7.1",
    "Domaine {domain} hors de l'espace de confiance MSSante"
    " / Sender domain {domain} is not in the MSSante trust space",
)
WRONG_OPERATOR = Reply(
    550,
    "5.7.1",
    "Certificat non autorise pour le domaine {domain}"
    " / Certificate subject is not the operator listed for {domain}",
)
NOT_AN_OPERATOR = Reply(
    550,
    "5.7.1",
    "Expediteur vide reserve aux operateurs / Null sender accepted from trust-space operators only",
)

# --- abuse limits (limits.py) -------------------------------------------------------
TOO_MANY_MESSAGES = Reply(
    451,
    "4.7.0",
    "Trop de messages, reessayez plus tard"
    " / Rate limit exceeded: too many messages, try again later",
)
# RFC 5321 4.5.3.1.10: 452 for too many recipients; the client sends the
# rest in another transaction.  RFC 3463 X.5.3: too many recipients.
TOO_MANY_RECIPIENTS = Reply(452, "4.5.3", "Trop de destinataires / Too many recipients")
TOO_MANY_BAD_RECIPIENTS = Reply(
    450,
    "4.7.1",
    "Trop d'adresses refusees, reessayez plus tard / Too many invalid recipients, try again later",
)
PROBING_CLOSED = Reply(
    421,
    "4.7.0",
    "Trop d'erreurs, fermeture de la session / Too many errors, closing connection",
)

# --- submission (RFC 6409, RFC 4954) --------------------------------------------------
AUTH_OK = Reply(235, "2.7.0", "Authentification reussie / Authentication successful")
AUTH_FAILED = Reply(535, "5.7.8", "Identifiants refuses / Authentication credentials invalid")
AUTH_NO_CERTIFICATE = Reply(
    535, "5.7.8", "Aucun certificat client presente / No client certificate for EXTERNAL"
)
AUTH_REQUIRED = Reply(530, "5.7.0", "Authentification requise / Authentication required")
AUTH_NEEDS_TLS = Reply(
    538, "5.7.11", "Chiffrement requis pour s'authentifier / Encryption required for AUTH"
)
AUTH_ALREADY = Reply(503, "5.5.1", "Deja authentifie / Already authenticated")
AUTH_UNKNOWN_MECHANISM = Reply(
    504, "5.5.4", "Mecanisme d'authentification inconnu / Unrecognized authentication type"
)
SENDER_NOT_OWNED = Reply(
    550,
    "5.7.1",
    "Adresse d'expediteur non autorisee pour ce compte / This account may not send as that address",
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

# --- session -------------------------------------------------------------------
OK = Reply(250, "2.0.0", "OK")
BYE = Reply(221, "2.0.0", "Au revoir / Bye")
READY_FOR_TLS = Reply(220, "2.0.0", "Pret pour TLS / Ready to start TLS")
STARTTLS_SYNTAX = Reply(501, "5.5.4", "Syntaxe : STARTTLS sans argument / Syntax: STARTTLS")
TLS_ALREADY_ACTIVE = Reply(503, "5.5.1", "TLS deja actif / TLS already active")

# --- sequence and syntax ------------------------------------------------------
NEED_MAIL = Reply(503, "5.5.1", "Commande MAIL attendue d'abord / Need MAIL command first")
NEED_RCPT = Reply(503, "5.5.1", "Aucun destinataire accepte / No valid recipients, need RCPT first")
NESTED_MAIL = Reply(503, "5.5.1", "Commande MAIL deja recue / Nested MAIL command")
MALFORMED_ADDRESS = Reply(553, "5.1.3", "Adresse mal formee / Malformed address (RFC 5321 4.1.2)")
SYNTAX_ERROR = Reply(500, "5.5.2", "Erreur de syntaxe / Syntax error")
COMMAND_TOO_LONG = Reply(
    500, "5.5.2", "Ligne de commande trop longue / Command line too long (RFC 5321 4.5.3.1.4)"
)
UNKNOWN_COMMAND = Reply(500, "5.5.1", "Commande inconnue / Command not recognised")
NOT_IMPLEMENTED = Reply(502, "5.5.1", "Commande non prise en charge / Command not implemented")
ASCII_ONLY = Reply(
    500, "5.6.7", "Caracteres non ASCII sans SMTPUTF8 / Non-ASCII octets need SMTPUTF8"
)
HELO_FIRST = Reply(503, "5.5.1", "EHLO ou HELO d'abord / Send EHLO or HELO first")
PARAMETER_UNKNOWN = Reply(
    555, "5.5.4", "Parametre non reconnu / MAIL FROM or RCPT TO parameter not recognised"
)
DATA_SYNTAX = Reply(501, "5.5.4", "Syntaxe : DATA sans argument / Syntax: DATA takes no argument")
BAD_SIZE_PARAMETER = Reply(501, "5.5.4", "Parametre SIZE invalide / Invalid SIZE parameter")
# RFC 5321 4.2.3 501: a parameter glued to the address (<a@b>RET=FULL)...
PARAMETER_SYNTAX = Reply(
    501, "5.5.4", "Syntaxe des parametres invalide / Syntax error in parameters"
)
# RFC 3461 4: NOTIFY, ORCPT, RET or ENVID malformed, repeated, or an xtext
# that does not decode to printable US-ASCII.
DSN_PARAMETER_INVALID = Reply(
    501, "5.5.4", "Parametre {name} invalide / Invalid {name} parameter (RFC 3461)"
)
# RFC 3030 2: without a valid octet count the chunk cannot be framed, so
# the connection is closed after this reply (protocol.py, smtp_BDAT).
BDAT_SYNTAX = Reply(
    501,
    "5.5.4",
    "Syntaxe : BDAT <taille> [LAST], fermeture de la session"
    " / Syntax: BDAT chunk-size [LAST]; closing connection",
)
# RFC 3030 2: DATA and BDAT are not mixed in one transaction.
DATA_AFTER_BDAT = Reply(
    503,
    "5.5.1",
    "DATA interdit apres BDAT, transaction annulee"
    " / DATA not allowed after BDAT in the same transaction; transaction reset",
)

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

HEADER_TOO_BIG = Reply(
    552,
    "5.3.4",
    "En-tetes trop volumineux : {limit} octets au plus"
    " / Message header section larger than {limit} octets",
)
NON_ASCII_WITHOUT_SMTPUTF8 = Reply(
    553,
    "5.6.7",
    "Adresse non ASCII sans SMTPUTF8 / Non-ASCII address requires SMTPUTF8 (RFC 6531 3.5)",
)

# RFC 7372 3.1: no valid author-matched DKIM signature.
DKIM_REQUIRED = Reply(
    550,
    "5.7.22",
    "Signature DKIM valide du domaine {domain} requise"
    " / No valid DKIM signature of the author domain {domain}",
)
# RFC 3463 X.4.3: the key look-up failed; the sender retries later.
DKIM_TEMPORARY = Reply(
    451,
    "4.4.3",
    "Verification DKIM impossible pour le moment / DKIM key lookup failed, try again later",
)

# --- bounces of notification e-mails (notify/bounces.py) -----------------------------
# RFC 3463 X.1.1: no such mailbox; only our own authenticated return paths exist.
BOUNCE_ADDRESS_UNKNOWN = Reply(
    550,
    "5.1.1",
    "Adresse de retour inconnue : seuls les retours de nos notifications sont acceptes"
    " / No such bounce address: only return paths of our notifications are accepted",
)
BOUNCE_RECEIVED = Reply(250, "2.0.0", "Rapport de remise recu / Delivery report received")

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
# RFC 5321 3.8 and 4.2.3: 421 when the service is about to close; RFC 3463
# X.3.2: "system not accepting network messages" (the node is stopping; the
# client tries another MX or later).
SHUTTING_DOWN = Reply(
    421,
    "4.3.2",
    "Service en cours d'arret, reessayez plus tard / Service shutting down, try again later",
)


def _name_replies(table: dict[str, object]) -> None:
    for constant, value in table.items():
        if isinstance(value, Reply) and constant.isupper():
            object.__setattr__(value, "name", constant.lower())  # frozen: once, at import


_name_replies(globals())


# aiosmtpd answers command syntax itself.  We advertise ENHANCEDSTATUSCODES,
# so every reply must carry an enhanced code (RFC 2034 3): its replies are
# mapped here by their text; any other one gets the generic code of its
# class (RFC 3463 3.x.0 / 5.5.x for syntax).
AIOSMTPD_REPLIES: dict[str, Reply] = {
    "250 OK": OK,
    "221 Bye": BYE,
    "220 Ready to start TLS": READY_FOR_TLS,
    "503 Error: need MAIL command": NEED_MAIL,
    "503 Error: nested MAIL command": NESTED_MAIL,
    "503 Error: need RCPT command": NEED_RCPT,
    "553 5.1.3 Error: malformed address": MALFORMED_ADDRESS,
    "500 Error: bad syntax": SYNTAX_ERROR,
    "500 Command line too long": COMMAND_TOO_LONG,
    "500 Error: strict ASCII mode": ASCII_ONLY,
    "530 Must issue a STARTTLS command first": TLS_REQUIRED,
    "502 EXPN not implemented": NOT_IMPLEMENTED,
    "530 5.7.0 Authentication required": AUTH_REQUIRED,
    "538 5.7.11 Encryption required for requested authentication mechanism": AUTH_NEEDS_TLS,
    "503 Already authenticated": AUTH_ALREADY,
    "504 5.5.4 Unrecognized authentication type": AUTH_UNKNOWN_MECHANISM,
    "535 5.7.8 Authentication credentials invalid": AUTH_FAILED,
}
_PREFIX_REPLIES: list[tuple[str, Reply]] = [
    ("500 Error: command ", UNKNOWN_COMMAND),
    ("503 Error: send HELO first", HELO_FIRST),
    ("503 Error: send EHLO first", HELO_FIRST),
    ("555 ", PARAMETER_UNKNOWN),
]
_CLASS_CODES = {2: "2.0.0", 3: "", 4: "4.0.0", 5: "5.5.0"}


def with_enhanced_code(line: str) -> str:
    """A reply line from aiosmtpd, with an enhanced code if it lacks one."""
    known = AIOSMTPD_REPLIES.get(line)
    if known is not None:
        return str(known)
    for prefix, reply in _PREFIX_REPLIES:
        if line.startswith(prefix):
            return str(reply)
    code, sep, text = line.partition(" ")
    if not (code.isdigit() and len(code) == 3 and sep):
        return line
    first = text.split(" ", 1)[0]
    if first[:1] in "245" and first.count(".") == 2:
        return line  # already has one
    enhanced = _CLASS_CODES.get(int(code[0]), "")
    if code in ("500", "501", "502", "504"):
        enhanced = {"500": "5.5.2", "501": "5.5.4", "502": "5.5.1", "504": "5.5.4"}[code]
    return f"{code} {enhanced} {text}" if enhanced else line
