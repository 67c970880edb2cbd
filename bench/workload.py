"""Workloads for the serving benchmark: arrivals, lengths, shared prefixes, multi-turn. Pure.

Everything is drawn from one seeded `random.Random`, so a workload is repeatable: the same
seed gives the same requests at the same offsets, whichever endpoint is measured.

Arrivals (`--arrival`):
* `poisson`: exponential gaps at `rate` requests/s;
* `bursty`: gamma-distributed gaps of shape `burstiness`, same mean rate: vLLM's
  `--burstiness` (below 1 bursts, 1 is Poisson, above 1 is more regular; the gaps'
  coefficient of variation is 1/sqrt(burstiness));
* `concurrency`: no schedule (vLLM's `--request-rate inf`); the client keeps `concurrency`
  requests in flight.

Lengths (`--input`, `--output`): `fixed:N`, `uniform:A:B`, `mix:P:LONG:SHORT` (a
fraction P of requests LONG tokens, the rest SHORT: the long-prompt mix), or
`shift:FIRST~SECOND` (the first half of the requests from FIRST, the rest from SECOND,
each one of the forms above: a mix whose balance changes mid-run).

Prompts are token-id lists drawn from [200, vocab) (no special tokens), so the length is
exact for any tokenizer. `shared_prefix` puts one of `prefix_groups` fixed prefixes of that
many tokens in front of each prompt; `turns` > 1 makes conversations whose every turn sends
the whole history so far plus new tokens (answers are stand-ins of the output length).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Request:
    index: int
    at: float                    # seconds after the start (0 for the concurrency mode)
    prompt: list[int]            # token ids (empty for a text prompt)
    max_tokens: int
    conversation: int = -1
    turn: int = 0
    text: str = ""               # a dataset's prompt, sent as text
    prompt_len: int = 0          # its tokens under the model's tokenizer

    @property
    def prompt_tokens(self) -> int:
        return self.prompt_len or len(self.prompt)


@dataclass(frozen=True)
class WorkloadSpec:
    num_requests: int = 24
    arrival: str = "poisson"         # poisson | bursty | concurrency
    rate: float = 1.0                # requests/s (poisson, bursty)
    burstiness: float = 1.0          # the gaps' gamma shape (bursty), as vLLM's flag
    input: str = "fixed:1024"
    output: str = "fixed:64"
    shared_prefix: int = 0           # tokens of a shared prefix (0: none)
    prefix_groups: int = 1
    turns: int = 1                   # > 1: multi-turn conversations
    vocab: int = 40000
    seed: int = 0
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.num_requests < 1 or self.rate <= 0 or self.burstiness <= 0:
            raise ValueError("need num_requests >= 1, rate > 0, burstiness > 0")
        if self.arrival not in ("poisson", "bursty", "concurrency"):
            raise ValueError(f"unknown arrival process {self.arrival!r}")
        parse_dist(self.input)
        parse_dist(self.output)


def parse_dist(spec: str) -> tuple[str, tuple[float, ...]]:
    kind, _, rest = spec.partition(":")
    if kind == "shift":
        parts = rest.split("~")
        if len(parts) != 2 or any(p.startswith("shift") for p in parts):
            raise ValueError(f"bad shift {spec!r}: shift:FIRST~SECOND")
        for p in parts:
            parse_dist(p)
        return kind, ()
    try:
        args = tuple(float(x) for x in rest.split(":")) if rest else ()
    except ValueError:
        raise ValueError(f"bad length distribution {spec!r}") from None
    ok = {"fixed": 1, "uniform": 2, "mix": 3}
    if kind not in ok or len(args) != ok[kind]:
        raise ValueError(f"bad length distribution {spec!r}: fixed:N, uniform:A:B or "
                         f"mix:P:LONG:SHORT")
    if kind == "uniform" and not 1 <= args[0] <= args[1]:
        raise ValueError(f"bad uniform range in {spec!r}")
    if kind == "mix" and not (0 <= args[0] <= 1 and args[1] >= 1 and args[2] >= 1):
        raise ValueError(f"bad mix in {spec!r}")
    if kind == "fixed" and args[0] < 1:
        raise ValueError(f"bad length in {spec!r}")
    return kind, args


def draw_length(spec: str, rng: random.Random, frac: float = 0.0) -> int:
    """`frac`: where the request falls in the run, 0..1 (for `shift`)."""
    kind, a = parse_dist(spec)
    if kind == "shift":
        first, second = spec.partition(":")[2].split("~")
        return draw_length(first if frac < 0.5 else second, rng)
    if kind == "fixed":
        return int(a[0])
    if kind == "uniform":
        return rng.randint(int(a[0]), int(a[1]))
    return int(a[1]) if rng.random() < a[0] else int(a[2])


def gaps(spec: WorkloadSpec, rng: random.Random, n: int) -> list[float]:
    if spec.arrival == "concurrency":
        return [0.0] * n
    mean = 1.0 / spec.rate
    if spec.arrival == "poisson":
        return [rng.expovariate(spec.rate) for _ in range(n)]
    shape = spec.burstiness                      # gamma: cv = 1 / sqrt(shape)
    return [rng.gammavariate(shape, mean / shape) for _ in range(n)]


def from_samples(samples, spec: WorkloadSpec) -> list[Request]:
    """Requests of a dataset's samples (vLLM's SampleRequest: prompt text, its length, the
    expected output length), at the spec's arrivals."""
    rng = random.Random(spec.seed)
    offsets = gaps(spec, rng, len(samples))
    t, out = 0.0, []
    for i, s in enumerate(samples):
        t += offsets[i] if i else 0.0
        text = s.prompt if isinstance(s.prompt, str) else ""
        ids = [] if text else [int(x) for x in s.prompt]       # a dataset of token ids
        out.append(Request(i, t, ids, int(s.expected_output_len), text=text,
                           prompt_len=int(s.prompt_len)))
    return out


def build(spec: WorkloadSpec) -> list[Request]:
    rng = random.Random(spec.seed)

    def tokens(n: int) -> list[int]:
        return [rng.randrange(200, spec.vocab) for _ in range(n)]

    prefixes = [tokens(spec.shared_prefix) for _ in range(spec.prefix_groups)] \
        if spec.shared_prefix else [[]]
    offsets = gaps(spec, rng, spec.num_requests)
    t = 0.0
    reqs: list[Request] = []
    if spec.turns <= 1:
        for i in range(spec.num_requests):
            t += offsets[i] if i else 0.0
            frac = i / spec.num_requests
            prompt = prefixes[i % len(prefixes)] + tokens(draw_length(spec.input, rng, frac))
            reqs.append(Request(i, t, prompt, draw_length(spec.output, rng, frac)))
        return reqs
    # multi-turn: conversations interleave; turn k of a conversation follows turn k-1
    n_conv = math.ceil(spec.num_requests / spec.turns)
    history = [list(prefixes[c % len(prefixes)]) for c in range(n_conv)]
    order = [(turn, c) for turn in range(spec.turns) for c in range(n_conv)]
    for i, (turn, c) in enumerate(order[:spec.num_requests]):
        t += offsets[i] if i else 0.0
        history[c] = history[c] + tokens(draw_length(spec.input, rng))
        out = draw_length(spec.output, rng)
        reqs.append(Request(i, t, list(history[c]), out, conversation=c, turn=turn))
        history[c] = history[c] + tokens(out)      # the stand-in answer joins the history
    return reqs
