"""Prefix index and our block hash: example and property tests against a brute-force model."""

from hypothesis import given, settings
from hypothesis import strategies as st

from pdserve import kvhash
from scheduler.index import PrefixIndex


def test_block_hashes_chain_and_ignore_partial_tail():
    a = kvhash.block_hashes(list(range(40)), 16)
    assert len(a) == 2
    assert kvhash.block_hashes(list(range(32)), 16) == a
    b = kvhash.block_hashes([99] + list(range(1, 40)), 16)
    assert a[0] != b[0] and a[1] != b[1]                 # a change in block 0 changes block 1
    assert kvhash.block_hashes(list(range(40)), 16, max_blocks=1) == a[:1]
    assert kvhash.root_for(None) == kvhash.ROOT_STATE != kvhash.root_for(3)
    assert kvhash.cacheable_blocks(32, 16) == 1 and kvhash.cacheable_blocks(33, 16) == 2
    # a chain continued from a parent's state equals hashing the whole prefix at once
    toks = list(range(1000, 1100))
    head, states = kvhash.extend(kvhash.ROOT_STATE, toks[:48], 16)
    tail, _ = kvhash.extend(states[-1], toks[48:], 16)
    assert head + tail == kvhash.block_hashes(toks, 16) and len(set(head + tail)) == 6
    assert kvhash.block_hashes(toks, 16, state=kvhash.root_for(7)) != head + tail


def test_match_counts_leading_blocks_per_worker():
    ix = PrefixIndex()
    h = kvhash.block_hashes(list(range(64)), 16)
    ix.stored("a", h[:4])
    ix.stored("b", h[:2])
    ix.stored("c", h[1:4])                                # holds no block 0: no usable prefix
    assert ix.match(h, ["a", "b", "c", "d"]) == {"a": 4, "b": 2, "c": 0, "d": 0}
    assert ix.match(h, ["b"]) == {"b": 2}
    ix.removed("a", [h[2]])                               # evicted out of order
    assert ix.match(h, ["a"]) == {"a": 2}
    assert ix.stats().blocks == 4 and ix.stats().entries == 3 + 2 + 3


def test_worker_removal_clear_and_snapshot_replace():
    ix = PrefixIndex()
    h = kvhash.block_hashes(list(range(64)), 16)
    ix.stored("a", h)
    ix.stored("b", h[:1])
    assert ix.remove_worker("a") == 4
    assert ix.match(h, ["a", "b"]) == {"a": 0, "b": 1}
    assert ix.stats().blocks == 1
    ix.stored("c", h)                                     # reuses a's slot
    assert ix.match(h, ["b", "c"]) == {"b": 1, "c": 4}
    ix.clear_worker("c")
    assert ix.match(h, ["c"]) == {"c": 0} and ix.held_by("c") == 0
    ix.replace("b", h[:3])
    assert ix.match(h, ["b"]) == {"b": 3}
    ix.removed("ghost", h)                                # unknown worker: ignored
    assert ix.stats().blocks == 3


ops = st.lists(st.tuples(st.sampled_from(["store", "remove", "drop", "clear"]),
                         st.sampled_from(["w0", "w1", "w2", "w3"]),
                         st.lists(st.integers(0, 11), max_size=6)), max_size=60)


@settings(max_examples=300, deadline=None)
@given(ops, st.integers(0, 12))
def test_index_matches_a_brute_force_model(seq, prompt_len):
    keys = list(range(1000, 1012))                        # 12 block hashes of one chain
    ix = PrefixIndex()
    model: dict[str, set[int]] = {}
    for op, w, blocks in seq:
        hs = [keys[b] for b in blocks]
        if op == "store":
            ix.stored(w, hs)
            model.setdefault(w, set()).update(hs)
        elif op == "remove":
            ix.removed(w, hs)
            model.get(w, set()).difference_update(hs)
        elif op == "drop":
            ix.remove_worker(w)
            model.pop(w, None)
        else:
            ix.clear_worker(w)
            if w in model:
                model[w] = set()
    prompt = keys[:prompt_len]
    got = ix.match(prompt, ["w0", "w1", "w2", "w3"])
    for w in ["w0", "w1", "w2", "w3"]:
        held = model.get(w, set())
        depth = 0
        while depth < len(prompt) and prompt[depth] in held:
            depth += 1
        assert got[w] == depth
    assert ix.stats().blocks == len(set().union(*model.values()) if model else set())
    assert ix.stats().entries == sum(len(s) for s in model.values())
