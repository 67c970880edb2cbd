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


def request(grammar, prompt=(5, 6, 7)):
    so = None if grammar is False else SimpleNamespace(grammar=grammar)
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
