"""The supervisor `fleetplane up` leaves running: it owns the embedded stack, restarts services
that die, and tears everything down on SIGTERM (`fleetplane down`)."""

from __future__ import annotations

import argparse
import json
import os
import signal
import time
from pathlib import Path
from types import FrameType

from prometheus_client import CollectorRegistry

from fleetplane.cli.stack import Stack
from fleetplane.core.localstack import STATE_FILE, write_state
from fleetplane.core.logging import configure_logging, get_logger
from fleetplane.metrics.registry import serve
from fleetplane.metrics.supervisor import Restarts


def main() -> None:
    parser = argparse.ArgumentParser(prog="fleetplane-supervisor")
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--broker-port", type=int, default=0)
    parser.add_argument("--external-bootstrap", default=None)
    parser.add_argument("--ingest-port", type=int, default=0)
    parser.add_argument("--accounting-port", type=int, default=0)
    parser.add_argument("--provider-port", type=int, default=0)
    parser.add_argument("--no-fake-provider", action="store_true")
    parser.add_argument("--metrics-port", type=int, default=0,
                        help="the supervisor's /metrics (restarts per service); 0: none")
    parser.add_argument("--metrics-ports", default="{}",
                        help="JSON: process name -> metrics port (others get free ports)")
    args = parser.parse_args()
    configure_logging("supervisor", json=True)
    log = get_logger(__name__)
    stack = Stack(data_dir=args.data_dir, external_bootstrap=args.external_bootstrap,
                  fake_provider=not args.no_fake_provider, broker_port=args.broker_port,
                  ingest_port=args.ingest_port, accounting_port=args.accounting_port,
                  provider_port=args.provider_port,
                  metrics_ports={k: int(v) for k, v in json.loads(args.metrics_ports).items()})
    registry = CollectorRegistry()
    registry.register(Restarts(stack.describe, lambda name: (
        stack.broker.alive() if name == "broker" and stack.broker is not None
        else name in stack.children and stack.children[name].alive())))
    metrics_url = (f"http://127.0.0.1:{args.metrics_port}/metrics"
                   if serve("127.0.0.1", args.metrics_port, registry) is not None else None)
    state_file = stack.data_dir / STATE_FILE
    stopping = False

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    write_state(state_file, {"supervisor_pid": os.getpid(), "state": "starting"})
    try:
        stack.start()
        write_state(state_file, {"supervisor_pid": os.getpid(), "state": "ready",
                                 **stack.describe(),
                                 "supervisor_metrics_url": metrics_url})
        log.info("stack ready", **{k: v for k, v in stack.describe().items() if k != "services"})
        while not stopping:
            restarted = stack.supervise_once()
            if restarted:
                log.warning("restarted services", services=restarted)
                write_state(state_file, {"supervisor_pid": os.getpid(), "state": "ready",
                                         **stack.describe(),
                                 "supervisor_metrics_url": metrics_url})
            time.sleep(0.5)
    except Exception as exc:
        log.exception("stack failed")
        write_state(state_file, {"supervisor_pid": os.getpid(), "state": "failed",
                                 "error": str(exc)})
        raise
    finally:
        stack.stop()
        if state_file.exists() and json.loads(state_file.read_text()).get("state") != "failed":
            state_file.unlink(missing_ok=True)
        log.info("stack stopped")


if __name__ == "__main__":
    main()
