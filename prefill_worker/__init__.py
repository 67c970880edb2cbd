"""Prefill worker: a vLLM engine that computes the prompt's KV and holds it for decode."""
