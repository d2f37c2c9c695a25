from fleetplane.core import events as ev
from fleetplane.core.catalog import Usage, catalog_for
from fleetplane.core.settings import Settings
from fleetplane.router.handlers import route


def catalog():  # type: ignore[no-untyped-def]
    return catalog_for(Settings().catalog_file)


def accepted(**spec: object) -> ev.TaskAccepted:
    base: dict[str, object] = {"name": "n", "task_type": "summarize", "prompt": "x" * 400}
    base.update(spec)
    return ev.TaskAccepted(task_id="t1", team="a", spec=ev.TaskSpec(**base))  # type: ignore[arg-type]


def routed(event: ev.TaskAccepted) -> ev.TaskRouted:
    (out,) = route(catalog(), event)
    assert isinstance(out, ev.TaskRouted)
    return out


def test_task_type_picks_its_tier() -> None:
    assert routed(accepted(task_type="summarize")).tier == "small"
    assert routed(accepted(task_type="architecture")).tier == "frontier"
    assert routed(accepted(task_type="refactor")).tier == "standard"


def test_manifest_tier_beats_task_type_and_pinned_beats_all() -> None:
    r = routed(accepted(task_type="summarize", tier="frontier", model_preference="tier"))
    assert (r.tier, r.model) == ("frontier", "claude-opus-4-7")
    assert "requested by the manifest" in r.reason
    r = routed(accepted(task_type="architecture", model_preference="pinned",
                        model="gpt-4o-mini"))
    assert (r.model, r.provider) == ("gpt-4o-mini", "openai")
    assert "pinned" in r.reason


def test_unknown_task_type_gets_the_default_tier_and_says_so() -> None:
    r = routed(accepted(task_type="haiku-writing"))
    assert r.tier == "standard" and "no policy" in r.reason


def test_decision_carries_alternatives_estimate_and_causation() -> None:
    event = accepted()
    r = routed(event)
    assert r.causation_id == event.event_id and r.task_id == "t1" and r.attempt == 1
    assert r.model not in r.alternatives and len(r.alternatives) >= 3
    small = catalog().model(r.model)
    # 400 chars ~ 100 input tokens + 500 expected output tokens, at the catalog's prices
    assert r.estimated_cost_usd == small.cost(Usage(input_tokens=100, output_tokens=500))


def test_unknown_pinned_model_is_rejected_not_crashed() -> None:
    (out,) = route(catalog(), accepted(model_preference="pinned", model="no-such-model"))
    assert isinstance(out, ev.TaskRejected) and out.field == "spec.model"


def test_prices_come_from_litellm_cost_map_and_explicit_prices() -> None:
    c = catalog()
    haiku = c.model("claude-haiku-4-5")
    assert haiku.prices.input == 1e-06 and haiku.prices.output == 5e-06
    local = c.model("fleet-local-coder")
    assert abs(local.prices.input - 0.05e-6) < 1e-15
    usage = Usage(input_tokens=1000, output_tokens=200, cache_creation_input_tokens=100,
                  cache_read_input_tokens=1000)
    expected = 1000 * 1e-06 + 200 * 5e-06 + 100 * haiku.prices.cache_write \
        + 1000 * haiku.prices.cache_read
    assert abs(haiku.cost(usage) - expected) < 1e-12
