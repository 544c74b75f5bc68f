"""Bad input → ValueError naming the field; the engine keeps serving the others."""

import pytest

from engine.config import SpeculativeConfig, build_engine_config
from engine.engine import Engine
from engine.sampling import SamplingParams


@pytest.mark.parametrize("kwargs, field", [
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": -3}, "max_tokens"),
    ({"temperature": -0.1}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -2}, "top_k"),
    ({"min_tokens": 10, "max_tokens": 5}, "min_tokens"),
    ({"stop": [""]}, "stop"),
    ({"acceptance": "maybe"}, "acceptance"),
])
def test_sampling_params_errors(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_config_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown engine option 'blocksize'"):
        build_engine_config("default", blocksize=3)
    with pytest.raises(ValueError, match="speculative.acceptance"):
        SpeculativeConfig(acceptance="sometimes")
    with pytest.raises(ValueError, match="speculative: unknown keys"):
        build_engine_config("default", speculative={"tre": "x"})
    with pytest.raises(ValueError, match="enforce_eager: expected True or False"):
        build_engine_config("default", enforce_eager="yes")
    with pytest.raises(ValueError, match="neither 'default' nor an existing local directory"):
        Engine(str(tmp_path / "nope"))
    (tmp_path / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    with pytest.raises(ValueError, match=r"missing: \*\.safetensors.*tokenizer"):
        Engine(str(tmp_path))


def test_unknown_architecture(tmp_path, tiny_llama):
    import json
    import shutil

    d = tmp_path / "m"
    shutil.copytree(tiny_llama, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="GPT2LMHeadModel.*unsupported"):
        Engine(str(d))


def test_bad_requests_leave_engine_serving(tiny_llama):
    eng = Engine(str(tiny_llama), block_size=4, num_blocks=64, max_model_len=64)
    good = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    eng.add_request([5, 6, 7], good, request_id="ok")
    eng.step()
    with pytest.raises(ValueError, match="prompt: must not be empty"):
        eng.add_request("", good)
    with pytest.raises(ValueError, match="prompt: must not be empty"):
        eng.add_request([], good)
    with pytest.raises(ValueError, match="prompt: 70 tokens, but the context holds 64"):
        eng.add_request([5] * 70, good)
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 256\)"):
        eng.add_request([5, 999], good)
    with pytest.raises(ValueError, match="request_id: 'ok' is already in use"):
        eng.add_request([5], good, request_id="ok")
    with pytest.raises(ValueError, match=r"prompts\[1\]: prompt: must not be empty"):
        eng.generate_batch([[5], []], good)
    with pytest.raises(ValueError, match="params.acceptance"):
        eng.add_request([5], SamplingParams(acceptance="typical"))
    outs = []
    while eng.has_unfinished():
        outs += [o for o in eng.step() if o.finished]
    assert [o.request_id for o in outs] == ["ok"] and len(outs[0].token_ids) == 8
    assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks


def test_heads_errors(tiny_llama, tmp_path):
    with pytest.raises(ValueError, match=r"speculative.heads: '.*nope' is not a directory"):
        Engine(str(tiny_llama), speculative={"heads": str(tmp_path / "nope")})
    with pytest.raises(ValueError, match="'default' heads belong to the bundled model"):
        Engine(str(tiny_llama), speculative={"heads": "default"})
    with pytest.raises(ValueError, match="depth 5 but there are only 4 heads"):
        Engine(str(tiny_llama), speculative={"heads": "random", "tree": "chain:5"})
