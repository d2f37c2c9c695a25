"""The one place for settings: environment variables prefixed FLEETPLANE_ (or a .env file).

Kafka settings dump straight to a librdkafka configuration (``consumer_config`` /
``producer_config``); extra librdkafka keys go in FLEETPLANE_KAFKA_CONFIG as JSON.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parents[3]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FLEETPLANE_", env_file=".env", extra="ignore")

    # Kafka
    kafka_bootstrap: str = "127.0.0.1:19092"
    kafka_config: dict[str, str] = Field(
        default_factory=dict, description="Extra librdkafka settings for every client."
    )
    kafka_consumer_config: dict[str, str] = Field(
        default_factory=dict, description="Extra librdkafka settings for consumers only, after "
        "kafka_config (consumer properties given to a producer only draw warnings).")
    kafka_compression: Literal["none", "gzip", "snappy", "lz4", "zstd"] = Field(
        default="lz4",
        description="compression.type of every producer: a batch is compressed once by its "
        "producer, stored and served as it is (docs/operations.md, \"Compression\"). On the "
        "embedded broker it shrinks the state it rewrites every second: by a quarter in a "
        "steady stream of small batches, by half or more in bursts.")
    transactional: bool = Field(
        default=True,
        description="Exactly-once consume-transform-produce with Kafka transactions "
        "(off: at-least-once, offsets stored after output is acknowledged).",
    )
    instance_id: str = Field(
        default="0",
        description="Stable per-replica id: the transactional.id is <group>-<instance_id>, so a "
        "restarted replica fences and aborts its predecessor's open transaction at once.",
    )
    batch_size: int = 500
    poll_timeout_s: float = 0.1
    #: idle backoff (core.loop.IdleBackoff): after this long without a record a consumer stops
    #: fetching and probes every idle_probe_s instead (0: off; Apache Kafka holds empty fetches).
    #: Short on purpose: a drained consumer parks mid-run too, between batches (pacing), instead
    #: of fetching back to back while it waits (measured: 39 instead of 72 ms of CPU per task)
    idle_backoff_s: float = 0.005
    idle_probe_s: float = 0.02
    #: the analytics sink's (accounting's) idle probe: nothing waits on its hand-off and it
    #: writes ClickHouse every COMMIT_INTERVAL_S anyway, so between batches it fetches a few
    #: times a second instead of every idle_probe_s (docs/accounting.md, "Consumer group")
    sink_probe_s: float = 0.25
    #: a loop parks its partitions while it handles and commits a batch (a hop: any batch; a
    #: sink that prefers large batches: one that drained what its consumer had fetched; the
    #: parallel loop: after each take and before each commit), instead of letting the client
    #: fetch back to back meanwhile (core.loop.IdleBackoff.park_for_work; docs/benchmarks.md,
    #: stops 20 and 21)
    idle_park_while_handling: bool = True
    #: a loop that committed records rings the parked consumers of their topics on this host,
    #: which probe at once instead of after up to idle_probe_s (core.doorbell)
    handoff_doorbell: bool = True
    #: a ring names the partitions its commit wrote, and a woken consumer probes only those;
    #: while rings keep coming, every parked partition is still probed at least this often
    #: (records whose producer rings no doorbell: other hosts, plain Kafka clients). An input
    #: with no ring within idle_probe_s is probed whole then, as before (docs/benchmarks.md,
    #: stop 23)
    idle_full_probe_s: float = 0.1
    #: a consumer with a doorbell whose input stays quiet (no ring, and its probes find
    #: nothing) doubles the wait between its probes from idle_probe_s up to this: an idle
    #: stack's hops used to probe every partition 50 times a second (stop 27: ~0.4 of a core
    #: for an idle stack). A producer that rings (every loop on this host, the ingest API,
    #: EventProducer.send) still wakes it at once; a record no ring announces (another host,
    #: a plain Kafka client) waits up to this after a quiet spell. idle_probe_s or less: off
    idle_quiet_probe_s: float = 0.5
    #: a consumer on which a probe that no ring started found a record (producers that ring
    #: nothing: a plain Kafka client, another host) keeps probing every idle_probe_s for this
    #: long after such a record instead of backing off (core.loop.IdleBackoff, stop 32). 0:
    #: off, every input backs off when quiet. On by default for ingest's input only (below):
    #: on the other hops' inputs the unannounced records are the stack's own (the
    #: coordinator's clock ticks, the executor's live channel), and with it on an idle stack's
    #: coordinator probed every 20 ms (24 -> 43 ms of CPU a second)
    idle_unannounced_window_s: float = 0.0
    #: idle_unannounced_window_s for ingest's input, tasks.submitted, which producers outside
    #: fleetplane write (docs/events.md, "Producing directly to Kafka") without ringing: while
    #: one submits (a record within this window) its submissions are read within a probe,
    #: even after quiet spells; the first after a longer quiet waits up to
    #: ingest_quiet_probe_s. The HTTP API rings: its submissions never wait
    ingest_unannounced_window_s: float = 600.0
    #: idle_quiet_probe_s for ingest's input. Stop 31 set it to idle_probe_s (no backoff: a
    #: direct submission after a quiet spell had waited up to 0.5 s, one task at a time
    #: 1.78-1.87x of the model time), at 48 ms of CPU a second on an idle stack; since stop
    #: 32 the unannounced window above keeps a direct submitter's input at idle_probe_s, so
    #: this is every input's again. 0.02 keeps ingest's input at idle_probe_s at all times
    ingest_quiet_probe_s: float = 0.5
    session_timeout_ms: int = 10_000

    # Files
    data_dir: Path = Path(".fleetplane")
    schemas_dir: Path = REPO_ROOT / "schemas"
    #: records of the current schema are decoded by cavro (about twice as fast as fastavro,
    #: the same field dicts; fastavro stays the encoder, the reader of older writers and the
    #: reference: core/serde.py, docs/events.md); false: fastavro decodes everything
    avro_fast_decode: bool = True
    topics_file: Path = REPO_ROOT / "infra" / "topics.yaml"
    catalog_file: Path = REPO_ROOT / "infra" / "catalog.yaml"
    teams_file: Path = REPO_ROOT / "infra" / "teams.yaml"

    # ClickHouse: chdb:///abs/dir (embedded, in-process) or http(s)://user:pw@host:8123/db
    clickhouse_dsn: str = ""
    clickhouse_database: str = "fleetplane"
    sink_flush_rows: int = 20_000
    #: accounting's sink inserts on a thread of its own while the loop decodes the next batch,
    #: and its checkpoints store offsets up to the lowest record not yet inserted instead of
    #: waiting for the insert (accounting/sink.py; docs/accounting.md, "Sink, seventeenth round")
    sink_background_inserts: bool = True
    clickhouse_ttl_days: int = Field(
        default=90, ge=0, description="Drop raw rows older than this many days (0: keep "
        "forever); the accounting rollups are kept. The audit log has its own setting.")
    clickhouse_audit_ttl_days: int = Field(
        default=0, ge=0, description="Drop audit-log rows (the `events` table: every event as "
        "consumed) older than this many days; 0 (default): keep them (docs/accounting.md).")

    # Accounting (issue 6): partitioning, budget and anomaly publishing, analyst SQL limits
    clickhouse_partition: str = Field(
        default="month", description="Partition granularity of new fact tables: month, week, day.")
    accounting_repair_hours: float = Field(
        default=2.0, ge=0, description="At accounting's start, recount the rollup buckets of "
        "the last this many hours from the raw rows (a crash during an insert can leave rows "
        "out of the materialized views); 0: off.")
    accounting_check_interval_s: float = Field(
        default=5.0, description="How often accounting recomputes budgets and anomalies.")
    budget_republish_s: float = Field(
        default=60.0, description="BudgetStatus is published on change and at least this often.")
    anomaly_window: int = Field(default=200, description="Baseline: last N attempts per type.")
    anomaly_min_samples: int = Field(default=20, description="No score below this many.")
    anomaly_threshold: float = Field(default=3.5, description="Alert when |robust z| exceeds.")
    anomaly_min_ratio: float = Field(
        default=2.0, description="...and the value is at least this many times the baseline "
        "median (cost, tokens and duration overruns per task type and model).")
    anomaly_min_duration_excess_ms: float = Field(
        default=10_000.0, description="...and a duration at least this much over the median.")
    sql_max_execution_time_s: int = 10
    sql_max_result_rows: int = 10_000

    # HTTP services (all bind to 127.0.0.1 by default)
    bind_host: str = "127.0.0.1"
    ingest_port: int = 8470
    ingest_workers: int = Field(
        default=1, ge=1, le=64, description="Ingest processes sharing the HTTP port "
        "(SO_REUSEPORT) and the validator's consumer group; each enforces 1/N of every rate "
        "limit (fleetplane.ingest.workers). More than one pays only with cores to spare.")
    ingest_worker_index: int = Field(
        default=0, ge=0, description="Set by worker 0 for the workers it starts; not an "
        "operator setting.")
    accounting_port: int = 8471
    coordinator_web_port: int = 8472
    fake_provider_port: int = 8479
    ingest_url: str = ""
    accounting_url: str = ""

    # Models
    anthropic_base_url: str = "http://127.0.0.1:8479"
    anthropic_api_key: str = "fleetplane-local"
    openai_base_url: str = "http://127.0.0.1:8479/v1"
    openai_api_key: str = "fleetplane-local"
    model_timeout_s: float = 60.0
    model_max_retries: int = 2
    openai_via_litellm: bool = Field(
        default=False, description="Call `provider: openai` models through litellm like the "
        "other non-Anthropic providers; default: the openai SDK directly (litellm wraps the same "
        "SDK and adds ~2 ms of CPU per call: docs/executor.md, 'Which client calls which "
        "provider').")

    model_http_transport: Literal["aiohttp", "httpx"] = Field(
        default="aiohttp", description="The HTTP transport under the anthropic and openai SDKs' "
        "async clients: the SDKs' own aiohttp client (DefaultAioHttpClient) or their default "
        "httpx one; aiohttp cost about half the CPU per call (docs/executor.md, 'Which client "
        "calls which provider').")

    # Executor (issue 5: agent runtime, workspaces, sandbox; see docs/executor.md)
    executor_slots: int = 32
    executor_id: str = ""
    executor_repositories_file: Path = REPO_ROOT / "infra" / "repositories.yaml"
    executor_repositories: dict[str, str] = Field(
        default_factory=dict, description="name -> git repository path (JSON); overrides the "
        "repositories file entry of the same name.")
    executor_workspaces_dir: Path | None = Field(
        default=None, description="Where attempt worktrees live (default <data_dir>/worktrees).")
    executor_journal_dir: Path | None = Field(
        default=None, description="Attempt journal (default <data_dir>/executor-runs; '' off).")
    executor_heartbeat_s: float = 2.0
    executor_claim_in_loop: bool = Field(
        default=True, description="Claim a burst of attempts in the poll loop before waking "
        "the slot threads (docs/executor.md, the first fill: the A/B of 2026-12-06); off: "
        "each slot thread claims its own.")
    executor_live_linger_ms: float = Field(
        default=0.0, description="linger.ms of the executor's live channel (TaskStarted, audit "
        "events): an attempt waits for its claim's acknowledgement before the model call and "
        "for its audit events' before its outcome, so every millisecond of linger is paid twice "
        "per task (5 ms, the producers' default: about 11 ms of a one-call task; "
        "docs/benchmarks.md, stop 20).")
    executor_lease_s: float = Field(
        default=30.0, description="Attempt lease: claimed by TaskStarted before the first model "
        "call, renewed by each heartbeat; a redelivered dispatch whose lease is live on another "
        "executor is not run (0: no leases). Keep it below coordinator_heartbeat_timeout_s.")
    executor_lease_lookback_s: float = Field(
        default=600.0, description="How far back in tasks.lifecycle an executor reads the "
        "fleet's claims at start-up.")
    executor_chain_sweep_s: float = Field(
        default=15.0, description="How often the executor compares its journal with the "
        "fleet's committed outcomes and reports an audit chain no outcome claims "
        "(executor/chains.py; 0: never).")
    executor_utilization_window_s: float = 10.0
    executor_max_output_tokens: int = 1024
    executor_max_tokens_per_task: int = 400_000
    executor_retry_backoff_s: float = 0.5
    executor_command_timeout_s: float = 60.0
    executor_command_cpu_s: int = 60
    executor_command_memory_mb: int = 1024
    executor_command_file_mb: int = 64
    executor_command_max_pids: int = 128
    executor_group_id: str = "fleetplane-executor"
    executor_previous_group_id: str = Field(
        default="", description="A brand-new executor group (no committed offset on "
        "tasks.dispatch) starts where this group's commits are (a renamed group); empty: see "
        "executor_new_group_lookback_s.")
    executor_new_group_lookback_s: float = Field(
        default=600.0, description="A brand-new executor group starts at the dispatches of the "
        "last this-many seconds, not at the beginning of tasks.dispatch (the attempt leases "
        "know only executor_lease_lookback_s of outcomes; older dispatches are the "
        "coordinator's dispatched->started timeout's).")
    executor_cancel_lookback_s: float = Field(
        default=300.0, description="At start-up the cancellation watcher reads tasks.outcomes "
        "from this far back, so a cancel published while the executor was starting or down is "
        "still honoured when its dispatch arrives.")
    executor_live_events: bool = Field(
        default=True, description="Publish heartbeats, TaskStarted and audit events while the "
        "attempt runs (non-transactional producer); off: everything with the outcome.")

    # Coordinator (admission, failure policies: docs/coordinator.md)
    coordinator_max_running: int = Field(
        default=64, description="Fleet capacity: attempts dispatched and not finished, all teams.")
    coordinator_heartbeat_timeout_s: float = Field(
        default=60.0, description="A running attempt silent this long is declared lost.")
    coordinator_tick_s: float = Field(
        default=0.5, description="Scheduler clock: backoff releases and heartbeat checks.")
    coordinator_takeover_s: float = Field(
        default=5.0, description="A standby coordinator takes the active role when the "
        "active made no progress on the broker (ticks, decisions, commits) this long; the "
        "standby lengthens it on a loaded machine (coordinator/liveness.py).")
    coordinator_replay_s: float = Field(
        default=60.0, description="On taking the active role the coordinator reads "
        "tasks.outcomes again from this many seconds back (an applied outcome changes nothing): "
        "a hard broker crash can keep the committed input offsets yet lose the forwarded copies "
        "or the scheduler's changelog tail written with them (docs/reliability.md, stop 20). "
        "0: off.")
    coordinator_purge_keep_s: float = Field(
        default=10.0, description="The active coordinator deletes the records of its own "
        "scheduler topic (the repartition's copies and ticks) that its schedule step committed "
        "more than this long ago (coordinator/purge.py; a takeover reads only the last ticks, "
        "0.5 s apart); 0: never.")
    coordinator_backoff_base_ms: int = 1_000
    coordinator_backoff_cap_ms: int = 60_000
    coordinator_start_timeout_s: float = Field(
        default=300.0, description="An attempt dispatched and not started (no TaskStarted) "
        "this long is declared lost (0: never).")
    coordinator_reservations: bool = Field(
        default=True, description="The oldest passed-over conflict waiter of a repository "
        "reserves its write scope (no starvation of broad scopes; docs/coordinator.md).")
    coordinator_terminal_retention_s: float = Field(
        default=7 * 86_400.0, ge=0, description="A finished task's row leaves the coordinator's "
        "table this long after the task ended (0: kept). Within it, late and redelivered "
        "events of the task are absorbed and tasks depending on it see its outcome; the "
        "default matches the idempotency and dependency-name windows (docs/coordinator.md, "
        "\"Forgetting finished tasks\").")
    coordinator_terminal_max_rows: int = Field(
        default=200_000, ge=0, description="At most this many finished tasks' rows are kept "
        "(the oldest forgotten first; 0: no cap): about 3 KB of memory and 8-16 us of a "
        "failover's table rebuild each, so both stay bounded.")
    coordinator_conflict_hold_timeout_s: float = Field(
        default=1800.0, description="A running attempt held for approval after a conflict "
        "(conflict_policy hold) with no approve/reject this long is stopped: rolled back, as "
        "a reject would (0: never).")

    # Router (fleetplane.router; docs/routing.md)
    router_exploration_share: float = Field(
        default=1.0, ge=0, le=1,
        description="Share of routing decisions judged by Thompson samples (the rest by the "
        "posterior estimates).")
    router_confidence_z: float = Field(
        default=0.0, description="Models other than the best are judged this many posterior "
        "standard deviations lower (negative: optimism).")
    router_shortfall_gain: float = Field(
        default=3.0, ge=0, description="The target rises by this times the task type's "
        "realised shortfall against it.")
    router_low_budget_quality_share: float = Field(
        default=0.9, ge=0, le=1, description="The router's q is at most this while a team's "
        "budget is low.")
    router_prompt_signal: bool = Field(
        default=True, description="Learn P(success | prompt, model) from prompt features.")
    router_embedding: str = Field(
        default="wordllama", pattern="^(wordllama|hashing)$",
        description="Prompt embedding: wordllama (bundled weights) or hashing.")
    router_min_cost_observations: int = 3
    router_quality_scope: str = Field(
        default="price", pattern="^(type|pooled|price)$",
        description="Where q x the best model's success is kept: per task type, or pooled over "
        "all task types (the cheapest successes bought first), or over all task types by one "
        "price of a success held by the ledger (price). docs/routing.md")
    router_semantic_cache_types: str = Field(
        default="", description="Comma-separated task types whose near-duplicate prompts may "
        "be answered from the semantic cache (opt-in; empty: off). docs/routing.md")
    router_semantic_cache_threshold: float = Field(default=0.97, ge=0, le=1)
    router_semantic_cache_max_edits: int = Field(default=0, ge=0)
    router_shared_state: bool = Field(
        default=True, description="Publish and follow the learned statistics on the compacted "
        "router.stats topic (replicas learn from all outcomes; a restart reads the snapshot).")
    router_stats_pace_s: float = Field(
        default=0.5, ge=0, description="The other replicas' statistics are read from "
        "router.stats in rounds this far apart (core.follower pacing): a peer's outcome counts "
        "here up to this much later; 0: the idle backoff's pace, which the topic's record per "
        "outcome keeps fetching back to back in a steady stream.")
    router_cache_ttl_s: float = Field(default=86_400.0, ge=0,
                                      description="Response cache entry lifetime (0: no cache).")
    router_cache_scope: str = Field(default="team", pattern="^(team|fleet)$",
                                    description="team: answers are reused within a team only.")
    router_cache_max_entries: int = 100_000
    router_group_id: str = Field(
        default="fleetplane-router", description="The router's consumer group (the reconciler "
        "judges the router hop by this group's committed offsets).")
    router_new_group_lookback_s: float = Field(
        default=600.0, ge=0, description="A brand-new router group (no committed offset on a "
        "partition of its inputs: a renamed group, offsets the broker expired) starts at the "
        "records of the last this-many seconds, not at the start of tasks.accepted's 30 "
        "days: re-routing tasks the coordinator has forgotten would run them again "
        "(docs/routing.md, \"A new group\").")
    router_rebuild_lookback_s: float = Field(
        default=172_800.0, ge=0, description="At start-up the router reads tasks.routed, "
        "tasks.lifecycle, tasks.outcomes and tasks.accepted from this far back (0: from the "
        "start); budget holds of any age come from router.holds. At least the response "
        "cache's TTL, so the cache is rebuilt whole (docs/routing.md, \"Start-up\").")

    # Intake (ingest service, CLI, SDK): tokens, idempotency, rate limits
    token: str = Field(default="", description="API token for the CLI and SDK "
                       "(FLEETPLANE_TOKEN); else the config file, else the local admin token.")
    config_file: Path = Field(default=Path("~/.config/fleetplane/config.yaml"),
                              description="CLI/SDK config: `token:` and `ingest_url:`.")
    max_request_bytes: int = Field(default=1_048_576, description="Largest HTTP body ingest "
                                   "reads (413 above).")
    auth_failures_per_minute: float = Field(default=30.0, description="Failed token checks "
                                            "allowed per client address before 429.")
    auth_failure_burst: int = 20
    trusted_proxies: str = Field(default="", description="Addresses (comma-separated) of "
                                 "reverse proxies whose X-Forwarded-For ingest believes; empty: "
                                 "none, the client address is the TCP peer's.")
    idempotency_window_s: int = Field(default=7 * 86_400, description="How long an "
                                      "idempotency key is remembered (ingest.idempotency).")
    names_window_s: int = Field(default=7 * 86_400, description="How far back a dependency "
                                "given by task name is looked for (ingest.names); task ids "
                                "of older tasks are still accepted.")
    table_catchup_timeout_s: float = 20.0

    # Reconciler (issue 19: re-drives tasks whose next event was lost; docs/operations.md)
    reconciler_port: int = 8473
    reconciler_deadline_s: float = Field(
        default=30.0, description="How long a task may wait at a hop (submitted, accepted, "
        "routed) after the hop's consumer group has read past its record before the "
        "reconciler re-drives it.")
    reconciler_scan_s: float = Field(
        default=2.0, description="How often the reconciler compares what should be with what is.")
    reconciler_lookback_s: float = Field(
        default=86_400.0, ge=0, description="The reconciler reads the task topics from this "
        "far back when it starts, and forgets finished tasks and tasks with no new record "
        "after this long (0: from the start, kept): its start-up and memory stay bounded "
        "however long the topics are kept (docs/operations.md, \"Reconciler\").")
    reconciler_max_redrives: int = Field(
        default=5, description="Re-drives of one hop of one task before the reconciler gives "
        "up and raises a critical alert for an operator.")

    # Observability (docs/operations.md, "Metrics" and "Traces"). Ingest and accounting serve
    # /metrics on their HTTP ports; the others on a metrics port of their own (0: none).
    router_metrics_port: int = 8474
    coordinator_metrics_port: int = 8475
    executor_metrics_port: int = 8476
    reconciler_metrics_port: int = 8477
    supervisor_metrics_port: int = 8478
    otlp_endpoint: str = Field(
        default="", description="OTLP/HTTP collector (e.g. http://otel-collector:4318): spans "
        "are exported there; empty: no OTLP export.")
    trace_file: str = Field(
        default="", description="Also write spans as JSON lines to this file ({service} is "
        "replaced by the service name); empty: none. Tracing is off (no spans, no "
        "traceparent headers) unless this or otlp_endpoint is set.")
    trace_sample_ratio: float = Field(
        default=1.0, ge=0, le=1, description="Share of new traces recorded (an incoming "
        "traceparent's sampled flag is followed).")

    # Scheduling priority (docs/operations.md, "CPU priority")
    nice: int = Field(
        default=0, ge=0, le=19, description="This process's niceness, applied to all its "
        "threads at start (bootstrap); 0 leaves it as started.")
    background_nice: int = Field(
        default=10, ge=0, le=19, description="The niceness the local stack (`fleetplane up`, "
        "the tests' and bench's stacks) gives the services no task waits for (accounting, "
        "reconciler), so on a shared machine the hops of the dispatch path get the CPU first; "
        "0: every service at the same priority.")

    # Logging
    log_level: str = "INFO"
    log_json: bool = True

    def resolved_data_dir(self) -> Path:
        return self.data_dir.resolve()

    def resolved_clickhouse_dsn(self) -> str:
        if self.clickhouse_dsn:
            return self.clickhouse_dsn
        return f"chdb://{(self.resolved_data_dir() / 'clickhouse').as_posix()}"

    def resolved_ingest_url(self) -> str:
        return self.ingest_url or f"http://{self.bind_host}:{self.ingest_port}"

    def resolved_accounting_url(self) -> str:
        return self.accounting_url or f"http://{self.bind_host}:{self.accounting_port}"

    def client_config(self) -> dict[str, Any]:
        return {"bootstrap.servers": self.kafka_bootstrap, **self.kafka_config}

    def consumer_config(self, group_id: str) -> dict[str, Any]:
        return {
            **self.client_config(),
            "group.id": group_id,
            "auto.offset.reset": "earliest",
            "enable.auto.commit": not self.transactional,
            "enable.auto.offset.store": False,
            "isolation.level": "read_committed",
            "session.timeout.ms": self.session_timeout_ms,
            "heartbeat.interval.ms": max(1000, self.session_timeout_ms // 4),
            **self.kafka_config,
            **self.kafka_consumer_config,
        }

    def producer_config(self, transactional_id: str | None = None) -> dict[str, Any]:
        cfg: dict[str, Any] = {
            **self.client_config(),
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 5,
            "compression.type": self.kafka_compression,
        }
        if transactional_id:
            cfg["transactional.id"] = transactional_id
        cfg.update(self.kafka_config)
        return cfg


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
