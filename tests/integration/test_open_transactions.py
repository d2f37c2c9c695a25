"""metrics.lag.open_transactions: what an operator asks when read_committed consumers stop
("is a transaction holding a partition?"), answered from the broker."""

from __future__ import annotations

from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic

from fleetplane.core.settings import Settings
from fleetplane.metrics.lag import open_transactions


def test_an_open_transaction_is_reported_until_it_commits(base_settings: Settings,
                                                           unique: str) -> None:
    topic = f"otx-{unique}"
    admin = AdminClient({"bootstrap.servers": base_settings.kafka_bootstrap})
    for fut in admin.create_topics([NewTopic(topic, 2, 1)]).values():
        fut.result(30)
    plain = Producer(base_settings.producer_config())
    for i in range(3):
        plain.produce(topic, key=b"k", value=b"committed %d" % i, partition=0)
    plain.flush(30)
    assert open_transactions(admin, [topic]) == {}

    txn = Producer({**base_settings.producer_config(), "transactional.id": f"otx-{unique}"})
    txn.init_transactions(30)
    txn.begin_transaction()
    for i in range(2):
        txn.produce(topic, key=b"k", value=b"open %d" % i, partition=0)
    txn.flush(30)
    # partition 0: three committed records, then two of the open transaction (and its end)
    found = open_transactions(admin, [topic])
    assert list(found) == [(topic, 0)]
    lso, end = found[(topic, 0)]
    assert lso == 3 and end >= 5

    txn.commit_transaction(30)
    assert open_transactions(admin, [topic]) == {}
