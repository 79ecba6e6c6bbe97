"""The SMTP protocol: aiosmtpd's command loop with our DATA phase and errors.

aiosmtpd parses commands, EHLO, STARTTLS and AUTH well.  Two things are
replaced:

- ``smtp_DATA``: the message is read in bulk by :class:`DataReceiver`,
  streamed to a spool file (never held in memory), and refused precisely
  when malformed (see data.py);
- ``handle_exception``: an unexpected error becomes ``451 4.3.0`` with a log
  id; the client never sees exception text.

Session policy (EHLO keywords, MAIL, RCPT, storing) lives in session.py.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import ssl
from asyncio import sslproto
from typing import Any

from aiosmtpd.smtp import SMTP, TLSSetupException, syntax

from mssante.smtp import replies
from mssante.smtp.data import DataProblem, DataReceiver
from mssante.smtp.replies import Reply

log = logging.getLogger("mssante.smtp")

READ_CHUNK = 256 * 1024

_PROBLEM_REPLIES = {
    DataProblem.BARE_LINE_ENDING: replies.BARE_LINE_ENDING,
    DataProblem.NUL: replies.NUL_IN_DATA,
    DataProblem.LINE_TOO_LONG: replies.LINE_TOO_LONG,
}


class AlertingSSLProtocol(sslproto.SSLProtocol):
    """asyncio's server-side TLS, sending the alert when a handshake fails.

    On a failed handshake asyncio closes the connection without flushing
    what OpenSSL prepared, so a client whose certificate was refused sees a
    bare disconnection.  Flushing first gives it the precise TLS alert
    (RFC 8446 6.2: unknown_ca, certificate_expired, certificate_revoked...).
    """

    def _do_handshake(self) -> None:
        try:
            self._sslobj.do_handshake()  # type: ignore[attr-defined]
        except sslproto.SSLAgainErrors:
            self._process_outgoing()  # type: ignore[attr-defined]
        except ssl.SSLError as exc:
            self._process_outgoing()  # type: ignore[attr-defined]
            self._on_handshake_complete(exc)
        else:
            self._on_handshake_complete(None)


# Stands for "this connection is TLS" where aiosmtpd expects its STARTTLS protocol.
_IMPLICIT_TLS: Any = object()


def new_log_id() -> str:
    return secrets.token_hex(6)


class GatewayProtocol(SMTP):
    """One SMTP connection.  ``handler`` is a :class:`session.Policy`."""

    def __init__(
        self, handler: Any, *, max_message_size: int, max_header_size: int, **kwargs: Any
    ) -> None:
        # SIZE is ours (session.py answers it from the reply table), so
        # aiosmtpd's own check is off.  SMTPUTF8 (RFC 6531) is offered; an
        # address that needs it without it is refused in session.py.
        super().__init__(handler, data_size_limit=None, enable_SMTPUTF8=True, **kwargs)
        self.max_message_size = max_message_size
        self.max_header_size = max_header_size
        self._raw_replies = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        # Implicit TLS (port 465): aiosmtpd fills session.ssl only after
        # STARTTLS; the certificate checks need it from the start.
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None and self.session is not None and not self.session.ssl:
            self.session.ssl = {"ssl_object": ssl_object}
            # aiosmtpd 1.4.6 knows TLS only through STARTTLS and would hide
            # AUTH (and answer 538) on an implicit-TLS port: mark it as TLS.
            # No STARTTLS is offered there (no tls_context).
            if self._tls_protocol is None:
                self._tls_protocol = _IMPLICIT_TLS

    async def reply(self, reply: Reply) -> None:
        await self.push(str(reply))

    async def push(self, status: str | bytes) -> None:
        # The greeting and EHLO/HELO lines carry no enhanced code (RFC 2034 3);
        # every other reply does.
        if isinstance(status, bytes):
            await super().push(status)
            return
        if not self._raw_replies and not self._is_greeting(status):
            status = replies.with_enhanced_code(status)
        await super().push(status)
        if status.startswith("421 ") and self.transport is not None:
            # RFC 5321 3.8: 421 closes the transmission channel.
            self.transport.close()

    def _is_greeting(self, status: str) -> bool:
        return status.startswith(f"220 {self.hostname} ")

    @syntax("EHLO hostname")
    async def smtp_EHLO(self, hostname: str) -> None:
        await self._unmarked(super().smtp_EHLO, hostname)

    @syntax("HELO hostname")
    async def smtp_HELO(self, hostname: str) -> None:
        await self._unmarked(super().smtp_HELO, hostname)

    async def _unmarked(self, command: Any, arg: str) -> None:
        if not arg:  # a syntax error is a normal reply
            await command(arg)
            return
        self._raw_replies = True
        try:
            await command(arg)
        finally:
            self._raw_replies = False

    async def handle_exception(self, error: Exception) -> str:
        if isinstance(error, TLSSetupException):
            # The handshake failed (a refused client certificate among others:
            # the client got the TLS alert); aiosmtpd closes the connection.
            cause = error.__cause__
            reason = getattr(cause, "verify_message", None) or getattr(cause, "reason", None)
            log.info("TLS handshake failed: %s", reason or type(cause).__name__)
            return ""
        log_id = new_log_id()
        log.error("internal error log_id=%s", log_id, exc_info=error)
        return str(replies.INTERNAL_ERROR.format(log_id=log_id))

    @syntax("STARTTLS", when="tls_context")
    async def smtp_STARTTLS(self, arg: str) -> None:
        """aiosmtpd's STARTTLS, with the plaintext read-ahead thrown away.

        Commands a client (or a man in the middle) pipelined after STARTTLS
        in clear must not be executed inside the TLS session (STARTTLS
        command injection: CVE-2011-0411 Postfix, CVE-2021-33515 Dovecot,
        CVE-2021-38371 Exim).  RFC 3207 4: the client must not pipeline after
        STARTTLS.  The buffer is cleared at the very moment the transport
        switches to TLS, so nothing received in clear survives the switch.
        """
        if arg:
            await self.reply(replies.STARTTLS_SYNTAX)
            return
        if self._tls_protocol is not None:
            await self.reply(replies.TLS_ALREADY_ACTIVE)
            return
        await self.reply(replies.READY_FOR_TLS)
        waiter = self.loop.create_future()
        assert self.tls_context is not None  # STARTTLS is only offered with a context
        self._tls_protocol = AlertingSSLProtocol(
            self.loop, self, self.tls_context, waiter, server_side=True
        )
        self._original_transport = self.transport
        assert self._original_transport is not None
        buffer: bytearray = self._reader._buffer  # type: ignore[attr-defined]
        if buffer:
            log.warning("discarded %d octets pipelined in clear after STARTTLS", len(buffer))
            buffer.clear()
        self._original_transport.set_protocol(self._tls_protocol)
        self.transport = self._tls_protocol._app_transport
        self._tls_protocol.connection_made(self._original_transport)
        try:
            await waiter
        except asyncio.CancelledError:
            raise
        except Exception as error:
            raise TLSSetupException() from error

    @syntax("DATA")
    async def smtp_DATA(self, arg: str | None) -> None:
        if await self.check_helo_needed():
            return
        if await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        assert self.session is not None
        if not self.envelope.rcpt_tos:
            await self.reply(replies.NEED_RCPT)
            return
        if arg:
            await self.reply(replies.DATA_SYNTAX)
            return
        policy = self.event_handler
        spool = policy.new_spool()
        try:
            await self.reply(replies.START_DATA)
            receiver = DataReceiver(spool.write, self.max_message_size, self.max_header_size)
            await self._receive(receiver)
            if receiver.problem is not None:
                if receiver.problem is DataProblem.TOO_BIG:
                    reply = replies.SIZE_EXCEEDED.format(limit=self.max_message_size)
                elif receiver.problem is DataProblem.HEADER_TOO_BIG:
                    reply = replies.HEADER_TOO_BIG.format(limit=self.max_header_size)
                else:
                    reply = _PROBLEM_REPLIES[receiver.problem]
                log.info("DATA refused: %s", receiver.problem.value)
                spool.discard()
                await self.reply(reply)
                return
            reply = await policy.deliver(self.session, self.envelope, spool)
        except BaseException:
            spool.discard()
            raise
        finally:
            self._set_post_data_state()  # type: ignore[no-untyped-call]
        await self.reply(reply)

    async def _receive(self, receiver: DataReceiver) -> None:
        reader: Any = self._reader  # asyncio.StreamReader; _buffer used below
        while True:
            chunk = await reader.read(READ_CHUNK)
            if not chunk:
                # The peer closed mid-DATA: nothing was acknowledged.
                raise ConnectionResetError("connection closed during DATA")
            self._reset_timeout()
            end = receiver.feed(chunk)
            if end is not None:
                rest = chunk[end:]
                if rest:
                    # RFC 2920: commands pipelined after the end of data go
                    # back to the reader for the command loop.
                    reader._buffer[0:0] = rest
                return
