"""Our vLLM v1 KV connector. Load it with

    KVTransferConfig(kv_connector="PDConnector",
                     kv_connector_module_path="kv_transfer.connector",
                     kv_role="kv_producer" | "kv_consumer",
                     kv_connector_extra_config={"agent_host": ..., "agent_port": ..., ...})
"""

from kv_transfer.connector.connector import PDConnector

__all__ = ["PDConnector"]
