"""The coordinator's partitioner matches librdkafka's default (consistent_random: CRC-32)."""

from __future__ import annotations

import zlib

import pytest

from fleetplane.coordinator.partitioning import partition_for


def test_crc32_modulo_partition_count() -> None:
    for key in (b"task-1", b"a", "tâche-é".encode(), b"0" * 200):
        assert partition_for(key, 6) == zlib.crc32(key) % 6
    assert partition_for(b"123456789", 6) == 0xCBF43926 % 6  # the CRC-32 check value


def test_single_partition_and_empty_key() -> None:
    assert partition_for(b"anything", 1) == 0
    assert partition_for(b"", 6) == 0


def test_rejects_no_partitions() -> None:
    with pytest.raises(ValueError):
        partition_for(b"k", 0)
