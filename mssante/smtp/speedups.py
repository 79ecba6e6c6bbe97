"""aiosmtpd's per-connection introspection, done once per class.

aiosmtpd's ``SMTP.__init__`` runs ``inspect.getmembers`` on the protocol
and on the handler, and ``inspect.signature`` on the EHLO hook, for every
connection: with one new connection per message that is about a tenth of
the gateway's CPU (BENCHMARKS.md).  The answers depend only on the
classes (and on the handler object, which a listener shares between its
connections), so this module gives ``aiosmtpd.smtp`` an ``inspect`` that
remembers them.  aiosmtpd only keeps the ``auth_*`` members of
``getmembers`` (smtp.py, ``_auth_methods``), which is all this returns.
"""

from __future__ import annotations

import functools
import inspect as _inspect
from collections.abc import Callable
from typing import Any

import aiosmtpd.smtp


class _CachingInspect:
    def __init__(self) -> None:
        self._auth_names: dict[type, list[str]] = {}

    def getmembers(self, obj: object) -> list[tuple[str, Any]]:
        names = self._auth_names.get(type(obj))
        if names is None:
            names = [n for n, _ in _inspect.getmembers(obj) if n.startswith("auth_")]
            self._auth_names[type(obj)] = names
        return [(n, getattr(obj, n)) for n in names]

    @staticmethod
    @functools.lru_cache(maxsize=64)
    def signature(fn: Callable[..., Any]) -> _inspect.Signature:
        return _inspect.signature(fn)

    def __getattr__(self, name: str) -> Any:  # anything else: the real module
        return getattr(_inspect, name)


def install() -> None:
    """Idempotent; called when the listeners are built (listener.py)."""
    if not isinstance(getattr(aiosmtpd.smtp, "inspect", None), _CachingInspect):
        setattr(aiosmtpd.smtp, "inspect", _CachingInspect())  # noqa: B010 - no stubs for it
