"""pdserve: disaggregated prefill/decode LLM serving on vLLM, KV over UCX (NIXL).

This package holds what every process shares: configuration, errors, wire
helpers, metrics, logging, the bundled model and the command line.
"""

__version__ = "0.1.0"
