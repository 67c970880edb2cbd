"""Stop strings across the first token, as one colocated engine checks them.

The first token of a disaggregated request is sampled and detokenized on the prefill
engine; the decode engine gets it as the last prompt token, and vLLM checks stop strings
in a request's own output text only. A stop string that begins in the first token's text
and ends in a later token's would be seen whole by neither engine.

So for such a request the decode worker gives its engine no stop strings (stop token ids
stay with the engine) and checks them itself, with vLLM's own `check_stop_strings`, over
the whole output text: the first token's (from the frontend) and then the engine's, token
by token as the engine detokenizes them. vLLM's rules are kept:
* strings are checked once more output tokens than `min_tokens` exist;
* the match that completes earliest wins, and the text is cut before it (after it with
  `include_stop_str_in_output`);
* while a request runs, the last (longest stop string - 1) characters are held back, as
  vLLM's detokenizer holds them, so a stream never shows text that a match then cuts. The
  frontend holds back the same tail of the first token's text and says how much it sent;
* the engine may hand over several tokens at once; the output keeps those up to the one
  that completed the match, as a colocated engine that checks after every token stops
  there (the model's tokenizer, given as `decode`, says which one).

Pure: text in, text out; `vllm.v1.engine.detokenizer.check_stop_strings` does the match.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from pdserve.sampling import stop_hold

CONTEXT = 6      # tokens before a piece decoded with it (as an incremental detokenizer)


class StopAcrossFirst:
    def __init__(self, stops: Sequence[str], first_text: str, sent: int,
                 min_tokens: int, include: bool = False, first_token: int | None = None,
                 decode: Callable[[list[int]], str] | None = None) -> None:
        """`min_tokens`: the decode engine's own (the request's less the first token).
        `include`: vLLM's `include_stop_str_in_output` (the text is cut after the match,
        and nothing is held back). `decode`: the model's tokenizer, to find the token that
        completed a match when the engine handed several at once (`first_token` is the
        context of the first ones); without it every token handed over is kept."""
        from vllm.v1.engine.detokenizer import check_stop_strings
        self._check = check_stop_strings
        self.stops = list(stops)
        self.include = include
        # the frontend held back the same (first_text_sent)
        self.hold = stop_hold(self.stops, include)
        self.text = first_text          # the whole output text so far
        self.sent = min(sent, len(first_text))   # of it, what the client has
        self.tokens = 0                 # decode-engine tokens so far
        self.min_tokens = min_tokens
        self.decode = decode
        self.matched: str | None = None     # the stop string that ended the request
        self.recent = [] if first_token is None else [first_token]   # context to decode

    def step(self, new_text: str, new_ids: Sequence[int], finished: bool
             ) -> tuple[str, bool, int]:
        """The engine's next text and tokens: (what goes to the client now, whether a stop
        string ended the request here, how many of `new_ids` the output keeps). A colocated
        engine checks after every token and stops at the one that completes a match, so
        of several tokens handed over at once only those up to it are kept."""
        start = len(self.text)
        self.text += new_text
        self.tokens += len(new_ids)
        keep = len(new_ids)
        if new_text and self.tokens > self.min_tokens:
            hit = self._check(self.text, len(new_text), self.stops, self.include)
            if hit is not None:
                stop, offset = hit
                self.matched = stop
                end = (len(self.text) if offset < 0 else
                       offset if self.include else offset + len(stop))
                keep = self._tokens_to(list(new_ids), end - start)
                if offset >= 0:     # -1: the match ends the text, nothing to cut
                    self.text = self.text[:offset]
                return self._out(len(self.text)), True, keep
        self.recent = (self.recent + list(new_ids))[-CONTEXT:]
        return self._out(len(self.text) if finished else len(self.text) - self.hold), False, keep

    def _tokens_to(self, ids: list[int], chars: int) -> int:
        """The fewest of `ids` whose text reaches `chars` characters of theirs."""
        if len(ids) <= 1 or self.decode is None:
            return len(ids)
        base = len(self.decode(self.recent))
        for j in range(1, len(ids)):
            if len(self.decode(self.recent + ids[:j])) - base >= chars:
                return j
        return len(ids)

    def _out(self, upto: int) -> str:
        if upto <= self.sent:
            return ""
        out, self.sent = self.text[self.sent:upto], upto
        return out
