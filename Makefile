# fleetplane: the two set-up commands are `make run` and `make test` (see README.md).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
export LITELLM_LOCAL_MODEL_COST_MAP := True

.PHONY: install run up down demo test test-long test-quarantine test-unit test-tansu lint typecheck bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(VENV)/.installed: $(PY) pyproject.toml
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

## run: install, start the embedded stack and run the demo
run: install
	$(VENV)/bin/fleetplane up
	$(VENV)/bin/fleetplane demo

up: install
	$(VENV)/bin/fleetplane up

down:
	$(VENV)/bin/fleetplane down

demo: install
	$(VENV)/bin/fleetplane demo

## test: the suite on a real broker and real ClickHouse, without the minutes-long chaos runs
## (marker `long`: make test-long); exit 5 (no tests) is a failure
PYTEST = rc=0; $(PY) -m pytest -q $(1) $(PYTEST_ARGS) || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; exit $$rc
test: install
	@$(call PYTEST,-m "not long")

## test-long: chaos and the reconciler at CI scale (SIGKILLs, broker kills; several minutes),
## without the quarantined tests (docs/testing.md, "Quarantine": make test-quarantine)
test-long: install
	@$(call PYTEST,-m "long and not quarantine")

## test-quarantine: the tests known to fail (none when docs/testing.md's table is empty)
test-quarantine: install
	@rc=0; $(PY) -m pytest -q -m quarantine $(PYTEST_ARGS) || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "nothing is quarantined"; exit 0; fi; exit $$rc

test-unit: install
	$(PY) -m pytest -q tests/unit

lint: install
	$(VENV)/bin/ruff check services tests bench
	$(VENV)/bin/mypy services/fleetplane

typecheck: lint

## bench: the suite (docs/benchmarks.md): throughput, latency at 200/s, overhead, memory, ClickHouse
bench: install
	$(PY) -m pip install -q -e ".[bench]"
	$(PY) -m bench.suite $(BENCH_ARGS)

## bench-anchor: the LiteLLM proxy forwarding the same calls to the fake provider (in make bench)
bench-anchor: install
	$(PY) -m pip install -q -e ".[bench]"
	$(PY) -m bench.anchor $(BENCH_ARGS)

## per-service benches (each prints its figures; BENCH_ARGS passes options through)
.PHONY: bench-anchor bench-pipeline bench-intake bench-routing bench-coordinator bench-coordinator-failover bench-router-startup bench-burst bench-executor bench-concurrency bench-accounting fuzz
bench-pipeline: install    ## one batch through all five services (--tasks, --rate, --submit, --latency-ms)
	$(PY) -m bench.pipeline $(BENCH_ARGS)
bench-intake: install      ## ingest HTTP submit latency/throughput with auth, idempotency, rate limits
	$(PY) -m bench.intake $(BENCH_ARGS)
bench-routing: install     ## routing decision latency in process
	$(PY) -m bench.routing $(BENCH_ARGS)
bench-executor: install    ## executor overhead per agent step, concurrency, cancel latency
	$(PY) -m bench.executor $(BENCH_ARGS)
bench-concurrency: install  ## one executor process: 2,000 waiting attempts, cancels, SIGKILL, mixed durations (--quick)
	$(PY) -m bench.concurrency $(BENCH_ARGS)
fuzz: install              ## hostile HTTP requests and raw Kafka records at a fresh stack; prints counts
	$(PY) -m bench.fuzz $(FUZZ_ARGS)
bench-accounting: install  ## sink rows/s and analytics latency over 1M and 10M model calls (chdb)
	$(PY) -m bench.accounting $(BENCH_ARGS)
.PHONY: bench-observability
bench-observability: install  ## CPU per record of loop metrics and of traces (in process)
	$(PY) -m bench.observability $(BENCH_ARGS)
bench-coordinator: install  ## scheduler at 100,000 queued / 500 repos / 20 teams (p99, events/s, restore), then on the broker
	$(PY) -m bench.coordinator_scale $(SCALE_ARGS)
	$(PY) -m bench.coordinator $(BENCH_ARGS)

bench-burst: install  ## 20,000 TaskSubmitted at Kafka speed through the stack, then again with the active coordinator SIGKILLed
	$(PY) -m bench.burst $(BENCH_ARGS)

bench-router-startup: install  ## the router's start-up over 100,000 tasks of history (30 days), whole against the lookback
	$(PY) -m bench.router_startup $(BENCH_ARGS)

bench-coordinator-failover: install  ## SIGKILL the active coordinator with 20,000 rows: standby ready after
	$(PY) -m bench.coordinator_failover $(BENCH_ARGS)

## chaos: the large chaos run (2,000 tasks; each service SIGKILLed in turn, broker restart,
## 10% provider failures and stalls); prints lost / duplicated / stuck, exits 1 on any violation
.PHONY: chaos reliability
chaos: install
	$(PY) -m bench.chaos $(CHAOS_ARGS)

## reliability: chaos at CI scale, fuzz, tenant isolation and the executor red-team suite
reliability: install
	@$(call PYTEST,-m reliability)

clean:
	rm -rf .fleetplane .pytest_cache .mypy_cache .ruff_cache
