"""KV block transfer between vLLM engines: our KV connector, layouts, leases, UCX backend."""
