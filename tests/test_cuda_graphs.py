"""CUDA graph bookkeeping that runs on CPU: which steps replay a graph, batch buckets, and the
packed input buffer (the capture and replay themselves are checked in test_gpu.py)."""

import pytest
import torch

from engine import SamplingParams
from engine.core.outputs import ScheduledSeq
from engine.core.shapes import BATCH_BUCKETS, padded_batch
from engine.spec.tree import MedusaTree
from engine.worker.cuda_graphs import GraphLayout, MixedStep, graphable_nodes
from engine.worker.device_tail import ProposeAfter, TailKey

TREE = MedusaTree.build("small_12", 4)


def seq(i, start, table, tokens=(7,), cands=()):
    return ScheduledSeq(seq_id=i, token_ids=list(tokens), start_pos=start, block_table=list(table), sample=True,
                        tree_size=len(cands), candidates=list(cands), params=SamplingParams(temperature=0))


def test_padded_batch_is_the_smallest_bucket_that_fits():
    assert [padded_batch(b) for b in (1, 2, 3, 5, 17, 64, 65)] == [1, 2, 4, 8, 24, 64, 96]
    assert padded_batch(BATCH_BUCKETS[-1] + 1) is None
    assert list(BATCH_BUCKETS) == sorted(set(BATCH_BUCKETS))


def test_a_step_ships_only_the_table_pages_it_uses():
    """Every graph's tables are the engine's full width, held page after page: a step packs
    and copies ids, starts and only the first J pages of every table (J: its longest), the
    pad block past a sequence's pages and for padding sequences; the device view reads back
    each table row by row."""
    from engine.worker.cuda_graphs import load_inputs

    layout = GraphLayout(batch=4, nodes=2, width=6)
    seqs = [seq(0, 20, [5, 2], cands=[1]), seq(1, 3, [7], cands=[1]), seq(2, 40, [3, 4, 6], cands=[1])]
    host, used = layout.pack(seqs, list(range(100, 106)), pad_block=9)
    assert used == 4 * 2 + 4 + 3 * 4 < layout.size  # 3 of the 6 pages
    buf = torch.full((layout.size,), -1, dtype=torch.int64)
    load_inputs(buf, (host, used))
    v = layout.views(buf)
    assert v["ids"].tolist() == [100, 101, 102, 103, 104, 105, 0, 0] and v["starts"].tolist() == [20, 3, 40, 0]
    assert v["tables"][:, :3].tolist() == [[5, 2, 9], [7, 9, 9], [3, 4, 6], [9, 9, 9]]
    assert (v["tables"][:, 3:] == -1).all()  # untouched: no sequence reads past its pages


def test_start_up_captures_every_bucket_a_step_within_the_budget_pads_to():
    """7 sequences of a 13-node tree fit a 100-token budget and run in the 8 bucket (104 padded
    tokens): that graph is captured at start-up too, not on first use mid-run."""
    from engine.worker.cuda_graphs import CudaGraphRunner

    runner = CudaGraphRunner(None, None, torch.device("cpu"), width=4, pad_block=0)
    captured = []
    runner._graph = lambda shape, b, width=None: captured.append((shape, b))
    runner.capture([None, TREE], max_batch=64, max_tokens=100)
    assert sorted(b for shape, b in captured if shape is None) == [b for b in BATCH_BUCKETS if b <= 64]
    assert sorted(b for shape, b in captured if shape is TREE) == [1, 2, 4, 8]


def test_only_uniform_decode_or_verify_steps_replay_graphs(bundled_dir):
    """The runner finds the uniform shape (one pending token plus the same tree, or nothing
    more) and the graph runner takes it if the tables fit and the batch has a bucket."""
    from engine.core.outputs import SchedulerOutput
    from engine.worker.input_batch import InputBatch

    n = TREE.num_nodes - 1
    trees = {n: TREE, 2: MedusaTree.build("chain:2", 4)}

    def nodes(seqs):
        return InputBatch.build(SchedulerOutput(step_id=1, seqs=seqs), trees, scratch_tokens=4096).uniform_nodes

    assert nodes([seq(0, 5, [0]), seq(1, 9, [1])]) == 1  # plain decode
    assert nodes([seq(0, 5, [0], cands=[1] * n)] * 3) == TREE.num_nodes  # verify
    assert nodes([seq(0, 5, [0], cands=[1] * n), seq(1, 5, [1])]) is None  # mixed
    assert nodes([seq(0, 0, [0], tokens=[1, 2, 3])]) is None  # prefill chunk
    with pytest.raises(ValueError, match="one tree per step"):
        nodes([seq(0, 5, [0], cands=[1] * n), seq(1, 5, [1], cands=[1, 1])])
    assert graphable_nodes([seq(0, 5, [0])], 1, 4)
    assert not graphable_nodes([seq(0, 5, [0])], None, 4)
    assert not graphable_nodes([seq(0, 5, [0, 1, 2, 3, 4])], 1, 4)  # table wider than the graphs'
    assert not graphable_nodes([seq(0, 5, [0])] * (BATCH_BUCKETS[-1] + 1), 1, 4)  # no bucket
    assert not graphable_nodes([], 1, 4)


def test_fresh_prompts_replay_a_prefill_graph_of_their_padded_shape():
    """Prompts prefilled from position 0 take the graph of the next length bucket and batch
    bucket within the token budget; a later chunk, a decode token or a tree does not."""
    from engine.worker.cuda_graphs import PREFILL_BUCKETS, CudaGraphRunner, FreshPrefill

    graphs = CudaGraphRunner(None, None, torch.device("cpu"), width=4, pad_block=0, max_prefill_tokens=2048)
    assert graphs.mixed_tokens == () and not graphs.sealed
    assert graphs.prefill_shape([seq(0, 0, [0], tokens=range(40))]) == FreshPrefill(64)
    assert graphs.prefill_shape([seq(0, 0, [0], tokens=range(2)), seq(1, 0, [1], tokens=range(16)),
                                 seq(2, 0, [2], tokens=range(17))]) == FreshPrefill(32)  # 4 x 32 tokens
    assert graphs.prefill_shape([seq(0, 0, [0], tokens=range(2000))]) == FreshPrefill(2048)
    assert graphs.prefill_shape([seq(i, 0, [i], tokens=range(100)) for i in range(9)]) == FreshPrefill(128)
    assert graphs.prefill_shape([seq(i, 0, [i], tokens=range(100)) for i in range(17)]) is None  # 24 x 128
    assert graphs.prefill_shape([seq(0, 64, [0], tokens=range(40))]) is None  # a later chunk: cached prefix
    assert graphs.prefill_shape([seq(0, 0, [0], tokens=range(40)), seq(1, 9, [1])]) is None  # mixed
    assert graphs.prefill_shape([seq(0, 0, [0], tokens=[5])]) is None  # one token: the decode graphs' shape
    # With mixed graphs, only a shape captured already: several prompts go to the mixed graphs.
    graphs.mixed_tokens, graphs.graphs = (2048,), {(FreshPrefill(64), 1): None}
    assert graphs.prefill_shape([seq(0, 0, [0], tokens=range(40))]) == FreshPrefill(64)
    assert graphs.prefill_shape([seq(0, 0, [0], tokens=range(40)), seq(1, 0, [1], tokens=range(9))]) is None
    assert FreshPrefill(16).mask.tolist() == [[j <= i for j in range(16)] for i in range(16)]
    assert list(PREFILL_BUCKETS) == sorted(PREFILL_BUCKETS)


def test_steps_without_a_tree_replay_a_mixed_graph_of_their_token_bucket():
    """Prefill chunks beside decode tokens take the mixed graph of the next token bucket within
    the budget, over the graphs' one batch bucket; a tree, too many sequences or tokens, or a
    table wider than the graphs' does not."""
    from engine.worker.cuda_graphs import MIXED_BUCKETS, CudaGraphRunner, MixedStep

    graphs = CudaGraphRunner(None, None, torch.device("cpu"), width=4, pad_block=0, max_mixed_tokens=100, max_seqs=5)
    assert graphs.mixed_tokens == (16, 32, 64, 128) and graphs.mixed_batch == 8
    assert graphs.mixed_shape([seq(0, 64, [0, 1], tokens=range(40)), seq(1, 9, [1])]) == MixedStep(64)
    assert graphs.mixed_shape([seq(0, 0, [0], tokens=range(3))]) == MixedStep(16)
    assert graphs.mixed_shape([seq(0, 0, [0], tokens=range(120))]) == MixedStep(128)
    assert graphs.mixed_shape([seq(0, 0, [0], tokens=range(129))]) is None  # over the top bucket
    assert graphs.mixed_shape([seq(i, 9, [i], tokens=range(2)) for i in range(9)]) is None  # 9 > 8 sequences
    assert graphs.mixed_shape([seq(0, 9, [0], tokens=range(2)), seq(1, 5, [1], cands=[3, 4])]) is None  # a tree
    assert graphs.mixed_shape([seq(0, 9, [0, 1, 2, 3, 4], tokens=range(2))]) is None  # wider than 4 pages
    assert CudaGraphRunner(None, None, torch.device("cpu"), width=4, pad_block=0).mixed_shape(
        [seq(0, 9, [0], tokens=range(2))]) is None  # no mixed graphs asked for
    big = CudaGraphRunner(None, None, torch.device("cpu"), width=4, pad_block=0, max_mixed_tokens=100,
                          max_seqs=BATCH_BUCKETS[-1] + 3)  # more sequences than any batch bucket
    assert big.mixed_batch == BATCH_BUCKETS[-1] + 3
    assert big.mixed_shape([seq(0, 9, [0], tokens=range(2))]) == MixedStep(16)
    assert list(MIXED_BUCKETS) == sorted(MIXED_BUCKETS)


@torch.inference_mode()
def test_a_mixed_graph_attends_like_the_eager_step():
    """A mixed graph (uncaptured, as on CPU) over a first chunk, a later chunk after a cached
    prefix and two decode tokens, padded to 64 tokens and 8 sequences: the same outputs as
    the eager step through the backend's own metadata, the same K/V written to the same
    slots, and the padding writes only the pad block."""
    from engine.attention.base import SeqAttn, StepAttnInputs
    from engine.attention.kv_cache import PagedKVCache
    from engine.attention.torch_ref import TorchAttentionBackend
    from engine.core.outputs import SchedulerOutput
    from engine.worker.cuda_graphs import CudaGraphRunner
    from engine.worker.input_batch import InputBatch

    torch.manual_seed(0)
    block, heads, kv_heads, dim = 16, 4, 2, 8
    cache = PagedKVCache(1, 24, block, kv_heads, dim, torch.float32, torch.device("cpu"))
    cache.k_all.normal_()
    cache.v_all.normal_()
    backend = TorchAttentionBackend(cache, torch.device("cpu"))
    table_q, table_k = torch.randn(500, heads, dim), torch.randn(500, 2, kv_heads, dim)

    def model(ids, positions, backend_, meta):  # q, k, v from the token and its position
        key = (ids * 7 + positions) % 500
        return backend_.forward(0, table_q[key], table_k[key, 0], table_k[key, 1], meta).flatten(1)

    seqs = [seq(0, 0, [3, 9], tokens=range(1, 21)), seq(1, 37, [5, 2, 7], tokens=range(30, 41)),
            seq(2, 20, [11, 12]), seq(3, 5, [4])]
    batch = InputBatch.build(SchedulerOutput(step_id=1, seqs=seqs), {}, cache.scratch_tokens)
    batch.locate(cache)
    before = cache.k_all.clone()
    attn = [SeqAttn(q_len=len(s.token_ids), ctx_len=s.start_pos, block_table=s.block_table) for s in seqs]
    eager = model(torch.tensor(batch.ids), torch.tensor(batch.positions), backend,
                  backend.prepare(StepAttnInputs(attn, torch.tensor(batch.slots))))
    after_eager = cache.k_all.clone()
    cache.k_all.copy_(before)
    graphs = CudaGraphRunner(model, backend, torch.device("cpu"), width=4, pad_block=cache.pad_block,
                             max_mixed_tokens=50, max_seqs=6)
    shape = graphs.mixed_shape(seqs)
    hidden = graphs.run_mixed(shape, seqs, batch.ids, batch.positions, batch.slots)
    assert hidden.shape[0] == shape.num_tokens == 64
    torch.testing.assert_close(hidden[:len(batch.ids)], eager)
    pad = set(range(cache.pad_slot, cache.pad_slot + block))
    changed = set((cache.k_all != after_eager).any(-1).any(-1).any(0).nonzero().flatten().tolist())
    assert changed <= pad and torch.equal(cache.k_all[:, :cache.pad_slot], after_eager[:, :cache.pad_slot])


@pytest.mark.parametrize("tree", [None, TREE])
@torch.inference_mode()  # as the runner replays graphs
def test_graphs_derive_positions_slots_and_lengths_like_the_eager_step(tree):
    """A decode or verify graph gets only ids, starts and tables from the host and derives the
    rest on the device: every real token's position and K/V slot equal what the eager step
    computes (``InputBatch.locate``), the attention lengths are the cached prefix before the
    pending token, and padded sequences start at 0 in the pad block, their candidates in
    scratch rows past the real ones."""
    from engine.attention.kv_cache import PagedKVCache
    from engine.attention.torch_ref import TorchAttentionBackend
    from engine.core.outputs import SchedulerOutput
    from engine.worker.cuda_graphs import CudaGraphRunner
    from engine.worker.input_batch import InputBatch

    block, nodes = 16, tree.num_nodes if tree else 1
    cache = PagedKVCache(1, 20, block, 1, 8, torch.float32, torch.device("cpu"), scratch_tokens=4 * nodes)
    backend = TorchAttentionBackend(cache, torch.device("cpu"))
    seen = {}

    def model(ids, positions, backend_, meta):  # records what the graph's forward hands the model
        seen.update(ids=ids.tolist(), positions=positions.tolist(), slots=meta.slots.tolist(),
                    kv_lens=meta.kv_lens.tolist(), tables=meta.tables.tolist())
        return torch.zeros(len(ids), 4)

    graphs = CudaGraphRunner(model, backend, torch.device("cpu"), width=3, pad_block=cache.pad_block)
    cands = list(range(200, 200 + nodes - 1))
    seqs = [seq(0, 20, [5, 2], cands=cands), seq(1, 3, [7], tokens=(8,), cands=cands[::-1])]
    batch = InputBatch.build(SchedulerOutput(step_id=1, seqs=seqs), {nodes - 1: tree} if tree else {},
                             cache.scratch_tokens)
    batch.locate(cache)
    assert graphs.run(tree, seqs, batch.ids).layout.batch == 2
    assert seen["ids"] == batch.ids
    assert seen["positions"] == batch.positions and seen["slots"] == batch.slots
    assert seen["kv_lens"] == [20, 3]  # the prefix: the pending token is one of the step's own
    assert seen["tables"] == [[5, 2, cache.pad_block], [7, cache.pad_block, cache.pad_block]]
    # Three sequences run in the 4 graph: the fourth is padding.
    three = seqs + [seq(2, 40, [3, 4, 6], tokens=(9,), cands=cands)]
    graphs.run(tree, three, batch.ids + [9] + cands)
    assert seen["positions"][3 * nodes:] == [d for d in (tree.depths if tree else [0])]
    assert seen["slots"][3 * nodes] == cache.pad_slot
    assert seen["slots"][3 * nodes + 1:] == list(range(cache.scratch_slot0 + 3 * nodes + 1, cache.scratch_slot0 + 4 * nodes))
    assert seen["kv_lens"][3] == 0 and seen["tables"][3] == [cache.pad_block] * 3


def test_fixed_shape_steps_give_eager_tokens_on_cpu(monkeypatch, bundled_dir):
    """The CUDA graph path without the capture (what it does on CPU): padded fixed-shape steps
    through the static buffers and the pad block, the greedy tail deciding, committing and
    proposing on the device — the same tokens as the eager engine for plain decoding and
    Medusa (bundled heads, so paths are accepted and committed): a sampled request beside
    greedy ones (the sampled tail), a request with logprobs (graph forward, host-side
    decision), greedy ones alone (greedy tail); no KV block leaked."""
    import engine.worker.worker
    from engine import SamplingParams
    from engine.core.backoff import BackoffPolicy, LatencyModel, LatencyPoint
    from engine.engine import Engine
    from tests.conftest import PROMPTS

    greedy = SamplingParams(temperature=0, max_tokens=20)
    mixed = [greedy, greedy, SamplingParams(temperature=0.8, seed=1, max_tokens=20)]
    logprobs = [SamplingParams(temperature=0, max_tokens=20, logprobs=True), greedy]
    batches = [(PROMPTS[:3], mixed), (PROMPTS[3:5], logprobs), (PROMPTS[6:7], greedy)]
    specs = (None, {"tree": "small_12"}, {"tree": "small_12", "backoff": True})

    # (Its own back-off policy: start-up's latency grid is invented, not timed. A 64-token
    # budget: every step here fits it, and the CPU captures fewer prompt and mixed buckets.)
    import engine.worker.startup
    from tests.conftest import invented_latency_grid

    monkeypatch.setattr(engine.worker.startup, "measure_step_latency", invented_latency_grid)

    def engine_for(spec):
        eng = Engine("default", speculative=spec, max_num_seqs=4, max_num_batched_tokens=64)
        if eng.backoff is not None:
            # An invented device where trees pay at one or two sequences and not beyond, so
            # steps verify nested subtrees of several sizes (learning off: it would pull back
            # to this CPU, where plain decoding wins).
            sizes = eng.backoff.latency.sizes
            model = LatencyModel([LatencyPoint(b, n, 10 + 0.3 * b * n + (1000 if b > 2 and n else 0))
                                  for n in sizes for b in (1, 2, 4)])
            eng.backoff = BackoffPolicy(model, eng.backoff.prior, learning_rate=0.0)
        return eng

    def run(spec):
        eng = engine_for(spec)
        toks = [[o.token_ids for o in eng.generate_batch(p, params)] for p, params in batches]
        return eng, toks

    ref = {i: run(spec)[1] for i, spec in enumerate(specs)}
    monkeypatch.setattr(engine.worker.worker, "use_cuda_graphs", lambda *args: True)
    for i, spec in enumerate(specs):
        eng = engine_for(spec)
        graphs = eng.executor.worker.runner.graphs
        assert graphs is not None and not graphs.captured
        # The greedy decision and the acceptance rule's sampled one were captured at start-up
        # after every decode / verify graph, each followed by its proposal in a Medusa engine.
        decode_graphs = [g for g in graphs.graphs.values() if g.decodes]
        decisions = [{k for k in g.tails if isinstance(k, TailKey)} for g in decode_graphs]
        # greedy, and sampled with / without filters x with / without greedy rows beside
        sampled = [sorted((k.filters, k.greedy_rows) for k in d if k.sampled) for d in decisions]
        assert decode_graphs and all(x == [(False, False), (False, True), (True, False), (True, True)] for x in sampled)
        assert all(sum(not k.sampled for k in d) == 1 for d in decisions)
        assert all({k.decision for k in g.tails if isinstance(k, ProposeAfter)} == (d if spec else set())
                   for g, d in zip(decode_graphs, decisions))
        calls = {"forward": 0, "tail": 0, "prefill": 0, "mixed": 0}

        def counted(name, fn):
            return lambda *a, **k: (calls.__setitem__(name, calls[name] + 1), fn(*a, **k))[1]
        keys = []  # the tail keys the steps replayed
        run_tail = graphs.run_tail

        def recorded_tail(g, key, *args, **kwargs):
            keys.append(key)
            return run_tail(g, key, *args, **kwargs)
        graphs.run, graphs.run_tail = counted("forward", graphs.run), counted("tail", recorded_tail)
        graphs.run_prefill = counted("prefill", graphs.run_prefill)
        graphs.run_mixed = counted("mixed", graphs.run_mixed)
        toks = [[o.token_ids for o in eng.generate_batch(p, params)] for p, params in batches]
        assert toks == ref[i], spec
        decided = [key for key in keys if isinstance(key, TailKey)]
        assert calls["forward"] > len(decided) > 0, calls  # the logprobs request's steps skip the tail
        assert any(key.sampled for key in decided) and any(not key.sampled for key in decided), keys
        assert any(isinstance(key, ProposeAfter) for key in keys) == bool(spec), keys
        # Each batch's prompts in one step: one prompt through its fresh-prefill graph (captured
        # at start-up), several through a mixed graph.
        assert calls["prefill"] == 1 and calls["mixed"] == 2, calls
        if spec:
            assert eng.stats.accepted_per_depth[0] > 5  # paths were accepted and committed
        if eng.backoff is not None:  # plain steps and a subtree smaller than the full tree
            used = eng.stats.steps_by_tree_size
            assert used.get(0, 0) > 0 and any(0 < n < 12 for n in used), used
        assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks
        # Every graph these steps replayed was captured at start-up: none captured, none missed.
        assert graphs.sealed and graphs.misses == 0, graphs.misses
        assert eng.stats.num_capture_steps == 0 and eng.stats.num_graph_miss_steps == 0


def test_every_shape_back_off_can_choose_has_its_graphs_after_start_up(monkeypatch, bundled_dir):
    """What the scheduler may run — each tree of the back-off set, or plain decoding, for any
    number of decoding sequences whose tokens fit the step budget — has its forward graph at
    its batch bucket, and after it the greedy and sampled decisions, each with its proposal;
    the host-decided steps' proposal has a graph for every batch bucket; prompts and mixed
    steps have theirs. All before the first request, and then the runner is sealed."""
    import engine.worker.startup
    import engine.worker.worker
    from engine.engine import Engine
    from tests.conftest import invented_latency_grid

    monkeypatch.setattr(engine.worker.worker, "use_cuda_graphs", lambda *args: True)
    monkeypatch.setattr(engine.worker.startup, "measure_step_latency", invented_latency_grid)  # (not what it checks)
    seqs, budget = 8, 128
    eng = Engine("default", speculative={"tree": "auto", "backoff": True}, max_num_seqs=seqs,
                 max_num_batched_tokens=budget)
    runner = eng.executor.worker.runner
    graphs = runner.graphs
    assert graphs.sealed and eng.num_graphs == graphs.num_graphs > 0
    sizes = set(eng.policy.subtrees) | {0}
    assert len(sizes) > 3
    for n in sizes:
        tree = runner.trees[n] if n else None
        for b in range(1, seqs + 1):
            if b * (n + 1) > budget:  # the scheduler never runs it (SpeculationPolicy.tree_for)
                continue
            g = graphs.graphs.get((tree, padded_batch(b)))
            assert g is not None, (n, b)
            decisions = [k for k in g.tails if isinstance(k, TailKey)]
            assert any(not k.sampled for k in decisions) and any(k.sampled for k in decisions), (n, b)
            assert all(ProposeAfter(k) in g.tails for k in decisions), (n, b)
    assert {b for key, b in graphs.row_graphs if key == "propose"} == {b for b in BATCH_BUCKETS if b <= seqs}
    assert graphs.mixed_tokens and all((MixedStep(t), graphs.mixed_batch) in graphs.graphs for t in graphs.mixed_tokens)


def test_a_sealed_runner_runs_a_missing_shape_eagerly_and_counts_it(monkeypatch, bundled_dir):
    """After start-up nothing is captured: a step whose graph is missing (one removed here)
    runs its forward eagerly, its decision and proposal eagerly too, gives the same tokens,
    and is counted — in the runner's misses and the engine's graph-miss steps."""
    import engine.worker.worker
    from engine import SamplingParams
    from engine.core.shapes import padded_batch
    from engine.engine import Engine
    from tests.conftest import PROMPTS

    params = SamplingParams(temperature=0, max_tokens=12)
    spec = {"tree": "small_12"}
    kwargs = dict(speculative=spec, max_num_seqs=4, max_num_batched_tokens=256)
    ref = [o.token_ids for o in Engine("default", **kwargs).generate_batch(PROMPTS[:2], params)]
    monkeypatch.setattr(engine.worker.worker, "use_cuda_graphs", lambda *args: True)
    eng = Engine("default", **kwargs)
    runner = eng.executor.worker.runner
    graphs = runner.graphs
    seconds, count = graphs.capture_seconds, len(graphs.graphs)
    del graphs.graphs[(runner.tree, padded_batch(2))]  # the 2-sequence verify graph
    assert [o.token_ids for o in eng.generate_batch(PROMPTS[:2], params)] == ref
    assert graphs.misses > 0 and eng.stats.num_graph_miss_steps > 0
    assert eng.stats.num_capture_steps == 0
    assert graphs.capture_seconds == seconds and len(graphs.graphs) == count - 1  # nothing captured


def test_chunked_prompts_beside_decodes_give_eager_tokens_through_mixed_graphs(monkeypatch, bundled_dir):
    """A token budget smaller than the prompts: later chunks and chunks beside decode tokens
    run the mixed graphs (uncaptured on CPU), their proposals the row graphs — the same tokens
    as the eager engine, greedy and seeded sampling, plain and Medusa; no KV block leaked."""
    import engine.worker.worker
    from engine import SamplingParams
    from engine.engine import Engine
    from tests.conftest import PROMPTS

    prompts = [p * 4 for p in PROMPTS[:4]]  # 20-60 tokens: chunks of 32
    params = [SamplingParams(temperature=0, max_tokens=12)] * 3 + [SamplingParams(temperature=0.8, seed=3,
                                                                                  max_tokens=12)]
    for spec in (None, {"tree": "small_12"}):
        kwargs = dict(speculative=spec, max_num_seqs=4, max_num_batched_tokens=32)
        with monkeypatch.context() as m:
            m.setattr(engine.worker.worker, "use_cuda_graphs", lambda *args: False)
            ref = [o.token_ids for o in Engine("default", **kwargs).generate_batch(prompts, params)]
        monkeypatch.setattr(engine.worker.worker, "use_cuda_graphs", lambda *args: True)
        eng = Engine("default", **kwargs)
        graphs = eng.executor.worker.runner.graphs
        assert graphs.mixed_tokens == (16, 32) and graphs.mixed_batch == 4
        mixed, rows = [], []
        run_mixed, run_rows = graphs.run_mixed, graphs.run_rows
        graphs.run_mixed = lambda shape, seqs, *a: (mixed.append(len(seqs)), run_mixed(shape, seqs, *a))[1]
        graphs.run_rows = lambda key, fn, inputs: (rows.append(key), run_rows(key, fn, inputs))[1]
        assert [o.token_ids for o in eng.generate_batch(prompts, params)] == ref, spec
        assert mixed and max(mixed) > 1, mixed  # chunks beside other sequences' work
        assert ("propose" in rows) == bool(spec), rows  # host-decided steps' proposals: row graphs
        assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks


@torch.inference_mode()
def test_row_graphs_pad_to_a_bucket_and_give_each_row_its_own_answer(monkeypatch, bundled_dir):
    """The heads' proposal of a host-decided step through ``run_rows``: captured at start-up for
    every batch bucket up to max_num_seqs, fed n rows (padding rows hold older inputs), it
    gives row for row what the eager proposal gives for those n rows alone."""
    import engine.worker.worker
    from engine.core.shapes import BATCH_BUCKETS
    from engine.engine import Engine

    monkeypatch.setattr(engine.worker.worker, "use_cuda_graphs", lambda *args: True)
    eng = Engine("default", speculative={"tree": "small_12"}, max_num_seqs=6, max_num_batched_tokens=256)
    runner = eng.executor.worker.runner
    graphs = runner.graphs
    assert sorted(b for key, b in graphs.row_graphs if key == "propose") == [b for b in BATCH_BUCKETS if b <= 8]
    torch.manual_seed(0)
    hidden = torch.randn(8, runner.model.lm_head.weight.shape[1])
    roots = torch.randint(0, 49152, (8,))
    for n in (5, 1, 3, 8):  # each after a larger one: padding rows hold its inputs
        got, confidence = runner._propose(hidden[:n], roots[:n])
        assert confidence is None  # (only adaptive trees ask for it)
        assert got.shape[0] == n and torch.equal(got, runner.tail.propose(hidden[:n], roots[:n])), n
