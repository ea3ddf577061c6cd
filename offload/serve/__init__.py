"""`offload serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn, the `serve` extra) over one loaded model.

protocol.py turns request bodies into checked `Job`s and results into OpenAI's JSON shapes; worker.py runs the
jobs on the model in one thread with continuous batching (and speculative decoding per request with a draft),
from a bounded queue; app.py is the FastAPI application (routes, the API key, server-sent events).
"""
