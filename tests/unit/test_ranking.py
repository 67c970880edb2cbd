"""How the chooser orders the options it predicted (scheduler/ranking.py `ranked`): those
predicted to meet both SLOs first, the lowest TTFT first; then the least-missed; and a
request late whatever it does on a prefill worker. Pure: options built by hand."""

from dataclasses import replace

from scheduler import ranking as A
from tests.unit.adaptive_helpers import SLO


def test_ranking_meets_slos_first_then_lowest_ttft():
    def opt(kind, score, ttft):
        return A.Option(kind, "p" if kind == "remote" else "d", "d", ttft, 0.01, ttft, 0,
                        score)
    # both meet the SLOs: the lower TTFT, whatever the headroom on TPOT says
    got = A.ranked([opt("remote", 0.6, 2.0), opt("local", 0.2, 1.0)], SLO)
    assert [o.kind for o in got] == ["local", "remote"]
    # TTFTs within TIE of the SLO of each other: remote first
    near = 1.0 + A.TIE * SLO.ttft_s * 0.9
    got = A.ranked([opt("local", 0.2, 1.0), opt("remote", 0.2, near)], SLO)
    assert [o.kind for o in got] == ["remote", "local"]
    # ...unless the gap is over TIE_REL of the lower TTFT: a client sees it
    short = 0.5 * A.TIE * SLO.ttft_s / A.TIE_REL     # the same gap over a shorter TTFT
    got = A.ranked([opt("local", 0.2, short), opt("remote", 0.2, short + 0.9 * A.TIE
                                                   * SLO.ttft_s)], SLO)
    assert [o.kind for o in got] == ["local", "remote"]
    # an option predicted to miss comes after every one predicted to meet, however fast
    got = A.ranked([opt("local", -0.1, 0.1), opt("remote", 0.1, 2.5)], SLO)
    assert [o.kind for o in got] == ["remote", "local"]
    # nothing meets: the least-missed first
    got = A.ranked([opt("local", -0.5, 0.1), opt("remote", -0.2, 4.0)], SLO)
    assert [o.kind for o in got] == ["remote", "local"]
    # ...and as good as it within MARGIN: the sooner (both miss the TPOT SLO alike)
    got = A.ranked([opt("local", -0.20, 2.9), opt("remote", -0.22, 1.0)], SLO)
    assert [o.kind for o in got] == ["remote", "local"]
    # among remotes that tie, the lower TTFT
    got = A.ranked([opt("remote", 0.5, 0.3), opt("remote", 0.4, 0.2)], SLO)
    assert [o.ttft_s for o in got] == [0.2, 0.3]


def test_a_request_late_whatever_it_does_has_its_prompt_computed_remotely():
    """Every option's first token after the TTFT SLO (counted from the arrival of a
    request held `held_s`): remote first, the sooner computed first, even where the
    decode engine would compute it sooner; a request that can still make it is ranked as
    ever."""
    def opt(kind, score, ttft):
        return A.Option(kind, "p" if kind != "local" else "d", "d", ttft, 0.01, ttft, 0,
                        score)
    slo, before = SLO, replace(SLO, late_remote=False)     # PDSERVE_LATE_PREFILL=local
    late = [opt("local", -0.1, 3.3), opt("remote", -0.4, 4.2), opt("remote", -0.3, 3.9)]
    assert [(o.kind, o.ttft_s) for o in A.ranked(late, slo)] == \
        [("remote", 3.9), ("remote", 4.2), ("local", 3.3)]
    assert A.ranked(late, before)[0].kind == "local"           # the sooner computed
    # held 1 s: the local option's first token at 2.5 s comes after the 3 s SLO too
    held = [opt("local", 0.1, 2.5), opt("remote", -0.2, 3.6)]
    assert [o.kind for o in A.ranked(held, slo, held_s=1.0)] == ["remote", "local"]
    # one option still makes it from the arrival: ranked as ever (the least-missed first)
    assert [o.kind for o in A.ranked(held, slo, held_s=0.2)] == ["local", "remote"]
    # a kept first token counts from when it is computed (`first_s`), not when its stream
    # sends it: computed within the SLO, this request is not late, and is ranked as ever
    kept = replace(opt("remote", -0.3, 3.2), ready_s=2.8)
    assert A.ranked([opt("local", -0.05, 3.4), kept], slo)[0].kind == "local"
