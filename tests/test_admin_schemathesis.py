"""Property-based tests of the admin API from the OpenAPI description it serves.

schemathesis reads ``/openapi.json`` from the live server (real TLS, the
insurer's client certificate and token), generates requests for every
operation, valid ones and invalid ones, and checks each answer: never a
5xx, a documented status, content type and headers, a body that matches
the documented schema, and invalid data refused with a 4xx.

schemathesis speaks ``requests`` (blocking), so the server runs on an event
loop of its own in a thread: the real gateway and admin server of
tests/admin.py, on SQLite (the API's code is the same on PostgreSQL, which
tests/test_admin_api.py covers).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode, checks

from mssante.app import Gateway
from mssante.cli import seed_demo
from tests.admin import AdminApi, running_admin
from tests.conftest import FakeClock, make_settings

CHECKS = [
    checks.not_a_server_error,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_headers_conformance,
    checks.response_schema_conformance,
    checks.negative_data_rejection,
]
CONFIG = schemathesis.Config()
# Bounded so that the file runs in well under a minute on two cores.
MAX_EXAMPLES = 40
BULK = "/v1/patients/bulk"
OPERATIONS = [
    ("GET", "/v1/patients/{ins}"),
    ("PUT", "/v1/patients/{ins}"),
    ("PATCH", "/v1/patients/{ins}"),
    ("POST", BULK),
    ("GET", "/v1/queues"),
]


def one_result_per_item(ctx: Any, response: Any, case: schemathesis.Case) -> None:
    if response.status_code == 200:
        results = response.json()["results"]
        assert [r["index"] for r in results] == list(range(len(case.body["items"])))
        assert all(r["status"] != 500 for r in results)


@dataclass
class LiveAdmin:
    url: str
    session: requests.Session


@contextlib.contextmanager
def _serving(directory: Path) -> Iterator[AdminApi]:
    """The gateway and its admin API on a loop of their own, in a thread."""
    started = threading.Event()
    found: dict[str, Any] = {}

    async def serve() -> None:
        gateway = Gateway(make_settings(directory / "data"), clock=FakeClock())
        await gateway.start()
        try:
            await seed_demo(gateway.store)
            async with running_admin(gateway, directory) as admin:
                stop = asyncio.Event()
                found.update(admin=admin, loop=asyncio.get_running_loop(), stop=stop)
                started.set()
                await stop.wait()
        finally:
            await gateway.stop()

    def run() -> None:
        try:
            asyncio.run(serve())
        except BaseException as exc:
            found["error"] = exc
        finally:
            started.set()  # also when it could not start: the fixture says why

    thread = threading.Thread(target=run, name="admin-api", daemon=True)
    thread.start()
    started.wait()
    if "admin" not in found:
        thread.join()
        raise RuntimeError("the admin API did not start") from found.get("error")
    try:
        yield found["admin"]
    finally:
        found["loop"].call_soon_threadsafe(found["stop"].set)
        thread.join()
    if "error" in found:
        raise found["error"]


@pytest.fixture(scope="module")
def live_admin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveAdmin]:
    with _serving(tmp_path_factory.mktemp("admin")) as admin, requests.Session() as session:
        session.cert = (str(admin.insurer.cert_path), str(admin.insurer.key_path))
        session.verify = str(admin.pki.anchors())
        session.headers["Authorization"] = f"Bearer {admin.token}"
        yield LiveAdmin(admin.url, session)


@pytest.fixture(scope="module")
def admin_schema(live_admin: LiveAdmin) -> schemathesis.BaseSchema:
    session = live_admin.session
    return schemathesis.openapi.from_url(
        f"{live_admin.url}/openapi.json",
        config=CONFIG,
        headers=dict(session.headers),
        cert=session.cert,
        verify=session.verify,
    )


def test_every_operation_is_tested(admin_schema: schemathesis.BaseSchema) -> None:
    found = {(op.ok().method.upper(), op.ok().path) for op in admin_schema.get_all_operations()}
    assert found == set(OPERATIONS)


# schemathesis.pytest.from_fixture would generate these, but it relies on a pytest
# private attribute gone in pytest 9 (Function._nodeid): listed here, checked above.
@pytest.mark.parametrize(("method", "path"), OPERATIONS)
def test_the_admin_api_keeps_to_its_description(
    admin_schema: schemathesis.BaseSchema, live_admin: LiveAdmin, method: str, path: str
) -> None:
    operation = admin_schema[path][method]
    cases = st.one_of(
        operation.as_strategy(GenerationMode.POSITIVE),
        operation.as_strategy(GenerationMode.NEGATIVE),
    )

    # A bulk answers 200 with one result per item, invalid items included (a bad
    # item does not lose the others): its items' invalid data is refused item by
    # item, which the check of the whole request would call accepted.
    chosen = CHECKS if path != BULK else [*CHECKS[:-1], one_result_per_item]

    @given(case=cases)
    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )
    def check(case: schemathesis.Case) -> None:
        # schemathesis passes its own TLS settings to each request: the session's
        # certificate and anchors are given again.
        session = live_admin.session
        case.call_and_validate(
            session=session, checks=chosen, verify=session.verify, cert=session.cert
        )

    check()
