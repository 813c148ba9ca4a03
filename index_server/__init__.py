"""The index server: `provenance-guard serve`. clip-retrieval back's API (so its clients keep working, with
exact cosines instead of PQ estimates), POST /v1/check returning the core's result JSON, health, metrics,
token auth, request limits, and concurrent image queries batched through the model.

app.py holds the routes; batcher.py the micro-batching of embeddings; metrics.py the Prometheus counters."""
