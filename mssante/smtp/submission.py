"""The submission listener's policy: professional clients that authenticate.

Port 587 with STARTTLS (RFC 6409), optionally 465 with implicit TLS
(RFC 8314).  A client authenticates before MAIL (aiosmtpd answers
``530 5.7.0`` otherwise), over TLS only, with:

- ``PLAIN`` or ``LOGIN`` and the account's password (argon2id, verified in a
  worker thread: aiosmtpd's own authenticator hook is synchronous, so its
  mechanisms parse the exchange and ours verify asynchronously);
- ``EXTERNAL`` (RFC 4422 appendix A): the TLS client certificate bound to an
  applicative mailbox's account.

An account may use only its own addresses in MAIL FROM (``550 5.7.1``).
Recipients are routed exactly as on the MX listener: only patient mailboxes,
never a relay.
"""

from __future__ import annotations

import base64
import logging
from typing import Any

from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword
from cryptography.hazmat.primitives.serialization import Encoding

from mssante.smtp import replies
from mssante.smtp.limits import peer_identity
from mssante.smtp.session import Policy, grow_for_dsn_parameters, peer_certificate, peer_ip
from mssante.store.accounts import Accounts
from mssante.store.models import Account

log = logging.getLogger("mssante.smtp")


def accept_for_parsing(*_: Any) -> AuthResult:
    """aiosmtpd's synchronous authenticator: it only hands the parsed
    credentials back to our asynchronous mechanisms below, which decide."""
    return AuthResult(success=True, auth_data=_[-1])


def _refused(reply: replies.Reply) -> AuthResult:
    # handled=False: aiosmtpd sends our message as the reply.
    return AuthResult(success=False, handled=False, message=str(reply))


class SubmissionPolicy(Policy):
    LISTENER = "submission"

    def __init__(self, *, accounts: Accounts, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._accounts = accounts

    async def handle_EHLO(
        self, server: Any, session: Any, envelope: Any, hostname: str, responses: list[str]
    ) -> list[str]:
        session.host_name = hostname
        server.command_size_limits["MAIL"] += 26
        grow_for_dsn_parameters(server)
        extra = [
            f"250-SIZE {self._max_size}",
            "250-PIPELINING",
            "250-ENHANCEDSTATUSCODES",
            "250-DSN",  # RFC 3461: NOTIFY=SUCCESS is honoured here too
        ]
        return [responses[0], *extra, *responses[1:]]

    async def handle_MAIL(
        self, server: Any, session: Any, envelope: Any, address: str, mail_options: list[str]
    ) -> str:
        account: Account | None = session.auth_data
        if account is None or not account.may_send_as(address):
            log.info("MAIL refused: account may not send as this address")
            txn = self._transaction(server)
            txn.mail_domain = address.rpartition("@")[2].lower() or None
            txn.identity = self._log_identity(session)
            await self._record_refusal(
                at=self._clock.now(),
                sender=address,
                peer=peer_ip(session),
                cause="sender_not_owned",
                patient_id=None,
                correlation=txn.correlation_id,
            )
            self.mail_refused(txn, replies.SENDER_NOT_OWNED)
            return str(replies.SENDER_NOT_OWNED)
        return await super().handle_MAIL(server, session, envelope, address, mail_options)

    def _log_identity(self, session: Any) -> str | None:
        # The account by its id: its address is a professional's, but the id is enough.
        account: Account | None = session.auth_data
        if account is not None:
            return f"account:{account.id}"
        return super()._log_identity(session)

    def _identity(self, session: Any) -> str:
        account: Account | None = session.auth_data
        if account is not None:
            return peer_identity(account=account.address)
        return super()._identity(session)

    # --- SASL mechanisms -----------------------------------------------------------------

    async def _by_password(self, result: AuthResult) -> AuthResult:
        if not result.success or not isinstance(result.auth_data, LoginPassword):
            return result
        creds: LoginPassword = result.auth_data
        login = creds.login.decode("utf-8", "replace")
        account = await self._accounts.by_password(login, creds.password.decode("utf-8", "replace"))
        if account is None:
            log.info("AUTH failed for an account")
            return _refused(replies.AUTH_FAILED)
        log.info("AUTH ok account=%s", account.id)
        return AuthResult(success=True, auth_data=account, message=str(replies.AUTH_OK))

    async def auth_PLAIN(self, server: SMTP, args: list[str]) -> AuthResult:
        return await self._by_password(await SMTP.auth_PLAIN(server, None, args))

    async def auth_LOGIN(self, server: SMTP, args: list[str]) -> AuthResult:
        return await self._by_password(await SMTP.auth_LOGIN(server, None, args))

    async def auth_EXTERNAL(self, server: SMTP, args: list[str]) -> AuthResult:
        cert = peer_certificate(server.session)
        if cert is None:
            return _refused(replies.AUTH_NO_CERTIFICATE)
        if len(args) > 1 and args[1] != "=":
            # RFC 4422 A.1: an authorization identity must be our own address.
            try:
                wanted = base64.b64decode(args[1], validate=True).decode()
            except ValueError:
                return _refused(replies.AUTH_FAILED)
        else:
            wanted = None
        account = await self._accounts.by_certificate(cert.public_bytes(Encoding.DER))
        if account is None or (wanted is not None and not account.may_send_as(wanted)):
            return _refused(replies.AUTH_FAILED)
        log.info("AUTH EXTERNAL ok account=%s", account.id)
        return AuthResult(success=True, auth_data=account, message=str(replies.AUTH_OK))
