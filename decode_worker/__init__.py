"""Decode worker: a vLLM engine that loads the prompt's KV from a prefill worker and streams."""
