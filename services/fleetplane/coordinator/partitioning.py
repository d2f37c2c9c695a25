"""The partitioner every fleetplane producer uses, for the coordinator's aiokafka producer.

The confluent-kafka services produce with librdkafka's default partitioner, consistent_random:
CRC-32 of the key modulo the partition count (random for empty keys). aiokafka (under Faust)
defaults to murmur2, which would put the coordinator's events for a task on another partition
than the other services' events for that task: per-task ordering across producers and the
co-partitioning of tasks.* with the coordinator's table would break. So the coordinator always
passes an explicit partition computed here.
"""

from __future__ import annotations

import zlib


def partition_for(key: bytes, partitions: int) -> int:
    """librdkafka's consistent_random for a non-empty key (empty keys: partition 0)."""
    if partitions <= 0:
        raise ValueError("a topic has at least one partition")
    return zlib.crc32(key) % partitions if key else 0
