"""pdserve's patches to vLLM apply only behind their switch, once per process, and a patch
that found nothing to patch may try again (pdserve/patching.py)."""

from pdserve.patching import switched_once


def test_a_patch_applies_once_and_only_behind_its_switch(monkeypatch):
    calls = []

    @switched_once("PDSERVE_TEST_SWITCH")
    def apply() -> bool:
        calls.append(1)
        return True

    monkeypatch.delenv("PDSERVE_TEST_SWITCH", raising=False)
    assert apply() is False and calls == [] and not apply.applied
    monkeypatch.setenv("PDSERVE_TEST_SWITCH", "0")
    assert apply() is False and calls == []
    monkeypatch.setenv("PDSERVE_TEST_SWITCH", "1")
    assert apply() is True and apply.applied
    assert apply() is False and calls == [1]        # loaded again: not patched twice
    assert apply.__name__ == "apply" and apply.switch == "PDSERVE_TEST_SWITCH"


def test_a_patch_with_nothing_to_patch_tries_again(monkeypatch):
    found = [False, True]

    @switched_once("PDSERVE_TEST_SWITCH")
    def apply() -> bool:
        return found.pop(0)

    monkeypatch.setenv("PDSERVE_TEST_SWITCH", "1")
    assert apply() is False and not apply.applied
    assert apply() is True and apply.applied and found == []


def test_scheduled_reads_each_request_of_a_step_with_its_tokens_before_the_step():
    from types import SimpleNamespace as NS

    from pdserve.patching import scheduled
    # vLLM has already advanced num_computed_tokens by the step's own tokens
    prompt = NS(num_computed_tokens=300, num_prompt_tokens=1024)     # a 256-token chunk
    stream = NS(num_computed_tokens=700, num_prompt_tokens=600)      # one decode token
    out = NS(num_scheduled_tokens={"a": 256, "b": 1, "gone": 7})
    got = list(scheduled(out, {"a": prompt, "b": stream}))
    assert got == [(prompt, 256, 44), (stream, 1, 699)]               # "gone" is skipped
    assert sum(n for r, n, before in got if before < r.num_prompt_tokens) == 256
