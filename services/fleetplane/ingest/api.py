"""Ingest HTTP API (FastAPI): POST /v1/tasks takes a manifest (JSON) and publishes TaskSubmitted.

Invalid input gets HTTP 422 naming each field at fault; the event is acknowledged by the broker
before the API answers 202."""

from __future__ import annotations

import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from fleetplane.core.errors import Retriable
from fleetplane.core.events import TaskSubmitted
from fleetplane.core.kafka import EventProducer
from fleetplane.ingest.manifest import TaskManifest


class SubmitResponse(BaseModel):
    task_id: str
    team: str
    name: str
    state: str = "submitted"


def _field(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc if p not in ("body",)]
    return ".".join(parts) or "body"


def create_app(producer: EventProducer) -> FastAPI:
    app = FastAPI(title="fleetplane ingest", version="1")

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{"field": _field(tuple(e.get("loc", ()))), "reason": e.get("msg", "invalid")}
                  for e in exc.errors()]
        return JSONResponse(status_code=422, content={"error": "invalid task manifest",
                                                      "errors": errors})

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/v1/tasks", status_code=202, response_model=SubmitResponse)
    def submit(manifest: TaskManifest) -> Any:
        task_id = uuid.uuid4().hex
        event = TaskSubmitted(task_id=task_id, team=manifest.metadata.team,
                              spec=manifest.to_spec(), source="http",
                              idempotency_key=manifest.idempotency_key)
        try:
            producer.send([event], timeout_s=10)
        except Retriable as exc:
            return JSONResponse(status_code=503, content={"error": f"broker unavailable: {exc}"},
                                headers={"Retry-After": "1"})
        return SubmitResponse(task_id=task_id, team=event.team, name=event.spec.name)

    return app
