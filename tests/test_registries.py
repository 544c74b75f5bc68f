"""Registries: acceptance rules, attention backends and model architectures are each one
registration away, and every place that takes a choice reads the registry."""

import pytest

from engine.attention import ATTENTION_BACKENDS, select_backend
from engine.config import SpeculativeConfig, build_engine_config
from engine.models.config import ArchConfig
from engine.models.registry import MODEL_REGISTRY, ModelSpec, find_model
from engine.sampling import SamplingParams
from spec_decode.acceptance import ACCEPTANCE_RULES, accept, register_rule


def test_auto_backend_follows_device_and_dtype():
    assert select_backend("auto", "cuda", "bfloat16").name == "xformers"
    # float32 on a GPU: xformers' kernels are 16-bit only, so auto takes the torch backend
    # (before the registry this raised unless attention_backend="torch" was also given).
    assert select_backend("auto", "cuda", "float32").name == "torch"
    assert select_backend("auto", "cpu", "float32").name == "torch"
    with pytest.raises(ValueError, match="dtype: attention_backend 'xformers' takes"):
        select_backend("xformers", "cuda", "float32")
    with pytest.raises(ValueError, match="attention_backend: 'xformers' runs on"):
        select_backend("xformers", "cpu", "bfloat16")
    with pytest.raises(ValueError, match="attention_backend"):
        build_engine_config(attention_backend="flash9")
    assert ATTENTION_BACKENDS["xformers"].cuda_graphs and not ATTENTION_BACKENDS["torch"].cuda_graphs


def test_a_registered_rule_is_accepted_everywhere(monkeypatch):
    calls = []

    from spec_decode.acceptance import Accepted

    @register_rule("always_root", lossless=False, summary="test rule: accepts nothing")
    def always_root(tree, tokens, logits, params, seed, first_pos, epsilon, alpha):
        calls.append(first_pos)
        return Accepted([0], int(logits[0].argmax()))

    try:
        SpeculativeConfig(acceptance="always_root")  # config and sampling take it …
        SamplingParams(acceptance="always_root")
        from spec_decode.tree import MedusaTree
        import torch

        tree = MedusaTree.build("chain:2", 2)
        out = accept("always_root", tree, torch.tensor([1, 2, 3]), torch.randn(3, 8),
                     SamplingParams(temperature=0.5), 0, 7)
        assert calls == [7] and out.path[0] == 0  # … and dispatch reaches it
        with pytest.raises(ValueError, match="registered twice"):
            register_rule("always_root", lossless=False, summary="")(always_root)
    finally:
        ACCEPTANCE_RULES.pop("always_root")
    with pytest.raises(ValueError, match="speculative.acceptance"):
        SpeculativeConfig(acceptance="always_root")
    with pytest.raises(ValueError, match="SamplingParams.acceptance"):
        SamplingParams(acceptance="always_root")


@pytest.mark.parametrize("graphs", [False, True])
def test_a_registered_rule_serves_requests(monkeypatch, bundled_dir, graphs):
    """A rule registered as the docstring says runs real engine steps — as the engine's rule
    and as a request's override, beside greedy and typical requests, eagerly and through the
    graph path (uncaptured on CPU): it is called, tokens come out, nothing finishes with
    'error', and since it accepts nothing a greedy-temperature request under it equals plain
    decoding. (It failed every request with ``tuple.index(x): x not in tuple``, and engines
    with graphs at start-up: the sampled tail knew three rules by name.)"""
    import engine.worker
    from engine.engine import Engine
    from spec_decode.acceptance import Accepted
    from tests.conftest import PROMPTS

    calls = []

    @register_rule("root_only", lossless=False, summary="test rule: accepts no candidate")
    def root_only(tree, tokens, logits, params, seed, first_pos, epsilon, alpha):
        calls.append(first_pos)
        return Accepted([0], int(logits[0].argmax()))

    try:
        monkeypatch.setattr(engine.worker, "use_cuda_graphs", lambda *args: graphs)
        eng = Engine("default", speculative={"tree": "small_12", "acceptance": "root_only"}, max_num_seqs=4)
        sampled = SamplingParams(temperature=0.7, seed=3, max_tokens=12)
        params = [sampled, SamplingParams(temperature=0, max_tokens=12),
                  SamplingParams(temperature=0.7, seed=4, max_tokens=12, acceptance="typical"), sampled]
        outs = eng.generate_batch(PROMPTS[:4], params)
        assert all(o.finish_reason in ("stop", "length") and o.token_ids for o in outs), outs
        assert calls  # the host path decided by the registered function
        # Accepting nothing, with the bonus drawn as argmax, a sampled request equals greedy decoding.
        plain = Engine("default", max_num_seqs=4)
        greedy = SamplingParams(temperature=0, max_tokens=12)
        assert outs[0].token_ids == plain.generate_batch([PROMPTS[0]], greedy)[0].token_ids
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
