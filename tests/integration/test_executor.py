"""The executor's handler against the fake provider over HTTP, through the real anthropic SDK
and litellm: usage as reported, cost from catalog prices, failures classified, repeats ignored."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from fleetplane.core import events as ev
from fleetplane.core.catalog import Usage, catalog_for
from fleetplane.core.settings import Settings
from fleetplane.executor.handlers import SeenDispatches, execute
from fleetplane.executor.models import AsyncCalls, ModelClients
from fleetplane.fakeprovider import FakeProvider


@pytest.fixture(scope="module")
def provider() -> Iterator[FakeProvider]:
    with FakeProvider() as fake:
        yield fake


def clients(provider: FakeProvider, openai_via_litellm: bool = False) -> ModelClients:
    return ModelClients(Settings(anthropic_base_url=provider.base_url,
                                 openai_base_url=provider.openai_base_url,
                                 model_max_retries=0, model_timeout_s=5,
                                 openai_via_litellm=openai_via_litellm))


def dispatched(model: str = "claude-haiku-4-5", provider_name: str = "anthropic",
               prompt: str = "summarize this") -> ev.TaskDispatched:
    spec = ev.TaskSpec(name="n", task_type="summarize", prompt=prompt)
    return ev.TaskDispatched(task_id="t-exec", team="payments", spec=spec, attempt=1,
                             model=model, provider=provider_name, tier="small")


def test_completes_with_cost_from_reported_usage(provider: FakeProvider) -> None:
    provider.set_script({"replies": [{"match": "usage-probe", "text": "the answer",
                                      "usage": {"input_tokens": 1234, "output_tokens": 321,
                                                "cache_read_input_tokens": 1000}}]})
    catalog = catalog_for(Settings().catalog_file)
    event = dispatched(prompt="usage-probe please")
    out = list(execute(catalog, clients(provider), "x1", SeenDispatches(), event))
    kinds = [type(e).__name__ for e in out]
    assert kinds == ["TaskStarted", "ModelCall", "TaskCompleted"]
    call = out[1]
    assert isinstance(call, ev.ModelCall)
    assert (call.input_tokens, call.output_tokens, call.cache_read_input_tokens) == (1234, 321,
                                                                                      1000)
    expected = catalog.model("claude-haiku-4-5").cost(
        Usage(input_tokens=1234, output_tokens=321, cache_read_input_tokens=1000))
    assert call.cost_usd == pytest.approx(expected) and call.outcome == "ok"
    done = out[2]
    assert isinstance(done, ev.TaskCompleted)
    assert done.output == "the answer" and done.cost_usd == call.cost_usd
    assert all(e.causation_id == event.event_id for e in out)


@pytest.mark.parametrize("via_litellm", [False, True], ids=["openai-sdk", "litellm"])
def test_openai_models_are_called_and_priced(provider: FakeProvider, via_litellm: bool) -> None:
    provider.set_script(None)
    catalog = catalog_for(Settings().catalog_file)
    out = list(execute(catalog, clients(provider, via_litellm), "x1", SeenDispatches(),
                       dispatched(model="gpt-4o-mini", provider_name="openai")))
    call = next(e for e in out if isinstance(e, ev.ModelCall))
    assert call.outcome == "ok" and call.input_tokens > 0 and call.cost_usd > 0
    assert provider.calls[-1].api == "openai"


def test_provider_errors_fail_the_attempt_with_their_class(provider: FakeProvider) -> None:
    provider.set_script({"replies": [{"match": "overload", "error": {"status": 529}}]})
    catalog = catalog_for(Settings().catalog_file)
    out = list(execute(catalog, clients(provider), "x1", SeenDispatches(),
                       dispatched(prompt="overload me")))
    call = next(e for e in out if isinstance(e, ev.ModelCall))
    failed = out[-1]
    assert call.outcome == "overloaded" and call.cost_usd == 0
    assert isinstance(failed, ev.TaskFailed) and not failed.final
    assert failed.failure_class == "model_error" and "overloaded" in failed.reason


def test_a_repeated_dispatch_is_not_run_twice_and_ids_are_deterministic(
    provider: FakeProvider,
) -> None:
    provider.set_script(None)
    catalog = catalog_for(Settings().catalog_file)
    event = dispatched(prompt="once only")
    seen = SeenDispatches()
    before = len(provider.calls)
    first = list(execute(catalog, clients(provider), "x1", seen, event))
    assert list(execute(catalog, clients(provider), "x1", seen, event)) == []
    assert len(provider.calls) == before + 1
    # another process (fresh memory) re-running it derives the same event ids
    again = list(execute(catalog, clients(provider), "x2", SeenDispatches(), event))
    assert [e.event_id for e in again] == [e.event_id for e in first]


def test_shared_clients_close_their_connections_at_shutdown() -> None:
    """The executor's shutdown closes the shared SDK clients on the calls' loop: no
    connection to the provider is left open (a client left open, the control, keeps its
    keep-alive connection)."""
    model = catalog_for(Settings().catalog_file).model("claude-haiku-4-5")

    def left_open(closing: bool) -> int:
        with FakeProvider() as fresh:  # no other test's connections
            port = int(fresh.base_url.rstrip("/").rsplit(":", 1)[1])
            mc, calls = clients(fresh), AsyncCalls()
            turn = calls.submit(mc.achat(model, None, [{"role": "user", "content": "hi"}], [],
                                         64, 0.0, 5.0)).result(10)
            assert turn.usage.input_tokens > 0
            assert established_to(port) >= 1  # the call's keep-alive connection
            if closing:
                calls.submit(mc.aclose()).result(5)
            calls.close()
            return established_to(port)

    assert left_open(closing=True) == 0
    assert left_open(closing=False) >= 1


def established_to(port: int) -> int:
    """Established TCP connections to 127.0.0.1:`port` (Linux: /proc/net/tcp)."""
    with open("/proc/net/tcp") as f:
        rows = [line.split() for line in f.readlines()[1:]]
    return sum(1 for r in rows if int(r[2].split(":")[1], 16) == port and r[3] == "01")
