"""One call per service's composition root: metrics for its loops, tracing when configured,
and the scrape endpoint (docs/operations.md, "Metrics", "Traces")."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry

from fleetplane.core.events import Event
from fleetplane.core.kafka import PublishHook, add_publish_hook, remove_publish_hook
from fleetplane.core.loop import Instruments, Output, Record, set_instruments
from fleetplane.core.settings import Settings
from fleetplane.metrics.loop import InputHook, LoopFamilies, LoopMetrics
from fleetplane.metrics.registry import PROCESS, serve
from fleetplane.tracing import propagation
from fleetplane.tracing.tracer import Tracing

if TYPE_CHECKING:
    from opentelemetry.sdk.trace.export import SpanExporter

_families: dict[int, LoopFamilies] = {}


def families(registry: CollectorRegistry) -> LoopFamilies:
    """The loop metric families of `registry` (created once: a name registers once)."""
    found = _families.get(id(registry))
    if found is None:
        found = _families[id(registry)] = LoopFamilies(registry)
    return found


class Chain(Instruments):
    """Two instruments: `outer` wraps `inner` (a span around the timed handling)."""

    def __init__(self, outer: Instruments, inner: Instruments) -> None:
        self.outer = outer
        self.inner = inner

    def consumed(self, records: Sequence[Record]) -> None:
        self.outer.consumed(records)
        self.inner.consumed(records)

    def handle(self, event: Event, rec: Record, run: Callable[[], list[Output]]
               ) -> list[Output]:
        return self.outer.handle(event, rec, lambda: self.inner.handle(event, rec, run))

    def error(self, exc: BaseException, action: str) -> None:
        self.outer.error(exc, action)
        self.inner.error(exc, action)

    def committed(self, seconds: float) -> None:
        self.outer.committed(seconds)
        self.inner.committed(seconds)

    def aborted(self) -> None:
        self.outer.aborted()
        self.inner.aborted()


@dataclass
class Observability:
    """What `instrument` set up for a process."""

    service: str
    settings: Settings
    registry: CollectorRegistry = PROCESS
    tracing: Tracing | None = None
    inputs: list[InputHook] = field(default_factory=list)
    hooks: list[PublishHook] = field(default_factory=list)

    def on_input(self, hook: InputHook) -> None:
        """`hook` sees every event the process's loops handle (from now on)."""
        self.inputs.append(hook)

    def on_publish(self, hook: Callable[[Event], None]) -> None:
        """`hook` sees every event the process publishes."""
        def observe(event: Event) -> Iterable[tuple[str, bytes]]:
            hook(event)
            return ()

        self.hooks.append(observe)
        add_publish_hook(observe)

    def serve(self, port: int) -> None:
        """/metrics of this process on `port` (0: none), bound to the settings' bind_host."""
        serve(self.settings.bind_host, port, self.registry)

    def close(self) -> None:
        """Uninstall (tests): loops built afterwards are bare, publishing adds nothing."""
        for hook in self.hooks:
            remove_publish_hook(hook)
        self.hooks.clear()
        set_instruments(None)
        propagation.enabled = False


def instrument(settings: Settings, service: str, *, entry: bool = False,
               registry: CollectorRegistry = PROCESS,
               exporters: list[SpanExporter] | None = None) -> Observability:
    """Loop metrics (and spans, when tracing is configured, or `exporters` are given) for
    every Processor the process builds from now on. `entry`: the service's loops start a trace
    for a record that carries none (ingest, where submissions enter)."""
    tracing: Tracing | None = None
    if settings.otlp_endpoint or settings.trace_file or exporters:
        from fleetplane.tracing.setup import configure  # the SDK only when tracing is on

        tracing = configure(settings, service, exporters)
    obs = Observability(service, settings, registry, tracing)
    fams = families(registry)

    def factory(svc: str, group: str) -> Instruments:
        metrics = LoopMetrics(fams, svc, group, obs.inputs)
        if tracing is None:
            return metrics
        return Chain(tracing.instruments(svc, group, entry=entry), metrics)

    set_instruments(factory)
    if tracing is not None:
        obs.hooks.append(tracing.publish_hook)
        add_publish_hook(tracing.publish_hook)
    return obs
