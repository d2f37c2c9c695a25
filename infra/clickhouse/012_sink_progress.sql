-- Issue 18: how far each flush of the accounting sink went, per consumer group and topic
-- partition, written before the flush's inserts (sink.py). After a restart or a rebalance the
-- sink looks up stored event ids only for redelivered records at or below these offsets.
-- ReplacingMergeTree(offset) keeps the highest offset per partition.
CREATE TABLE IF NOT EXISTS {database}.sink_progress
(
    consumer_group LowCardinality(String),
    topic          LowCardinality(String),
    `partition`    UInt32,
    `offset`       UInt64,
    flushed_at     DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree(`offset`)
ORDER BY (consumer_group, topic, `partition`);
