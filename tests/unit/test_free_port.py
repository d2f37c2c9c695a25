"""free_port never hands the same port out twice in a process (a stack takes a dozen ports
before any of its services binds one)."""

from __future__ import annotations

from fleetplane.infra.broker import LOW_PORTS, free_port


def test_free_port_never_repeats_a_port_it_handed_out() -> None:
    ports = [free_port() for _ in range(2_000)]
    # 2,000 random picks from the range would repeat about 88 times
    assert len(set(ports)) == len(ports)
    assert all(LOW_PORTS[0] <= p <= LOW_PORTS[1] for p in ports)
