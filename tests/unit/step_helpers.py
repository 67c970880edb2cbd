"""A stand-in for vLLM's request in the step hook's unit tests (not a test module)."""

from types import SimpleNamespace as NS

from kv_transfer.handle import P_REMOTE_PREFILL
from pdserve.sampling import TTFT_DUE


class Req:      # hashable, as vLLM's requests are (its queue makes sets of them)
    def __init__(self, rid, due, computed=0, prompt=500, remote=False, max_tokens=16):
        self.request_id = rid
        self.num_computed_tokens = computed
        self.num_prompt_tokens = prompt
        self.max_tokens = max_tokens
        self.kv_transfer_params = {P_REMOTE_PREFILL: True} if remote else None
        self.sampling_params = NS(extra_args={TTFT_DUE: due} if due else None)
