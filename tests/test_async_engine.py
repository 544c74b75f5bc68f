"""AsyncEngine: streamed text equals the blocking result; cancel frees KV; safe deltas."""

import asyncio

from engine.async_engine import AsyncEngine, stream_delta
from engine.engine import Engine
from engine.sampling import SamplingParams


def test_stream_delta_never_splits_characters_or_stop_strings():
    assert stream_delta("héllo \ufffd", "", 0, False) == "héllo "  # incomplete bytes held back
    assert stream_delta("héllo \ufffd\ufffd", "héllo ", 0, False) == ""
    assert stream_delta("héllo 😀", "héllo ", 0, False) == "😀"  # completed later
    assert stream_delta("abcdef", "ab", 2, False) == "cd"  # last 2 held for a stop string
    assert stream_delta("abcdef", "abcd", 2, True) == "ef"  # everything once finished
    assert stream_delta("abc", "abcd", 0, True) == ""  # never resend or shrink


def test_stream_matches_blocking_and_cancel_frees_blocks(tiny_llama):
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    blocking = Engine(str(tiny_llama), block_size=4, num_blocks=128)
    prompts = ["w5 w6 w7", "w9 w10", "w100"]
    ref = [o.text for o in blocking.generate_batch(prompts, params)]
    eng = Engine(str(tiny_llama), block_size=4, num_blocks=128)
    aeng = AsyncEngine(eng)

    async def collect(p):
        text, tokens = "", []
        async for out in aeng.generate(p, params):
            text += out.delta_text
            tokens += out.delta_token_ids
            last = out
        assert last.finished and last.text == text and last.token_ids == tokens
        return text

    async def cancel_early(p):
        async for out in aeng.generate(p, SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)):
            if len(out.token_ids) >= 3:
                break  # leaving the loop aborts the request

    async def main():
        texts = await asyncio.gather(*(collect(p) for p in prompts), cancel_early("w42 w43"))
        await asyncio.sleep(0)
        await aeng.shutdown()
        return texts[:3]

    assert asyncio.run(main()) == ref
    assert eng.block_manager.num_used_blocks == 0 and not eng.has_unfinished()
    assert aeng.num_finished.get("abort") == 1 and aeng.num_finished.get("length") == 3
