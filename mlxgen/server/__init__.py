"""`mlxgen serve`: Ollama's /api/* and OpenAI's /v1/* over a pool of warm models.

app.py builds the Starlette app and runs it under uvicorn; ollama_api.py and openai_api.py
translate each API to one Job (engine.py); worker.py runs every job, in arrival order, on the
one thread that touches MLX; pool.py keeps models loaded (LRU by weight bytes, keep_alive);
prefix_cache.py keeps recent conversations' KV caches for reuse across requests."""
