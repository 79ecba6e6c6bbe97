"""``mssante serve`` with ``smtp.workers`` > 1: gateway processes sharing the ports.

One Python process runs one event loop on one core.  With N workers the
kernel spreads new connections over N processes listening on the same
ports (SO_REUSEPORT, Linux).  They share the database (one writer
transaction at a time across processes: ``BEGIN IMMEDIATE`` on SQLite, an
advisory lock on PostgreSQL, db.py) and the blob directory.

This process, the supervisor:
1. prepares the data directory once (schema, keys, development
   certificates, demo patients), so workers never race to create them;
2. reserves the ports (a port 0 becomes a real one all workers share);
3. starts ``mssante serve --worker`` N times and waits until each listens;
4. forwards SIGTERM/SIGINT (stop) and SIGHUP (reload trust files), and
   restarts a worker that died.

Workers die with the supervisor (PR_SET_PDEATHSIG): a kill -9 of it leaves
no process behind, and loses nothing acknowledged (``250`` is sent only
after commit).  Notifications (sending and the bounce listener) run in the
first worker only.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mssante.settings import Settings

log = logging.getLogger("mssante.workers")

READY = b"R"
START_TIMEOUT = 60.0
RESTART_DELAY = 1.0
_PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int) -> None:
    """Ask Linux to SIGKILL this process when its parent dies."""
    libc_name = ctypes.util.find_library("c")
    if libc_name is not None:
        libc = ctypes.CDLL(libc_name, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def reserve_port(host: str, port: int) -> socket.socket:
    """Bind (without listening) with SO_REUSEPORT: fixes a port 0 and fails
    early when another program holds the port."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(address)
    return sock


@dataclass
class Ports:
    smtp: int
    submission: int | None
    implicit_tls: int | None

    def env(self) -> dict[str, str]:
        env = {"MSSANTE_SMTP__PORT": str(self.smtp)}
        if self.submission is not None:
            env["MSSANTE_SUBMISSION__PORT"] = str(self.submission)
        if self.implicit_tls is not None:
            env["MSSANTE_SUBMISSION__IMPLICIT_TLS_PORT"] = str(self.implicit_tls)
        return env


class Supervisor:
    def __init__(self, settings: Settings, *, config_path: Path | None, role: str) -> None:
        self.settings = settings
        self._role = role
        self._config_path = config_path
        self._procs: dict[int, asyncio.subprocess.Process] = {}
        self._stopping = False
        self.ports: Ports | None = None

    def _reserve(self) -> tuple[Ports, list[socket.socket]]:
        s = self.settings
        held = [reserve_port(s.smtp.host, s.smtp.port)]
        submission = implicit = None
        if s.submission.enabled:
            held.append(reserve_port(s.submission.host, s.submission.port))
            submission = held[-1].getsockname()[1]
            if s.submission.implicit_tls_port is not None:
                held.append(reserve_port(s.submission.host, s.submission.implicit_tls_port))
                implicit = held[-1].getsockname()[1]
        return Ports(held[0].getsockname()[1], submission, implicit), held

    async def _spawn(self, index: int) -> None:
        assert self.ports is not None
        read_fd, write_fd = os.pipe()
        env = dict(os.environ) | self.ports.env()
        if self._config_path is not None:
            env["MSSANTE_CONFIG"] = str(self._config_path)
        argv = [
            sys.executable,
            "-m",
            "mssante",
            "serve",
            "--worker",
            f"--role={self._role}",
            f"--worker-index={index}",
            f"--ready-fd={write_fd}",
            f"--parent={os.getpid()}",
        ]
        try:
            proc = await asyncio.create_subprocess_exec(*argv, env=env, pass_fds=(write_fd,))
        finally:
            os.close(write_fd)
        try:
            ready = await asyncio.wait_for(
                asyncio.to_thread(os.read, read_fd, 1), timeout=START_TIMEOUT
            )
        finally:
            os.close(read_fd)
        if ready != READY:
            await proc.wait()
            raise RuntimeError(f"worker {index} exited during start-up ({proc.returncode})")
        self._procs[index] = proc
        log.info("worker %d (pid %d) listening", index, proc.pid)

    async def start(self, count: int) -> Ports:
        self.ports, held = self._reserve()
        try:
            for index in range(count):
                await self._spawn(index)
        except BaseException:
            await self.stop()
            raise
        finally:
            for sock in held:
                sock.close()
        return self.ports

    def signal_all(self, sig: int) -> None:
        for proc in self._procs.values():
            if proc.returncode is None:
                proc.send_signal(sig)

    async def watch(self) -> None:
        """Restart workers that die, until stop()."""
        while not self._stopping:
            waits = {asyncio.create_task(proc.wait()): index for index, proc in self._procs.items()}
            done, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            for task in pending:
                task.cancel()
            if self._stopping:
                return
            for task in done:
                index = waits[task]
                log.error(
                    "worker %d exited with %s; restarting", index, self._procs[index].returncode
                )
                await asyncio.sleep(RESTART_DELAY)
                if self._stopping:
                    return
                # The port is held by the other workers: no reservation needed.
                await self._spawn(index)

    async def stop(self) -> None:
        self._stopping = True
        self.signal_all(signal.SIGTERM)
        for proc in self._procs.values():
            await proc.wait()


def notify_ready(fd: int | None) -> None:
    if fd is not None:
        os.write(fd, READY)
        os.close(fd)


def install_signals(loop: asyncio.AbstractEventLoop, stop: Callable[[], None]) -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop)
