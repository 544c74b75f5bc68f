"""Adaptive trees (speculative.adaptive): every sequence's tree sized by its own heads'
calibrated confidence under one budget a step — the policy's choices, its calibration, and
that output stays exactly plain decoding's with ragged trees in a step."""

import random

import pytest
import torch

from engine import SamplingParams
from engine.core.adaptive import AdaptiveTrees, Candidates, NodeCalibration, measure_driver_ms_per_node
from engine.core.backoff import LatencyModel, LatencyPoint
from engine.engine import Engine
from engine.spec.tree import MedusaTree
from tests.conftest import PROMPTS

FULL = MedusaTree.build("mc_sim_7b_63", 4)
SIZES = (0, 1, 2, 4, 8, 16, 32, 63)


def _device(per_token_ms: float, fixed_ms: float = 10.0, route: str = "host") -> LatencyModel:
    """A device whose step costs fixed + per_token * tokens (every route alike)."""
    return LatencyModel([LatencyPoint(b, n, fixed_ms + per_token_ms * b * (n + 1))
                         for n in SIZES for b in (1, 4, 16, 64)])


def _confidence(top: float) -> list[float]:
    """Heads that give their rank-r guess probability top / (r + 1)^2 (a sure head: top near 1)."""
    return [top / (c[-1] + 1) ** 2 for c in FULL.choices]


def _policy(per_token_ms: float = 0.05, **kw) -> AdaptiveTrees:
    return AdaptiveTrees(FULL.parents, FULL.depths, _device(per_token_ms), **kw)


def _closed(nodes: list[int]) -> bool:
    taken = {FULL.choices[i] for i in nodes}
    return nodes == sorted(set(nodes)) and all(c[:-1] in taken for c in taken if len(c) > 1)


def test_sure_sequences_get_deep_trees_unsure_ones_none_and_every_tree_is_closed():
    policy = _policy()
    seqs = [Candidates(0, [7] * 63, _confidence(0.95)), Candidates(1, [7] * 63, _confidence(0.5)),
            Candidates(2, [7] * 63, _confidence(0.0005))]
    plan = policy.plan(seqs, num_decoding=4, max_nodes=10_000)
    assert len(plan.get(0, [])) > len(plan.get(1, [])) > 0 and 2 not in plan, plan
    assert all(_closed(nodes) for nodes in plan.values())
    depth = {i: max(len(FULL.choices[c]) for c in nodes) for i, nodes in plan.items()}
    assert depth[0] >= depth[1]
    # The plan's promise is the sum of the taken nodes' values.
    values = {i: policy.values(s.confidence) for i, s in enumerate(seqs)}
    assert plan.expected == pytest.approx(sum(values[i][c] for i, nodes in plan.items() for c in nodes))


def test_the_budget_follows_the_step_cost_and_the_token_budget():
    seqs = [Candidates(i, [7] * 63, _confidence(0.9)) for i in range(16)]
    cheap = _policy(0.001).plan(seqs, 16, 10_000)
    dear = _policy(0.5).plan(seqs, 16, 10_000)
    assert sum(map(len, cheap.values())) > sum(map(len, dear.values()))
    assert not _policy(50.0).plan(seqs, 16, 10_000)  # verification never pays: plain decoding
    capped = _policy(0.001).plan(seqs, 16, 20)
    assert 0 < sum(map(len, capped.values())) <= 20


def test_heads_that_promise_much_and_deliver_nothing_are_priced_out_then_tried_again():
    policy = _policy()
    seqs = [Candidates(i, list(range(100, 163)), _confidence(0.9)) for i in range(4)]
    steps = 0
    while (plan := policy.plan(seqs, 4, 10_000)) and steps < 50:
        # Nothing accepted: every sequence produced only a token none of its candidates guessed.
        policy.observe_step([(nodes, [seqs[i].tokens[c] for c in nodes], [seqs[i].confidence[c] for c in nodes], [1])
                             for i, nodes in plan.items()])
        steps += 1
    assert steps <= 12, steps
    idle = 0
    while not policy.plan(seqs, 4, 10_000) and idle < 2000:
        idle += 1
    assert 20 < idle < 2000  # the evidence ages: trees come back, but not at once


def test_a_calibration_follows_what_served_steps_accepted_per_depth_and_confidence():
    cal = NodeCalibration(depth=2)
    for _ in range(200):  # depth 1 at 0.5 is right 90% of the time, depth 2 at 0.5 10%
        cal.observe([(1, 0.5, True)] * 9 + [(1, 0.5, False)] + [(2, 0.5, True)] + [(2, 0.5, False)] * 9)
    assert cal.value(1, 0.5) == pytest.approx(0.9, abs=0.03) and cal.value(2, 0.5) == pytest.approx(0.1, abs=0.03)
    # A bin never served follows its depth: depth 1 delivered more than promised, depth 2 less.
    assert cal.value(1, 0.01) > 0.015 and cal.value(2, 0.01) < 0.005
    assert NodeCalibration(depth=1).value(1, 0.3) == pytest.approx(0.3)  # no evidence: the heads' own word


def test_only_the_accepted_path_teaches_and_the_walk_stops_where_it_was_rejected():
    policy = _policy()
    kids = FULL.children
    a, b = kids[0][0], kids[0][1]  # two depth-1 nodes (node ids)
    a1 = kids[a][0]  # a child of a
    nodes = sorted(n - 1 for n in (a, b, a1))
    tokens = {a - 1: 10, b - 1: 11, a1 - 1: 12}
    seen = []
    policy.calibration.observe = seen.extend
    # Accepted a (10) then rejected a1 (12 was not the model's 13), bonus 13.
    policy.observe_step([(nodes, [tokens[c] for c in nodes], [0.5] * 3, [10, 13])])
    assert sorted(seen) == [(1, 0.5, False), (1, 0.5, True), (2, 0.5, False)]


def test_proposals_are_probed_while_no_tree_is_chosen_and_the_probes_are_priced():
    seqs = [Candidates(0, [7] * 63, _confidence(1e-6))]

    def proposals(policy: AdaptiveTrees, steps: int) -> int:
        n = 0
        for _ in range(steps):
            assert not policy.plan(seqs, 1, 10_000)
            n += policy.propose_next(1)
        return n

    assert 3 <= proposals(_policy(), 64) <= 5  # a cheap device: probes 4, 8, 16, 32 steps apart
    # A GPU-like device, where a proposing step (the host path) costs 3x a plain one: the first
    # probe waits until it costs 2% of the plain steps between (100 steps), then longer.
    gpu = AdaptiveTrees(FULL.parents, FULL.depths, LatencyModel(
        [LatencyPoint(b, n, 1.0 if n == 0 else 3.0) for n in SIZES for b in (1, 4)]))
    assert proposals(gpu, 99) == 0 and proposals(gpu, 1) == 1 and proposals(gpu, 300) == 1


def test_adaptive_and_backoff_are_exclusive():
    with pytest.raises(ValueError, match="speculative.adaptive"):
        Engine("default", speculative={"adaptive": True, "backoff": True})


@pytest.fixture(scope="module")
def adaptive_engine(bundled_dir):
    """The bundled model with adaptive trees, a KV cache small enough to preempt six chat
    requests, and a device where verifying is cheap (this CPU's timings vary from box to box;
    latency learning off, so served steps cannot pull it back): trees are sized by the heads'
    calibrated confidence."""
    import engine.worker.startup as startup

    with pytest.MonkeyPatch.context() as mp:  # (the start-up grid is replaced below: not measured)
        mp.setattr(startup, "measure_step_latency", lambda runner, batch_sizes, sizes, *a, **kw: [
            [b, n, 10.0 + 0.01 * b * (n + 1)] for n in [0, *sizes] for b in batch_sizes])
        eng = Engine("default", max_num_seqs=6, num_blocks=14, block_size=16,
                     speculative={"heads": "default", "adaptive": True, "acceptance": "greedy"})
    eng.policy.adaptive.latency, eng.policy.adaptive.learning_rate = _device(0.01), 0.0
    return eng


def test_adaptive_trees_are_lossless_ragged_and_leak_nothing(adaptive_engine, monkeypatch):
    """Greedy adaptive Medusa == plain decoding on the bundled model, with sequences of one
    step verifying trees of different sizes (and some none), a batch that drains, and
    preemption."""
    eng = adaptive_engine
    prompts = PROMPTS[:6]
    params = [SamplingParams(temperature=0, max_tokens=12 + 6 * i) for i in range(len(prompts))]
    plain = Engine("default", max_num_seqs=6)
    ref = [o.token_ids for o in plain.generate_batch(prompts, params, chat=True)]
    sizes_per_step = []
    schedule = eng.scheduler.schedule

    def spy():
        out = schedule()
        sizes_per_step.append(sorted(len(s.candidates) for s in out.seqs if s.sample))
        return out

    monkeypatch.setattr(eng.scheduler, "schedule", spy)
    preempted = eng.stats.num_preemptions
    assert [o.token_ids for o in eng.generate_batch(prompts, params, chat=True)] == ref
    assert any(len(set(s)) > 1 for s in sizes_per_step), sizes_per_step  # ragged steps ran
    assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks
    assert eng.stats.num_preemptions > preempted


def test_ragged_step_graphs_are_lossless(bundled_dir, monkeypatch):
    """The GPU's path for adaptive trees, run uncaptured on the CPU (the graph runner's CPU
    mode: the same static buffers, derived positions, slots and masks, and the same tails): a
    ragged step's graph forwards each sequence's own tree, the greedy tail decides it in the
    full tree's node space and commits the accepted nodes, and the proposal reports its
    confidences. Output == plain decoding, every ragged step had its graph, nothing leaks."""
    import engine.worker.startup as startup
    import engine.worker.worker as worker
    from engine.worker.cuda_graphs import CudaGraphRunner

    monkeypatch.setattr(worker, "use_cuda_graphs", lambda *a, **kw: True)
    monkeypatch.setattr(startup, "measure_step_latency", lambda runner, batch_sizes, sizes, *a, **kw: [
        [b, n, 10.0 + 0.01 * b * (n + 1)] for n in [0, *sizes] for b in batch_sizes])
    from engine.sample.host_decision import logits_rows
    from engine.worker.model_runner import ModelRunner

    ragged, checked = [], []
    run_ragged, ragged_step = CudaGraphRunner.run_ragged, ModelRunner._ragged_step
    monkeypatch.setattr(CudaGraphRunner, "run_ragged", lambda self, shape, b, seqs: ragged.append(
        sorted(len(s.candidates) for s in seqs)) or run_ragged(self, shape, b, seqs))

    def check(self, batch, graph, defer):  # every ragged decision is the host decider's on the same logits
        logits = self.model.lm_head(graph.hidden[:graph.shape.num_tokens])
        ranges, rows = logits_rows(batch.seqs, batch.offsets)
        host = self.host.decide(batch.seqs, ranges, logits[torch.tensor(rows)], batch.seq_trees)
        result = ragged_step(self, batch, graph, defer)
        checked.extend(r.sampled_token_ids == d.tokens for r, d in zip(result.results, host))
        return result

    monkeypatch.setattr(ModelRunner, "_ragged_step", check)
    eng = Engine("default", max_num_seqs=2, max_num_batched_tokens=128, num_blocks=64, block_size=16,
                 speculative={"heads": "default", "tree": "small_12", "adaptive": True, "acceptance": "greedy"})
    eng.policy.adaptive.latency, eng.policy.adaptive.learning_rate = _device(0.01), 0.0
    prompts = PROMPTS[:3]
    params = [SamplingParams(temperature=0, max_tokens=14 + 5 * i) for i in range(len(prompts))]
    ref = [o.token_ids for o in Engine("default", max_num_seqs=2).generate_batch(prompts, params, chat=True)]
    assert [o.token_ids for o in eng.generate_batch(prompts, params, chat=True)] == ref
    assert any(max(sizes) > 0 for sizes in ragged), ragged  # trees were verified in ragged graphs
    assert checked and all(checked)
    assert eng.stats.num_graph_miss_steps == 0 and sum(eng.stats.accepted_hist[1:]) > 0
    assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks


def test_sampled_rules_decide_adaptive_trees(adaptive_engine):
    """Sampled requests over ragged trees, typical and rejection side by side: each rule's host
    function decides its sequence's own tree (the rules themselves are checked on arbitrary
    trees in test_acceptance.py and test_rejection_sampling.py); every request ends by its
    length or EOS, trees were accepted, nothing leaks."""
    eng = adaptive_engine
    accepted = sum(eng.stats.accepted_hist[1:])
    sp = [SamplingParams(temperature=0.7, max_tokens=24, seed=i, acceptance=("typical", "rejection")[i % 2])
          for i in range(6)]
    out = [o.token_ids for o in eng.generate_batch(PROMPTS[:6], sp, chat=True)]
    assert all(len(t) == 24 or (len(t) < 24 and t[-1] in eng.eos_token_ids) for t in out)
    assert sum(eng.stats.accepted_hist[1:]) > accepted
    assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks


def test_constrained_requests_over_adaptive_trees(adaptive_engine):
    """A grammar over adaptive trees: each row's mask follows its own tree (Engine.tree_children),
    greedy output equals plain decoding's under the same grammar, the grammars are dropped."""
    sp = SamplingParams(temperature=0, max_tokens=40,
                        structured_outputs={"json": {"type": "object", "properties": {"city": {"type": "string"}},
                                                     "required": ["city"]}})
    prompts = ["Name a large city as JSON.", "Which city is the capital of France? Answer in JSON."]
    ref = [o.token_ids for o in Engine("default", max_num_seqs=2).generate_batch(prompts, sp, chat=True)]
    eng = adaptive_engine
    verified = eng.stats.num_verified_candidates
    assert [o.token_ids for o in eng.generate_batch(prompts, sp, chat=True)] == ref
    assert eng.stats.num_verified_candidates > verified and len(eng.structured) == 0


def _ranked_plan(policy: AdaptiveTrees, seqs: list[Candidates], b: int, max_nodes: int) -> dict[int, list[int]]:
    """The plan by its definition: every (sequence, node) valued, ranked, the best M taken for
    the M of the best rate (what ``plan``'s best-first walk must reproduce)."""
    c = len(policy.depths)
    keys = [(v - policy._hair[k], i * c + k) for i, s in enumerate(seqs)
            for k, v in enumerate(policy.values(s.confidence))]
    ranked = sorted((k for k in keys if k[0] >= policy.MIN_VALUE), key=lambda k: (-k[0], k[1]))
    best_m, best_rate = 0, b / policy.latency.ms(b, 0, "host") * policy.margin
    for m in policy.budgets(b, max_nodes):
        m = min(m, len(ranked))
        rate = (b + sum(k[0] for k in ranked[:m])) / policy.step_ms(b, m, "host")
        if rate > best_rate + 1e-9:
            best_m, best_rate = m, rate
        if m == len(ranked):
            break
    plan: dict[int, list[int]] = {}
    for _, j in sorted(ranked[:best_m], key=lambda k: k[1]):
        plan.setdefault(seqs[j // c].seq_id, []).append(j % c)
    return plan


@pytest.mark.parametrize("seed", range(6))
def test_the_best_first_plan_is_the_ranked_plan(seed):
    """The plan walks the trees best-first and stops early; it must take exactly the nodes that
    ranking every (sequence, node) by value would, for any confidences, calibration, step cost,
    batch and token budget."""
    rng = random.Random(seed)
    for _ in range(20):
        policy = _policy(rng.choice([0.0005, 0.005, 0.02, 0.1]), margin=rng.choice([1.0, 1.1]))
        for row in policy.calibration._ratio:  # a calibration learned on some traffic
            row[:] = [rng.uniform(0.2, 1.3) for _ in row]
        b = rng.choice([1, 3, 16, 40, 64])
        seqs = [Candidates(i, [7] * 63, [rng.random() ** rng.choice([1, 3, 8]) for _ in range(63)])
                for i in range(b - rng.randrange(2) if b > 1 else b)]
        max_nodes = rng.choice([5, 50, 10_000])
        plan = policy.plan(seqs, b, max_nodes)
        assert dict(plan) == _ranked_plan(policy, seqs, b, max_nodes)
        assert all(_closed(nodes) for nodes in plan.values())


def test_the_drivers_own_cost_per_node_is_priced():
    """A verified node costs the driver's Python too (planning it, learning from it): priced
    beside the grid, it makes plans smaller, and a served step teaches the grid only the
    workers' share of its time."""
    seqs = [Candidates(i, [7] * 63, _confidence(0.9)) for i in range(16)]
    free = _policy(0.001).plan(seqs, 16, 10_000)
    dear = _policy(0.001, driver_ms_per_node=0.02).plan(seqs, 16, 10_000)
    assert 0 < sum(map(len, dear.values())) < sum(map(len, free.values()))
    measured = measure_driver_ms_per_node(FULL.parents, FULL.depths, batch=16, repeats=3)
    assert 0 < measured < 0.1, measured  # ms per node on any host this runs on
    policy = _policy(0.05, driver_ms_per_node=0.01, learning_rate=1.0)
    predicted = policy.step_ms(16, 64)
    assert predicted == pytest.approx(policy._grid_ms(16, 64, "host") + 0.64)
    for _ in range(5):  # served exactly as predicted: nothing to correct
        policy.observe_latency(16, 64, predicted)
    assert policy.step_ms(16, 64) == pytest.approx(predicted)
