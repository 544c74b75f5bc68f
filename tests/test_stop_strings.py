"""The output processor: incremental text equals decoding all ids at once, and stop strings stop
at the very token that completes them, where decoding the whole output every token would
(multi-byte text included), however many tokens a step appends."""


import pytest

from engine import SamplingParams
from engine.core.request import Request, RequestStatus
from engine.output_processor import OutputProcessor

BODY = "Ein langer Text — with ümlauts, 漢字とかなの混ざった文章, emoji 🙂👍🏽 and plain words. " * 6


@pytest.fixture(scope="module")
def tokenizer(bundled_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(bundled_dir))


def _request(processor, stops):
    return Request(request_id="r", seq_id=0, prompt_token_ids=[1], params=SamplingParams(stop=stops, max_tokens=4096),
                   seed=0, eos_token_ids=frozenset(), detokenizer=processor.new_detokenizer())


def _finish(req, reason):
    """What Scheduler.finish does to the request itself."""
    req.status, req.finish_reason = RequestStatus.FINISHED, reason


def _feed(processor, req, ids, per_step):
    """Append ``per_step`` tokens at a time (a Medusa step appends several), as the scheduler
    does; the processor checks after each step. Returns the step outputs."""
    outs = []
    for i in range(0, len(ids), per_step):
        if req.finished:
            break
        req.output_token_ids += ids[i:i + per_step]
        outs += processor.process([req])
    return outs


@pytest.mark.parametrize("per_step", [1, 3])
def test_incremental_text_equals_full_decode(tokenizer, per_step):
    ids = tokenizer.encode(BODY, add_special_tokens=False)
    processor = OutputProcessor(tokenizer, finish=lambda r, reason: None)
    req = _request(processor, [])
    texts = [o.text for o in _feed(processor, req, ids, per_step)]
    # Every intermediate text is a prefix of the final one and never ends inside a character.
    full = tokenizer.decode(ids, skip_special_tokens=True)
    assert texts[-1] == full
    for t in texts:
        assert full.startswith(t) and not t.endswith("\ufffd")


@pytest.mark.parametrize("per_step", [1, 4])
@pytest.mark.parametrize("stop", ["§ end", "終わり", "🙂🙂", "x"])
def test_stop_string_stops_where_full_decoding_does(tokenizer, stop, per_step):
    text = BODY + stop + " and after the stop."
    ids = tokenizer.encode(text, add_special_tokens=False)
    finished = []
    processor = OutputProcessor(tokenizer, finish=lambda r, reason: (finished.append(reason), _finish(r, reason)))
    req = _request(processor, [stop, "never in the text"])
    last = _feed(processor, req, ids, per_step)[-1]

    # Brute force: decode everything after every token; the first token whose text holds the stop.
    k = next(k for k in range(1, len(ids) + 1) if stop in tokenizer.decode(ids[:k], skip_special_tokens=True))
    assert finished == ["stop"]
    assert req.output_token_ids == ids[:k] and last.token_ids == ids[:k]
    assert last.text == text[: text.index(stop)]


def test_stop_string_trims_logprobs_and_later_tokens(tokenizer):
    ids = tokenizer.encode("one two three four five", add_special_tokens=False)
    processor = OutputProcessor(tokenizer, finish=_finish)
    req = _request(processor, ["three"])
    req.output_token_ids += ids
    req.output_logprobs += [-0.5] * len(ids)
    [out] = processor.process([req])
    k = next(k for k in range(1, len(ids) + 1) if "three" in tokenizer.decode(ids[:k]))
    assert k < len(ids) and out.token_ids == ids[:k] and len(req.output_logprobs) == k
    assert out.text == "one two " and req.finish_reason == "stop"


def test_an_old_output_read_late_keeps_its_own_text(tokenizer):
    ids = tokenizer.encode("alpha beta gamma delta", add_special_tokens=False)
    processor = OutputProcessor(tokenizer, finish=lambda r, reason: None)
    req = _request(processor, [])
    outs = _feed(processor, req, ids, 1)
    assert outs[-1].text == "alpha beta gamma delta"  # read the newest first
    assert outs[1].text == tokenizer.decode(ids[:2])
