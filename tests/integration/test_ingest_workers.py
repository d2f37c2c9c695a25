"""Two ingest workers on one port (FLEETPLANE_INGEST_WORKERS=2): both serve, the submissions of
both are accepted once, an idempotency key replayed on either gets the same task, and stopping
the first stops the other (fleetplane.ingest.workers)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

import httpx
import psutil

from fleetplane.core import events as ev
from fleetplane.core.settings import REPO_ROOT, Settings
from fleetplane.core.topics import ACCEPTED
from fleetplane.infra.broker import free_port
from fleetplane.ingest.tokens import issue
from tests.e2e.conftest import manifest, read_topic


def listeners(port: int) -> set[int]:
    """Pids with a listening socket on `port`."""
    return {c.pid for c in psutil.net_connections("tcp")
            if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port and c.pid}


def served_by(port: int, client_port: int) -> int | None:
    """The pid holding the server side of the connection from `client_port`."""
    for c in psutil.net_connections("tcp"):
        if c.laddr and c.laddr.port == port and c.raddr and c.raddr.port == client_port:
            return int(c.pid) if c.pid is not None else None
    return None


def post(url: str, headers: dict[str, str], body: dict[str, object],
         port: int) -> tuple[httpx.Response, int | None]:
    """POST on a connection of its own; the response and the worker (pid) that answered."""
    with httpx.Client(timeout=30) as client:
        r = client.post(f"{url}/v1/tasks", headers=headers, json=body)
        stream = r.extensions["network_stream"]
        return r, served_by(port, stream.get_extra_info("client_addr")[1])


def test_two_workers_share_the_port_accept_each_task_once_and_stop_together(
        base_settings: Settings, tmp_path: Path, unique: str) -> None:
    team = f"workers-{unique}"
    token, _ = issue(base_settings, team)
    port = free_port()
    teams = tmp_path / "teams.yaml"
    teams.write_text("defaults: {rate_limit: {per_second: 1000000, burst: 1000000}}\n")
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT / "services"),
           "FLEETPLANE_KAFKA_BOOTSTRAP": base_settings.kafka_bootstrap,
           "FLEETPLANE_DATA_DIR": str(tmp_path), "FLEETPLANE_INGEST_PORT": str(port),
           "FLEETPLANE_INGEST_WORKERS": "2", "FLEETPLANE_INSTANCE_ID": f"ingest-{unique}",
           "FLEETPLANE_TEAMS_FILE": str(teams), "FLEETPLANE_ACCOUNTING_URL": "http://127.0.0.1:9"}
    log = open(tmp_path / "ingest.log", "wb")  # noqa: SIM115
    first = subprocess.Popen([sys.executable, "-m", "fleetplane.ingest.main"], env=env,
                             stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    log.close()
    url = f"http://127.0.0.1:{port}"
    headers = {"Authorization": f"Bearer {token}"}
    try:
        deadline = time.monotonic() + 120
        pids: set[int] = set()
        while time.monotonic() < deadline:
            assert first.poll() is None, (tmp_path / "ingest.log").read_text()[-3000:]
            pids = listeners(port)
            if len(pids) == 2:
                try:  # and both know the token (each reads fleet.tokens itself)
                    ok = [httpx.get(f"{url}/v1/whoami", headers=headers, timeout=5).status_code
                          for _ in range(8)]
                    if ok == [200] * 8:
                        break
                except httpx.HTTPError:
                    pass
            time.sleep(0.3)
        assert len(pids) == 2 and first.pid in pids, pids

        run = uuid.uuid4().hex[:8]
        ids = set()
        workers: Counter[int | None] = Counter()
        for i in range(30):  # a new connection each: the kernel spreads them over the workers
            r, pid = post(url, headers, manifest(team, f"w{i}", f"workers {run} {i}"), port)
            assert r.status_code == 202, r.text
            ids.add(r.json()["task_id"])
            workers[pid] += 1
        keyed = {**manifest(team, "once", f"once {run}"), "idempotencyKey": f"once-{run}"}
        answers = [post(url, headers, keyed, port) for _ in range(12)]
        assert all(a.status_code in (200, 202) for a, _ in answers), [a.text for a, _ in answers]
        keyed_ids = {a.json()["task_id"] for a, _ in answers}
        assert len(keyed_ids) == 1, keyed_ids  # the same task, whichever worker answered
        ids |= keyed_ids
        workers.update(pid for _, pid in answers)
        assert set(workers) == pids, workers  # both served (and nothing else did)

        accepted: Counter[str] = Counter()
        deadline = time.monotonic() + 90
        while set(accepted) != ids and time.monotonic() < deadline:
            accepted = Counter(e.task_id for e in read_topic(base_settings, ACCEPTED, ids,
                                                             idle_s=2)
                               if isinstance(e, ev.TaskAccepted))
        assert accepted == {t: 1 for t in ids}, accepted

        other = psutil.Process((pids - {first.pid}).pop())
        first.send_signal(signal.SIGTERM)
        first.wait(60)
        _, alive = psutil.wait_procs([other], timeout=30)
        assert not alive, "the second worker outlived the first"
    finally:
        if first.poll() is None:
            first.kill()
