"""The active coordinator's HTTP pages on FLEETPLANE_COORDINATOR_WEB_PORT (health, stats, held
tasks, the fleet; the CLI reads them) and the views of the world they show."""

from __future__ import annotations

import threading
from http.server import ThreadingHTTPServer
from typing import Any

from fleetplane.coordinator.world import World
from fleetplane.core.logging import get_logger
from fleetplane.core.status_pages import Page, handler_for

log = get_logger(__name__)


def held_tasks(world: World) -> list[dict[str, Any]]:
    """The held tasks, with why and since when."""
    return [{"task_id": s.task_id, "team": s.team, "kind": s.hold_kind or "queued",
             "reason": s.hold_reason, "held_by": s.held_by, "paths": s.held_paths,
             "since": (s.held_since or s.updated_at).isoformat(),
             "repository": s.repository, "attempt": s.next_attempt,
             "priority": s.spec.priority if s.spec else None}
            for s in world.held()]


def fleet_view(world: World, max_running: int) -> dict[str, Any]:
    """Running attempts per team, the fleet's switches, spend and rows."""
    running: dict[str, int] = {}
    for s in world.active.values():
        running[s.team] = running.get(s.team, 0) + 1
    fleet = world.fleet
    return {"ready": True, "kill_switch": fleet.kill_switch,
            "kill_switch_reason": fleet.kill_switch_reason, "paused": fleet.paused,
            "running": running, "active": len(world.active),
            "waiting": len(world.waiting),
            "task_rows": len(world.tasks), "finished_rows": world.terminal,
            "max_running": max_running,
            "spend": {k: v.model_dump() for k, v in fleet.spend.items()},
            "budget_exhausted": fleet.budget_exhausted}


class WebPages:
    """`pages` (path -> status and JSON body) served from a thread; the port is bound when
    the role is taken and retried while busy (the previous active, if it still holds the
    port, is on its way out) until `stopping` is set."""

    def __init__(self, host: str, port: int, pages: dict[str, Page],
                 stopping: threading.Event) -> None:
        self.host, self.port, self.pages, self.stopping = host, port, pages, stopping
        self.server: ThreadingHTTPServer | None = None

    def start(self) -> None:
        threading.Thread(target=self._bind, name="web", daemon=True).start()

    def shutdown(self) -> None:
        if self.server is not None:
            self.server.shutdown()

    def _bind(self) -> None:
        handler = handler_for(self.pages)
        while not self.stopping.is_set():
            try:
                server = ThreadingHTTPServer((self.host, self.port), handler)
            except OSError as exc:
                log.warning("web port busy, retrying", error=str(exc))
                self.stopping.wait(0.5)
                continue
            server.daemon_threads = True
            self.server = server
            server.serve_forever(poll_interval=0.2)
            return
