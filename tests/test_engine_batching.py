"""A request's tokens do not depend on what else runs with it: joins, finishes, aborts,
chunked prefill, preemption by recompute, seeded sampling."""

import random

import pytest

from engine import SamplingParams
from engine.engine import Engine
from tests.conftest import PROMPTS

MAX = 40


def _alone(engine, prompts, params):
    return [engine.generate_batch([p], params)[0].token_ids for p in prompts]


def _churn(engine, prompts, params):
    """Requests join over time, one is aborted mid-way, others finish early."""
    ids = {}
    done = {}
    early = SamplingParams(temperature=params.temperature, seed=params.seed, max_tokens=5)
    engine.add_request(PROMPTS[-1], SamplingParams(temperature=0, max_tokens=MAX), request_id="victim")
    queue = list(enumerate(prompts))
    step = 0
    while queue or engine.has_unfinished():
        if queue and step % 2 == 0:
            i, p = queue.pop(0)
            ids[engine.add_request(p, params, request_id=f"r{i}")] = i
            engine.add_request(p, early, request_id=f"short{i}")
        if step == 6:
            assert engine.abort("victim")
        for o in engine.step():
            if o.finished and o.request_id in ids:
                done[ids[o.request_id]] = o.token_ids
        step += 1
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    return [done[i] for i in range(len(prompts))]


@pytest.fixture(scope="module")
def engine(bundled_dir):
    # A small token budget forces chunked prefill of the longer prompts.
    return Engine(str(bundled_dir), max_num_seqs=8, max_num_batched_tokens=24)


def test_batch_invariance_greedy(engine):
    prompts = PROMPTS[:6]
    params = SamplingParams(temperature=0, max_tokens=MAX)
    assert _churn(engine, prompts, params) == _alone(engine, prompts, params)


def test_batch_invariance_seeded_sampling(engine):
    prompts = PROMPTS[:4]
    params = SamplingParams(temperature=0.8, top_p=0.95, top_k=50, seed=1234, max_tokens=MAX)
    alone = _alone(engine, prompts, params)
    assert _churn(engine, prompts, params) == alone
    # And the seed matters: another seed gives other text for at least one prompt.
    other = _alone(engine, prompts, SamplingParams(temperature=0.8, top_p=0.95, top_k=50, seed=99, max_tokens=MAX))
    assert other != alone


def test_preemption_gives_identical_tokens(bundled_dir, engine):
    prompts = PROMPTS[:6]
    params = SamplingParams(temperature=0, max_tokens=MAX, ignore_eos=True)
    ref = _alone(engine, prompts, params)
    # 8 blocks of 16 tokens cannot hold 6 sequences of ~50 tokens at once.
    small = Engine(str(bundled_dir), num_blocks=8, block_size=16, max_num_seqs=6)
    outs = small.generate_batch(prompts, params)
    assert small.stats.num_preemptions > 0
    assert [o.token_ids for o in outs] == ref
    assert small.block_manager.num_free_blocks == small.block_manager.num_blocks


def test_a_decode_step_is_counted_as_merging_its_counts():
    """``record_decode`` (once per sequence and step, counted in place) keeps the counters that
    merging the step's own counts would: steps, tokens, the accepted-length histogram, per depth."""
    from engine.core.request import DecodeCounters

    rng = random.Random(0)
    fast, merged = DecodeCounters(), DecodeCounters()
    for _ in range(300):
        n = rng.randint(0, 5)
        per_depth = [int(n > d) for d in range(rng.choice([0, 3, 5]))]
        fast.record_decode(n, per_depth)
        merged.merge_counts(1, n + 1, [0] * n + [1], per_depth)
    assert fast == merged and fast.num_decode_steps == 300 and sum(fast.accepted_hist) == 300


def test_stepping_an_idle_engine_is_harmless(engine):
    """``step()`` with nothing to run returns [] and leaves the engine as it was: polled while
    idle, between requests and after the last one finished, it still serves each request as
    when run alone (``for o in iter(engine.step, [])`` is a loop users write)."""
    params = SamplingParams(temperature=0, max_tokens=8)
    want = _alone(engine, PROMPTS[:2], params)
    assert [engine.step() for _ in range(3)] == [[], [], []]
    for i, p in enumerate(PROMPTS[:2]):
        engine.add_request(p, params, request_id=f"idle{i}")
    done = {}
    while engine.has_unfinished():
        done.update({o.request_id: o.token_ids for o in engine.step() if o.finished})
    assert engine.step() == [] and engine.step() == []
    assert [done["idle0"], done["idle1"]] == want
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_adds_steps_aborts_and_idle_steps_keep_the_invariants(bundled_dir, seed):
    """A random sequence of add_request / step / abort / idle steps (the cache small enough to
    preempt): every request added is reported finished exactly once (aborted ones not at all),
    none is lost, nothing is reported twice, finished requests' greedy tokens equal the same
    prompt run alone, and the KV cache is empty at the end."""
    rng = random.Random(seed)
    eng = Engine(str(bundled_dir), num_blocks=24, block_size=16, max_num_seqs=6, max_num_batched_tokens=64)
    params = SamplingParams(temperature=0, max_tokens=12)
    live, aborted, finished, prompts = set(), set(), {}, {}
    for i in range(120):
        action = rng.random()
        if action < 0.25 and len(prompts) < 14:
            rid = f"r{len(prompts)}"
            prompts[rid] = PROMPTS[rng.randrange(len(PROMPTS))]
            eng.add_request(prompts[rid], params, request_id=rid)
            live.add(rid)
        elif action < 0.32 and live:
            rid = rng.choice(sorted(live))
            assert eng.abort(rid)
            live.discard(rid)
            aborted.add(rid)
        else:
            for o in eng.step():
                assert o.request_id not in aborted and o.request_id not in finished, o.request_id
                if o.finished:
                    finished[o.request_id] = o.token_ids
                    live.discard(o.request_id)
    while eng.has_unfinished():
        for o in eng.step():
            assert o.request_id not in finished
            if o.finished:
                finished[o.request_id] = o.token_ids
                live.discard(o.request_id)
    assert not live and set(finished) | aborted == set(prompts) and not set(finished) & aborted
    assert eng.step() == []
    assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks
    alone = Engine(str(bundled_dir), max_num_seqs=1)
    for rid in sorted(finished)[:4]:
        assert finished[rid] == alone.generate_batch([prompts[rid]], params)[0].token_ids, rid
