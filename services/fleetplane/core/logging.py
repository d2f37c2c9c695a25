"""Structured logs (structlog). Every line carries task_id: the loop binds it per record through
contextvars, and lines outside a task say task_id=null."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator, MutableMapping
from contextlib import contextmanager
from typing import Any

import structlog


def _ensure_task_id(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> Any:
    event_dict.setdefault("task_id", None)
    return event_dict


def configure_logging(service: str, level: str = "INFO", json: bool = True) -> None:
    lvl = logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
    logging.basicConfig(stream=sys.stderr, level=max(lvl, logging.WARNING), format="%(message)s")
    renderer: Any = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _ensure_task_id,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    structlog.contextvars.bind_contextvars(service=service)


def get_logger(name: str | None = None) -> Any:
    return structlog.get_logger(name)


@contextmanager
def task_context(task_id: str | None, **extra: Any) -> Iterator[None]:
    """Bind task_id (and more) to every log line inside the block."""
    tokens = structlog.contextvars.bind_contextvars(task_id=task_id, **extra)
    try:
        yield
    finally:
        structlog.contextvars.reset_contextvars(**tokens)
