"""fleetplane-executor: composition root."""

from __future__ import annotations

import os
import socket
from functools import partial

from fleetplane.core.catalog import load_catalog
from fleetplane.core.follower import Follower, apply_json
from fleetplane.core.logging import get_logger
from fleetplane.core.loop import Record
from fleetplane.core.parallel import ParallelProcessor
from fleetplane.core.service import bootstrap, freeze_startup_heap
from fleetplane.core.topics import DISPATCH, OUTCOMES
from fleetplane.executor.chains import UnreportedChains
from fleetplane.executor.handlers import SeenDispatches, Starter, execute
from fleetplane.executor.leases import LeaseTable
from fleetplane.executor.models import ModelClients
from fleetplane.executor.position import position_new_group
from fleetplane.executor.runtime import Journal, LiveEmitter, Runtime
from fleetplane.executor.workspace import Workspaces, load_repositories
from fleetplane.ingest.repositories import (
    REPOSITORIES_TOPIC,
    CheckoutResolver,
    RepositoryRegistry,
)
from fleetplane.metrics.executor import Calls, Slots
from fleetplane.metrics.setup import instrument

log = get_logger(__name__)

#: the followers (cancellations, the fleet's leases and outcomes) read in rounds this far apart:
#: a cancel waits at most this long more, and the fetch loop does not spin (core/follower.py)
FOLLOWER_PACE_S = 0.1


def main() -> None:
    settings = bootstrap("executor")
    obs = instrument(settings, "executor")  # metrics and traces (docs/operations.md)
    obs.on_publish(Calls(obs.registry).observe)
    obs.serve(settings.executor_metrics_port)  # at once: start-up below can take a while
    catalog = load_catalog(settings.catalog_file)
    executor_id = settings.executor_id or f"{socket.gethostname()}-{os.getpid()}"
    journal_dir = settings.executor_journal_dir or settings.resolved_data_dir() / "executor-runs"
    # registered repositories (fleet.repositories) on top of infra/repositories.yaml
    registry = RepositoryRegistry()
    # one consumer for every topic this process only reads (core/follower.py): the registered
    # repositories, cancellations, the fleet's attempt leases
    follower = Follower(settings, f"executor-follower-{executor_id}", pace_s=FOLLOWER_PACE_S)
    repositories = follower.follow("repositories", [REPOSITORIES_TOPIC],
                                   partial(apply_json, registry.apply))
    data_dir = settings.resolved_data_dir()
    workspaces = Workspaces(load_repositories(settings),
                            settings.executor_workspaces_dir or data_dir / "worktrees",
                            lookup=CheckoutResolver(registry, data_dir / "repositories"))
    runtime = Runtime(settings, executor_id,
                      live=LiveEmitter(settings) if settings.executor_live_events else None,
                      journal=Journal(journal_dir) if str(journal_dir) else None,
                      workspaces=workspaces)
    if runtime.journal is not None:
        runtime.journal.prune()
    removed = runtime.workspaces.clean_orphans()
    if removed:
        log.warning("orphaned worktrees removed at start-up", count=len(removed), paths=removed)
    ok, why = runtime.sandbox.availability()
    log.info("sandbox", available=ok, detail=why)
    runtime.start(follower)
    leases = None
    committed: Follower | None = None
    if settings.executor_lease_s > 0 and runtime.live is not None:
        leases = LeaseTable(settings, executor_id, settings.executor_lease_lookback_s)
        # outcomes count only once committed: a follower of their own, read_committed (leases.py)
        committed = Follower(settings, f"executor-outcomes-{executor_id}", "read_committed",
                             pace_s=FOLLOWER_PACE_S)
        leases.follow(follower, committed)
        committed.start()
    follower.start()
    if not repositories.ready.wait(settings.table_catchup_timeout_s):
        log.warning("registered repositories not read at start-up; serving what was read")
    # take dispatches once the cancellations of the lookback window are known (a cancel published
    # while this executor was starting stops its attempt before the first model call) and the
    # fleet's recent claims are read (docs/executor.md); both are read at the same time
    if not runtime.watcher_ready.wait(90):
        log.warning("cancellation watcher not ready after 90 s; taking dispatches anyway")
    else:
        log.info("watching cancellations", topic=OUTCOMES,
                 lookback_s=settings.executor_cancel_lookback_s)
    if leases is not None and not (leases.ready.wait(120) and leases.outcomes_ready.wait(120)):
        log.warning("attempt leases not read within 120 s; starting anyway")
    chains = None
    if leases is not None and runtime.journal is not None and runtime.live is not None \
            and settings.executor_chain_sweep_s > 0:
        # level-triggered: audit chains of the journal that no committed outcome claims
        chains = UnreportedChains(runtime, leases, runtime.live.emit,
                                  interval_s=settings.executor_chain_sweep_s,
                                  grace_s=max(30.0, settings.executor_lease_s))
        chains.start()
    clients, seen = ModelClients(settings), SeenDispatches()
    handler = partial(execute, catalog, clients, executor_id, seen, runtime=runtime,
                      leases=leases)
    # the claims of a burst are made by the poll loop, all before the slots run (the first fill)
    starter = Starter(catalog, clients, executor_id, seen, runtime, leases)

    def answers_committed(records: list[Record]) -> None:
        runtime.committed(records)  # their attempts stop heartbeating
        seen.committed(records)  # read again, they are not answered again

    # a brand-new group starts at the recent dispatches, not the whole history (position.py)
    position_new_group(settings, settings.executor_group_id)
    # Continuous dispatch (core/parallel.py): an attempt starts as soon as a slot frees, the
    # consumer keeps polling while attempts run (no max.poll.interval.ms override needed).
    processor = ParallelProcessor("executor", [DISPATCH], handler, settings,
                                  group_id=settings.executor_group_id,
                                  slots=settings.executor_slots,
                                  on_committed=answers_committed,
                                  begin=starter.begin if settings.executor_claim_in_loop
                                  else None,
                                  before_retry=leases.drop_committed if leases else None,
                                  # a dispatch whose task was cancelled before it started is
                                  # refused at once, not after the dispatches ahead of it
                                  urgent=lambda rec: rec.key is not None
                                  and runtime.cancelled(rec.key.decode(errors="replace")))
    runtime.on_cancel = lambda task_id: processor.promote(task_id.encode())
    runtime.track_commits = True  # finished attempts heartbeat until their outcome commits
    obs.registry.register(Slots(processor.slots, processor.running_count,
                                lambda: len(runtime.running())))
    processor.install_signal_handlers()
    # the start-up heap is not scanned by the collections a burst of claims sets off
    log.info("start-up heap frozen", objects=freeze_startup_heap())
    try:
        processor.run()
    finally:
        if chains is not None:
            chains.close()
        if not processor.running_count():
            # an attempt still running keeps its call: stopping the loop freezes it, as
            # before, where closing its connection would fail it
            try:
                runtime.calls.submit(clients.aclose()).result(5)
            except Exception as exc:  # shutting down: a client that will not close is left
                log.warning("model clients not closed", error=str(exc)[:200])
        runtime.close()
        follower.close()
        if committed is not None:
            committed.close()
    if processor.running_count():
        # Attempts still running after the drain: their dispatches were not committed and come
        # back to the next owner (the journal reports them lost, never re-run). Their worker
        # threads would keep the interpreter alive until they end: leave now.
        log.warning("exiting with attempts still running", running=processor.running_count())
        os._exit(0)


if __name__ == "__main__":
    main()
