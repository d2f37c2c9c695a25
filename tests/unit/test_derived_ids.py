"""Derived event ids (core.events.derived_id) are the version-5 UUIDs every service has always
published: a redelivered input must yield the same ids as before, across versions, or the
consumers' deduplication by event id would miss the repeat."""

from __future__ import annotations

import uuid

from hypothesis import given
from hypothesis import strategies as st

from fleetplane.core.events import derived_id

NAMESPACE = uuid.UUID("6f1d3c52-8a0e-4b7e-9a55-0c2f7f1e9d10")


@given(st.text(max_size=60), st.text(max_size=30))
def test_a_derived_id_is_the_uuid5_of_the_cause_and_the_tag(cause: str, tag: str) -> None:
    assert derived_id(cause, tag) == uuid.uuid5(NAMESPACE, f"{cause}/{tag}").hex


def test_known_ids_do_not_change() -> None:
    assert derived_id("c48ddb9efe944cafb77478ea9fbe3dea", "started") == \
        uuid.uuid5(NAMESPACE, "c48ddb9efe944cafb77478ea9fbe3dea/started").hex
    assert uuid.UUID(derived_id("e1", "accepted")).version == 5
