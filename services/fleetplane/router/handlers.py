"""Router handler: TaskAccepted -> TaskRouted (pure, given the catalog)."""

from __future__ import annotations

from collections.abc import Iterable

from fleetplane.core.catalog import Catalog
from fleetplane.core.events import Event, TaskAccepted, TaskRejected, TaskRouted
from fleetplane.core.loop import Record
from fleetplane.router.policy import choose


def route(catalog: Catalog, event: Event, record: Record | None = None) -> Iterable[Event]:
    if not isinstance(event, TaskAccepted):
        return []
    try:
        decision = choose(catalog, event.spec)
    except KeyError as exc:
        return [event.derive(TaskRejected, reason=f"cannot route: {exc.args[0]}",
                             field="spec.model", source=event.source)]
    return [
        event.derive(
            TaskRouted,
            spec=event.spec,
            attempt=1,
            model=decision.model.name,
            provider=decision.model.provider,
            tier=decision.model.tier,
            reason=decision.reason,
            alternatives=decision.alternatives,
            estimated_cost_usd=decision.estimated_cost_usd,
        )
    ]
