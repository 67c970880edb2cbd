"""Core assignment of `pdserve serve`: pools never share a core when two or more exist."""

from pdserve.launcher import assign_cores


def test_pools_get_disjoint_cores():
    assert assign_cores(["0", "1"], 1, 1) == (["0"], ["1"])
    assert assign_cores(["0", "1"], 2, 1) == (["0", "0"], ["1"])
    assert assign_cores(["0", "1"], 1, 2) == (["0"], ["1", "1"])
    assert assign_cores(["0", "1", "2", "3"], 3, 1) == (["0", "1", "2"], ["3"])
    assert assign_cores(["0", "1", "2", "3"], 2, 2) == (["0", "1"], ["2", "3"])
    p, d = assign_cores([str(i) for i in range(8)], 4, 4)
    assert not set(p) & set(d) and len(set(p)) == 4


def test_one_core_or_one_pool():
    assert assign_cores(["0"], 2, 1) == (["0", "0"], ["0"])
    assert assign_cores(["0", "1"], 0, 2) == ([], ["1", "0"])
