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
  frontend holds back the same tail of the first token's text and says how much it sent.

Pure: text in, text out; `vllm.v1.engine.detokenizer.check_stop_strings` does the match.
"""

from __future__ import annotations

from collections.abc import Sequence

from pdserve.sampling import stop_hold


class StopAcrossFirst:
    def __init__(self, stops: Sequence[str], first_text: str, sent: int,
                 min_tokens: int, include: bool = False) -> None:
        """`min_tokens`: the decode engine's own (the request's less the first token).
        `include`: vLLM's `include_stop_str_in_output` (the text is cut after the match,
        and nothing is held back)."""
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

    def step(self, new_text: str, new_tokens: int, finished: bool) -> tuple[str, bool]:
        """The engine's next text: (what goes to the client now, whether a stop string
        ended the request here)."""
        self.text += new_text
        self.tokens += new_tokens
        if new_text and self.tokens > self.min_tokens:
            hit = self._check(self.text, len(new_text), self.stops, self.include)
            if hit is not None:
                if hit[1] >= 0:     # -1: the match ends the text, nothing to cut
                    self.text = self.text[:hit[1]]
                return self._out(len(self.text)), True
        return self._out(len(self.text) if finished else len(self.text) - self.hold), False

    def _out(self, upto: int) -> str:
        if upto <= self.sent:
            return ""
        out, self.sent = self.text[self.sent:upto], upto
        return out
