"""Registries: acceptance rules, attention backends and model architectures are each one
registration away, and every place that takes a choice reads the registry."""

import pytest

from engine import Engine, SamplingParams
from engine.attention import ATTENTION_BACKENDS, select_backend
from engine.core.config import SpeculativeConfig
from engine.models.config import ArchConfig
from engine.models.registry import MODEL_REGISTRY, ModelSpec, find_model
from engine.sample.acceptance import ACCEPTANCE_RULES, accept, register_rule


def test_auto_backend_follows_device_and_dtype():
    assert select_backend("auto", "cuda", "bfloat16").name == "triton"
    # float32 on a GPU: the Triton backend is 16-bit only, so auto takes the torch backend
    # (before the registry this raised unless attention_backend="torch" was also given).
    assert select_backend("auto", "cuda", "float32").name == "torch"
    assert select_backend("auto", "cpu", "float32").name == "torch"
    with pytest.raises(ValueError, match="dtype: attention_backend 'triton' takes"):
        select_backend("triton", "cuda", "float32")
    with pytest.raises(ValueError, match="attention_backend: 'triton' runs on"):
        select_backend("triton", "cpu", "bfloat16")
    with pytest.raises(ValueError, match="attention_backend: expected 'auto' or one of"):
        Engine("default", attention_backend="flash9")  # refused before anything loads
    assert ATTENTION_BACKENDS["triton"].cuda_graphs and not ATTENTION_BACKENDS["torch"].cuda_graphs


def test_a_registered_rule_is_accepted_everywhere(monkeypatch, tiny_llama):
    calls = []

    from engine.sample.acceptance import Accepted

    @register_rule("always_root", lossless=False, summary="test rule: accepts nothing")
    def always_root(tree, tokens, logits, params, seed, first_pos, epsilon, alpha):
        calls.append(first_pos)
        return Accepted([0], int(logits[0].argmax()))

    try:
        SpeculativeConfig(acceptance="always_root")  # config and sampling take it …
        SamplingParams(acceptance="always_root")
        import torch

        from engine.spec.tree import MedusaTree

        tree = MedusaTree.build("chain:2", 2)
        out = accept("always_root", tree, torch.tensor([1, 2, 3]), torch.randn(3, 8),
                     SamplingParams(temperature=0.5), 0, 7)
        assert calls == [7] and out.path[0] == 0  # … and dispatch reaches it
        with pytest.raises(ValueError, match="registered twice"):
            register_rule("always_root", lossless=False, summary="")(always_root)
    finally:
        ACCEPTANCE_RULES.pop("always_root")
    # Unregistered, the engine refuses it: in its config before anything loads, in a request.
    with pytest.raises(ValueError, match="speculative.acceptance: expected one of"):
        Engine("default", speculative={"acceptance": "always_root"})
    with pytest.raises(ValueError, match="SamplingParams.acceptance: expected one of"):
        Engine(str(tiny_llama)).add_request([1, 2], SamplingParams(acceptance="always_root"))


@pytest.mark.parametrize("graphs", [False, True])
@pytest.mark.parametrize("on_device", [False, True])
def test_a_registered_rule_serves_requests(monkeypatch, bundled_dir, graphs, on_device):
    """A rule registered as the docstring says — a host function, and optionally its batched
    device version — runs real engine steps, as the engine's rule and beside greedy and typical
    requests, eagerly and through the graph path (uncaptured on CPU): it is called, tokens come
    out, nothing finishes with 'error'. It accepts no candidate and draws the bonus as plain
    decoding draws its token, so a sampled request under it equals plain sampling with the same
    seed. (It failed every request with ``tuple.index(x): x not in tuple``, and engines with
    graphs at start-up: the sampled tail knew three rules by name.)"""
    import torch

    import engine.worker.worker
    from engine.engine import Engine
    from engine.sample.acceptance import Accepted
    from engine.sample.sampler import processed_probs, sample_token
    from tests.conftest import PROMPTS

    host_calls, device_calls = [], []

    def root_only_on_device(v):
        device_calls.append(v.tokens.shape[0])
        b = v.tokens.shape[0]
        root = torch.zeros(b, dtype=torch.long, device=v.tokens.device)
        return torch.zeros(b, v.tree.depth + 1, dtype=torch.long, device=root.device), root, v.draw_at(root)

    @register_rule("root_only", lossless=True, summary="test rule: accepts no candidate",
                   device=root_only_on_device if on_device else None)
    def root_only(tree, tokens, logits, params, seed, first_pos, epsilon, alpha):
        host_calls.append(first_pos)
        return Accepted([0], sample_token(processed_probs(logits[0], params), params, seed, first_pos))

    try:
        monkeypatch.setattr(engine.worker.worker, "use_cuda_graphs", lambda *args: graphs)
        eng = Engine("default", speculative={"tree": "small_12", "acceptance": "root_only"}, max_num_seqs=4,
                     max_num_batched_tokens=64)
        sampled = [SamplingParams(temperature=0.7, seed=3 + i, max_tokens=12) for i in range(2)]
        # (Beside a typical request on the host path only: a step of two device rules has no
        # captured tail, start-up captures the engine's rule, and would run it eagerly.)
        other = SamplingParams(temperature=0.7, seed=4, max_tokens=12, acceptance=None if on_device else "typical")
        params = [sampled[0], SamplingParams(temperature=0, max_tokens=12), other, sampled[1]]
        outs = eng.generate_batch(PROMPTS[:4], params)
        assert all(o.finish_reason in ("stop", "length") and o.token_ids for o in outs), outs
        # Back-off prices a sampled step by where it decides: the host without a device version.
        assert eng.scheduler.rule_on_device(None) is on_device and eng.scheduler.rule_on_device("typical")
        # Where it decides: the device tail when the rule has a device version (the host path
        # still takes steps with a prompt in them), else the host path, by the host function.
        assert (device_calls if on_device else host_calls) and not (device_calls and not on_device)
        plain = Engine("default", max_num_seqs=4).generate_batch([PROMPTS[0], PROMPTS[3]], sampled)
        assert [outs[0].token_ids, outs[3].token_ids] == [o.token_ids for o in plain]
        if graphs:
            assert eng.executor.worker.runner.graphs.misses == 0
    finally:
        ACCEPTANCE_RULES.pop("root_only")


def _hf_config(**over):
    return {"architectures": ["LlamaForCausalLM"], "vocab_size": 32, "hidden_size": 16, "intermediate_size": 32,
            "num_hidden_layers": 1, "num_attention_heads": 2, **over}


def test_model_registry_resolves_and_checks_architectures():
    assert set(MODEL_REGISTRY) >= {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"}
    assert find_model({"model_type": "qwen2"}).architecture == "Qwen2ForCausalLM"
    assert ArchConfig.from_hf(_hf_config(architectures=["Qwen2ForCausalLM"])).attention_bias
    assert ArchConfig.from_hf(_hf_config(eos_token_id=[2, 7])).eos_token_ids == (2, 7)
    with pytest.raises(ValueError, match="unsupported"):
        ArchConfig.from_hf(_hf_config(architectures=["GPT2LMHeadModel"]))
    with pytest.raises(ValueError, match="sliding_window"):
        ArchConfig.from_hf(_hf_config(architectures=["MistralForCausalLM"], sliding_window=8,
                                      max_position_embeddings=64))
    from engine.models.llama import LlamaForCausalLM

    assert MODEL_REGISTRY["MistralForCausalLM"].load_class() is LlamaForCausalLM
    with pytest.raises(ValueError, match="registered twice"):
        from engine.models.registry import register_model

        register_model(ModelSpec("LlamaForCausalLM", "llama", "engine.models.llama:LlamaForCausalLM"))


def test_public_api_is_importable_from_the_package():
    import engine

    assert {"Engine", "SamplingParams", "RequestOutput"} <= set(engine.__all__)
