"""The notification e-mail: French, plain text and accessible HTML.

DOMAIN.md 3: a notification never carries health information.  What the
e-mail can say is fixed by what :class:`NotificationEmail` holds: how many
new messages wait, in whose mailbox (one's own or a child's, for a legal
representative: DOMAIN.md 4), optionally the senders' display names
(``notify.show_sender_name``, off by default), and how to read them.  No
subject, body, attachment name, document type or sender specialty can
reach it, because none is ever passed in.

The HTML part follows WCAG 2.1 where an e-mail can: ``lang="fr"``, a title,
one heading, paragraphs, a link whose text says where it goes, and text
contrast above 7:1 (AAA) on a white background.
"""

from __future__ import annotations

import email.policy
import html
from dataclasses import dataclass
from datetime import datetime
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import format_datetime

# Text #1a1a1a, muted #4a4a4a, link/button #0a4a8f: 17.4, 8.9 and 9.0 to 1 on white.
_TEXT, _MUTED, _ACCENT = "#1a1a1a", "#4a4a4a", "#0a4a8f"
_MAX_NAME = 80
_MAX_NAMES = 5


@dataclass(frozen=True, slots=True)
class NotificationEmail:
    """Everything a notification e-mail may say, and nothing more."""

    to: str
    activated: bool  # the person told can read now; else they must activate first
    own: int = 0  # new messages in their own mailbox
    children: tuple[int, ...] = ()  # new messages per child's mailbox (legal representative)
    senders: tuple[str, ...] = ()  # display names, only with notify.show_sender_name

    @property
    def total(self) -> int:
        return self.own + sum(self.children)


@dataclass(frozen=True, slots=True)
class Sender:
    """Who the e-mail is from and where the patient goes to read or activate."""

    address: str
    name: str
    webmail_url: str
    activation_url: str


def _messages(n: int) -> str:
    return "un nouveau message" if n == 1 else f"{n} nouveaux messages"


def subject(mail: NotificationEmail) -> str:
    kids = sum(mail.children)
    if mail.own and kids:
        return "Nouveaux messages dans votre messagerie de santé et celle de votre enfant"
    if kids:
        where = "de vos enfants" if len(mail.children) > 1 else "de votre enfant"
        return f"{_messages(kids).capitalize()} dans la messagerie de santé {where}"
    return f"{_messages(mail.own).capitalize()} dans votre messagerie de santé"


def clean_name(name: str) -> str:
    """A display name on one line, bounded in length."""
    one_line = " ".join("".join(c if c.isprintable() else " " for c in name).split())
    return one_line[:_MAX_NAME]


def _news(mail: NotificationEmail) -> list[str]:
    lines = []
    if mail.own:
        lines.append(f"Vous avez {_messages(mail.own)} dans votre messagerie de santé.")
    kids = sum(mail.children)
    if kids:
        verb = "est arrivé" if kids == 1 else "sont arrivés"
        where = (
            "les messageries de santé de vos enfants"
            if len(mail.children) > 1
            else "la messagerie de santé de votre enfant"
        )
        lines.append(
            f"{_messages(kids).capitalize()} {verb} dans {where}, que vous consultez"
            " en tant que représentant légal."
        )
    names = [n for n in (clean_name(s) for s in mail.senders) if n][:_MAX_NAMES]
    if names:
        label = "Expéditeur" if len(names) == 1 else "Expéditeurs"
        lines.append(f"{label} : {', '.join(names)}.")
    return lines


def _how_to_read(mail: NotificationEmail, sender: Sender) -> tuple[str, str, str]:
    """(sentence, link text, URL)."""
    them = "le" if mail.total == 1 else "les"
    if mail.activated:
        return (
            f"Pour {them} lire, connectez-vous à votre messagerie :",
            "Lire mes messages",
            sender.webmail_url,
        )
    # DOMAIN.md 3: a created profile must be activated before it can be read.
    return (
        f"Votre profil n'est pas encore activé. Pour {them} lire, activez-le d'abord"
        " en suivant les étapes indiquées sur cette page :",
        "Activer mon profil",
        sender.activation_url,
    )


_FOOTER = (
    "Pour protéger votre vie privée, ce courriel ne contient aucune information"
    " sur le contenu des messages.",
    "Nous ne vous demandons jamais vos identifiants ni vos codes par courriel.",
    "Ce courriel est envoyé automatiquement : merci de ne pas y répondre.",
)


def text_body(mail: NotificationEmail, sender: Sender) -> str:
    how, _, url = _how_to_read(mail, sender)
    parts = ["Bonjour,", "\n".join(_news(mail)), f"{how}\n{url}", "\n".join(_FOOTER)]
    return "\n\n".join(parts) + "\n"


def html_body(mail: NotificationEmail, sender: Sender) -> str:
    e = html.escape
    how, link_text, url = _how_to_read(mail, sender)
    news = "\n".join(f"<p>{e(line)}</p>" for line in _news(mail))
    inner = f"""{news}
<p>{e(how)}</p>
{button(link_text, url)}
<p>Si le bouton ne fonctionne pas, copiez cette adresse dans votre navigateur :
<a href="{e(url, quote=True)}" style="color:{_ACCENT}">{e(url)}</a></p>"""
    return html_page(subject(mail), inner, _FOOTER)


def button(text: str, url: str) -> str:
    """A link styled as a button (mail clients ignore style sheets: inline styles)."""
    e = html.escape
    return f"""<p><a href="{e(url, quote=True)}" style="display:inline-block;padding:0.75em 1.25em;\
background:{_ACCENT};color:#ffffff;font-weight:bold;text-decoration:underline;\
border-radius:4px">{e(text)}</a></p>"""


def html_page(title: str, inner: str, footer_lines: tuple[str, ...]) -> str:
    """The HTML part of a service e-mail: ``inner`` (already escaped) in the common frame."""
    e = html.escape
    footer = "\n".join(f"<p>{e(line)}</p>" for line in footer_lines)
    return f"""<!DOCTYPE html>
<html lang="fr">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{e(title)}</title>
</head>
<body style="margin:0;padding:0;background:#ffffff;color:{_TEXT};\
font-family:Arial,Helvetica,sans-serif;font-size:16px;line-height:1.5">
<main style="max-width:36em;margin:0 auto;padding:1.5em">
<h1 style="font-size:1.4em;line-height:1.3;color:{_TEXT}">{e(title)}</h1>
<p>Bonjour,</p>
{inner}
</main>
<footer style="max-width:36em;margin:0 auto;padding:0 1.5em 1.5em;color:{_MUTED};\
font-size:14px">
{footer}
</footer>
</body>
</html>
"""


def service_email(
    sender: Sender,
    *,
    to: str,
    subject: str,
    text: str,
    html_part: str,
    message_id: str,
    at: datetime,
) -> bytes:
    """A service e-mail as it goes on the wire (CRLF), before the DKIM signature."""
    msg = EmailMessage(policy=email.policy.SMTP)
    msg["From"] = Address(display_name=sender.name, addr_spec=sender.address)
    msg["To"] = to
    msg["Subject"] = subject
    msg["Date"] = format_datetime(at)
    msg["Message-ID"] = message_id
    # RFC 3834 5: a machine wrote this; autoresponders must not answer it.
    msg["Auto-Submitted"] = "auto-generated"
    msg["X-Auto-Response-Suppress"] = "All"  # the same for Exchange
    msg.set_content(text, charset="utf-8", cte="quoted-printable")
    msg.add_alternative(html_part, subtype="html", charset="utf-8", cte="quoted-printable")
    # After the parts are made: set_content() moves Content-* fields into them.
    msg["Content-Language"] = "fr"
    return msg.as_bytes()


def compose(mail: NotificationEmail, sender: Sender, *, message_id: str, at: datetime) -> bytes:
    """The e-mail as it goes on the wire (CRLF), before the DKIM signature."""
    return service_email(
        sender,
        to=mail.to,
        subject=subject(mail),
        text=text_body(mail, sender),
        html_part=html_body(mail, sender),
        message_id=message_id,
        at=at,
    )
