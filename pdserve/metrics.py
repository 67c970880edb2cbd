"""Prometheus metrics of every process but the scheduler's own (scheduler/metrics.py). Names
are the contract with deploy/ dashboards."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

_LAT = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 3, 5, 7.5,
        10, 15, 20, 30, 60, 120)
_TOK = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2, 5)
_BYTES = tuple(float(2 ** i) for i in range(12, 34, 2))
_XFER_S = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1,
           2.5, 5, 10)

# -- frontend (per client request)
REQUESTS = Counter("pdserve_requests", "Client requests by endpoint and HTTP status",
                   ["endpoint", "status"])
TTFT = Histogram("pdserve_time_to_first_token_seconds", "Time to first token", buckets=_LAT)
TPOT = Histogram("pdserve_time_per_output_token_seconds",
                 "Mean time per output token after the first, per request", buckets=_TOK)
ITL = Histogram("pdserve_inter_token_latency_seconds", "Gap between streamed tokens",
                buckets=_TOK)
E2E = Histogram("pdserve_e2e_request_latency_seconds", "End-to-end request latency",
                buckets=_LAT)
PROMPT_TOKENS = Counter("pdserve_prompt_tokens", "Prompt tokens processed")
GEN_TOKENS = Counter("pdserve_generation_tokens", "Tokens generated")
INFLIGHT = Gauge("pdserve_inflight_requests", "Requests in progress at the frontend")
GOODPUT = Counter("pdserve_goodput_requests",
                  "Requests completed within both SLOs (TTFT and TPOT); its rate is goodput")
SLO_SECONDS = Gauge("pdserve_slo_seconds", "The frontend's SLOs (goodput counts requests "
                    "within both)", ["signal"])

# -- KV transfer (decode worker: per request)
KV_BYTES = Histogram("pdserve_kv_transfer_bytes", "KV bytes transferred per request",
                     buckets=_BYTES)
KV_SECONDS = Histogram("pdserve_kv_transfer_seconds", "KV transfer time per request",
                       buckets=_XFER_S)
KV_PUSH_SECONDS = Histogram("pdserve_kv_push_seconds", "Push mode (prefill worker): first "
                            "WRITE posted to last WRITE landed, per request", buckets=_XFER_S)
KV_PUSH_EXPOSED_SECONDS = Histogram(
    "pdserve_kv_push_exposed_seconds", "Push mode (prefill worker): the part of the WRITEs "
    "the engine waited for after its forward passes (the rest overlapped compute)",
    buckets=_XFER_S)
KV_GBPS = Histogram("pdserve_kv_transfer_gbps", "KV transfer GB/s per request",
                    buckets=(0.1, 0.25, 0.5, 1, 2, 4, 6, 8, 10, 12, 16, 25, 50))
KV_FAILURES = Counter("pdserve_kv_transfer_failures", "KV transfers that failed, by reason "
                      "(lease_expired, timeout, peer_unreachable, checksum_mismatch, "
                      "incompatible, error)", ["reason"])
KV_DESCRIPTORS = Histogram("pdserve_kv_transfer_descriptors",
                           "UCX descriptors per KV transfer (contiguous blocks merged)",
                           buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096))
KV_RECOMPUTES = Counter("pdserve_kv_recompute_fallbacks",
                        "Failed KV loads the decode engine recovered from by computing the "
                        "prompt itself (--load-failure-policy recompute)")
KV_CHECKSUMS = Counter("pdserve_kv_checksums", "Debug mode: transfers whose CRC32 was "
                       "compared on both sides", ["result"])
KV_LEASE_RENEWALS = Counter("pdserve_kv_lease_renewals", "Decode worker: renewals of the "
                            "producer's lease while its request waited in the decode engine",
                            ["result"])
KV_EXTERNAL_TOKENS = Counter("pdserve_kv_external_prompt_tokens",
                             "Prompt tokens the decode engine received by KV transfer")

LOCAL_PREFILLS = Counter("pdserve_decode_local_prefills",
                         "Requests the decode worker prefilled itself (conditional "
                         "disaggregation)")

# -- workers (load; also reported to the scheduler in heartbeats)
WORKER_RUNNING = Gauge("pdserve_worker_running_requests", "Running requests", ["role"])
WORKER_WAITING = Gauge("pdserve_worker_waiting_requests", "Waiting requests", ["role"])
WORKER_KV_USAGE = Gauge("pdserve_worker_kv_usage_ratio", "KV cache usage (0..1)", ["role"])
KV_LEASES = Gauge("pdserve_kv_leases_held",
                  "Producer: requests whose blocks are held for decode; consumer: loads pending",
                  ["role"])
KV_LEASES_EXPIRED = Gauge("pdserve_kv_leases_expired",
                          "Leases that expired before the consumer released them (total)")
KV_TRANSPORT_PEERS = Gauge("pdserve_kv_transport_peers",
                           "KV peers by the UCX transport their connection really uses "
                           "(nvlink, rdma, shm, tcp, none: read from UCX's endpoint log)",
                           ["role", "transport"])
KV_TRANSPORT_FALLBACK = Gauge("pdserve_kv_transport_fallback_peers",
                              "KV peers whose connection uses a worse transport than expected "
                              "(e.g. TCP where shared memory or RDMA was expected)", ["role"])
WORKER_REQUESTS = Counter("pdserve_worker_requests", "Requests served by a worker",
                          ["role", "outcome"])
PREFILL_SECONDS = Histogram("pdserve_prefill_seconds", "Prefill time per request on the worker",
                            buckets=_LAT)

# -- every serving process (pdserve/loop_lag.py)
EVENT_LOOP_LAG = Histogram(
    "pdserve_event_loop_lag_seconds", "How much later than due the process's asyncio event "
    "loop woke a 10 ms timer: blocking work in the loop, or the process waiting for a CPU",
    ["process"], buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5))

# -- scheduler
REJECTED = Counter("pdserve_rejected_requests", "Requests refused by admission control",
                   ["reason"])
ROUTE_RETRIES = Counter("pdserve_route_retries",
                        "Frontend: requests re-placed after a worker failed", ["role"])


def serve_metrics(port: int, host: str = "127.0.0.1") -> int:
    """Expose the default registry on host:port (0 picks a port). Returns the port."""
    server, _thread = start_http_server(port, addr=host)  # port 0: the OS picks, no race
    return server.server_port
