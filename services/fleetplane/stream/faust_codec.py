"""A faust codec for fleetplane's topics (needs faust-streaming: `pip install fleetplane[stream]`).

    import faust
    from fleetplane.stream.faust_codec import register
    register()                                   # codec name "fleetplane"
    app = faust.App("my-consumer", broker="kafka://127.0.0.1:9092")
    outcomes = app.topic("tasks.outcomes", value_serializer="fleetplane")

    @app.agent(outcomes)
    async def on_outcome(stream):
        async for event in stream:              # TaskCompleted, TaskFailed, ... (pydantic)
            ...

examples/stream_faust.py is a complete worker. A record that is not a fleetplane event raises
faust's ValueDecodeError for that record, which faust logs and skips.
"""

from __future__ import annotations

from typing import Any

from faust.serializers import codecs

from fleetplane.core.events import Event
from fleetplane.core.serde import Serde, default_serde

CODEC_NAME = "fleetplane"


class FleetplaneCodec(codecs.Codec):
    """Avro single-object bytes <-> fleetplane events (every schema version)."""

    def __init__(self, serde: Serde | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._serde = serde

    @property
    def serde(self) -> Serde:
        if self._serde is None:
            self._serde = default_serde()
        return self._serde

    def _loads(self, s: bytes) -> Any:
        return self.serde.decode(s)

    def _dumps(self, s: Any) -> bytes:
        if not isinstance(s, Event):
            raise TypeError(f"the fleetplane codec encodes fleetplane events, not {type(s)}")
        return self.serde.encode(s)


def register(name: str = CODEC_NAME) -> None:
    """Make `value_serializer=name` decode fleetplane events in this process."""
    codecs.register(name, FleetplaneCodec())
