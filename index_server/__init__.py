"""The index server: `provenance-guard serve`. clip-retrieval back's API (so its clients keep working, with
exact cosines instead of PQ estimates), POST /v1/check returning the core's result JSON, health, metrics,
token auth, request limits, and concurrent image queries batched through the model.

config.py: the settings; state.py: what a process holds (bundles, models, budget); handlers.py: the work
behind each route; app.py: the routes (create_app); middleware.py: token, size limit, request metrics;
batcher.py: the micro-batching of embeddings and searches; metrics.py: prometheus_client's metrics;
processes.py: serving on uvicorn, one process or its workers, and the connection deadlines."""
