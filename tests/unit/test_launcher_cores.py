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


def test_tensor_parallel_engines_get_a_core_per_rank():
    from pdserve.engine import omp_bind
    from pdserve.launcher import pool_tp
    assert assign_cores(["0", "1", "2", "3"], 1, 1, tp_p=2) == (["0|1"], ["2"])
    assert assign_cores(["0", "1", "2"], 1, 1, tp_p=2) == (["0|1"], ["2"])
    assert assign_cores(["0", "1"], 1, 1, tp_p=2) == (["0|0"], ["1"])     # shared
    assert assign_cores(["0", "1", "2", "3"], 1, 1, tp_d=2) == (["0"], ["1|2"])
    assert assign_cores(["0"], 1, 1, tp_p=2, tp_d=2) == (["0|0"], ["0|0"])
    assert pool_tp(["--model", "m", "--kv-cache-gib", "1", "--tensor-parallel-size", "2"]) == 2
    assert pool_tp(["-tp", "2", "--tensor-parallel-size=4"]) == 4           # the last wins
    assert pool_tp(["--block-size", "32"]) == 1
    assert omp_bind("0", 1) == "0" and omp_bind("0", 2) == "0|0"
    assert omp_bind("0,1", 2) == "0|1" and omp_bind("0-4", 2) == "0,1,2|3,4"
    assert omp_bind("0|1", 2) == "0|1"
