"""Bad input → ValueError naming the field; the engine keeps serving the others."""

import pytest

from engine import SamplingParams
from engine.core.config import build_engine_config
from engine.engine import Engine


@pytest.mark.parametrize("kwargs, field", [
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": -3}, "max_tokens"),
    ({"temperature": -0.1}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -2}, "top_k"),
    ({"min_tokens": 10, "max_tokens": 5}, "min_tokens"),
    ({"stop": [""]}, "stop"),
    # Strict types (issue 14): each of these used to pass and break the engine later.
    ({"temperature": 0.7, "seed": 1.5}, "seed"),
    ({"seed": "42"}, "seed"),
    ({"seed": True}, "seed"),
    ({"max_tokens": True}, "max_tokens"),
    ({"temperature": "0.7"}, "temperature"),
    ({"logprobs": "yes"}, "logprobs"),
    ({"ignore_eos": 1}, "ignore_eos"),
    ({"stop": 5}, "stop"),
    ({"stop_token_ids": [True]}, "stop_token_ids"),
    ({"acceptance": ["greedy"]}, "acceptance"),
])
def test_sampling_params_errors(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_config_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown engine option 'blocksize'"):
        build_engine_config("default", blocksize=3)
    with pytest.raises(ValueError, match="speculative.acceptance: expected one of"):
        Engine("default", speculative={"acceptance": "sometimes"})
    with pytest.raises(ValueError, match="speculative: unknown keys"):
        build_engine_config("default", speculative={"tre": "x"})
    with pytest.raises(ValueError, match="enforce_eager: expected bool, got 'yes'"):
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
    with pytest.raises(ValueError, match="SamplingParams.acceptance: set, but speculation is off"):
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


def test_stop_accepts_one_string_or_none():
    assert SamplingParams(stop="answer").stop == ["answer"]
    assert SamplingParams(stop=None).stop == []
    assert SamplingParams(stop=("a", "b")).stop == ["a", "b"]


def test_bool_token_ids_are_refused(tiny_llama):
    eng = Engine(str(tiny_llama), block_size=4, num_blocks=64)
    with pytest.raises(ValueError, match="prompt"):
        eng.add_request([True, False], SamplingParams(max_tokens=2))
    assert not eng.has_unfinished()


def test_a_failing_request_fails_alone_and_the_engine_keeps_serving(tiny_llama, monkeypatch):
    """A fault inside the runner for one request among several: that request finishes with
    'error' (its blocks freed), the others get exactly the tokens they get without the fault,
    and later steps and requests work."""
    import engine.worker.model_runner as mr

    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    prompts = [[5, 6, 7], [9, 10, 11, 12], [20, 21], [30, 31, 32]]
    ref = Engine(str(tiny_llama), block_size=4, num_blocks=64).generate_batch(prompts, params)
    eng = Engine(str(tiny_llama), block_size=4, num_blocks=64,
                 speculative={"heads": "random", "num_heads": 2, "tree": "chain:2"})
    bad_seq = {}
    real = mr.ModelRunner.execute

    def faulty(self, out, *args, **kwargs):
        if any(s.seq_id == bad_seq.get("id") and s.num_output_tokens >= 2 for s in out.seqs):
            raise RuntimeError("injected fault")
        return real(self, out, *args, **kwargs)

    monkeypatch.setattr(mr.ModelRunner, "execute", faulty)
    rids = [eng.add_request(p, params) for p in prompts]
    bad_seq["id"] = eng._requests[rids[1]].seq_id
    done = {}
    while eng.has_unfinished():
        for o in eng.step():
            if o.finished:
                done[o.request_id] = o
    assert done[rids[1]].finish_reason == "error"
    for i in (0, 2, 3):
        assert done[rids[i]].token_ids == ref[i].token_ids and done[rids[i]].finish_reason == "length"
    assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks
    # The engine serves on.
    monkeypatch.setattr(mr.ModelRunner, "execute", real)
    assert eng.generate_batch([prompts[1]], params)[0].token_ids == ref[1].token_ids


def test_wrong_types_surrogates_and_a_too_small_cache_are_value_errors(bundled_dir):
    """A wrong option type names the option (it was a TypeError from a comparison); a prompt
    or chat message with a lone surrogate is refused as invalid Unicode (the tokenizer raised a
    TypeError); a max_model_len the KV cache cannot hold is refused with the numbers, not cut
    down in silence."""
    from engine import SamplingParams
    from engine.engine import Engine

    for kw, field in ((dict(max_model_len="big"), "max_model_len"), (dict(max_num_seqs=2.5), "max_num_seqs"),
                      (dict(kv_cache_memory_gb="1"), "kv_cache_memory_gb"), (dict(num_blocks=True), "num_blocks")):
        with pytest.raises(ValueError, match=f"^{field}: "):
            Engine(str(bundled_dir), **kw)
    with pytest.raises(ValueError, match=r"max_model_len: 100 tokens .* holds 64 .*num_blocks=4 x block_size=16"):
        Engine(str(bundled_dir), num_blocks=4, block_size=16, max_model_len=100)
    eng = Engine(str(bundled_dir), num_blocks=4, block_size=16)
    assert eng.max_model_len == 64  # the cache's capacity, said in the log
    for chat in (False, True):
        with pytest.raises(ValueError, match="not valid Unicode"):
            eng.generate_batch(["hi \ud800 there"], SamplingParams(max_tokens=2), chat=chat)
    assert eng.generate_batch(["hi there"], SamplingParams(max_tokens=2))[0].token_ids
