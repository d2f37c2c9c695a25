"""The offline evaluation harness: any file of the documented shape, clear errors otherwise."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fleetplane.core.catalog import catalog_for
from fleetplane.core.settings import REPO_ROOT, Settings
from fleetplane.router.evaluate import EvalFileError, EvalTask, evaluate, load_tasks, main


def catalog():  # type: ignore[no-untyped-def]
    return catalog_for(Settings().catalog_file)


def write(tmp_path: Path, rows: list[object]) -> Path:
    path = tmp_path / "eval.jsonl"
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def test_the_shipped_example_evaluates_and_baselines_are_consistent(
        capsys: pytest.CaptureFixture[str]) -> None:
    path = REPO_ROOT / "examples" / "routing-eval.jsonl"
    assert main([str(path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    results = {r["policy"]: r for r in report["results"]}
    single = [p for p in results if p.startswith("best single <= cost: ")]
    assert set(results) - set(single) == {
        "router", "task-type tiers", "all-frontier", "all-small", "random", "oracle",
        "hindsight per-type (q 0.95)"}
    # the curve over q: more success costs more, and the gap figures are shares
    curve = report["curve"]
    assert [p["q"] for p in curve] == sorted(p["q"] for p in curve) and len(curve) >= 5
    assert curve[-1]["cost_usd"] >= curve[0]["cost_usd"]
    assert 0 <= report["summary"]["average_gap_recovered"] <= 1.5
    # per task type figures add up to the totals
    router = results["router"]
    assert sum(t["tasks"] for t in router["by_type"].values()) == router["tasks"]
    n = sum(1 for line in path.read_text().splitlines() if line.strip())
    assert all(r["tasks"] == n for r in results.values())
    # the oracle is the cheapest way to the best success any policy can reach
    assert results["oracle"]["success_rate"] >= max(r["success_rate"] for r in results.values())
    assert results["oracle"]["cost_usd"] <= results["all-frontier"]["cost_usd"]
    assert set(results["all-frontier"]["picks"]) == {"claude-opus-4-7"}
    # the table names every policy
    assert main([str(path)]) == 0
    out = capsys.readouterr().out
    assert "all-frontier" in out and "oracle" in out and "cost vs frontier" in out
    assert "cost-success curve over q" in out and "per task type" in out
    assert "cost at 50% of the gap" in out


def test_any_file_of_that_shape_models_outside_the_catalog_with_a_tier(tmp_path: Path) -> None:
    rows: list[object] = []
    for i in range(200):
        rows.append({"task_id": f"t{i}", "task_type": "my-type", "candidates": {
            "tiny-1": {"success": True, "cost_usd": 0.001, "tier": "small"},
            "big-1": {"success": True, "cost_usd": 0.05, "tier": "frontier"},
        }})
    tasks = load_tasks(write(tmp_path, rows), catalog())
    res = {r.name: r for r in evaluate(tasks, catalog(), exploration_share=0.3)}
    assert res["all-small"].picks == {"tiny-1": 200}
    assert res["all-frontier"].picks == {"big-1": 200}
    assert res["oracle"].cost_usd == pytest.approx(0.2)
    # the router starts on the default tier (standard: none here, so the next one that has a
    # candidate) and learns that the tiny model always succeeds
    assert res["router"].picks.get("tiny-1", 0) > 100, res["router"].picks


def test_malformed_lines_are_rejected_with_line_and_field(tmp_path: Path) -> None:
    path = write(tmp_path, [
        {"task_id": "ok", "task_type": "codegen",
         "candidates": {"gpt-4o-mini": {"success": True, "cost_usd": 0.1}}},
        "{not json",
        {"task_id": "b", "task_type": "codegen",
         "candidates": {"gpt-4o-mini": {"success": "maybe", "cost_usd": -1}}},
        {"task_id": "c", "task_type": "codegen", "candidates": {}},
        {"task_id": "d", "task_type": "codegen", "surprise": 1,
         "candidates": {"gpt-4o-mini": {"success": True, "cost_usd": 0.1}}},
        {"task_id": "d2", "task_type": "codegen",
         "candidates": {"mystery": {"success": True, "cost_usd": 0.1}}},
        {"task_id": "e", "task_type": "codegen",
         "candidates": {"x": {"success": True, "cost_usd": 0.1, "tier": "galactic"}}},
    ])
    with pytest.raises(EvalFileError) as exc:
        load_tasks(path, catalog())
    text = str(exc.value)
    for expected in ("line 2: not JSON", "line 3: candidates.gpt-4o-mini.success",
                     "line 3: candidates.gpt-4o-mini.cost_usd", "line 4: candidates",
                     "line 5: surprise", "line 6: candidates.mystery: not in the catalog",
                     "line 7: candidates.x.tier: 'galactic'"):
        assert expected in text, (expected, text)
    assert main([str(path)]) == 2
    assert main([str(write(tmp_path, [""]))]) == 2  # empty
    assert main([str(tmp_path / "missing.jsonl")]) == 2


def test_prompts_feed_the_router_and_hindsight_and_single_model_baselines(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Generated file with prompts: the cheap model answers questions about rivers, only the
    dear one answers questions about mountains. The hindsight per-type baseline picks per type,
    the oracle per prompt; the router (hashed prompt features) beats the best single model of
    at most its cost."""
    rows: list[object] = []
    rng = __import__("random").Random(4)
    for i in range(600):
        topic = rng.choice(["river", "mountain"])
        rows.append({"task_id": f"p{i}", "task_type": "qa",
                     "prompt": f"Tell me about the {topic} number {rng.randint(1, 50)}",
                     "candidates": {
                         "cheap": {"success": topic == "river", "cost_usd": 0.001,
                                   "tier": "small"},
                         "dear": {"success": True, "cost_usd": 0.02, "tier": "frontier"}}})
    tasks = load_tasks(write(tmp_path, rows), catalog())
    assert tasks[0].prompt and tasks[0].prompt.startswith("Tell me about the")
    # q 0.7: the cheap model's type-level success (50%) misses it, its success on river
    # prompts (100%) does: only the per-prompt signal lets the router use it where it works
    # q kept per task type: the type's mixture share of the dear model goes to the prompts
    # ranked by the predicted gain, so the dear model gets the mountains
    res = {r.name: r for r in evaluate(tasks, catalog(), embedding="hashing", q=0.7,
                                       quality_scope="type")}
    assert res["hindsight per-type (q 0.70)"].picks == {"dear": 600}  # cheap: 50% < 70%
    assert res["oracle"].success_rate == 1.0
    single = next(r for name, r in res.items() if name.startswith("best single <= cost"))
    assert single.cost_usd <= res["router"].cost_usd
    assert res["router"].success_rate >= 0.9
    assert res["router"].cost_usd < 0.8 * res["all-frontier"].cost_usd  # prompts tell them apart
    # the default (price) scope keeps q 0.7 x all-frontier's success at the lowest cost: the
    # cheap model's predicted success on river prompts (its prompt model has measured skill)
    # sends them to it, so the same promise costs much less than without the prompts
    res = {r.name: r for r in evaluate(tasks, catalog(), embedding="hashing", q=0.7)}
    blind = {r.name: r for r in evaluate(tasks, catalog(), embedding="hashing", q=0.7,
                                         prompt_signal=False)}
    for r in (res, blind):
        assert r["router"].success_rate >= 0.7 * r["all-frontier"].success_rate - 0.02
    assert res["router"].cost_usd < 0.75 * blind["router"].cost_usd  # prompts tell them apart
    assert res["router"].cost_usd < 0.4 * res["all-frontier"].cost_usd
    single = next(r for name, r in res.items() if name.startswith("best single <= cost"))
    assert single.success_rate < res["router"].success_rate
    with pytest.raises(SystemExit) as exc:  # argparse: usage error, exit code 2
        main([str(write(tmp_path, rows[:5])), "--embedding", "nope"])
    assert exc.value.code == 2


def test_the_cost_breakdown_adds_up_to_the_router_against_the_hindsight_mixture() -> None:
    """fleetplane.router.breakdown: ledger + exploration + estimation = router - hindsight, per
    row, and the hindsight mixture is the linear program on the type's whole-file rates."""
    from fleetplane.router.breakdown import breakdown, hindsight_mixtures
    from fleetplane.router.policy import PolicyConfig

    rng = __import__("random").Random(2)
    rows = [{"task_id": f"b{i}", "task_type": "qa", "candidates": {
        "cheap": {"success": i % 10 < 8, "cost_usd": 0.001, "tier": "small"},
        "dear": {"success": True, "cost_usd": 0.01, "tier": "frontier"}}}
        for i in range(300)]
    rng.shuffle(rows)
    tasks = [EvalTask.model_validate(r) for r in rows]
    mix = hindsight_mixtures(tasks, 0.95)["qa"]
    # cheap 0.8, dear 1.0: target 0.95 needs 75% dear
    assert mix.upper.name == "dear" and mix.lower is not None and mix.lower.name == "cheap"
    assert mix.upper_share == pytest.approx(0.75)
    out = breakdown(tasks, 0.95, PolicyConfig())
    assert {("*", "*"), ("qa", "*"), ("*", "first 100"), ("*", "100-300")} == set(out)
    for parts in out.values():
        for k in (0, 1):
            assert (parts["ledger"][k] + parts["exploration"][k] + parts["estimation"][k]
                    == pytest.approx(parts["router"][k] - parts["hindsight"][k], abs=1e-9))
    assert out["*", "*"]["hindsight"][0] == pytest.approx(0.95)  # of all-frontier's success
    assert 0.2 < out["*", "*"]["router"][1] <= 1.0
