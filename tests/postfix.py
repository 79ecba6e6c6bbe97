"""A real Postfix for the interoperability tests: a professional's operator on loopback.

:class:`PostfixInstance` writes its own ``main.cf`` and ``master.cf`` into a
temporary directory (never ``/etc/postfix``) and runs ``postfix -c <dir>
start``: queue, data directory, log file (``maillog_file``, no syslog) and
mailboxes all live in that directory, removed by :meth:`remove`.  The
instance is the operator of one professional domain:

- **smtpd** on ``127.0.0.1:<free port>``: STARTTLS required, a client
  certificate required and verified against the test anchors
  (``smtpd_tls_req_ccert``); mail for the professional domain is delivered
  by virtual(8) into one Maildir per address;
- **smtp client**: mail for the patient domain goes to mssante's MX
  (``transport_maps``) at TLS level ``secure``: the certificate must chain
  to the anchors and carry the name the TLS policy table gives (the next
  hop is an address); the operator's client certificate is presented.  No
  DNS at all: ``smtp_dns_support_level = disabled`` (Postfix >= 2.11; the
  older ``disable_dns_lookups`` is deprecated), ``smtpd_peername_lookup = no``.

Mail is submitted with Postfix's own ``sendmail -C <dir>``.  Postfix must
start as root (its master drops privileges to the ``postfix`` user), so
the tests need root, as CI has; :class:`PostfixUnavailable` says what is
missing.  :meth:`stop` stops the master and checks that no process of the
instance is left (processes are found by the ``MAIL_CONFIG`` of their
environment, which Postfix passes to every daemon it starts).
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.pg import free_port

COMMAND_TIMEOUT = 60.0
# Daemons run as this user for virtual(8) deliveries into the Maildirs.
MAILBOX_USER = "nobody"


class PostfixUnavailable(RuntimeError):
    """Postfix cannot run here; the message says what to install or change."""


def find_postfix() -> Path:
    """The ``postfix`` command (Debian: /usr/sbin/postfix)."""
    found = shutil.which("postfix") or shutil.which("postfix", path="/usr/sbin:/usr/local/sbin")
    if found is None:
        raise PostfixUnavailable(
            "postfix not found on PATH nor in /usr/sbin: install it (Debian: apt-get install "
            "postfix; .ci/run does it); the interoperability tests need a real Postfix"
        )
    if os.geteuid() != 0:
        raise PostfixUnavailable(
            "Postfix's master must start as root (it drops privileges to the postfix user): "
            "run the interoperability tests as root, as CI does"
        )
    try:
        pwd.getpwnam("postfix")
    except KeyError:
        raise PostfixUnavailable(
            "there is no 'postfix' user (the Debian package creates it): reinstall postfix"
        ) from None
    return Path(found)


@dataclass(frozen=True)
class TlsFiles:
    """PEM files: a certificate chain, its key, and the CAs the peer must chain to."""

    cert: Path
    key: Path
    anchors: Path | None = None


@dataclass
class PostfixInstance:
    """One private Postfix: configure with the constructor, then start, stop, remove.

    ``relay``: domain -> ``host:port`` of its next hop (mssante's MX), reached
    with TLS level ``secure``, the server certificate matching ``relay_match``.
    ``client``: the certificate presented to that next hop (None: none).
    ``server``: smtpd's certificate and the anchors client certificates must
    chain to.  ``mailboxes``: local parts of ``domain`` that get a Maildir.
    ``extra``: more ``main.cf`` parameters (``soft_bounce = yes``...).
    """

    myhostname: str
    domain: str
    mailboxes: list[str]
    server: TlsFiles
    relay: dict[str, str] = field(default_factory=dict)
    relay_match: str = ""
    relay_anchors: Path | None = None
    client: TlsFiles | None = None
    extra: dict[str, str] = field(default_factory=dict)
    root: Path = field(init=False)
    port: int = field(init=False, default=0)
    running: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        self.postfix = find_postfix()
        self.root = Path(tempfile.mkdtemp(prefix="mssante-postfix-"))
        # Daemons that dropped privileges open files below it (outside pytest's
        # tmp dirs, which are 0700).
        self.root.chmod(0o755)
        self.config = self.root / "etc"
        self.queue = self.root / "spool"
        self.data = self.root / "lib"
        self.mail = self.root / "mail"
        self.log = self.root / "log" / "maillog"

    # --- configuration ----------------------------------------------------------------
    def _tls_copy(self, files: TlsFiles, name: str) -> TlsFiles:
        """Copies in the config directory: read by root before privileges are dropped."""
        tls = self.config / "tls"
        tls.mkdir(mode=0o755, exist_ok=True)
        anchors = tls / f"{name}-anchors.pem" if files.anchors else None
        out = TlsFiles(tls / f"{name}.pem", tls / f"{name}.key", anchors)
        shutil.copyfile(files.cert, out.cert)
        shutil.copyfile(files.key, out.key)
        out.key.chmod(0o600)
        if files.anchors and anchors:
            shutil.copyfile(files.anchors, anchors)
        return out

    def _write_config(self) -> None:
        self.config.mkdir(mode=0o755)
        self.log.parent.mkdir(mode=0o755)
        nobody = pwd.getpwnam(MAILBOX_USER)
        postfix = pwd.getpwnam("postfix")
        self.mail.mkdir(mode=0o755)
        os.chown(self.mail, nobody.pw_uid, nobody.pw_gid)
        # The queue directory belongs to root, as /var/spool/postfix does;
        # `postfix start` creates its subdirectories with their owners.
        self.queue.mkdir(mode=0o755)
        self.data.mkdir(mode=0o700)
        os.chown(self.data, postfix.pw_uid, postfix.pw_gid)
        server = self._tls_copy(self.server, "smtpd")
        assert server.anchors is not None, "smtpd verifies client certificates: anchors needed"
        (self.config / "mailboxes").write_text(
            "".join(f"{local}@{self.domain} {local}/\n" for local in self.mailboxes)
        )
        (self.config / "transport").write_text(
            "".join(
                f"{domain} smtp:[{_host(hop)}]:{_port(hop)}\n" for domain, hop in self.relay.items()
            )
        )
        # Level "secure" checks the certificate against the next-hop name, and
        # an address is not one: the policy table says which name to expect.
        (self.config / "tls_policy").write_text(
            "".join(
                f"[{_host(hop)}]:{_port(hop)} secure match={self.relay_match}\n"
                for hop in self.relay.values()
            )
        )
        params = {
            "compatibility_level": "3.6",
            "queue_directory": str(self.queue),
            "data_directory": str(self.data),
            "meta_directory": "/etc/postfix",  # postfix-files, read only
            "maillog_file": str(self.log),
            "maillog_file_prefixes": str(self.root),
            "myhostname": self.myhostname,
            "mydomain": self.domain,
            "myorigin": "$mydomain",
            "mydestination": "",
            "inet_interfaces": "127.0.0.1",
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.0/8",
            "alias_maps": "",
            "alias_database": "",
            "local_recipient_maps": "",
            "biff": "no",
            # No DNS: next hops are addresses, peers are not looked up.
            "smtp_dns_support_level": "disabled",
            "smtp_host_lookup": "native",
            "smtpd_peername_lookup": "no",
            "virtual_mailbox_domains": self.domain,
            "virtual_mailbox_base": str(self.mail),
            "virtual_mailbox_maps": f"texthash:{self.config / 'mailboxes'}",
            "virtual_uid_maps": f"static:{nobody.pw_uid}",
            "virtual_gid_maps": f"static:{nobody.pw_gid}",
            "transport_maps": f"texthash:{self.config / 'transport'}",
            "smtpd_relay_restrictions": "permit_mynetworks, reject_unauth_destination",
            # smtpd: the trust space's rules, as a professional operator applies them.
            "smtpd_tls_security_level": "encrypt",
            "smtpd_tls_cert_file": str(server.cert),
            "smtpd_tls_key_file": str(server.key),
            "smtpd_tls_CAfile": str(server.anchors),
            "smtpd_tls_ask_ccert": "yes",
            "smtpd_tls_req_ccert": "yes",
            "smtpd_tls_received_header": "yes",
            "smtpd_tls_loglevel": "1",
            # smtp client: TLS always, the next hop's certificate verified.
            "smtp_tls_security_level": "secure",
            "smtp_tls_policy_maps": f"texthash:{self.config / 'tls_policy'}",
            "smtp_tls_loglevel": "1",
            "delay_warning_time": "0",
        }
        if self.relay_anchors is not None:
            anchors = self.config / "tls" / "relay-anchors.pem"
            shutil.copyfile(self.relay_anchors, anchors)
            params["smtp_tls_CAfile"] = str(anchors)
        if self.client is not None:
            client = self._tls_copy(self.client, "smtp")
            params["smtp_tls_cert_file"] = str(client.cert)
            params["smtp_tls_key_file"] = str(client.key)
        params.update(self.extra)
        (self.config / "main.cf").write_text(
            "".join(f"{name} = {value}\n" for name, value in params.items())
        )

    # --- running ----------------------------------------------------------------------
    def _env(self) -> dict[str, str]:
        return {**os.environ, "MAIL_CONFIG": str(self.config)}

    def run(self, *args: str, stdin: bytes | None = None) -> str:
        """A Postfix command of this instance (``postfix``, ``postqueue``...): its output."""
        done = subprocess.run(
            [*args],
            input=stdin,
            capture_output=True,
            env=self._env(),
            cwd=self.root,
            timeout=COMMAND_TIMEOUT,
            check=False,
        )
        if done.returncode != 0:
            raise PostfixUnavailable(
                f"{' '.join(args)} failed ({done.returncode}):\n"
                f"{done.stdout.decode(errors='replace')}{done.stderr.decode(errors='replace')}"
                f"{self.log_text()[-3000:]}"
            )
        return done.stdout.decode(errors="replace")

    def _command(self, name: str) -> str:
        return str(self.postfix.parent / name)

    def start(self) -> None:
        """Write the configuration and start the master; returns once it listens."""
        self._write_config()
        for attempt in range(3):  # the free port may be taken before the master binds it
            self.port = free_port()
            (self.config / "master.cf").write_text(_master_cf(self.port))
            try:
                # `postfix start` creates the queue directories with their owners
                # (post-install create-missing) and waits for the master's
                # initialisation (master -w): smtpd's socket is bound when it returns.
                self.run(str(self.postfix), "-c", str(self.config), "start")
            except PostfixUnavailable as exc:
                self._kill_leftovers()
                if attempt == 2 or "Address already in use" not in str(exc):
                    raise
                continue
            self.running = True
            return

    def stop(self) -> None:
        """Stop the master and its daemons; fails if any process of the instance is left."""
        if not self.running:
            self._kill_leftovers()
            return
        self.running = False
        with contextlib.suppress(PostfixUnavailable):  # what is left is checked below
            self.run(str(self.postfix), "-c", str(self.config), "stop")
        left = self._wait_gone(20.0)
        if left:
            self._kill_leftovers()
            raise AssertionError(f"Postfix processes left after stop: {left}")

    def remove(self) -> None:
        """Stop (checking no process is left) and delete every file of the instance."""
        try:
            self.stop()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def kill(self) -> None:
        """Kill whatever is left of the instance and delete its files, quietly (atexit)."""
        self.running = False
        self._kill_leftovers()
        shutil.rmtree(self.root, ignore_errors=True)

    def processes(self) -> list[int]:
        """Every process whose environment names this instance's configuration."""
        marker = f"MAIL_CONFIG={self.config}".encode()
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                environ = (entry / "environ").read_bytes()
            except OSError:
                continue  # gone meanwhile
            if marker in environ.split(b"\0"):
                found.append(int(entry.name))
        return found

    def _wait_gone(self, timeout: float) -> list[int]:
        deadline = time.monotonic() + timeout
        while (left := self.processes()) and time.monotonic() < deadline:
            time.sleep(0.05)
        return left

    def _kill_leftovers(self) -> None:
        for pid in self.processes():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)
        self._wait_gone(10.0)

    # --- mail ------------------------------------------------------------------------
    def sendmail(self, message: bytes, *, sender: str, recipients: list[str]) -> None:
        """Submit ``message`` as a local user would (postdrop, then pickup)."""
        sendmail = self.run(
            self._command("postconf"), "-c", str(self.config), "-h", "sendmail_path"
        )
        self.run(
            sendmail.strip(),
            "-C",
            str(self.config),
            "-i",
            "-f",
            sender,
            "--",
            *recipients,
            stdin=message,
        )

    def queue_entries(self) -> list[dict[str, object]]:
        """``postqueue -j``: one JSON object per queued message (recipients, delay reasons)."""
        out = self.run(self._command("postqueue"), "-c", str(self.config), "-j")
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def maildir(self, local: str) -> list[bytes]:
        """Messages delivered into ``local``'s Maildir (``new/``), oldest first."""
        new = self.mail / local / "new"
        if not new.is_dir():
            return []
        files = sorted(new.iterdir(), key=lambda p: p.stat().st_mtime_ns)
        return [p.read_bytes() for p in files]

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""


def _host(hop: str) -> str:
    return hop.rpartition(":")[0].strip("[]")


def _port(hop: str) -> str:
    return hop.rpartition(":")[2]


def _master_cf(port: int) -> str:
    """Postfix 3.7's default services, none chrooted, smtpd on loopback ``port``."""
    services = [
        (f"127.0.0.1:{port}", "inet", "n", "-", "n", "-", "-", "smtpd"),
        ("pickup", "unix", "n", "-", "n", "60", "1", "pickup"),
        ("cleanup", "unix", "n", "-", "n", "-", "0", "cleanup"),
        ("qmgr", "unix", "n", "-", "n", "300", "1", "qmgr"),
        ("tlsmgr", "unix", "-", "-", "n", "1000?", "1", "tlsmgr"),
        ("rewrite", "unix", "-", "-", "n", "-", "-", "trivial-rewrite"),
        ("bounce", "unix", "-", "-", "n", "-", "0", "bounce"),
        ("defer", "unix", "-", "-", "n", "-", "0", "bounce"),
        ("trace", "unix", "-", "-", "n", "-", "0", "bounce"),
        ("verify", "unix", "-", "-", "n", "-", "1", "verify"),
        ("flush", "unix", "n", "-", "n", "1000?", "0", "flush"),
        ("proxymap", "unix", "-", "-", "n", "-", "-", "proxymap"),
        ("proxywrite", "unix", "-", "-", "n", "-", "1", "proxymap"),
        ("smtp", "unix", "-", "-", "n", "-", "-", "smtp"),
        ("relay", "unix", "-", "-", "n", "-", "-", "smtp"),
        ("showq", "unix", "n", "-", "n", "-", "-", "showq"),
        ("error", "unix", "-", "-", "n", "-", "-", "error"),
        ("retry", "unix", "-", "-", "n", "-", "-", "error"),
        ("discard", "unix", "-", "-", "n", "-", "-", "discard"),
        ("virtual", "unix", "-", "n", "n", "-", "-", "virtual"),
        ("anvil", "unix", "-", "-", "n", "-", "1", "anvil"),
        ("scache", "unix", "-", "-", "n", "-", "1", "scache"),
        ("postlog", "unix-dgram", "n", "-", "n", "-", "1", "postlogd"),
    ]
    return "".join(" ".join(s) + "\n" for s in services)
