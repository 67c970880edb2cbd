"""The HTTP frontend's command-line options, for `pdserve serve` and `pdserve frontend`:
its locks (frontend/security.py) and its OpenAI-layer options, named as vLLM's server
names them where vLLM has them."""

from __future__ import annotations

import argparse
import json


def _json_object(text: str) -> dict:
    try:
        v = json.loads(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not JSON: {e}") from None
    if not isinstance(v, dict):
        raise argparse.ArgumentTypeError("a JSON object is needed")
    return v


def http_args(p: argparse.ArgumentParser) -> None:
    """The HTTP frontend's locks (frontend/security.py) and its OpenAI-layer options, for
    `serve` and `frontend`."""
    p.add_argument("--api-key", action="append", default=[],
                   help="require 'Authorization: Bearer <key>' on /v1 (repeatable; also "
                        "PDSERVE_API_KEY, comma-separated, and --api-key-file)")
    p.add_argument("--api-key-file", default="", help="API keys, one per line")
    p.add_argument("--protect-metrics", default=False,
                   action=argparse.BooleanOptionalAction,
                   help="/metrics and /sd/targets need an API key too")
    p.add_argument("--max-body-bytes", type=int, default=8 << 20,
                   help="413 for a larger request body, before it is parsed (0: no limit)")
    p.add_argument("--max-inflight", type=int, default=512,
                   help="429 with Retry-After past this many generation requests in "
                        "progress at the frontend (0: no limit)")
    p.add_argument("--request-timeout-s", type=float, default=600.0,
                   help="a request's whole deadline, over every placement it takes (504)")
    p.add_argument("--shutdown-grace-s", type=float, default=60.0,
                   help="on SIGTERM, streams in progress get this long to finish")
    p.add_argument("--ssl-certfile", default="", help="serve HTTPS with this certificate")
    p.add_argument("--ssl-keyfile", default="", help="... and this private key")
    p.add_argument("--expose-routing", default=False,
                   action=argparse.BooleanOptionalAction,
                   help="responses carry internal routing details: the x-pdserve-route "
                        "header and the KV transfer's figures (they tell a client about "
                        "other clients' prefixes: for debugging and benchmarks)")
    p.add_argument("--enable-prompt-tokens-details", default=False,
                   action=argparse.BooleanOptionalAction,
                   help="usage.prompt_tokens_details.cached_tokens, as vLLM's flag")
    p.add_argument("--enable-force-include-usage", default=False,
                   action=argparse.BooleanOptionalAction,
                   help="every stream carries usage, in each chunk and at the end, as "
                        "vLLM's flag")
    p.add_argument("--enable-auto-tool-choice", default=False,
                   action=argparse.BooleanOptionalAction,
                   help='tool_choice "auto": the model\'s own tool calls, found by '
                        "--tool-call-parser (as vLLM's flags)")
    p.add_argument("--tool-call-parser", default="",
                   help="vLLM's tool parser for the model's call format (e.g. hermes, "
                        "llama3_json, mistral)")
    p.add_argument("--chat-template", default="",
                   help="the chat template instead of the model's: a file's path, or the "
                        "template itself (as vLLM's flag)")
    p.add_argument("--trust-request-chat-template", default=False,
                   action=argparse.BooleanOptionalAction,
                   help="requests may bring their own chat template (chat_template); "
                        "without it they get a 400 (as vLLM's flag)")
    p.add_argument("--default-chat-template-kwargs", type=_json_object, default=None,
                   help="chat template kwargs under every request's, a JSON object (as "
                        "vLLM's flag), e.g. '{\"enable_thinking\": false}'")
    p.add_argument("--allowed-origins", default="",
                   help='CORS origins, a JSON list (\'["https://a.example"]\') or commas')
