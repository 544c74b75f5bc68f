"""The heads shipped for the bundled model: lossless, and a regression floor on acceptance."""

import json

import pytest

from engine import Engine, SamplingParams
from engine.spec.heads import BUNDLED_HEADS_DIR
from tests.conftest import PROMPTS

# Measured when the heads were trained (see benchmarks/RESULTS.md, "Bundled heads"); the
# floor sits a little under the measurement so that only a real regression trips it.
MEAN_ACCEPTED_FLOOR = float(json.loads((BUNDLED_HEADS_DIR / "train_report.json").read_text())
                            ["regression_floor_mean_accepted"])


@pytest.fixture(scope="module")
def plain_chat(bundled_dir):
    eng = Engine("default", max_num_seqs=16)
    return [o.token_ids for o in eng.generate_batch(PROMPTS, SamplingParams(temperature=0, max_tokens=48), chat=True)]


@pytest.mark.parametrize("tree", ["mc_sim_7b_63", "auto"])
def test_bundled_heads_lossless_and_above_floor(plain_chat, tree):
    eng = Engine("default", speculative={"heads": "default", "tree": tree}, max_num_seqs=16)
    outs = eng.generate_batch(PROMPTS, SamplingParams(temperature=0, max_tokens=48), chat=True)
    assert [o.token_ids for o in outs] == plain_chat
    if tree == "mc_sim_7b_63":
        assert eng.stats.mean_accepted_length >= MEAN_ACCEPTED_FLOOR, eng.stats.mean_accepted_length
