"""EOS is one set: a model whose config lists several EOS ids (Llama 3 lists its end-of-turn ids)
stops on any of them, with or without Medusa, and min_tokens masks all of them."""

import json
import shutil

import pytest

from engine import Engine, SamplingParams

PROMPT = [5, 9, 17, 33]


@pytest.fixture(scope="module")
def two_eos(tiny_llama, tmp_path_factory):
    """The tiny model with config.json eos_token_id [2, t], t a token its greedy output reaches
    at index k (not at the start, nothing of the set before it). Returns (dir, t, k, reference)."""
    ref = Engine(str(tiny_llama), block_size=4, num_blocks=256).generate_batch(
        [PROMPT], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))[0].token_ids
    k = next(i for i in range(2, len(ref)) if ref[i] not in ref[:i] and ref[i] != 2 and 2 not in ref[:i + 1])
    path = tmp_path_factory.mktemp("two-eos")
    shutil.copytree(tiny_llama, path, dirs_exist_ok=True)
    cfg = json.loads((path / "config.json").read_text())
    cfg["eos_token_id"] = [2, ref[k]]
    (path / "config.json").write_text(json.dumps(cfg))
    return path, ref[k], k, ref


@pytest.mark.parametrize("speculative", [None, {"heads": "random", "tree": "chain:3"}])
def test_second_eos_id_ends_generation(two_eos, speculative):
    path, t, k, ref = two_eos
    eng = Engine(str(path), speculative=speculative, block_size=4, num_blocks=256)
    assert {2, t} <= eng.eos_token_ids
    out = eng.generate_batch([PROMPT], SamplingParams(temperature=0, max_tokens=40))[0]
    assert out.token_ids == ref[:k + 1] and out.finish_reason == "stop"


@pytest.mark.parametrize("speculative", [None, {"heads": "random", "tree": "chain:3"}])
def test_min_tokens_masks_every_eos_id(two_eos, speculative):
    path, t, k, _ = two_eos
    eng = Engine(str(path), speculative=speculative, block_size=4, num_blocks=256)
    out = eng.generate_batch([PROMPT], SamplingParams(temperature=0, max_tokens=40, min_tokens=k + 3))[0]
    assert len(out.token_ids) >= k + 3
    assert not {2, t} & set(out.token_ids[:k + 2])
