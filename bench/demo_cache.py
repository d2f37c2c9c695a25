"""The demo workload on a stack of its own, for the response cache's figures.

    python -m bench.demo_cache [--per-team 4]

Starts the embedded stack (broker, fake provider, five services) on free ports in a temporary
directory, runs `fleetplane demo`'s workload (a first wave, then the same prompts again), prints
the demo's tables and its cache line (hit rate, model cost saved), and stops the stack.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from rich.console import Console

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

from fleetplane.cli.demo import run_demo
from fleetplane.cli.stack import Stack


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--per-team", type=int, default=4)
    p.add_argument("--timeout", type=float, default=300.0)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="fleetplane-demo-") as tmp:
        stack = Stack(data_dir=Path(tmp))
        try:
            stack.start()
            code = run_demo(stack.ingest_url, stack.accounting_url, args.per_team,
                            args.timeout, Console(width=140), token=stack.admin_token)
            print(f"demo exit code {code}")
        finally:
            stack.stop()


if __name__ == "__main__":
    main()
