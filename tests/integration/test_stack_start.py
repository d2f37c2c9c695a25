"""A stack start that fails leaves nothing behind (issue 19, "clean stop, clean start"): the
chaos run's failed start (a port taken between choosing and binding it) left its broker
running, holding the data directory and its port."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from fleetplane.cli.stack import Stack


def test_a_failed_start_stops_the_broker_and_services_it_started(tmp_path: Path) -> None:
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    taken = holder.getsockname()[1]
    stack = Stack(data_dir=tmp_path / "stack", services=("reconciler",), fake_provider=False,
                  coordinator_standby=False, reconciler_port=taken)
    try:
        with pytest.raises(RuntimeError, match="reconciler exited during start-up"):
            stack.start(timeout_s=60)
        assert stack.broker is not None and not stack.broker.alive()
        assert all(c.proc is None or c.proc.poll() is not None for c in stack.children.values())
    finally:
        holder.close()
        stack.stop()
