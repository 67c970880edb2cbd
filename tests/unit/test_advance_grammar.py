"""The decode engine's grammar is advanced past the first token the prefill engine
sampled (kv_transfer/connector/scheduler_side.py: advance_grammar). Pure: fake requests."""

from types import SimpleNamespace

from kv_transfer.connector.scheduler_side import advance_grammar


class Grammar:
    def __init__(self, allowed):
        self.allowed, self.accepted = allowed, []

    def accept_tokens(self, request_id, tokens):
        if any(t not in self.allowed for t in tokens):
            return False
        self.accepted += tokens
        return True


def request(grammar, prompt=(5, 6, 7), ended=None):
    so = None if grammar is False else SimpleNamespace(grammar=grammar, reasoning_ended=ended)
    return SimpleNamespace(request_id="r", prompt_token_ids=list(prompt),
                           structured_output_request=so)


def test_the_first_token_is_accepted_into_the_grammar():
    g = Grammar({7})
    assert advance_grammar(request(g)) and g.accepted == [7]   # the prompt's last token


def test_nothing_to_do_without_a_ready_grammar():
    assert not advance_grammar(request(False))                 # unconstrained
    assert not advance_grammar(request(None))                  # not compiled (never here)
    assert not advance_grammar(request(ValueError("bad grammar")))


def test_a_token_outside_the_grammar_is_reported():
    g = Grammar({1})
    assert not advance_grammar(request(g)) and g.accepted == []


class Reasoner:
    """vLLM's think-tag rule: the reasoning has ended where the last marker is its end."""
    START, END = 100, 101

    def is_reasoning_end(self, ids):
        for t in reversed(ids):
            if t in (self.START, self.END):
                return t == self.END
        return False


def test_with_a_reasoning_parser_only_a_token_after_the_reasoning_enters_the_grammar():
    r = Reasoner()
    g = Grammar({7, r.END})
    # the prompt ended the reasoning (or the frontend said so): the first token was answer
    assert advance_grammar(request(g, (5, r.END, 7)), r) and g.accepted == [7]
    assert advance_grammar(request(g, (5, r.START, 7), ended=True), r) and g.accepted == [7, 7]
    # still reasoning: the first token was a reasoning token, or the one that ends it;
    # neither went through the grammar on the prefill engine, and neither does here
    assert not advance_grammar(request(g, (r.START, 5, 7)), r)
    assert not advance_grammar(request(g, (r.START, 5, r.END)), r)
    assert g.accepted == [7, 7]


def test_the_engines_reasoning_arguments_on_each_side():
    from pdserve.rpc import pd_pb2
    from pdserve.sampling import reasoning_args

    sp = pd_pb2.SamplingParams()
    assert reasoning_args(sp) == {}                         # unconstrained: nothing
    sp.structured.regex = "a+"
    assert reasoning_args(sp) == {}                         # no reasoning parser
    sp.structured.reasoning_ended = False
    sp.structured.reasoning_parser_kwargs = '{"chat_template_kwargs": {"thinking": true}}'
    kw = {"chat_template_kwargs": {"thinking": True}}
    assert reasoning_args(sp) == {"reasoning_ended": False, "reasoning_parser_kwargs": kw}
    # after a first token from elsewhere, which may have ended it: the engine reads again
    assert reasoning_args(sp, continues=True) == {"reasoning_ended": None,
                                                  "reasoning_parser_kwargs": kw}
    sp.structured.reasoning_ended = True
    assert reasoning_args(sp, continues=True)["reasoning_ended"] is True
