"""Prometheus metrics (docs/operations.md, "Metrics"): what a platform team scrapes.

* `fleet.FleetMetrics`: the fleet's facts, derived from the events the accounting service already
  consumes (every topic): tasks by outcome and team, submit->finished latency, running per team
  against its quota, model calls, tokens, cost and latency by model and team, cache hits, dead
  letters by service and error class. Served on accounting's `/metrics`.
* `lag.ConsumerLag`: consumer lag per consumer group and input topic, read from the broker at
  scrape time (cached briefly). Served on accounting's `/metrics` too.
* `http.RequestMetrics`: intake's HTTP requests by route and status, with a latency histogram.
  Served on ingest's `/metrics`.
"""
