"""Tensor parallelism: sharding plans, and TP=2 over Ray (gloo on CPU) equal to TP=1.

The Ray tests join a cluster started with `ray start --head` (as docs/ray.md deploys it), so
they also cover ray_address="auto"; they check that shutdown leaves no actor process behind and
that a killed rank fails the in-flight requests with an error within the timeout.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from engine import SamplingParams
from engine.engine import Engine
from engine.executor import WorkerError
from engine.models.config import ArchConfig
from engine.models.llama import LlamaForCausalLM
from engine.models.loader import read_arch_config
from engine.models.parallel import ShardPlan, read_shard, shard_tensor, split_range
from tests.conftest import PROMPTS
from tests.tiny import make_tiny_model


def _arch(num_heads: int, num_kv_heads: int, vocab: int = 101, inter: int = 30) -> ArchConfig:
    return ArchConfig.from_hf({"architectures": ["LlamaForCausalLM"], "vocab_size": vocab, "hidden_size": 8 * num_heads,
                               "intermediate_size": inter, "num_hidden_layers": 1, "num_attention_heads": num_heads,
                               "num_key_value_heads": num_kv_heads})


def test_split_range_covers_evenly():
    for n in (1, 7, 9, 49152):
        for parts in (1, 2, 3, 4, 8):
            if parts > n:
                continue
            ranges = [split_range(n, parts, r) for r in range(parts)]
            assert [i for r in ranges for i in r] == list(range(n))
            assert max(map(len, ranges)) - min(map(len, ranges)) <= 1


@pytest.mark.parametrize("heads,kv,tp", [(4, 2, 2), (8, 2, 4), (4, 1, 2), (9, 3, 2), (9, 3, 4), (8, 8, 3), (4, 2, 4)])
def test_shards_concatenate_to_the_full_weights(heads, kv, tp):
    """Every rank's slice, put back where it came from, rebuilds every weight exactly; each query
    head sits with the KV head it reads, and the local grouped-query layout is uniform."""
    arch = _arch(heads, kv)
    torch.manual_seed(0)
    full = {k: torch.randn(v.shape) for k, v in LlamaForCausalLM(arch).state_dict().items()}
    plans = [ShardPlan.build(arch, tp, r) for r in range(tp)]
    group = heads // kv
    for p in plans:
        assert p.num_q_heads % p.num_kv_heads == 0
        local_group = p.num_q_heads // p.num_kv_heads
        for i, qh in enumerate(p.q_heads):  # local query head i reads local KV head i // local_group
            assert p.kv_heads[i // local_group] == qh // group
    for name, w in full.items():
        specs = [p.rows(name, arch) for p in plans]
        if specs[0] is None:
            assert all(s is None for s in specs), name
            continue
        dim = specs[0][0]
        rebuilt = torch.full_like(w, float("nan"))
        for spec in specs:
            part = shard_tensor(w, spec)
            idx = torch.tensor(spec[1])
            rebuilt.index_copy_(dim, idx, part)
        assert torch.equal(rebuilt, w), name
        if name.endswith(("q_proj.weight", "o_proj.weight", "gate_proj.weight", "down_proj.weight", "lm_head.weight")):
            parts = [shard_tensor(w, s) for s in specs]  # disjoint: concatenation is the weight
            assert torch.equal(torch.cat(parts, dim), w), name


def test_ranks_read_only_their_slices_from_safetensors(tiny_llama):
    arch = read_arch_config(tiny_llama)
    plan = ShardPlan.build(arch, 2, 1)
    with safe_open(str(tiny_llama / "model.safetensors"), framework="pt") as f:
        for name in f.keys():
            spec = plan.rows(name, arch)
            assert torch.equal(read_shard(f, name, spec), shard_tensor(f.get_tensor(name), spec)), name


def test_tp_config_errors_name_the_field(tiny_llama):
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        Engine(str(tiny_llama), tensor_parallel_size=2)  # uniproc cannot split
    with pytest.raises(ValueError, match="tensor_parallel_size: 8 ranks for 4 attention heads"):
        Engine(str(tiny_llama), executor="ray", tensor_parallel_size=8)
    with pytest.raises(ValueError, match="ray_address"):
        Engine(str(tiny_llama), ray_address="auto")


# ---- over Ray ------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_cluster():
    """A one-node cluster started like a deployment (`ray start --head`); engines join it
    with ray_address="auto"."""
    import ray

    ray_cli = shutil.which("ray", path=str(Path(sys.executable).parent)) or shutil.which("ray")
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parent.parent), os.environ.get("PYTHONPATH", "")])}
    port = _free_port()
    subprocess.run([ray_cli, "start", "--head", f"--port={port}", "--num-cpus=4", "--include-dashboard=false",
                    "--disable-usage-stats"], check=True, env=env, capture_output=True, timeout=120)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        if ray.is_initialized():
            ray.shutdown()
        subprocess.run([ray_cli, "stop", "--force"], env=env, capture_output=True, timeout=120)


def _pids_gone(pids: list[int], timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = []
        for pid in pids:
            try:
                os.kill(pid, 0)
                alive.append(pid)
            except ProcessLookupError:
                pass
        if not alive:
            return True
        time.sleep(0.2)
    return False


def _tp_engine(model: str, ray_cluster: str, **kw) -> Engine:
    return Engine(model, executor="ray", tensor_parallel_size=2, ray_address="auto", worker_timeout_s=60, **kw)


@pytest.fixture(scope="module")
def tiny_tp(tmp_path_factory) -> Path:
    # Heads and KV heads divisible by 2, tied embeddings (vocab-parallel lm_head = embedding).
    return make_tiny_model(tmp_path_factory.mktemp("tiny_tp"), num_heads=4, num_kv_heads=2, tie_word_embeddings=True)


TINY_PROMPTS = [[5, 6, 7, 8], [9, 10, 11], list(range(20, 80)), [100] * 7]


@pytest.mark.parametrize("speculative", [None, {"heads": "random", "tree": "mc_sim_7b_63"}])
def test_tiny_tp2_equals_tp1(ray_cluster, tiny_tp, speculative):
    sp = SamplingParams(temperature=0, max_tokens=24)
    ref = [o.token_ids for o in Engine(str(tiny_tp), speculative=speculative).generate_batch(TINY_PROMPTS, sp)]
    with _tp_engine(str(tiny_tp), ray_cluster, speculative=speculative) as eng:
        out = [o.token_ids for o in eng.generate_batch(TINY_PROMPTS, sp)]
        assert out == ref
        assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks


@pytest.mark.parametrize("backoff", [False, True])
def test_tp2_start_up_timings_agree_across_ranks(ray_cluster, tiny_tp, tmp_path, backoff):
    """tree="auto" and back-off time steps on every rank; rank 0's decision is broadcast, so
    the ranks keep one tree (the executor refuses to start otherwise) and stay lossless."""
    import json

    from engine.spec.heads import MedusaHeads

    arch = read_arch_config(tiny_tp)
    MedusaHeads(4, 1, arch.hidden_size, arch.vocab_size).randomize(5).save(tmp_path)
    acc = [[0.5, 0.2, 0.1], [0.3, 0.1, 0.05], [0.2, 0.1, 0.05], [0.1, 0.05, 0.02]]
    (tmp_path / "tree.json").write_text(json.dumps({"rank_accuracy": acc}))
    spec = {"heads": str(tmp_path), "tree": "auto", "backoff": backoff}
    sp = SamplingParams(temperature=0, max_tokens=16)
    ref = [o.token_ids for o in Engine(str(tiny_tp)).generate_batch(TINY_PROMPTS, sp)]
    with _tp_engine(str(tiny_tp), ray_cluster, speculative=spec, max_num_seqs=4) as eng:
        assert len({tuple(map(tuple, i.tree)) for i in eng.executor.infos}) == 1
        assert (eng.backoff is not None) == backoff and (eng.tree_autotune is not None) != backoff
        assert [o.token_ids for o in eng.generate_batch(TINY_PROMPTS, sp)] == ref


def test_bundled_tp2_equals_tp1_plain_and_medusa(ray_cluster, bundled_dir):
    """The bundled model (9 query heads, 3 KV heads: an uneven split) at TP=2 over gloo."""
    sp = SamplingParams(temperature=0, max_tokens=24)
    plain = [o.token_ids for o in Engine("default", max_num_seqs=16).generate_batch(PROMPTS, sp, chat=True)]
    for speculative in (None, {"heads": "default", "tree": "mc_sim_7b_63"}):
        with _tp_engine("default", ray_cluster, speculative=speculative, max_num_seqs=16) as eng:
            out = [o.token_ids for o in eng.generate_batch(PROMPTS, sp, chat=True)]
            assert out == plain, speculative
            if speculative:
                assert eng.stats.mean_accepted_length > 1.2


def test_shutdown_leaves_no_actor_and_killed_rank_fails_requests(ray_cluster, tiny_tp):
    import ray

    eng = _tp_engine(str(tiny_tp), ray_cluster)
    pids = [i.pid for i in eng.executor.infos]
    assert len(set(pids)) == 2 and os.getpid() not in pids
    eng.generate_batch(TINY_PROMPTS[:1], SamplingParams(temperature=0, max_tokens=4))
    eng.shutdown()
    assert _pids_gone(pids), "actor processes survived Engine.shutdown()"
    assert eng.executor.actors == [] and eng.executor.pg is None
    with pytest.raises(WorkerError, match="shut down"):
        eng.add_request([5, 6])

    # A rank dies mid-service: the step fails within the timeout, every in-flight request is
    # failed and its KV freed, the engine refuses more work, and a new engine starts cleanly.
    eng = _tp_engine(str(tiny_tp), ray_cluster)
    rids = [eng.add_request(p, SamplingParams(temperature=0, max_tokens=200)) for p in TINY_PROMPTS]
    eng.step()
    ray.kill(eng.executor.actors[1], no_restart=True)
    t0 = time.monotonic()
    with pytest.raises(WorkerError, match="rank 1 failed.*4 in-flight request"):
        while eng.has_unfinished():
            eng.step()
    assert time.monotonic() - t0 < 60
    assert eng.block_manager.num_used_blocks == 0 and not eng.has_unfinished()
    with pytest.raises(WorkerError, match="engine is dead"):
        eng.add_request([5, 6])
    pids = [i.pid for i in eng.executor.infos]
    eng.shutdown()
    assert _pids_gone(pids)
    assert len(rids) == 4
    with _tp_engine(str(tiny_tp), ray_cluster) as again:
        assert again.generate_batch([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=3))[0].token_ids


def test_dummy_load_format_needs_no_weights(tiny_llama, tmp_path):
    """load_format="dummy": a config-only directory runs with random weights (large-shape
    throughput runs); without it the missing weights are an error naming them."""
    for f in tiny_llama.iterdir():
        if not f.name.endswith(".safetensors"):
            shutil.copy(f, tmp_path / f.name)
    with pytest.raises(ValueError, match="safetensors"):
        Engine(str(tmp_path))
    eng = Engine(str(tmp_path), load_format="dummy", speculative={"heads": "random"})
    out = eng.generate_batch([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=8))[0].token_ids
    assert len(out) == 8
    assert not any(torch.equal(p, torch.zeros_like(p)) for p in eng.model.parameters())
    with pytest.raises(ValueError, match="load_format"):
        Engine(str(tmp_path), load_format="npz")
