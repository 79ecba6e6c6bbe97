"""The SMTP protocol: aiosmtpd's command loop with our DATA phase and errors.

aiosmtpd parses commands, EHLO, STARTTLS and AUTH well.  Replaced or added:

- ``smtp_DATA``: the message is read in bulk by :class:`DataReceiver`,
  streamed to a spool file (never held in memory), and refused precisely
  when malformed (see data.py);
- ``smtp_BDAT`` (RFC 3030 CHUNKING, without BINARYMIME): chunks counted in
  octets go through the same receiver, without dot transparency, to the
  same spool, and the LAST one is delivered exactly as DATA is;
- ``handle_exception``: an unexpected error becomes ``451 4.3.0`` with a log
  id; the client never sees exception text.

It also keeps the books: sessions, TLS failures, the data phase's
outcome and time to 250 (metrics.py), and where each transaction ends
(transaction.py: one log line per transaction).

Session policy (EHLO keywords, MAIL, RCPT, storing) lives in session.py.
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
import ssl
import time
from asyncio import sslproto
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from aiosmtpd.smtp import SMTP, TLSSetupException, syntax

from mssante.metrics import ListenerMetrics
from mssante.smtp import replies
from mssante.smtp.data import DataProblem, DataReceiver
from mssante.smtp.dsn_parameters import DSN_PARAMETERS
from mssante.smtp.replies import Reply
from mssante.smtp.tls import handshake_failure
from mssante.smtp.transaction import Transaction
from mssante.store.blobs import Spool

log = logging.getLogger("mssante.smtp")

READ_CHUNK = 256 * 1024

# RFC 3030 2: bdat-cmd = "BDAT" SP chunk-size [ SP end-marker ] CR LF,
# chunk-size = 1*DIGIT, end-marker = "LAST" (keywords in any case).
_BDAT_ARGUMENT = re.compile(r"([0-9]+)(?: +(LAST))?", re.ASCII | re.IGNORECASE)

_PROBLEM_REPLIES = {
    DataProblem.BARE_LINE_ENDING: replies.BARE_LINE_ENDING,
    DataProblem.NUL: replies.NUL_IN_DATA,
    DataProblem.LINE_TOO_LONG: replies.LINE_TOO_LONG,
}


# RFC 5321 4.1.2 Path, the common case: dot-atom local part (RFC 5322 atext),
# letters-digits-hyphens domain labels; then optional whitespace and the rest.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_PLAIN_PATH = re.compile(
    rf"[ \t]*<({_ATEXT}(?:\.{_ATEXT})*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*)>[ \t]*(.*)\Z",
    re.DOTALL,
)


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


def record_handshake_failure(metrics: ListenerMetrics, error: BaseException | None) -> None:
    """A server-side TLS handshake failed (STARTTLS here, implicit TLS in listener.py)."""
    reason, detail = handshake_failure(error)
    metrics.tls_failed(reason)
    # The client got the TLS alert (AlertingSSLProtocol); the connection is closed.
    log.info(
        "TLS handshake failed: %s",
        detail,
        extra={"fields": {"event": "smtp.tls_failed", "listener": metrics.name, "reason": reason}},
    )


@dataclass
class _Chunks:
    """A message arriving in BDAT chunks: its spool and receiver, kept
    between commands until LAST, RSET or the end of the connection."""

    spool: Spool
    receiver: DataReceiver


class GatewayProtocol(SMTP):
    """One SMTP connection.  ``handler`` is a :class:`session.Policy`."""

    def __init__(
        self,
        handler: Any,
        *,
        max_message_size: int,
        max_header_size: int,
        metrics: ListenerMetrics,
        on_end: Callable[[GatewayProtocol], None] | None = None,
        **kwargs: Any,
    ) -> None:
        # SIZE is ours (session.py answers it from the reply table), so
        # aiosmtpd's own check is off.  SMTPUTF8 (RFC 6531) is offered; an
        # address that needs it without it is refused in session.py.
        self._chunks: _Chunks | None = None
        self.metrics = metrics  # the listener's: one registry per process
        # The open transaction (from MAIL to the reply to its data).
        self.transaction: Transaction | None = None
        self._counted = False
        super().__init__(handler, data_size_limit=None, enable_SMTPUTF8=True, **kwargs)
        self.max_message_size = max_message_size
        self.max_header_size = max_header_size
        self._raw_replies = False
        self._shutting_down = False
        self._on_end = on_end  # the listener counts sessions in progress

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._original_transport is None and not self._counted:
            # Not the second call aiosmtpd makes once STARTTLS is done.
            self._counted = True
            self.metrics.sessions.inc()
            self.metrics.sessions_active.inc()
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

    def connection_lost(self, error: Exception | None) -> None:
        self._drop_chunks()  # never acknowledged: nothing of it is kept
        self.end_transaction(None, "disconnect")
        if self._counted:  # aiosmtpd may call this twice (a failed STARTTLS)
            self._counted = False
            self.metrics.sessions_active.dec()
        super().connection_lost(error)
        if self._on_end is not None:
            self._on_end(self)

    def end_transaction(self, reply: Reply | None, ended_by: str) -> None:
        """The open transaction is over: its log line (transaction.py)."""
        txn, self.transaction = self.transaction, None
        if txn is not None:
            txn.end(self.session, reply, ended_by)

    def _data_answered(self, reply: Reply, ended_by: str, end_of_data: float | None) -> None:
        """The message data got its reply (written): count it, end the transaction."""
        if reply.is_success:
            self.metrics.accepted.inc()
            if end_of_data is not None:
                self.metrics.time_to_250.observe(time.perf_counter() - end_of_data)
        else:
            self.metrics.refused("data", reply.name)
        self.end_transaction(reply, ended_by)

    def _data_failed(self, error: BaseException) -> None:
        """The data phase raised: a lost connection, or an error answered 451."""
        if isinstance(error, Exception) and not isinstance(error, ConnectionError):
            self.metrics.refused("data", replies.INTERNAL_ERROR.name)
            self.end_transaction(None, "error")
        else:
            self.end_transaction(None, "disconnect")

    def _set_post_data_state(self) -> None:
        # End of a message, RSET, EHLO/HELO, STARTTLS: a new transaction, so
        # chunks of an unfinished BDAT message are dropped (RFC 3030 2: RSET
        # clears all the segments sent in the transaction).
        self._drop_chunks()
        super()._set_post_data_state()  # type: ignore[no-untyped-call]

    def _drop_chunks(self) -> None:
        chunks, self._chunks = self._chunks, None
        if chunks is not None:
            chunks.spool.discard()

    async def _call_handler_hook(self, command: str, *args: Any) -> Any:
        if command == "EHLO" and len(args) == 2:
            # RFC 3030 2: BDAT is the protocol's own, so it is offered on every
            # listener, before the policy adds its keywords.  Not BINARYMIME:
            # the content stays 7bit/8bitmime text, checked as DATA's is.
            responses: list[str] = args[1]
            responses.insert(len(responses) - 1, "250-CHUNKING")
        return await super()._call_handler_hook(command, *args)

    # RFC 3461 DSN parameters, validated by the policy (session.py):
    # aiosmtpd answers 555 to any MAIL or RCPT parameter it does not know,
    # and hands on the others upper-cased, while ENVID and ORCPT must come
    # back verbatim in a DSN: the arguments are kept as sent.
    arguments_as_sent = ""

    def _getparams(self, params: Sequence[str]) -> dict[str, str | bool] | None:
        found = super()._getparams(params)
        if found is None:
            return None
        return {name: value for name, value in found.items() if name not in DSN_PARAMETERS}

    @syntax("MAIL FROM: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_MAIL(self, arg: str | None) -> None:
        self.arguments_as_sent = arg or ""
        assert self.envelope is not None
        if self.envelope.mail_from is None:  # else aiosmtpd answers "nested MAIL"
            self.end_transaction(None, "reset")  # left open by a path not seen here
            self.transaction = Transaction(self.metrics.name)
        await super().smtp_MAIL(arg)
        if self.envelope.mail_from is None and self.transaction is not None:
            refusal = self.transaction.mail_refusal
            if refusal is None:
                self.transaction = None  # syntax or sequence: no transaction began
            else:
                self.end_transaction(refusal, "mail")

    @syntax("RCPT TO: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_RCPT(self, arg: str | None) -> None:
        self.arguments_as_sent = arg or ""
        await super().smtp_RCPT(arg)

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        # aiosmtpd parses every MAIL and RCPT path with the e-mail package's
        # header parser, a tenth of the gateway's CPU per message
        # (BENCHMARKS.md).  The usual <dot-atom@ldh.domain> form is read by a
        # regular expression giving the same result (tests/test_smtp_paths.py);
        # anything else (quoted local parts, literals, routes, UTF-8, <>) goes
        # to aiosmtpd's parser.
        m = _PLAIN_PATH.match(arg)
        if m is None:
            result: tuple[str | None, str | None] = super()._getaddr(arg)
            return result
        address, rest = m.group(1), m.group(2)
        if self.local_part_limit and len(address.rpartition("@")[0]) > self.local_part_limit:
            return None, None
        return address, rest

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
        elif self._shutting_down and status[3:4] == " " and not self._in_transaction():
            # The last line of a reply that ended a transaction (or came
            # outside one): the session may not start another.
            self._say_shutting_down()

    def begin_shutdown(self) -> None:
        """SIGTERM (issue 9.5): this session ends with ``421 4.3.2`` as soon
        as no transaction is in progress: now if it is between transactions,
        else right after the reply that ends the current one (its 250 is
        sent only after the commit, as always)."""
        self._shutting_down = True
        if not self._in_transaction():
            self._say_shutting_down()

    def hang_up_shutting_down(self) -> None:
        """The shutdown deadline: ``421 4.3.2`` even in a transaction; what
        was not acknowledged yet is dropped and the client sends it again."""
        self._shutting_down = True
        self._say_shutting_down()

    def _in_transaction(self) -> bool:
        return self._chunks is not None or (
            self.envelope is not None and self.envelope.mail_from is not None
        )

    def _say_shutting_down(self) -> None:
        transport = self.transport
        if isinstance(transport, asyncio.WriteTransport) and not transport.is_closing():
            transport.write(f"{replies.SHUTTING_DOWN}\r\n".encode("ascii"))
            transport.close()

    def _is_greeting(self, status: str) -> bool:
        return status.startswith(f"220 {self.hostname} ")

    @syntax("EHLO hostname")
    async def smtp_EHLO(self, hostname: str) -> None:
        await self._unmarked(super().smtp_EHLO, hostname)

    @syntax("HELO hostname")
    async def smtp_HELO(self, hostname: str) -> None:
        await self._unmarked(super().smtp_HELO, hostname)

    @syntax("RSET")
    async def smtp_RSET(self, arg: str | None) -> None:
        if not arg:
            self.end_transaction(None, "rset")
        await super().smtp_RSET(arg)

    @syntax("QUIT")
    async def smtp_QUIT(self, arg: str | None) -> None:
        if not arg:
            self.end_transaction(None, "quit")
        await super().smtp_QUIT(arg)

    async def _unmarked(self, command: Any, arg: str) -> None:
        if not arg:  # a syntax error is a normal reply
            await command(arg)
            return
        self.end_transaction(None, "ehlo")  # RFC 5321 4.1.4: EHLO resets the transaction
        self._raw_replies = True
        try:
            await command(arg)
        finally:
            self._raw_replies = False

    async def handle_exception(self, error: Exception) -> str:
        if isinstance(error, TLSSetupException):
            # The handshake failed (a refused client certificate among others:
            # the client got the TLS alert); aiosmtpd closes the connection.
            record_handshake_failure(self.metrics, error.__cause__)
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
        self.end_transaction(None, "starttls")  # RFC 3207 4.2: state is discarded
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
        if self._chunks is not None:
            # RFC 3030 2: DATA and BDAT are not mixed in one transaction; the
            # state after that is indeterminate, so the transaction is over
            # (its chunks dropped) and the client starts again from MAIL.
            self._set_post_data_state()
            await self.reply(replies.DATA_AFTER_BDAT)
            self._data_answered(replies.DATA_AFTER_BDAT, "data", None)
            return
        if not self.envelope.rcpt_tos:
            await self.reply(replies.NEED_RCPT)
            return
        if arg:
            await self.reply(replies.DATA_SYNTAX)
            return
        policy = self.event_handler
        spool = policy.new_spool()
        end_of_data: float | None = None
        try:
            await self.reply(replies.START_DATA)
            receiver = DataReceiver(spool.write, self.max_message_size, self.max_header_size)
            await self._receive(receiver)
            end_of_data = time.perf_counter()
            if self.transaction is not None:
                self.transaction.size = spool.size
            if receiver.problem is not None:
                log.info("DATA refused: %s", receiver.problem.value)
                spool.discard()
                reply = self._problem_reply(receiver.problem)
                await self.reply(reply)
                self._data_answered(reply, "data", None)
                return
            reply = await policy.deliver(self.session, self.envelope, spool)
        except BaseException as error:
            spool.discard()
            self._data_failed(error)
            raise
        finally:
            self._set_post_data_state()
        try:
            await self.reply(reply)
        finally:  # stored even if the client left before reading the 250
            self._data_answered(reply, "data", end_of_data)

    def _problem_reply(self, problem: DataProblem) -> Reply:
        if problem is DataProblem.TOO_BIG:
            return replies.SIZE_EXCEEDED.format(limit=self.max_message_size)
        if problem is DataProblem.HEADER_TOO_BIG:
            return replies.HEADER_TOO_BIG.format(limit=self.max_header_size)
        return _PROBLEM_REPLIES[problem]

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

    @syntax("BDAT chunk-size [LAST]")
    async def smtp_BDAT(self, arg: str | None) -> None:
        """RFC 3030 CHUNKING: ``BDAT <size> [LAST]`` then exactly <size> octets.

        Whatever the answer, the chunk's octets are read first (they are
        data, never commands: RFC 3030 2 "the receiver-SMTP MUST be prepared
        to accept and discard additional BDAT chunks already in the
        pipeline"), then the reply is sent:

        - refused as a command (no EHLO, no AUTH on submission, no MAIL, no
          accepted RCPT, or after a failed chunk): the chunk is dropped and
          the reply is the one DATA would get (``503 5.5.1``...);
        - content refused (bare CR or LF, NUL, a line over 998 octets, the
          header section or the message too big, counted across chunks):
          reported on the chunk where it is found, not deferred to LAST.
          RFC 3030 2 lets the server fail any chunk ("If a 5XX or 4XX code is
          received by the sender-SMTP in response to a BDAT chunk, the
          transaction should be considered failed and the sender-SMTP MUST
          NOT send any additional BDAT segments"), and answering at once
          stops a client from sending megabytes that would be thrown away.
          The transaction is then over: its chunks are dropped, and further
          BDATs already pipelined get ``503 5.5.1`` (need MAIL) until a new
          MAIL;
        - a non-final chunk: ``250 2.0.0`` with its octet count;
        - LAST: delivered as DATA is (``Policy.deliver``, ``250`` only once
          committed).

        A malformed argument gets ``501 5.5.4`` and the connection is
        closed: without a size nobody knows where the chunk ends, and
        reading on would take message octets for commands (the
        desynchronisation that SMTP smuggling exploits).
        """
        match = _BDAT_ARGUMENT.fullmatch(arg or "")
        if match is None:
            log.info("malformed BDAT argument: closing the connection")
            await self.reply(replies.BDAT_SYNTAX)
            self._hang_up()
            return
        size = int(match[1])
        last = match[2] is not None
        refusal = self._bdat_refusal()
        if refusal is not None:
            await self._read_octets(size, None)
            await self.reply(refusal)
            return
        chunks = self._chunks
        if chunks is None:
            spool = self.event_handler.new_spool()
            receiver = DataReceiver(
                spool.write,
                self.max_message_size,
                self.max_header_size,
                dot_transparency=False,
            )
            chunks = self._chunks = _Chunks(spool, receiver)
        try:
            # The receiver stops keeping anything at the first problem (the
            # size limit included, counted across chunks); the rest of the
            # chunk is still read.
            await self._read_octets(size, chunks.receiver.feed)
            if last:
                chunks.receiver.finish()
        except BaseException as error:
            self._set_post_data_state()  # drops the chunks
            self._data_failed(error)
            raise
        end_of_data = time.perf_counter()
        if self.transaction is not None:
            self.transaction.size = chunks.spool.size
        problem = chunks.receiver.problem
        if problem is not None:
            log.info("BDAT refused: %s", problem.value)
            self._set_post_data_state()
            reply = self._problem_reply(problem)
            await self.reply(reply)
            self._data_answered(reply, "bdat", None)
            return
        if not last:
            await self.reply(replies.CHUNK_RECEIVED.format(octets=size))
            return
        assert self.session is not None
        self._chunks = None  # the spool is the policy's now
        try:
            reply = await self.event_handler.deliver(self.session, self.envelope, chunks.spool)
        except BaseException as error:
            chunks.spool.discard()
            self._data_failed(error)
            raise
        finally:
            self._set_post_data_state()
        try:
            await self.reply(reply)
        finally:
            self._data_answered(reply, "bdat", end_of_data)

    def _bdat_refusal(self) -> Reply | None:
        """Why BDAT cannot be taken now, as DATA would be refused."""
        assert self.session is not None
        assert self.envelope is not None
        if not self.session.host_name:
            return replies.HELO_FIRST
        if self._auth_required and not self.session.authenticated:
            return replies.AUTH_REQUIRED
        if not self.envelope.mail_from:
            return replies.NEED_MAIL
        if not self.envelope.rcpt_tos:
            return replies.NEED_RCPT
        return None

    async def _read_octets(self, count: int, feed: Callable[[bytes], object] | None) -> None:
        """Read exactly ``count`` octets, handing them to ``feed`` (or dropping them).

        Bytes after them stay in the reader for the command loop (RFC 2920
        pipelining: the next BDAT may be in the same segment).  If ``feed``
        fails (the spool's disk), the rest is still read so the session
        stays in step, then the error is raised.
        """
        reader: Any = self._reader
        failure: Exception | None = None
        while count > 0:
            data = await reader.read(min(count, READ_CHUNK))
            if not data:
                # The peer closed mid-chunk: nothing was acknowledged.
                raise ConnectionResetError("connection closed during BDAT")
            self._reset_timeout()
            count -= len(data)
            if feed is None:
                continue
            try:
                feed(data)
            except Exception as exc:
                failure, feed = exc, None
        if failure is not None:
            raise failure

    def _hang_up(self) -> None:
        """Close without reading another command: what was pipelined after
        an unframed chunk is dropped unread."""
        buffer: bytearray = self._reader._buffer  # type: ignore[attr-defined]
        buffer.clear()
        if self.transport is not None:
            self.transport.close()
