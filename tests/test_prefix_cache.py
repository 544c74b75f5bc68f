"""Automatic prefix caching: full blocks of committed tokens are shared by identity (a hash chain
rooted in the request's cache salt), reference-counted, kept evictable after their requests end;
outputs are the same with caching on and off, with speculation on and off."""

import random

import pytest

from engine import Engine, SamplingParams
from engine.core.block_manager import BlockManager, extend_block_hashes
from engine.core.config import SchedulerConfig
from engine.core.outputs import SeqResult, StepResult
from engine.core.policy import SpeculationPolicy
from engine.core.request import Request
from engine.core.scheduler import Scheduler
from tests.conftest import PROMPTS
from tests.test_block_manager import fake_results


def ids(tokens, salt=None, bs=4):
    return extend_block_hashes([], tokens, len(tokens) // bs, bs, salt)


def test_blocks_are_shared_by_identity_counted_and_evicted_least_recently_freed_first():
    bm = BlockManager(num_blocks=6, block_size=4, enable_prefix_caching=True)
    a = list(range(10, 22))  # three full blocks
    assert bm.admit(1, [], 12) and bm.lookup(ids(a)) == []
    bm.register(1, ids(a)[:2])  # two blocks committed
    assert bm.lookup(ids(a)) == bm.block_table(1)[:2] and bm.num_cached_blocks == 2
    hits = bm.lookup(ids(a[:8] + [99, 98, 97, 96]))  # the same two blocks, then another
    assert hits == bm.block_table(1)[:2]
    assert bm.blocks_to_admit(hits, 12) == 1  # shared blocks cost nothing while referenced
    assert bm.admit(2, hits, 12) and bm.block_table(2)[:2] == hits
    bm.check_invariants()
    bm.free(1)
    bm.free(2)
    assert bm.num_free_blocks == 6 and bm.num_cached_blocks == 2  # freed, still cached
    bm.check_invariants()
    # Taking blocks evicts the least recently freed first: the two cached ones went back last.
    assert bm.admit(3, [], 16) and bm.lookup(ids(a)) == hits
    assert bm.admit(4, [], 8) and bm.lookup(ids(a)) == []  # now they were needed
    bm.check_invariants()


def test_salts_and_alignment_keep_identities_apart():
    tokens = list(range(50, 66))
    assert ids(tokens) != ids(tokens, salt="tenant-a") != ids(tokens, salt="tenant-b")
    # The same tokens one position later are other blocks (each identity chains from the start).
    assert not set(ids(tokens)) & set(ids([7] + tokens))
    bm = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=True)
    assert bm.admit(1, [], 16)
    bm.register(1, ids(tokens, salt="tenant-a"))
    assert len(bm.lookup(ids(tokens, salt="tenant-a"))) == 4
    assert bm.lookup(ids(tokens, salt="tenant-b")) == [] and bm.lookup(ids(tokens)) == []
    assert bm.lookup(ids([7] + tokens[:15], salt="tenant-a")) == []


def _scheduler(num_blocks: int, tree_depth: int = 0) -> Scheduler:
    policy = SpeculationPolicy({tree_depth: range(tree_depth)}) if tree_depth else None
    return Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=48),
                     BlockManager(num_blocks=num_blocks, block_size=4, enable_prefix_caching=True),
                     max_model_len=120, tree_depth=tree_depth, policy=policy)


def test_a_hit_stops_before_the_last_token_and_nothing_writes_into_a_shared_block():
    sched = _scheduler(64)
    prompt = list(range(3, 15))  # 12 tokens: three full blocks
    first = Request(request_id="a", seq_id=1, prompt_token_ids=prompt, eos_token_ids=frozenset({2}),
                    params=SamplingParams(temperature=0, max_tokens=3), seed=0)
    sched.add(first)
    out = sched.schedule()
    sched.update(StepResult(step_id=out.step_id, results=[SeqResult(seq_id=1, sampled_token_ids=[40])]))
    second = Request(request_id="b", seq_id=2, prompt_token_ids=list(prompt), eos_token_ids=frozenset({2}),
                     params=SamplingParams(temperature=0, max_tokens=3), seed=0)
    sched.add(second)
    out = sched.schedule()
    (s,) = [s for s in out.seqs if s.seq_id == 2]
    # Two of the three blocks come from the cache; the third holds the last prompt token, which
    # is computed (into a block of its own) because its logits start generation.
    assert s.start_pos == 8 and s.token_ids == prompt[8:] and second.metrics.num_cached_tokens == 8
    assert s.block_table[:2] == sched.blocks.block_table(1)[:2] and s.block_table[2] != sched.blocks.block_table(1)[2]
    assert sched.prefix_cache_queries == 24 and sched.prefix_cache_hits == 8


@pytest.mark.parametrize("tree_depth", [0, 3])
def test_random_workload_with_shared_prefixes_keeps_blocks_exact(tree_depth):
    """Adds, aborts, preemptions under KV pressure, prompts sharing prefixes and salts: after
    every step each block is free (cached or not) or owned with an exact reference count, no
    step writes into a block another live sequence holds, hits happen, nothing leaks."""
    rng = random.Random(tree_depth)
    sched = _scheduler(40, tree_depth)
    stems = [[rng.randint(3, 99) for _ in range(rng.randint(4, 24))] for _ in range(4)]
    pending = []
    for i in range(200):
        prompt = list(rng.choice(stems)) + [rng.randint(3, 99) for _ in range(rng.randint(0, 12))]
        pending.append(Request(request_id=str(i), seq_id=i, prompt_token_ids=prompt, eos_token_ids=frozenset({2}),
                               params=SamplingParams(temperature=0, max_tokens=rng.randint(1, 16)), seed=i,
                               cache_salt=rng.choice([None, None, "t1"])))
    steps = 0
    while pending or sched.has_unfinished():
        for _ in range(rng.randint(0, 3)):
            if pending:
                sched.add(pending.pop(0))
        if rng.random() < 0.05 and sched.running:
            sched.abort([rng.choice(sched.running).seq_id])
        out = sched.schedule()
        holders: dict[int, set] = {}
        for s in out.seqs:
            for b in s.block_table:
                holders.setdefault(b, set()).add(s.seq_id)
        for s in out.seqs:  # every block the step writes belongs to this sequence alone
            last = s.start_pos + len(s.token_ids) + (tree_depth if s.candidates else 0) - 1
            for b in s.block_table[s.start_pos // 4:last // 4 + 1]:
                assert holders[b] == {s.seq_id}, (s.seq_id, b)
        if out.seqs:
            sched.update(StepResult(step_id=out.step_id, results=fake_results(out, rng, tree_depth)))
        sched.blocks.check_invariants()
        steps += 1
        assert steps < 20000
    assert sched.blocks.num_free_blocks == sched.blocks.num_blocks
    assert sched.num_preemptions > 0 and sched.prefix_cache_hits > 0


def _conversation(eng, prompts, params, turns=2):
    """Each prompt, then its continuation by its own answer and a follow-up (a multi-turn chat)."""
    outs = []
    cur = list(prompts)
    for _ in range(turns):
        got = eng.generate_batch(cur, params)
        outs += [o.token_ids for o in got]
        cur = [p + o.text + " Tell me more." for p, o in zip(cur, got)]
    return outs


SYSTEM = "You are a careful assistant. Answer briefly and precisely. " * 3


@pytest.mark.parametrize("spec", [None, {"tree": "small_12"}])
def test_outputs_are_the_same_with_caching_on_and_off(bundled_dir, spec):
    """Greedy and seeded sampling over a shared system prompt and a second turn, with
    preemption (a small cache) and chunked prefill (a small budget): the same tokens with the
    prefix cache on and off, and the cache is hit. (Sampled requests verify trees by exact
    match, the rule whose tokens do not depend on which steps verify trees: with caching on,
    steps are scheduled otherwise. Typical acceptance and the rejection walk draw other —
    equally valid — samples under another schedule.)"""
    prompts = [SYSTEM + p for p in PROMPTS[:6]]
    params = [SamplingParams(temperature=0, max_tokens=20) if i % 2 else
              SamplingParams(temperature=0.8, seed=i, max_tokens=20, acceptance="greedy" if spec else None)
              for i in range(len(prompts))]
    got = {}
    for caching in (False, True):
        eng = Engine("default", speculative=spec, enable_prefix_caching=caching, max_num_seqs=4,
                     max_num_batched_tokens=64, num_blocks=14)
        got[caching] = _conversation(eng, prompts, params)
        assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks
        eng.block_manager.check_invariants()
        assert eng.stats.num_preemptions > 0
        assert (eng.stats.prefix_cache_hits > 0) == caching
    assert got[True] == got[False]


def test_medusa_hits_the_cache_exactly_as_plain_decoding_does(bundled_dir, monkeypatch):
    """The same conversations (greedy, so the same tokens) hit the same prefix-cache tokens,
    request by request, with Medusa (back-off) as without speculation: the heads keep no K/V
    of their own, and a Medusa step commits exactly the blocks a plain step would. (Back-off's
    start-up grid is invented: an invented device where trees pay, so steps verify them.)"""
    import engine.worker.startup
    from tests.conftest import invented_latency_grid

    monkeypatch.setattr(engine.worker.startup, "measure_step_latency", invented_latency_grid)
    prompts = [SYSTEM + p for p in PROMPTS[:6]]
    sp = SamplingParams(temperature=0, max_tokens=24)
    cached = {}
    for spec in (None, {"tree": "auto", "backoff": True}):
        eng = Engine("default", speculative=spec, max_num_seqs=8)
        cur, hits = list(prompts), []
        for _ in range(3):
            outs = eng.generate_batch(cur, sp)
            hits.append([o.metrics.num_cached_tokens for o in outs])
            cur = [p + o.text + " Tell me more." for p, o in zip(cur, outs)]
        cached[spec is None] = (hits, eng.stats.prefix_cache_queries, eng.stats.prefix_cache_hits)
        if spec is not None:
            assert any(n > 0 for n in eng.stats.steps_by_tree_size), eng.stats.steps_by_tree_size
    assert cached[True] == cached[False] and cached[True][2] > 0


def test_different_salts_never_share_and_usage_reports_cached_tokens(tiny_llama):
    eng = Engine(str(tiny_llama), max_num_seqs=4, block_size=4)
    prompt = list(range(5, 45))
    sp = SamplingParams(temperature=0, max_tokens=4)
    outs = {}
    for rid, salt in (("a1", "a"), ("b1", "b"), ("a2", "a"), ("n1", None)):
        eng.add_request(prompt, sp, request_id=rid, cache_salt=salt)
        while eng.has_unfinished():
            for o in eng.step():
                if o.finished:
                    outs[o.request_id] = o
    assert outs["a1"].metrics.num_cached_tokens == 0 and outs["b1"].metrics.num_cached_tokens == 0
    assert outs["a2"].metrics.num_cached_tokens == 36 and outs["n1"].metrics.num_cached_tokens == 0
    assert len({tuple(o.token_ids) for o in outs.values()}) == 1
    with pytest.raises(ValueError, match="cache_salt"):
        eng.add_request(prompt, sp, cache_salt="")
