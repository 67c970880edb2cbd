"""OpenAI-compatible HTTP frontend (FastAPI, SSE)."""
