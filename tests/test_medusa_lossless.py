"""Greedy with Medusa == greedy without, token for token (bundled model, several trees,
batch 1, mixed batches with joins/aborts, forced preemption)."""

import contextlib
import json

import pytest

from engine import SamplingParams
from engine.engine import Engine
from tests.conftest import PROMPTS
from tests.test_engine_batching import _churn

MAX = 32
GREEDY = SamplingParams(temperature=0, max_tokens=MAX)


@pytest.fixture(scope="module")
def reference(bundled_dir):
    eng = Engine(str(bundled_dir), max_num_seqs=16)
    return {p: o.token_ids for p, o in zip(PROMPTS, eng.generate_batch(PROMPTS, GREEDY))}


@pytest.mark.parametrize("tree", ["mc_sim_7b_63", "small_12", "chain:4"])
def test_lossless_batch1_and_batched(bundled_dir, reference, tree):
    eng = Engine(str(bundled_dir), speculative={"heads": "random", "tree": tree}, max_num_seqs=16)
    for p in PROMPTS[:3]:
        assert eng.generate_batch([p], GREEDY)[0].token_ids == reference[p]
    outs = eng.generate_batch(PROMPTS, GREEDY)
    assert [o.token_ids for o in outs] == [reference[p] for p in PROMPTS]
    # Speculation did real work: some candidates were accepted (and some steps gave > 1 token).
    assert eng.stats.mean_accepted_length > 1.0
    assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks


@pytest.mark.parametrize("acceptance", ["typical", "rejection", "greedy"])
def test_lossless_with_joins_aborts(bundled_dir, reference, acceptance):
    eng = Engine(str(bundled_dir), speculative={"heads": "random", "tree": "small_12", "acceptance": acceptance},
                 max_num_seqs=8, max_num_batched_tokens=40)
    prompts = PROMPTS[:5]
    assert _churn(eng, prompts, GREEDY) == [reference[p][:MAX] for p in prompts]


def test_lossless_under_preemption(bundled_dir, reference):
    params = SamplingParams(temperature=0, max_tokens=MAX, ignore_eos=True)
    plain = Engine(str(bundled_dir), max_num_seqs=8)
    ref = [o.token_ids for o in plain.generate_batch(PROMPTS[:6], params)]
    eng = Engine(str(bundled_dir), speculative={"heads": "random", "tree": "small_12"},
                 num_blocks=7, block_size=16, max_num_seqs=6)
    outs = eng.generate_batch(PROMPTS[:6], params)
    assert eng.stats.num_preemptions > 0
    assert [o.token_ids for o in outs] == ref
    assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks


def test_seeded_sampling_exact_match_rule_equals_plain(bundled_dir):
    """With the exact-match rule, sampled output equals plain sampling with the same seed."""
    params = SamplingParams(temperature=0.9, top_p=0.9, seed=42, max_tokens=MAX)
    plain = Engine(str(bundled_dir)).generate_batch(PROMPTS[:4], params)
    eng = Engine(str(bundled_dir), speculative={"heads": "random", "tree": "small_12", "acceptance": "greedy"})
    spec = eng.generate_batch(PROMPTS[:4], params)
    assert [o.token_ids for o in spec] == [o.token_ids for o in plain]


@pytest.mark.parametrize("acceptance", ["typical", "rejection"])
def test_device_tail_draws_what_the_host_rules_draw(bundled_dir, acceptance):
    """Sampled requests decide on the device (engine/sample/tail.py ``sampled``) unless they ask
    for logprobs, which sends their steps to the host rules: both must produce the same
    tokens, step for step (the draws are keyed by seed, position and draw alike). A batch with
    top-k / top-p and a greedy request beside sampled ones, the bundled heads so paths get
    accepted."""
    def batch(logprobs: bool) -> list[SamplingParams]:
        return [SamplingParams(temperature=0.7, seed=1, max_tokens=MAX, logprobs=logprobs),
                SamplingParams(temperature=1.0, top_p=0.9, top_k=40, seed=2, max_tokens=MAX, logprobs=logprobs),
                SamplingParams(temperature=0, max_tokens=MAX, logprobs=logprobs),
                SamplingParams(temperature=0.5, seed=3, max_tokens=MAX, logprobs=logprobs)]

    runs = []
    for logprobs in (False, True):
        eng = Engine("default", speculative={"tree": "small_12", "acceptance": acceptance}, max_num_seqs=8)
        runs.append([o.token_ids for o in eng.generate_batch(PROMPTS[:4], batch(logprobs))])
        assert eng.stats.mean_accepted_length > 1.3, eng.stats.mean_accepted_length
    assert runs[0] == runs[1]


def test_stops_exact_when_several_tokens_accepted(bundled_dir, reference):
    eng = Engine(str(bundled_dir), speculative={"heads": "random", "tree": "mc_sim_7b_63"})
    prompt = PROMPTS[3]  # "1, 2, 3, 4, 5," — long accepted runs
    ref = reference[prompt]
    for n in (1, 2, 3, 7, 11):
        out = eng.generate_batch([prompt], SamplingParams(temperature=0, max_tokens=n))[0]
        assert out.token_ids == ref[:n] and out.finish_reason in ("length", "stop")
    stop_tok = ref[5]
    out = eng.generate_batch([prompt], SamplingParams(temperature=0, max_tokens=MAX, stop_token_ids=[stop_tok]))[0]
    assert out.token_ids == ref[: ref.index(stop_tok) + 1] and out.finish_reason == "stop"
    full_text = eng.tokenizer.decode(ref, skip_special_tokens=True)
    stop_str = full_text[6:9]
    out = eng.generate_batch([prompt], SamplingParams(temperature=0, max_tokens=MAX, stop=[stop_str]))[0]
    assert out.finish_reason == "stop" and out.text == full_text[: full_text.index(stop_str)]
    assert out.token_ids == ref[: len(out.token_ids)] and len(out.token_ids) < len(ref)


@pytest.fixture(scope="module", params=["root_conditioned", "sequential"])
def root_heads(bundled_dir, reference, tmp_path_factory, request):
    """Random heads that read the path (root-conditioned, sequential) with a proposal
    vocabulary: the tokens of the reference outputs (so candidates are often right) plus the
    500 lowest ids."""

    from engine.models.loader import read_arch_config
    from engine.spec.heads import MedusaHeads

    arch = read_arch_config(bundled_dir)
    path = tmp_path_factory.mktemp("root_heads")
    MedusaHeads(4, 1, arch.hidden_size, arch.vocab_size, kind=request.param).randomize(7).save(path)
    vocab = sorted({t for ids in reference.values() for t in ids} | set(range(500)))
    (path / "proposal_vocab.json").write_text(json.dumps({"token_ids": vocab}))
    return path, vocab


@pytest.mark.parametrize("tree", ["mc_sim_7b_63", "small_12"])
def test_lossless_path_reading_heads_with_a_proposal_vocab(bundled_dir, reference, root_heads, tree):
    path, vocab = root_heads
    eng = Engine(str(bundled_dir), speculative={"heads": str(path), "tree": tree}, max_num_seqs=16)
    proposer = eng.executor.worker.runner.proposer
    assert proposer.heads.kind == json.loads((path / "config.json").read_text())["medusa_head_kind"]
    assert proposer.proposal_vocab_size == len(vocab)
    assert eng.generate_batch([PROMPTS[0]], GREEDY)[0].token_ids == reference[PROMPTS[0]]
    outs = eng.generate_batch(PROMPTS, GREEDY)
    assert [o.token_ids for o in outs] == [reference[p] for p in PROMPTS]
    assert eng.stats.mean_accepted_length > 1.0
    # Every candidate proposed came from the proposal vocabulary.
    import torch

    hidden = torch.randn(5, proposer.heads.hidden_size)
    cands = proposer.propose(hidden, torch.tensor([1, 2, 3, 4, 5]))
    assert set(cands.flatten().tolist()) <= set(vocab)
    full = Engine(str(bundled_dir), speculative={"heads": str(path), "tree": tree, "proposal_vocab": "full"})
    assert full.executor.worker.runner.proposer.proposal_vocab_size == proposer.heads.vocab_size


def test_lossless_path_reading_heads_under_preemption(bundled_dir, root_heads):
    params = SamplingParams(temperature=0, max_tokens=MAX, ignore_eos=True)
    ref = [o.token_ids for o in Engine(str(bundled_dir), max_num_seqs=8).generate_batch(PROMPTS[:6], params)]
    eng = Engine(str(bundled_dir), speculative={"heads": str(root_heads[0]), "tree": "small_12", "acceptance": "greedy"},
                 num_blocks=7, block_size=16, max_num_seqs=6)
    outs = eng.generate_batch(PROMPTS[:6], params)
    assert eng.stats.num_preemptions > 0
    assert [o.token_ids for o in outs] == ref
    assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks


@pytest.mark.parametrize("tree", ["mc_sim_7b_63", "small_12"])
def test_lossless_under_penalties_and_logit_bias(bundled_dir, tree):
    """Penalties depend on the token history: every tree node is penalised with its own path,
    so greedy Medusa still equals greedy plain decoding under them (and they do change it)."""
    prompts = PROMPTS[:5]
    params = [SamplingParams(temperature=0, max_tokens=MAX, frequency_penalty=0.6, presence_penalty=0.4),
              SamplingParams(temperature=0, max_tokens=MAX, repetition_penalty=1.4),
              SamplingParams(temperature=0, max_tokens=MAX, logit_bias={13: -5.0, 28: 3.0}, presence_penalty=1.0),
              SamplingParams(temperature=0, max_tokens=MAX, frequency_penalty=-0.5),
              SamplingParams(temperature=0, max_tokens=MAX, repetition_penalty=0.8, frequency_penalty=0.3)]
    plain = Engine(str(bundled_dir), max_num_seqs=8)
    ref = [o.token_ids for o in plain.generate_batch(prompts, params)]
    unpenalized = [o.token_ids for o in plain.generate_batch(prompts, GREEDY)]
    assert sum(a != b for a, b in zip(ref, unpenalized)) >= 3
    from engine.spec.heads import BUNDLED_HEADS_DIR

    eng = Engine(str(bundled_dir), speculative={"heads": str(BUNDLED_HEADS_DIR), "tree": tree}, max_num_seqs=8)
    assert [o.token_ids for o in eng.generate_batch(prompts, params)] == ref
    assert eng.stats.mean_accepted_length > 1.2
    # One at a time too (batch 1, a different step mix).
    assert eng.generate_batch([prompts[0]], params[0])[0].token_ids == ref[0]


def test_deferred_candidates_are_the_steps_own_and_reach_its_next_step(bundled_dir, reference):
    """A uniform step returns its tokens before its proposals (the device proposes while the
    host applies them): the candidates the driver pushes at the next step are exactly what
    the step would have returned at once, and the output stays plain greedy decoding's."""
    from engine.core.outputs import SeqResult, StepResult

    eng = Engine("default", speculative={"heads": "default", "tree": "small_12"}, max_num_seqs=16)
    runner = eng.executor.worker.runner
    execute, take = runner.execute, runner.take_candidates
    expected, deferred_steps = [], []

    def checked_execute(out, defer_candidates=False):
        if defer_candidates:  # the same step at once first (a re-run writes the same K/V)
            expected.append([r.next_candidates for r in execute(out).results])
        result = execute(out, defer_candidates)
        if result.candidates_deferred:
            deferred_steps.append(out.step_id)
            assert all(r.next_candidates == [] for r in result.results)
            assert [r.sampled_token_ids for r in result.results] == [r.sampled_token_ids
                                                                      for r in execute(out).results]
            runner._candidates_owed = True  # (the re-run above dropped the deferral)
        return result

    def checked_take():
        got = take()
        assert got.candidates == expected[-1] and got.confidence == []
        return got
    runner.execute, runner.take_candidates = checked_execute, checked_take
    outs = eng.generate_batch(PROMPTS, GREEDY)
    assert [o.token_ids for o in outs] == [reference[p] for p in PROMPTS]
    assert len(deferred_steps) > 5 and eng.stats.mean_accepted_length > 1.2
    with contextlib.suppress(RuntimeError):
        take()  # the last step's, which no step took: every request had finished
    with pytest.raises(RuntimeError, match="deferred no candidates"):
        take()
    # A deferred result leaves its candidates owed: the scheduler refuses to schedule until the
    # driver pushes them, and takes only one list per result.
    eng.add_request(PROMPTS[0], GREEDY)
    step = eng.scheduler.schedule()
    eng.scheduler.update(StepResult(step_id=step.step_id, candidates_deferred=True,
                                    results=[SeqResult(seq_id=s.seq_id, sampled_token_ids=[5]) for s in step.seqs]))
    assert eng.scheduler.awaits_draft_tokens
    with pytest.raises(RuntimeError, match="update_draft_token_ids"):
        eng.scheduler.schedule()
    with pytest.raises(ValueError, match="0 lists for 1 results"):
        eng.scheduler.update_draft_token_ids([])
    eng.scheduler.update_draft_token_ids([[7] * 12])
    assert not eng.scheduler.awaits_draft_tokens and eng.scheduler.schedule().seqs[0].candidates
