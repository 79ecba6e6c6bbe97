"""The browser harness (tests/browser.py) can fail: each check is shown to
catch what it is for, on tiny pages served here, before the webmail's
end-to-end tests (issue 8) trust it to pass."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from playwright.async_api import Browser
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route

from tests.browser import (
    SCREENSHOTS,
    axe,
    axe_source,
    format_violations,
    launch,
    new_page,
    screenshot,
    serious_or_critical,
    serve_app,
)
from tests.pki import Pki

STRICT_CSP = "default-src 'self'; script-src 'none'; object-src 'none'; base-uri 'none'"


def document(body: str, *, title: str = "Page de test") -> str:
    return (
        '<!doctype html><html lang="fr"><head><meta charset="utf-8">'
        f"<title>{title}</title></head><body>{body}</body></html>"
    )


# Each payload runs when nothing stops it: a dialog, or the marker global.
PAYLOADS = {
    "script-alert": document("<main><script>alert(1)</script></main>"),
    "onerror-alert": document('<main><img src="/absent.png" alt="" onerror="alert(2)"></main>'),
    "marker": document("<main><script>window.__xss = 1</script></main>"),
}
PAGES = {
    **PAYLOADS,
    "inaccessible": document('<main><img src="/absent.png"><input type="text" name="q"></main>'),
    "accessible": document(
        "<main><h1>Connexion à votre messagerie</h1>"
        '<form method="post"><label for="email">Adresse électronique</label>'
        '<input id="email" name="email" type="email" autocomplete="email">'
        '<button type="submit">Se connecter</button></form></main>',
        title="Connexion — Messagerie patient",
    ),
}


async def page(request: Request) -> Response:
    body = PAGES.get(request.path_params["name"])
    if body is None:
        return Response(status_code=404)
    headers = {"Content-Security-Policy": STRICT_CSP} if "csp" in request.query_params else {}
    return HTMLResponse(body, headers=headers)


APP = Starlette(routes=[Route("/{name}", page)])


@pytest.fixture
async def site() -> AsyncIterator[str]:
    async with serve_app(APP) as base_url:
        yield base_url


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with launch() as chromium:
        yield chromium


async def test_xss_watch_tells_executed_from_blocked(site: str, browser: Browser) -> None:
    for name in PAYLOADS:
        async with new_page(browser, base_url=site) as tab:
            await tab.page.goto(f"/{name}")
            assert await tab.xss.executed(), name
            with pytest.raises(AssertionError, match="a payload executed"):
                await tab.xss.assert_clean()
        async with new_page(browser, base_url=site) as tab:
            await tab.page.goto(f"/{name}?csp")
            await tab.xss.assert_clean()
            assert not await tab.xss.executed()
            # The payload reached the browser and was refused, not lost on the way;
            # the CSP report in the console does not fail the check.
            assert any("Content Security Policy" in line for line in tab.xss.console), (
                name,
                tab.xss.console,
            )


async def test_axe_tells_violations_from_a_well_formed_page(site: str, browser: Browser) -> None:
    async with new_page(browser, base_url=site) as tab:
        await tab.page.goto("/inaccessible")
        found = serious_or_critical(await axe(tab.page))
        assert {"image-alt", "label"} <= {v["id"] for v in found}, format_violations(found)
        message = format_violations(found)
        assert "image-alt (critical)" in message and "img" in message

        await tab.page.goto("/accessible?csp")  # axe gets in although scripts are refused
        found = serious_or_critical(await axe(tab.page))
        assert found == [], format_violations(found)
        await tab.xss.assert_clean()


async def test_screenshot_is_a_full_page_png(site: str, browser: Browser) -> None:
    async with new_page(browser, base_url=site) as tab:
        await tab.page.goto("/accessible")
        path = await screenshot(tab.page, "harness-accessible")
    assert path == SCREENSHOTS / "harness-accessible.png"
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width > 0 and height > 0


async def test_https_with_the_tests_own_certificate(tmp_path: Path, browser: Browser) -> None:
    cert = Pki(tmp_path / "pki").issue("web", "CN=127.0.0.1", server=True)
    async with serve_app(APP, ssl_certfile=cert.cert_path, ssl_keyfile=cert.key_path) as base_url:
        assert base_url.startswith("https://127.0.0.1:")
        async with new_page(browser, base_url=base_url) as tab:
            response = await tab.page.goto("/accessible")
            assert response is not None and response.ok
            assert await tab.page.evaluate("() => window.isSecureContext")


async def test_missing_chromium_fails_with_how_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("tests.browser.CHROMIUM", tmp_path / "chromium")
    with pytest.raises(pytest.fail.Exception, match="apt-get install chromium"):
        async with launch():
            pass


def test_missing_axe_fails_with_how_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("tests.browser.AXE_JS", tmp_path / "axe.min.js")
    with pytest.raises(pytest.fail.Exception, match="npm ci --prefix tests/browser"):
        axe_source()
