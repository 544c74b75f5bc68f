"""Stop strings: the per-token check decodes only the output's tail, yet stops exactly where
decoding the whole output would (multi-byte text included)."""

from types import SimpleNamespace

import pytest

from engine.engine import Engine


@pytest.fixture(scope="module")
def tokenizer(bundled_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(bundled_dir))


def _first_stop(check, ids, stops):
    """Feed the tokens one at a time, as Scheduler.update does; (tokens kept, cut) at the first stop."""
    req = SimpleNamespace(params=SimpleNamespace(stop=stops), output_token_ids=[], text_limit=None)
    for k, tok in enumerate(ids, start=1):
        req.output_token_ids.append(tok)
        if check(req) == "stop":
            return k, req.text_limit
    return None


@pytest.mark.parametrize("stop", ["§ end", "終わり", "🙂🙂", "x"])
def test_tail_check_stops_where_full_decoding_does(tokenizer, stop):
    body = ("Ein langer Text — with ümlauts, 漢字とかなの混ざった文章, emoji 🙂👍🏽 and plain words. " * 12)
    text = body + stop + " and after the stop."
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) > 4 * (len(stop) + 16)  # long enough that only the tail is decoded
    engine = SimpleNamespace(tokenizer=tokenizer)
    fast = _first_stop(lambda r: Engine._stop_string_check(engine, r), ids, [stop])

    def brute(req):  # decode everything, every time
        full = tokenizer.decode(req.output_token_ids, skip_special_tokens=True)
        if stop in full:
            req.text_limit = full.index(stop)
            return "stop"
        return None

    assert fast is not None and fast == _first_stop(brute, ids, [stop])
    k, cut = fast
    assert tokenizer.decode(ids[:k], skip_special_tokens=True)[:cut] == text[: text.index(stop)]
