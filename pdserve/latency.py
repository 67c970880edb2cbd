"""Latency model of an engine, fitted online. Pure: no I/O, no clock, no vLLM.

One engine step (a forward pass over every scheduled token) takes

    t = c0 + c1 * P/1e3 + c2 * A/1e6 + c3 * D + c4 * C/1e4 + c5 * M

  P  prompt tokens computed in the step (prefill chunks)
  A  their attention work: sum over chunks of chunk * (tokens before it + chunk / 2)
  D  decode sequences in the step (one token each)
  C  context tokens those sequences attend to
  M  1 when the step computes prompt tokens and decode sequences both (a mixed step)

c0 is the per-step part, c1 and c2 the per-token parts of prefill, c3 and c4 the decode
parts, c5 the part a mixed step pays on top of both (measured on a 2-core CPU: a step with
one stream took 74.6 ms alone and 101.7 ms with 3 prompt tokens beside it; one constant
for every step under-predicted such steps and broke the TPOT the budget promised,
docs/benchmarks.md). The same six numbers describe a prefill engine (D = 0), a decode engine and a
mixed one, on a CPU or a GPU: nothing here is tuned to a machine, the coefficients are
what the engine's own steps say. `OnlineLinear` fits them by exponentially weighted,
non-negative least squares: old steps fade (half-life in samples), so a model follows an
engine whose speed changes. A KV transfer is the same kind of fit with two features
(`TRANSFER_FEATURES`: per transfer and per byte).

Everything that predicts (prefill time, decode step, chunked prefill under a per-step
time allowance) is a function of the coefficients, so the scheduler, the benchmark and the
engine's own step budget (pdserve/vllm_plugin.py) share one definition.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

STEP_FEATURES = ("step", "prefill_ktok", "prefill_attn_mtok2", "decode_seqs", "decode_ctx_10ktok",
                 "mixed")
TRANSFER_FEATURES = ("transfer", "gbytes")
IDENTIFY_TOKENS = 16      # prompt tokens a step needs for its prefill terms to count as known
KEEP = 2.0                # half-lives a kind of step fades for after its last (StepModel)


@dataclass(frozen=True)
class StepSample:
    """One engine step as the engine saw it."""
    seconds: float
    prefill_tokens: int = 0
    prefill_attn: float = 0.0     # sum of chunk * (computed before + chunk / 2), tokens^2
    decode_seqs: int = 0
    decode_ctx: int = 0           # context tokens of the decode sequences
    # decode streams ran, none with an SLO left (pdserve/step_budget.py, `Stream.late`): the
    # step was not held to their slack, so it says nothing of what an on-time stream sees
    late_only: bool = False
    prefill_seqs: int = 0         # requests whose prompt tokens the step computed

    def features(self) -> list[float]:
        return step_features(self.prefill_tokens, self.prefill_attn, self.decode_seqs,
                             self.decode_ctx)


def step_features(prefill_tokens: float, prefill_attn: float, decode_seqs: float,
                  decode_ctx: float) -> list[float]:
    return [1.0, prefill_tokens / 1e3, prefill_attn / 1e6, float(decode_seqs), decode_ctx / 1e4,
            1.0 if prefill_tokens and decode_seqs else 0.0]


def chunk_attn(chunk: int, before: int) -> float:
    """Attention work of computing `chunk` prompt tokens after `before` computed ones."""
    return chunk * (before + chunk / 2.0)


def _solve(a: list[list[float]], b: list[float]) -> list[float] | None:
    """Gaussian elimination with partial pivoting; None when singular."""
    n = len(b)
    m = [row[:] + [b[i]] for i, row in enumerate(a)]
    for col in range(n):
        piv = max(range(col, n), key=lambda r: abs(m[r][col]))
        if abs(m[piv][col]) < 1e-300:
            return None
        m[col], m[piv] = m[piv], m[col]
        for r in range(col + 1, n):
            f = m[r][col] / m[col][col]
            if f:
                for c in range(col, n + 1):
                    m[r][c] -= f * m[col][c]
    x = [0.0] * n
    for r in range(n - 1, -1, -1):
        x[r] = (m[r][n] - sum(m[r][c] * x[c] for c in range(r + 1, n))) / m[r][r]
    return x


class OnlineLinear:
    """y ~ coef . x with coef >= 0, by exponentially weighted least squares.

    Keeps the weighted sufficient statistics (A = sum w x x^T, b = sum w x y), so one
    sample costs O(n^2) and a solve O(n^3) for a handful of features. `half_life` is in
    samples. A feature no sample has exercised gets coefficient 0 and counts as unknown
    (`known`), so a caller can borrow it from another fit (a pool-mate's).

    The ridge pulls each coefficient towards a prior: 0 at first, and for a feature no
    sample has identified for `hold_after` samples (two half-lives by default), the
    estimate it had when one last did. Fading is for following an engine whose speed
    changes; a step that computes no prompt token says nothing of a prompt token's cost,
    and with a prior of 0 the ridge let a decode engine's decode-only steps erase it.

    Samples may come in kinds (`observe`'s `kind`; `StepModel` passes `step_kind`). With
    `keep` > 0 each kind's statistics fade with every sample, as before, for `keep`
    samples after its own last one; a kind absent for longer stops fading there and keeps
    what it said. The kinds being served, rare ones included, follow an engine whose
    speed changes; a kind no longer served is the only word on what it covered. Without
    it, a decode engine that computed 384-1,024-token prompts and then, for a few thousand
    steps, only 16-64-token ones beside its streams fitted the prompt token's cost from
    those alone: a 1,024-token prompt predicted at a third of its time (a simulation in
    tests/unit/test_latency_kinds.py; measured: a local prompt predicted at 6.3 s took 12.3 s,
    docs/design.md). Plain decode steps do not identify the prompt terms at all, and the
    hold covers them; short prompts do, weakly, over a narrow range."""

    def __init__(self, n: int, half_life: float = 500.0, ridge: float = 1e-6,
                 hold_after: float | None = None, keep: float = 0.0) -> None:
        self.n = n
        self.decay = 0.5 ** (1.0 / half_life) if half_life > 0 else 1.0
        self.ridge = ridge
        self.hold_after = int(2 * half_life if hold_after is None else hold_after)
        self.keep = keep               # samples a kind fades for after its last (0: for good)
        self.since = [0] * n           # samples since one last identified feature j
        self.last = [0.0] * n          # each coefficient when a sample last identified it
        self.prior = [0.0] * n         # what the ridge pulls each coefficient towards
        self.kinds: dict[object, _Stats] = {}    # kind -> its (faded) sufficient statistics
        self.seen = [0.0] * n          # (faded) count of samples with feature j != 0
        self.solid = [0.0] * n         # ...of those that identify it (`observe`'s `counts`)
        self.samples = 0
        self._coef: list[float] | None = None

    def observe(self, x: list[float], y: float, weight: float = 1.0,
                counts: list[bool] | None = None, kind: object = None) -> None:
        """`counts[j]`: this sample identifies feature j (default: x[j] != 0); `known`
        counts only those. `kind`: which kind of sample it is (see the class)."""
        if len(x) != self.n or not math.isfinite(y) or y < 0 or weight <= 0:
            return
        g = self.decay
        ok = [bool(v) for v in x] if counts is None else counts
        for j in range(self.n):
            if ok[j]:
                self.since[j] = 0
                continue
            self.since[j] += 1
            if self.since[j] == 1 and self.solid[j] > 0:
                self.last[j] = self.coef()[j]    # what the last samples identifying j said
            if self.since[j] == self.hold_after:
                self.prior[j] = self.last[j]     # ...held from now on
        for i in range(self.n):
            self.seen[i] = g * self.seen[i] + (1.0 if x[i] else 0.0)   # samples, not weight
            self.solid[i] = g * self.solid[i] + (1.0 if ok[i] else 0.0)
        st = self.kinds.get(kind)
        if st is None:
            st = self.kinds[kind] = _Stats([0.0] * (self.n * self.n + self.n))
        f = self._faded(st) * g      # the other kinds' samples since its last, then this one
        wx = [weight * v for v in x]
        new = [u * v for u in wx for v in x] + [u * y for u in wx]
        st.ab = [f * s + t for s, t in zip(st.ab, new)]
        st.last = self.samples + 1
        self.samples += 1
        self._coef = None

    def _faded(self, st: "_Stats") -> float:
        """What a kind's statistics are worth now against when it was last observed: the
        decay of every sample since, or of `keep` of them if more came."""
        since = self.samples - st.last
        return self.decay ** (min(since, self.keep) if self.keep > 0 else since)

    def _stats(self) -> tuple[list[list[float]], list[float]]:
        """A = sum w x x^T and b = sum w x y over every kind, as faded now."""
        n = self.n
        ab = [0.0] * (n * n + n)
        for st in self.kinds.values():
            f = self._faded(st)
            ab = [s + f * t for s, t in zip(ab, st.ab)]
        return [ab[i * n:(i + 1) * n] for i in range(n)], ab[n * n:]

    def known(self, j: int, min_samples: float = 1.5) -> bool:
        """At least two samples identified feature j (a faded count: 1.5)."""
        return self.solid[j] >= min_samples

    def exercised(self, j: int, min_samples: float = 1.5) -> bool:
        """At least two samples had feature j at all."""
        return self.seen[j] >= min_samples

    def coef(self) -> list[float]:
        """Non-negative least squares over the features seen so far (active set: a
        feature whose coefficient comes out negative is dropped and the rest refitted),
        with a ridge towards `prior` relative to the features' mean weight.

        With a prior of 0 a feature whose samples had faded went to 0: on a decode engine
        whose prompts all went to prefill workers, a 1,024-token prompt step (528 ms)
        was predicted at 537 ms, 450 ms after 2,500 decode-only steps, 79 ms after 5,000
        and 17 ms after 8,000, and the engine's step budget would have let whole prompts
        in beside its streams (docs/design.md). Held after 2 half-lives at what the last
        prompt steps said, it is 537 ms after 8,000 such steps, and prompt steps that
        come back outweigh it as they did the prior of 0. Until a hold the fit is the
        same fit without one, coefficient for coefficient (tests/unit/test_latency.py)."""
        if self._coef is not None:
            return self._coef
        sa, sb = self._stats()
        active = [j for j in range(self.n) if self.seen[j] > 0]
        out = [0.0] * self.n
        while active:
            scale = sum(sa[j][j] for j in active) / len(active)
            lam = self.ridge * scale + 1e-12
            a = [[sa[i][j] + (lam if i == j else 0.0) for j in active] for i in active]
            x = _solve(a, [sb[i] + lam * self.prior[i] for i in active])
            if x is None:
                break
            neg = [k for k, v in enumerate(x) if v < 0]
            if not neg:
                for k, j in enumerate(active):
                    out[j] = x[k]
                break
            worst = min(neg, key=lambda k: x[k])
            active.pop(worst)
        self._coef = out
        return out

    def predict(self, x: list[float]) -> float:
        return sum(c * v for c, v in zip(self.coef(), x))


@dataclass
class _Stats:
    """One kind of sample's weighted sufficient statistics as of its last sample: A = sum
    w x x^T (row by row), then b = sum w x y."""
    ab: list[float]
    last: int = 0         # `OnlineLinear.samples` after its last one


def step_kind(s: StepSample) -> tuple[int, int, bool]:
    """A step's kind for `OnlineLinear`'s `keep`: its prompt tokens and the furthest
    prompt position it computed, each to a power of two, and whether it decoded too."""
    p = s.prefill_tokens
    end = int(s.prefill_attn / p + p / 2) if p > 0 else 0
    return (p.bit_length(), end.bit_length(), s.decode_seqs > 0)


class StepModel:
    """An engine's step time: `OnlineLinear` over STEP_FEATURES, with the predictions the
    scheduler and the engine's step budget need."""

    def __init__(self, half_life: float = 500.0, mixed: bool = True,
                 keep: float = KEEP) -> None:
        """`mixed`: fit the mixed step's own part (False: it stays 0, the five-term model;
        PDSERVE_STEP_MIXED=0 for comparisons). `keep`: the half-lives a kind of step
        (`step_kind`) fades for after its last one (`OnlineLinear`; 0: every kind fades
        for good, PDSERVE_STEP_KEEP=0 for comparisons)."""
        self.fit = OnlineLinear(len(STEP_FEATURES), half_life, keep=keep * half_life)
        self.mixed = mixed
        self._warm = False

    def observe(self, s: StepSample) -> None:
        # relative error is what matters (steps span milliseconds to seconds, and a decode
        # step's few milliseconds must not drown in a long prefill's noise): weight 1/t^2
        # a decode engine's one-token "prefills" (the token a remote prefill sampled) do
        # not tell a prompt token's cost from the step's fixed part: the prefill terms
        # count as known from chunks of IDENTIFY_TOKENS on
        x = s.features()
        if not self.mixed:
            x[5] = 0.0
        big = s.prefill_tokens >= IDENTIFY_TOKENS
        self.fit.observe(x, s.seconds, 1.0 / max(s.seconds, 1e-4) ** 2,
                         [bool(x[0]), big, big and bool(x[2]), bool(x[3]), bool(x[4]),
                          bool(x[5])], step_kind(s) if self.fit.keep > 0 else None)

    @property
    def samples(self) -> int:
        return self.fit.samples

    def warm(self) -> bool:
        """Enough steps to say anything: some with prompt tokens, some with decodes. Once
        warm, always: the faded counts fall under the bar after a few hundred steps of
        one kind (a stream decoding alone; a prefill worker, which decodes only in its
        warm-up), and the faded statistics still hold what the other kind taught. Without
        it a decode engine's budget had no model and let a whole 300-token prompt into
        one step beside a stream with a 1 ms TPOT SLO (a CI run), and a prefill worker
        dropped out of the scheduler's choice (tests/unit/test_adaptive.py)."""
        self._warm = self._warm or (self.fit.exercised(1) and self.fit.exercised(3))
        return self._warm

    def coef(self) -> list[float]:
        return self.fit.coef()


@dataclass(frozen=True)
class Coef:
    """A frozen set of step coefficients (seconds), what predictions are made from."""
    step: float = 0.0
    prefill_ktok: float = 0.0
    prefill_attn_mtok2: float = 0.0
    decode_seq: float = 0.0
    decode_ctx_10ktok: float = 0.0
    mixed: float = 0.0

    @classmethod
    def of(cls, c: list[float]) -> "Coef":
        return cls(*c[:len(STEP_FEATURES)])    # a shorter list (an older peer's): the rest 0

    def merged(self, fallback: "Coef", known: list[bool]) -> "Coef":
        """Our coefficients where we know the feature, the fallback's elsewhere."""
        mine, other = self.as_list(), fallback.as_list()
        return Coef.of([m if k else o for m, o, k in zip(mine, other, known)])

    def as_list(self) -> list[float]:
        return [self.step, self.prefill_ktok, self.prefill_attn_mtok2, self.decode_seq,
                self.decode_ctx_10ktok, self.mixed]

    def step_time(self, prefill_tokens: float = 0, prefill_attn: float = 0.0,
                  decode_seqs: float = 0, decode_ctx: float = 0) -> float:
        x = step_features(prefill_tokens, prefill_attn, decode_seqs, decode_ctx)
        return sum(c * v for c, v in zip(self.as_list(), x))

    def per_token(self, before: float = 0.0) -> float:
        """Marginal cost of one more prompt token after `before` tokens of context."""
        return self.prefill_ktok / 1e3 + self.prefill_attn_mtok2 * before / 1e6

    def decode_step(self, seqs: float, ctx: float) -> float:
        return self.step_time(decode_seqs=seqs, decode_ctx=ctx) if seqs else 0.0

    def prefill_time(self, tokens: int, cached: int = 0, max_step_tokens: int = 0) -> float:
        """Prefill of `tokens` uncached tokens (after `cached`) on an engine with no decode
        streams: whole steps of up to `max_step_tokens` (0: one step)."""
        if tokens <= 0:
            return 0.0
        return self.steps_time(tokens, max_step_tokens if max_step_tokens > 0 else tokens, cached)

    def steps_time(self, tokens: int, chunk: int, cached: int, seqs: float = 0,
                   ctx: float = 0) -> float:
        """Seconds to compute `tokens` prompt tokens in steps of `chunk` beside `seqs`
        (closed form: the features are linear, the attention grows by chunk^2 a step)."""
        if tokens <= 0:
            return 0.0
        chunk = max(1, min(chunk, tokens))
        k, last = divmod(tokens, chunk)
        attn = k * chunk * (cached + chunk / 2.0) + chunk * chunk * k * (k - 1) / 2.0
        t = k * self.step_time(chunk, 0.0, seqs, ctx) + self.step_time(0, attn) - self.step
        if last:
            t += self.step_time(last, chunk_attn(last, cached + k * chunk), seqs, ctx)
        return t

    def chunk_budget(self, allow_s: float, seqs: float, ctx: float, before: float = 0.0) -> int:
        """Prompt tokens one step may add to `seqs` decode streams and stay within `allow_s`
        (beside streams the first one brings the mixed step's own part)."""
        spare = allow_s - self.step_time(decode_seqs=seqs, decode_ctx=ctx) - (
            self.mixed if seqs else 0.0)
        per = self.per_token(before)
        if spare <= 0:
            return 0
        if per <= 0:
            return 1 << 30
        return int(spare / per)


class TransferModel:
    """KV transfer seconds ~ per transfer + per byte, from the decode side's records."""

    def __init__(self, half_life: float = 200.0) -> None:
        self.fit = OnlineLinear(len(TRANSFER_FEATURES), half_life)

    def observe(self, nbytes: int, seconds: float) -> None:
        if nbytes > 0:     # relative error, as for steps
            self.fit.observe([1.0, nbytes / 1e9], seconds, 1.0 / max(seconds, 1e-4) ** 2)

    def predict(self, nbytes: int) -> float:
        if nbytes <= 0 or not self.fit.samples:
            return 0.0
        return self.fit.predict([1.0, nbytes / 1e9])
