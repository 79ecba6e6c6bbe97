"""A real headless Chromium for the webmail's end-to-end tests (issue 8).

- :func:`serve_app` runs an ASGI app (the webmail) on uvicorn at
  ``127.0.0.1:<port 0>`` inside the test's event loop and yields its base URL,
  over HTTPS when given a certificate.
- :func:`launch` starts Debian's ``chromium`` (``MSSANTE_CHROMIUM`` overrides
  the path) through Playwright's ``executable_path``: Playwright never
  downloads a browser here.  The network is closed, so every background
  service Chromium would call home for is off.
- :func:`new_page` opens a fresh context and page with an :class:`XssWatch`
  attached: a payload *executed* when it opened a dialog (``alert``,
  ``confirm``, ``prompt``) or set the marker ``window.__xss``.  Console
  errors are only recorded: a CSP report ("Executing inline script
  violates ...") is the defence working.
- :func:`axe` runs axe-core (npm, pinned in ``tests/browser/package.json``)
  in the page; :func:`serious_or_critical` and :func:`format_violations`
  make the assertion and its message.
- :func:`screenshot` writes ``test-artifacts/screenshots/<name>.png``.

When Chromium or axe-core is missing the test fails (never skips) and says
how to install it; ``.ci/run`` and ``./dev test`` do.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from playwright.async_api import (
    Browser,
    BrowserContext,
    ConsoleMessage,
    Dialog,
    Page,
    async_playwright,
)
from playwright.async_api import Error as PlaywrightError

REPO_ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = Path(os.environ.get("MSSANTE_CHROMIUM", "/usr/bin/chromium"))
# The network is closed (CI reaches only package registries): nothing may
# phone home, and a headless run has no GPU to use.
CHROMIUM_ARGS = (
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-gpu",
    "--disable-quic",
)
AXE_JS = Path(__file__).resolve().parent / "browser" / "node_modules" / "axe-core" / "axe.min.js"
AXE_TAGS = ("wcag2a", "wcag2aa", "wcag21a", "wcag21aa")
SCREENSHOTS = REPO_ROOT / "test-artifacts" / "screenshots"

LAUNCH_TIMEOUT_MS = 30_000
ACTION_TIMEOUT_MS = 10_000
SERVER_START_TIMEOUT = 10.0
SERVER_STOP_TIMEOUT = 10.0

# Only these dialogs are script execution; "beforeunload" is the browser's own.
EXECUTION_DIALOGS = frozenset({"alert", "confirm", "prompt"})
# A payload that runs sets this global (``window.__xss = 1``).  Not the
# title: a page that shows a subject in its <title> would carry the text of
# an escaped, harmless payload there.
XSS_MARKER = "__xss"


# --- the server under test ------------------------------------------------


class _LoopServer(uvicorn.Server):
    """uvicorn sharing the test's loop: readiness is an event, not a poll of
    ``started``, and SIGINT stays pytest's (uvicorn would otherwise swallow
    Ctrl-C until its own shutdown)."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.ready = asyncio.Event()

    async def startup(self, sockets: list[Any] | None = None) -> None:
        await super().startup(sockets)
        self.ready.set()

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@contextlib.asynccontextmanager
async def serve_app(
    app: Any,
    *,
    ssl_certfile: str | os.PathLike[str] | None = None,
    ssl_keyfile: str | os.PathLike[str] | None = None,
) -> AsyncIterator[str]:
    """Serve ``app`` on 127.0.0.1, port 0, in this loop; yield its base URL
    (``http://127.0.0.1:<port>``, ``https://`` with a certificate and key)."""
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=0,
        log_level="warning",
        log_config=None,  # leave the process's logging (and pytest's caplog) alone
        access_log=False,
        timeout_graceful_shutdown=5,
        ssl_certfile=os.fspath(ssl_certfile) if ssl_certfile else None,
        ssl_keyfile=os.fspath(ssl_keyfile) if ssl_keyfile else None,
    )
    server = _LoopServer(config)

    async def serve() -> None:
        try:
            await server.serve()
        except SystemExit as exc:  # uvicorn's start-up failure; it would end the loop
            raise RuntimeError(f"uvicorn failed to start (exit {exc.code})") from exc

    task = asyncio.create_task(serve())
    ready = asyncio.create_task(server.ready.wait())
    try:
        await asyncio.wait(
            {task, ready}, timeout=SERVER_START_TIMEOUT, return_when=asyncio.FIRST_COMPLETED
        )
        if not server.ready.is_set():
            if task.done():
                task.result()  # raises the start-up failure
            raise TimeoutError(f"uvicorn did not start within {SERVER_START_TIMEOUT} s")
        port = server.servers[0].sockets[0].getsockname()[1]
        scheme = "https" if ssl_certfile else "http"
        yield f"{scheme}://127.0.0.1:{port}"
    finally:
        ready.cancel()
        server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await ready
        await asyncio.wait_for(task, SERVER_STOP_TIMEOUT)


# --- the browser ----------------------------------------------------------


def chromium_executable() -> Path:
    """Debian's chromium, or the test fails saying how to get it."""
    if not (CHROMIUM.is_file() and os.access(CHROMIUM, os.X_OK)):
        pytest.fail(
            f"Chromium not found at {CHROMIUM}: install it (Debian: apt-get install chromium; "
            ".ci/run does it) or point MSSANTE_CHROMIUM at a Chromium binary; "
            "the webmail's end-to-end tests need a real browser",
            pytrace=False,
        )
    return CHROMIUM


@contextlib.asynccontextmanager
async def launch() -> AsyncIterator[Browser]:
    """A headless Chromium, closed on exit."""
    executable = chromium_executable()
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=executable,
            headless=True,
            args=list(CHROMIUM_ARGS),
            # Chromium's sandbox refuses to run as root (CI): Playwright then
            # passes --no-sandbox.  Anyone else keeps the sandbox.
            chromium_sandbox=os.geteuid() != 0,
            timeout=LAUNCH_TIMEOUT_MS,
        )
        try:
            yield browser
        finally:
            await browser.close()


@dataclass
class XssWatch:
    """What the pages of one context did that a payload could have caused.

    Attached to the context, so pop-ups and frames are watched too.  Every
    dialog is recorded and dismissed; console messages and uncaught page
    errors are kept for the failure message (a CSP violation report in the
    console is a payload *blocked*, not executed).
    """

    page: Page
    dialogs: list[str] = field(default_factory=list)
    console: list[str] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)

    def attach(self, context: BrowserContext) -> None:
        context.on("dialog", self._on_dialog)
        context.on("console", self._on_console)
        context.on("weberror", lambda error: self.page_errors.append(str(error.error)))

    async def _on_dialog(self, dialog: Dialog) -> None:
        self.dialogs.append(f"{dialog.type}({dialog.message!r})")
        with contextlib.suppress(PlaywrightError):  # the page may be closing
            await dialog.dismiss()

    def _on_console(self, message: ConsoleMessage) -> None:
        self.console.append(f"{message.type}: {message.text}")

    @property
    def execution_dialogs(self) -> list[str]:
        return [d for d in self.dialogs if d.split("(", 1)[0] in EXECUTION_DIALOGS]

    async def marker_set(self) -> bool:
        """Whether a script set ``window.__xss``."""
        return bool(await self.page.evaluate(f"() => window.{XSS_MARKER} !== undefined"))

    async def executed(self) -> bool:
        """Whether any script a payload carried ran in this context."""
        return bool(self.execution_dialogs) or await self.marker_set()

    async def assert_clean(self) -> None:
        """Fail when a payload executed; the message shows what the browser saw."""
        dialogs = self.execution_dialogs
        marker = await self.marker_set()
        if dialogs or marker:
            lines = [f"a payload executed in {self.page.url}:"]
            lines += [f"  dialog {d}" for d in dialogs]
            if marker:
                lines.append(f"  marker window.{XSS_MARKER} set")
            lines += [f"  console {c}" for c in self.console]
            lines += [f"  page error {e}" for e in self.page_errors]
            raise AssertionError("\n".join(lines))


@dataclass
class Tab:
    context: BrowserContext
    page: Page
    xss: XssWatch


@contextlib.asynccontextmanager
async def new_page(
    browser: Browser,
    *,
    base_url: str,
    bypass_csp: bool = False,
    ignore_https_errors: bool = True,
) -> AsyncIterator[Tab]:
    """A fresh context (its own cookies) and page, French locale and Paris
    time, watched by an :class:`XssWatch`; closed on exit.

    Keep ``bypass_csp`` off for the XSS corpus: the page's own CSP is part
    of the defence under test.  :func:`axe` does not need it either.
    ``ignore_https_errors`` accepts the tests' own certificates.
    """
    context = await browser.new_context(
        base_url=base_url,
        bypass_csp=bypass_csp,
        ignore_https_errors=ignore_https_errors,
        locale="fr-FR",
        timezone_id="Europe/Paris",
    )
    try:
        context.set_default_timeout(ACTION_TIMEOUT_MS)
        context.set_default_navigation_timeout(ACTION_TIMEOUT_MS)
        page = await context.new_page()
        watch = XssWatch(page)
        watch.attach(context)
        yield Tab(context, page, watch)
    finally:
        await context.close()


# --- accessibility --------------------------------------------------------


def axe_source() -> str:
    """axe-core's script, or the test fails saying how to install it."""
    if not AXE_JS.is_file():
        pytest.fail(
            f"axe-core not found at {AXE_JS}: run `npm ci --prefix tests/browser` "
            "(./dev test does it; Debian: apt-get install nodejs npm)",
            pytrace=False,
        )
    return AXE_JS.read_text(encoding="utf-8")


async def axe(page: Page, *, tags: Sequence[str] = AXE_TAGS) -> list[dict[str, Any]]:
    """axe-core's violations on ``page`` for the given rule tags (WCAG 2.1 A/AA).

    The script goes in through DevTools evaluation, which the page's CSP does
    not govern: the page is audited as its users get it, CSP included (a
    ``<script>`` tag would be blocked, and ``bypass_csp`` would apply styles
    the CSP blocks for real users).
    """
    if not await page.evaluate("() => typeof window.axe === 'object'"):
        await page.evaluate(axe_source() + "\n;undefined")
    result = await page.evaluate(
        """tags => axe.run(document, {
            runOnly: {type: 'tag', values: tags},
            resultTypes: ['violations'],
        })""",
        list(tags),
    )
    violations: list[dict[str, Any]] = result["violations"]
    return violations


def serious_or_critical(violations: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [v for v in violations if v.get("impact") in ("serious", "critical")]


def format_violations(violations: list[dict[str, Any]], *, nodes: int = 3) -> str:
    """One line per rule: id, impact, help, and the first nodes' targets."""
    lines = []
    for v in violations:
        targets = [" ".join(map(str, n.get("target", []))) for n in v.get("nodes", [])]
        shown = ", ".join(targets[:nodes])
        more = f" (+{len(targets) - nodes} more)" if len(targets) > nodes else ""
        lines.append(f"{v['id']} ({v.get('impact')}): {v.get('help')} -- {shown}{more}")
    return "\n".join(lines)


# --- artefacts ------------------------------------------------------------


async def screenshot(page: Page, name: str) -> Path:
    """A full-page PNG at ``test-artifacts/screenshots/<name>.png``."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise ValueError(f"screenshot name {name!r}: letters, digits, '_', '.', '-' only")
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    await page.screenshot(path=path, full_page=True)
    return path
