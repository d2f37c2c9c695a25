"""Run the fake provider: in a background thread (tests) or as a console script (demo)."""

from __future__ import annotations

import argparse
import json
import os
import socket
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

import uvicorn
from fastapi import FastAPI

from .app import create_app
from .script import CallRecord, Script, ScriptRunner

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765
ENV_PREFIX = "FLEETPLANE_FAKE_"


def _as_script(script: Script | Mapping[str, Any] | None, **changes: Any) -> Script:
    """Validate ``script`` (a Script, its JSON-able dict, or None) with top-level ``changes``."""
    if isinstance(script, Script):
        if not changes:
            return script
        script = script.model_dump()
    return Script.model_validate({**(script or {}), **changes})


def _config(app: FastAPI, host: str, port: int, log_level: str) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        access_log=False,
        lifespan="off",
        timeout_graceful_shutdown=1,
    )


class _Server(uvicorn.Server):
    """uvicorn server that cuts pending fake latency/stalls short on SIGINT/SIGTERM."""

    def __init__(self, config: uvicorn.Config, runner: ScriptRunner) -> None:
        super().__init__(config)
        self._runner = runner

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self._runner.closing = True
        super().handle_exit(sig, frame)


class FakeProvider:
    """A fake Anthropic/OpenAI-compatible model provider served from a background thread.

    ``script`` is a :class:`Script` or its JSON dict; keyword ``knobs`` override its
    top-level fields, e.g. ``FakeProvider(latency_ms=5, failure_rate=0.1)``. Usage::

        with FakeProvider({"replies": [{"text": "hi"}]}) as fake:
            client = anthropic.Anthropic(base_url=fake.base_url, api_key="test")
            ...
            assert fake.calls[0].api == "anthropic"
    """

    def __init__(
        self,
        script: Script | Mapping[str, Any] | None = None,
        *,
        host: str = DEFAULT_HOST,
        port: int = 0,
        startup_timeout_s: float = 10.0,
        **knobs: Any,
    ) -> None:
        self.runner = ScriptRunner(_as_script(script, **knobs))
        self.app = create_app(runner=self.runner)
        self._host = host
        self._requested_port = port
        self._startup_timeout_s = startup_timeout_s
        self._port: int | None = None
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None

    # ------------------------------------------------------------ lifecycle

    def start(self) -> FakeProvider:
        if self._thread is not None:
            raise RuntimeError("FakeProvider already started")
        # proto=IPPROTO_TCP matters: asyncio only sets TCP_NODELAY on accepted sockets whose
        # proto says TCP, and without it every response waits out a delayed ACK (~40 ms).
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self._host, self._requested_port))
        sock.listen(1024)
        self._socket = sock
        self._port = int(sock.getsockname()[1])
        server = uvicorn.Server(_config(self.app, self._host, self._port, "warning"))
        self._server = server
        self._thread = threading.Thread(
            target=server.run,
            kwargs={"sockets": [sock]},
            name=f"fleetplane-fake-provider-{self._port}",
            daemon=True,
        )
        self.runner.closing = False
        self._thread.start()
        deadline = time.monotonic() + self._startup_timeout_s
        while not server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("fake provider failed to start")
            time.sleep(0.002)
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        """Shut down; in-flight latency/stall sleeps are cut short rather than awaited."""
        server, thread, sock = self._server, self._thread, self._socket
        self.runner.closing = True
        if server is not None:
            server.should_exit = True
        if thread is not None:
            thread.join(timeout_s)
            if thread.is_alive() and server is not None:
                server.force_exit = True
                thread.join(timeout_s)
        if sock is not None:
            sock.close()
        self._server = self._thread = self._socket = None

    def __enter__(self) -> FakeProvider:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # ------------------------------------------------------------ addresses

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("FakeProvider is not started")
        return self._port

    @property
    def base_url(self) -> str:
        """Root URL; use as the Anthropic SDK ``base_url``."""
        return f"http://{self._host}:{self.port}"

    @property
    def openai_base_url(self) -> str:
        """``base_url`` + ``/v1``; use as the OpenAI SDK ``base_url`` / litellm ``api_base``."""
        return f"{self.base_url}/v1"

    # ------------------------------------------------------------ scripting

    @property
    def script(self) -> Script:
        return self.runner.script

    @property
    def calls(self) -> list[CallRecord]:
        """Snapshot of recorded requests, oldest first."""
        return self.runner.calls()

    def set_script(self, script: Script | Mapping[str, Any] | None = None) -> None:
        """Replace the whole script (``None``: defaults); queued replies restart."""
        self.runner.set_script(_as_script(script))

    def update_script(self, **changes: Any) -> None:
        """Change some top-level script fields, e.g. ``update_script(latency_ms=20)``."""
        self.runner.set_script(_as_script(self.runner.script, **changes))

    def reset(self) -> None:
        """Clear calls and prompt-cache memory; replay the current script from the start."""
        self.runner.reset()


# ---------------------------------------------------------------- console script


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(ENV_PREFIX + name, default)


def _load_script(source: str | None) -> Script:
    if not source:
        return Script()
    text = source if source.lstrip().startswith("{") else Path(source).read_text()
    return Script.model_validate(json.loads(text))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fleetplane-fake-provider",
        description="Fake Anthropic/OpenAI-compatible model provider for tests and demos. "
        f"Every option can also be set with an environment variable {ENV_PREFIX}<OPTION>.",
    )
    parser.add_argument("--host", default=_env("HOST", DEFAULT_HOST))
    parser.add_argument("--port", type=int, default=_env("PORT", str(DEFAULT_PORT)))
    parser.add_argument(
        "--script", default=_env("SCRIPT"), help="script JSON, inline or as a file path"
    )
    parser.add_argument("--latency-ms", type=float, default=_env("LATENCY_MS"))
    parser.add_argument("--failure-rate", type=float, default=_env("FAILURE_RATE"))
    parser.add_argument("--stall-rate", type=float, default=_env("STALL_RATE"))
    parser.add_argument("--stall-ms", type=float, default=_env("STALL_MS"))
    parser.add_argument("--seed", type=int, default=_env("SEED"))
    parser.add_argument("--log-level", default=_env("LOG_LEVEL", "warning"))
    return parser


@dataclass(frozen=True)
class ServeConfig:
    """Resolved console-script settings (CLI options over FLEETPLANE_FAKE_* over defaults)."""

    host: str
    port: int
    log_level: str
    script: Script


def parse_config(argv: Sequence[str] | None = None) -> ServeConfig:
    """Parse CLI options (``argv``; ``None``: ``sys.argv``) with env-var fallbacks."""
    args = _parser().parse_args(argv)
    knobs = ("latency_ms", "failure_rate", "stall_rate", "stall_ms", "seed")
    overrides = {k: getattr(args, k) for k in knobs if getattr(args, k) is not None}
    script = _as_script(_load_script(args.script), **overrides)
    return ServeConfig(host=args.host, port=args.port, log_level=args.log_level, script=script)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``fleetplane-fake-provider``; serves until interrupted."""
    config = parse_config(argv)
    runner = ScriptRunner(config.script)
    app = create_app(runner=runner)
    print(f"fleetplane fake provider listening on http://{config.host}:{config.port}", flush=True)
    _Server(_config(app, config.host, config.port, config.log_level), runner).run()


if __name__ == "__main__":
    main()
