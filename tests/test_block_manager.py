"""Block manager and scheduler accounting under random workloads (no model: a fake runner)."""

import random

from engine import SamplingParams
from engine.core.block_manager import BlockManager
from engine.core.config import SchedulerConfig
from engine.core.outputs import SeqResult, StepResult
from engine.core.policy import SpeculationPolicy
from engine.core.request import Request
from engine.core.scheduler import Scheduler


def test_allocate_free_roundtrip():
    bm = BlockManager(num_blocks=8, block_size=4)
    assert bm.allocate(1, 9) and len(bm.block_table(1)) == 3
    assert bm.allocate(1, 12) and len(bm.block_table(1)) == 3  # still fits
    assert not bm.allocate(2, 21)  # needs 6, only 5 free: no change
    assert bm.block_table(2) == [] and bm.num_free_blocks == 5
    bm.free(1)
    bm.free(1)  # second free of the same sequence is a no-op, not a double free
    assert bm.num_free_blocks == 8
    bm.check_invariants()


def _fake_step(sched: Scheduler, rng: random.Random, tree_depth: int) -> None:
    out = sched.schedule()
    owners = {}
    for s in out.seqs:
        # The scheduler reserved every slot the step may write.
        need = s.start_pos + len(s.token_ids) + (tree_depth if s.candidates else 0)
        assert len(s.block_table) * sched.blocks.block_size >= need
        for b in s.block_table:
            assert owners.setdefault(b, s.seq_id) == s.seq_id, "block shared by two live sequences"
    sched.update(StepResult(step_id=out.step_id, results=fake_results(out, rng, tree_depth)))
    sched.blocks.check_invariants()


def fake_results(out, rng: random.Random, tree_depth: int) -> list[SeqResult]:
    """What a runner could return for ``out``: each sampling sequence accepts 0..depth of its
    candidates (random tokens) and proposes the next ones."""
    results = []
    for s in out.seqs:
        if not s.sample:
            results.append(SeqResult(seq_id=s.seq_id, sampled_token_ids=[]))
            continue
        acc = rng.randint(0, tree_depth) if s.candidates else 0
        results.append(SeqResult(seq_id=s.seq_id, sampled_token_ids=[rng.randint(3, 99) for _ in range(acc + 1)],
                                 num_accepted=acc, next_candidates=[5] * tree_depth if tree_depth else []))
    return results


def test_random_workload_frees_every_block():
    rng = random.Random(0)
    bm = BlockManager(num_blocks=64, block_size=4)
    tree_depth = 3
    sched = Scheduler(SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=64), bm,
                      max_model_len=120, tree_depth=tree_depth, policy=SpeculationPolicy({3: range(3)}))
    reqs = []
    for i in range(500):
        prompt = [rng.randint(3, 99) for _ in range(rng.randint(1, 60))]
        reqs.append(Request(request_id=str(i), seq_id=i, prompt_token_ids=prompt, eos_token_ids=frozenset({2}),
                            params=SamplingParams(temperature=0, max_tokens=rng.randint(1, 40)), seed=i))
    pending = list(reqs)
    steps = 0
    while pending or sched.has_unfinished():
        for _ in range(rng.randint(0, 3)):
            if pending:
                sched.add(pending.pop(0))
        if rng.random() < 0.1 and sched.running:
            sched.abort([rng.choice(sched.running).seq_id])
        if rng.random() < 0.05 and sched.waiting:
            sched.abort([rng.choice(list(sched.waiting)).seq_id])
        _fake_step(sched, rng, tree_depth)
        steps += 1
        assert steps < 20000
    assert bm.num_free_blocks == bm.num_blocks
    assert sched.num_preemptions > 0, "the workload should have forced preemption"
    for r in reqs:
        assert r.finished
        if r.finish_reason != "abort":
            assert r.finish_reason == "length"
            assert len(r.output_token_ids) == r.params.max_tokens or r.num_tokens >= 120


class _FixedChoice:
    """A back-off stand-in that always picks the n-candidate tree."""

    def __init__(self, n: int) -> None:
        self.n = n

    def choose(self, batch_size: int, max_candidates: int, host: bool = False) -> int:
        return self.n


def _decoding_scheduler(n_seqs: int, budget: int, n_cands: int, choice=None) -> Scheduler:
    """``n_seqs`` requests past their prefill, each holding ``n_cands`` candidates; ``choice``:
    the tree size the policy picks (None: always the full tree), 3 being candidates 0, 2, 5."""
    policy = SpeculationPolicy({n_cands: range(n_cands), 3: (0, 2, 5)},
                               _FixedChoice(choice) if choice is not None else None)
    sched = Scheduler(SchedulerConfig(max_num_seqs=n_seqs, max_num_batched_tokens=budget),
                      BlockManager(num_blocks=256, block_size=4), max_model_len=200, tree_depth=2, policy=policy)
    for i in range(n_seqs):
        sched.add(Request(request_id=str(i), seq_id=i, prompt_token_ids=[3, 4, 5], eos_token_ids=frozenset({2}),
                          params=SamplingParams(temperature=0, max_tokens=50), seed=i))
    out = sched.schedule()  # prefill, all of it fits
    sched.update(StepResult(step_id=out.step_id, results=[
        SeqResult(seq_id=s.seq_id, sampled_token_ids=[7], next_candidates=list(range(10, 10 + n_cands)))
        for s in out.seqs]))
    return sched


def test_trees_go_to_every_decoding_sequence_or_to_none():
    # 4 sequences x (1 + 6) = 28 tokens: fits a budget of 28, not one of 27.
    out = _decoding_scheduler(4, 28, 6).schedule()
    assert [len(s.candidates) for s in out.seqs] == [6] * 4 and [s.tree_size for s in out.seqs] == [6] * 4
    assert _decoding_scheduler(4, 28, 6).schedule().propose is True
    out = _decoding_scheduler(4, 27, 6).schedule()
    assert len(out.seqs) == 4 and all(s.candidates == [] and s.tree_size == 0 for s in out.seqs)  # plain, not mixed
    # ... and the next step would not fit them either: no proposals nobody reads.
    assert out.propose is False
    # Back-off's smaller tree (candidates 0, 2 and 5 of each full tree) makes them fit again,
    # and the step names it.
    out = _decoding_scheduler(4, 27, 6, choice=3).schedule()
    assert [s.candidates for s in out.seqs] == [[10, 12, 15]] * 4 and [s.tree_size for s in out.seqs] == [3] * 4
    out = _decoding_scheduler(4, 28, 6, choice=0).schedule()
    assert all(s.candidates == [] and s.tree_size == 0 for s in out.seqs)
    # Choosing no tree also turns the next step's proposals off: the step is plain decoding.
    assert out.propose is False


def test_trees_only_when_every_decoding_sequence_holds_candidates():
    """One decoding sequence without candidates (its last step proposed none for it) makes the
    step plain for all — a uniform step, which replays a graph, where trees for the others
    would run eagerly — and that step proposes for everyone, so trees come back next step. A
    prompts-only step proposes as for every sequence that decodes next, the ones it left out
    included."""
    sched = _decoding_scheduler(3, 64, 6)
    out = sched.schedule()
    assert [s.tree_size for s in out.seqs] == [6] * 3
    sched.update(StepResult(step_id=out.step_id, results=[
        SeqResult(seq_id=s.seq_id, sampled_token_ids=[7], num_accepted=0,
                  next_candidates=[] if s.seq_id == 0 else list(range(10, 16))) for s in out.seqs]))
    out = sched.schedule()
    assert all(s.tree_size == 0 and s.candidates == [] for s in out.seqs) and out.propose is True
    _answer(sched, out)
    assert [s.tree_size for s in sched.schedule().seqs] == [6] * 3
    # Full trees for n sequences fit a budget of 30 up to n = 4 (7 tokens each): four decode,
    # a fifth prompt arrives and gets a step of its own, which must not propose as for one.
    sched = _decoding_scheduler(4, 30, 6)
    sched.config.max_num_seqs = 5
    sched.add(Request(request_id="new", seq_id=9, prompt_token_ids=[3, 4, 5], eos_token_ids=frozenset({2}),
                      params=SamplingParams(temperature=0, max_tokens=50), seed=9))
    out = sched.schedule()
    assert [len(s.token_ids) for s in out.seqs] == [3] and out.propose is False


def _answer(sched: Scheduler, out, n_cands: int = 6) -> None:
    sched.update(StepResult(step_id=out.step_id, results=[
        SeqResult(seq_id=s.seq_id, sampled_token_ids=[7] if s.sample else [],
                  next_candidates=list(range(10, 10 + n_cands)) if s.sample else []) for s in out.seqs]))


def test_prefill_first_new_prompts_alone_and_no_trees_beside_a_prefill():
    """Prefill first: a new prompt gets a step of its own (never two such steps in a row, so
    arrivals cannot starve the decodes); a step that does mix prefill with decodes verifies no
    trees, so the chunks get the budget; a prompt that cannot be admitted holds nothing back."""
    def req(rid, seq_id, n):
        return Request(request_id=rid, seq_id=seq_id, prompt_token_ids=list(range(3, 3 + n)),
                       eos_token_ids=frozenset({2}), params=SamplingParams(temperature=0, max_tokens=50), seed=seq_id)

    sched = _decoding_scheduler(4, 64, 6)
    sched.config.max_num_seqs = 6
    sched.add(req("new", 99, 40))
    out = sched.schedule()
    assert [len(s.token_ids) for s in out.seqs] == [40]  # the prompt alone
    _answer(sched, out)
    sched.add(req("next", 98, 10))
    out = sched.schedule()  # right after a prompt-only step: everyone, and no trees
    assert [len(s.token_ids) for s in out.seqs] == [1, 1, 1, 1, 1, 10]
    assert all(s.tree_size == 0 and s.candidates == [] for s in out.seqs)
    _answer(sched, out)
    out = sched.schedule()  # everyone decodes: trees again, the new requests' included
    assert [s.tree_size for s in out.seqs] == [6] * 6
    _answer(sched, out)
    # A waiting request beyond max_num_seqs cannot be admitted: the trees stay.
    sched.add(req("late", 100, 2))
    out = sched.schedule()
    assert [s.tree_size for s in out.seqs] == [6] * 6 and len(sched.waiting) == 1
    # A prompt longer than the budget: its first chunk alone, then its last chunk beside the
    # decodes (no trees), then trees for all.
    sched = _decoding_scheduler(2, 24, 6)
    sched.config.max_num_seqs = 3
    sched.add(req("long", 7, 40))
    steps = []
    for _ in range(3):
        out = sched.schedule()
        steps.append([(len(s.token_ids), s.tree_size) for s in out.seqs])
        _answer(sched, out)
    assert steps == [[(24, 0)], [(1, 0), (1, 0), (16, 0)], [(1, 6)] * 3]


def test_served_decode_steps_correct_the_policy():
    """A pure decode step on the chosen tree reports its cost and yield to the policy (unless
    it captured a CUDA graph)."""
    seen = []

    class Recording(_FixedChoice):
        def observe(self, batch_size, n, ms, tokens_per_seq, host):
            seen.append((batch_size, n, ms, tokens_per_seq, host))

    policy = SpeculationPolicy({6: range(6), 3: (0, 2, 5)}, Recording(3))
    sched = Scheduler(SchedulerConfig(max_num_seqs=2, max_num_batched_tokens=64),
                      BlockManager(num_blocks=64, block_size=4), max_model_len=200, tree_depth=2, policy=policy)
    for i in range(2):
        sched.add(Request(request_id=str(i), seq_id=i, prompt_token_ids=[3, 4, 5], eos_token_ids=frozenset({2}),
                          params=SamplingParams(temperature=0, max_tokens=50), seed=i))
    out = sched.schedule()  # prefill: not a decode step, nothing observed
    sched.update(StepResult(step_id=out.step_id, results=[
        SeqResult(seq_id=s.seq_id, sampled_token_ids=[7], next_candidates=list(range(10, 16))) for s in out.seqs]),
        execute_ms=5.0)
    assert seen == []
    out = sched.schedule()
    assert [s.tree_size for s in out.seqs] == [3, 3]
    sched.update(StepResult(step_id=out.step_id, results=[
        SeqResult(seq_id=0, sampled_token_ids=[10, 8], num_accepted=1, next_candidates=list(range(10, 16))),
        SeqResult(seq_id=1, sampled_token_ids=[9], num_accepted=0, next_candidates=list(range(10, 16)))]),
        execute_ms=2.5)
    assert seen == [(2, 3, 2.5, 1.5, "greedy")]
    assert policy.steps_by_tree_size == {3: 1}
    # A step that captured a CUDA graph (first use of a shape: ~1 s) teaches the policy nothing.
    out = sched.schedule()
    sched.update(StepResult(step_id=out.step_id, captured=True, results=[
        SeqResult(seq_id=s.seq_id, sampled_token_ids=[9], next_candidates=list(range(10, 16))) for s in out.seqs]),
        execute_ms=900.0)
    assert len(seen) == 1 and policy.steps_by_tree_size == {3: 2}
