"""fleetplane-router: composition root."""

from __future__ import annotations

from fleetplane.core.catalog import load_catalog
from fleetplane.core.follower import Follower
from fleetplane.core.logging import get_logger
from fleetplane.core.loop import Processor
from fleetplane.core.offsets import position_new_group
from fleetplane.core.service import bootstrap, freeze_startup_heap
from fleetplane.core.settings import Settings
from fleetplane.core.teams import load_teams
from fleetplane.core.topics import ACCEPTED, BUDGET, LIFECYCLE, OUTCOMES
from fleetplane.metrics.setup import instrument
from fleetplane.router.features import FeatureCache, load_embedder
from fleetplane.router.handlers import Router
from fleetplane.router.holds import HOLDS_TOPIC
from fleetplane.router.policy import PolicyConfig
from fleetplane.router.rebuild import rebuild
from fleetplane.router.semantic import SemanticCache
from fleetplane.router.shared import STATS_TOPIC
from fleetplane.router.state import RouterState

#: What the router consumes: submissions to route, escalations and failed attempts (lifecycle),
#: outcomes (statistics and cache) and budget status. Its own tasks.routed is read at start-up
#: only (rebuild).
INPUTS = [ACCEPTED, LIFECYCLE, OUTCOMES, BUDGET]

log = get_logger(__name__)


def build_router(settings: Settings) -> Router:
    catalog = load_catalog(settings.catalog_file)
    features = (FeatureCache(load_embedder(settings.router_embedding))
                if settings.router_prompt_signal else None)
    semantic_types = [t.strip() for t in settings.router_semantic_cache_types.split(",")
                      if t.strip()]
    semantic = (SemanticCache(semantic_types, settings.router_semantic_cache_threshold,
                              settings.router_semantic_cache_max_edits,
                              settings.router_cache_ttl_s) if semantic_types else None)
    semantic_features = (features or FeatureCache(load_embedder(settings.router_embedding))
                         if semantic is not None else None)
    state = RouterState(catalog, settings.router_cache_ttl_s, settings.router_cache_scope,
                        settings.router_cache_max_entries, features, semantic,
                        semantic_features)
    cfg = PolicyConfig(exploration_share=settings.router_exploration_share,
                       min_cost_observations=settings.router_min_cost_observations,
                       confidence_z=settings.router_confidence_z,
                       shortfall_gain=settings.router_shortfall_gain,
                       low_budget_quality_share=settings.router_low_budget_quality_share,
                       quality_scope=settings.router_quality_scope)
    replica = settings.instance_id if settings.router_shared_state else None
    return Router(catalog, load_teams(settings.teams_file), state, cfg, replica=replica)


def start(router: Router, settings: Settings) -> tuple[Processor, Follower | None]:
    """Position a brand-new group, rebuild the state, follow the other replicas' statistics,
    and make the processor."""
    # a brand-new group starts at the recent inputs, not their whole retention (core.offsets)
    position_new_group(settings, settings.router_group_id, INPUTS,
                       settings.router_new_group_lookback_s)
    router.rebuilt = rebuild(router.state, settings, replica=router.replica,
                             group_id=settings.router_group_id)
    follower = None
    if router.replica is not None:
        follower = Follower(settings, name=f"router-stats-{settings.instance_id}",
                            pace_s=settings.router_stats_pace_s)
        follower.follow("router-stats", [STATS_TOPIC], router.follow_peers)
        # every replica knows every budget hold: the one that reads a team's budget status
        # releases that team's holds (docs/routing.md, "Start-up")
        follower.follow("router-holds", [HOLDS_TOPIC], router.follow_holds)
        # and every budget status: a replica holds its own tasks for a spent budget whichever
        # replica's group partition carries the team's status
        follower.follow("router-budget", [BUDGET], router.follow_budget)
        follower.start()
    router.batch_shared = True  # one record per changed cell or hold per transaction
    processor = Processor("router", INPUTS, router, settings, group_id=settings.router_group_id,
                          on_abort=router.on_abort, before_commit=router.commit_records)
    return processor, follower


def main() -> None:
    settings = bootstrap("router")
    instrument(settings, "router").serve(settings.router_metrics_port)  # docs/operations.md
    router = build_router(settings)
    processor, follower = start(router, settings)
    processor.install_signal_handlers()
    # later collections do not scan the start-up heap (core.service.freeze_startup_heap)
    log.info("start-up heap frozen", objects=freeze_startup_heap())
    try:
        processor.run()
    finally:
        if follower is not None:
            follower.close()


if __name__ == "__main__":
    main()
