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
    # each pool's degree, from its flags as its workers parse them
    from pdserve.cli import parse_args
    from pdserve.launcher import check_pool_args
    ns = parse_args(["serve", "--model", "m", "--kv-cache-gib", "1", "--prefill-args",
                     "-tp 2 --tensor-parallel-size=4"])        # the last wins
    pools = check_pool_args(ns, parse_args)
    assert (pool_tp(pools["prefill"]), pool_tp(pools["decode"])) == (4, 1)
    ns = parse_args(["serve", "--model", "m", "--tensor-parallel-size", "2"])
    assert [pool_tp(v) for v in check_pool_args(ns, parse_args).values()] == [2, 2]
    assert omp_bind("0", 1) == "0" and omp_bind("0", 2) == "0|0"
    assert omp_bind("0,1", 2) == "0|1" and omp_bind("0-4", 2) == "0,1,2|3,4"
    assert omp_bind("0|1", 2) == "0|1"
