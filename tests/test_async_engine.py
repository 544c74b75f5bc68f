"""AsyncEngine: streamed text equals the blocking result; cancel frees KV; safe deltas."""

import asyncio

from engine import SamplingParams
from engine.async_engine import AsyncEngine, stream_delta
from engine.engine import Engine


def test_stream_delta_never_splits_characters_or_stop_strings():
    assert stream_delta("héllo \ufffd", "", 0, False) == "héllo "  # incomplete bytes held back
    assert stream_delta("héllo \ufffd\ufffd", "héllo ", 0, False) == ""
    assert stream_delta("héllo 😀", "héllo ", 0, False) == "😀"  # completed later
    assert stream_delta("abcdef", "ab", 2, False) == "cd"  # last 2 held for a stop string
    assert stream_delta("abcdef", "abcd", 2, True) == "ef"  # everything once finished
    assert stream_delta("abc", "abcd", 0, True) == ""  # never resend or shrink
    assert stream_delta("héllo \ufffd", "", 0, True) == "héllo "  # a character cut by max_tokens: dropped


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
            assert out.delta_text or out.finished  # no empty deltas
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


def test_the_event_loop_never_waits_on_a_step(tiny_llama):
    """Steps run on the engine thread: with every step taking 200 ms, the loop still answers
    within a few ms, and a new request's first token comes within two steps."""
    import time

    eng = Engine(str(tiny_llama), block_size=4, num_blocks=128)
    real_step = eng.step

    def slow_step():
        time.sleep(0.2)  # a long step (a Medusa step on a small CPU takes this long)
        return real_step()

    eng.step = slow_step
    aeng = AsyncEngine(eng)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)

    async def stream(p):
        async for _ in aeng.generate(p, params):
            pass

    async def probe(lags):
        for _ in range(30):
            t0 = time.perf_counter()
            await asyncio.sleep(0.01)
            lags.append(time.perf_counter() - t0 - 0.01)

    async def first_token_s():
        await asyncio.sleep(0.5)  # the long streams are mid-flight
        t0 = time.perf_counter()
        async for _ in aeng.generate("w7 w8", SamplingParams(temperature=0, max_tokens=1)):
            return time.perf_counter() - t0

    async def main():
        lags = []
        results = await asyncio.gather(*(stream(f"w{i} w{i + 1}") for i in range(4)), probe(lags), first_token_s())
        await aeng.shutdown()
        return lags, results[-1]

    lags, ttft = asyncio.run(main())
    assert max(lags) < 0.05, max(lags)
    assert ttft < 2 * 0.2 + 0.15, ttft
    assert eng.block_manager.num_used_blocks == 0
