"""The ingest API served by uvicorn as ingest.main serves it, on the real test broker: the
address the failed-token limiter counts is the TCP peer's, so a local client cannot dodge it
by sending a new X-Forwarded-For with every guess (uvicorn trusts that header from 127.0.0.1
by default); with FLEETPLANE_TRUSTED_PROXIES naming the proxy, the forwarded address counts."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import httpx
import pytest

from fleetplane.core.kafka import EventProducer
from fleetplane.core.service import serve_http_in_thread
from fleetplane.core.settings import Settings
from fleetplane.core.teams import parse_teams
from fleetplane.infra.broker import free_port
from fleetplane.ingest.api import Intake, create_app
from fleetplane.ingest.idempotency import Marks
from fleetplane.ingest.taskview import TaskView
from fleetplane.ingest.tokens import TokenStore

pytestmark = pytest.mark.reliability


@pytest.fixture(params=["", "127.0.0.1"], ids=["no-proxy", "trusted-proxy"])
def ingest(request: pytest.FixtureRequest, base_settings: Settings
           ) -> Iterator[tuple[str, bool]]:
    producer = EventProducer(base_settings)
    intake = Intake(producer=producer, tokens=TokenStore(), marks=Marks(3600),
                    teams=parse_teams({}), view=TaskView("http://127.0.0.1:9", timeout_s=1),
                    auth_failures_per_minute=6, auth_failure_burst=5)
    port = free_port()
    server = serve_http_in_thread(create_app(intake), "127.0.0.1", port,
                                  trusted_proxies=request.param)
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", bool(request.param)
    finally:
        server.should_exit = True
        producer.close()


def test_forwarded_addresses_count_only_from_trusted_proxies(ingest: tuple[str, bool]) -> None:
    url, trusted = ingest
    codes = []
    with httpx.Client(base_url=url, timeout=10) as http:
        for i in range(8):
            guess = f"fpt_{uuid.uuid4().hex[:12]}_{uuid.uuid4().hex}"
            r = http.get("/v1/whoami", headers={"Authorization": f"Bearer {guess}",
                                                "X-Forwarded-For": f"203.0.113.{i}"})
            codes.append(r.status_code)
    if trusted:
        assert codes == [401] * 8  # each guess from another (forwarded) client address
    else:
        assert codes[:5] == [401] * 5 and codes[5:] == [429] * 3, codes
