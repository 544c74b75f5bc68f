"""AsyncEngine: streaming on top of Engine, for services.

The engine runs in its own thread, never on the asyncio event loop: a step takes milliseconds
on a GPU and up to a second for a Medusa step on a small CPU, and on the loop every step would
stall every handler, health probe and stream for that long (measured with 16 Medusa streams on
the 2-core box: /health 4.2 s, a new request's first token 6.8 s). The engine thread owns the
Engine: callers never touch it; they send commands (add, abort) through a queue that the
thread drains between steps, and each step's outputs come back to the request's asyncio queue
through ``loop.call_soon_threadsafe``. A thread rather than an engine-core process (vLLM V1):
the model's work releases the GIL (torch kernels), the handlers are light, and one process
keeps the embedding API (``AsyncEngine(Engine(...))``) and the tests simple; the engine
interface is the command queue either way.

Text is streamed incrementally: a delta never ends inside a multi-byte character (a trailing
U+FFFD from an incomplete byte sequence is held back, and dropped if max_tokens cut the
character), no delta is empty until the final one, and while stop strings are set, the last
(longest stop - 1) characters are held back until the request finishes, so text that a stop
string later removes is never sent. Leaving the ``async for`` early (or cancelling the
consumer) aborts the request and frees its KV blocks.
"""

from __future__ import annotations

import asyncio
import dataclasses
import queue
import threading
from dataclasses import dataclass
from typing import AsyncIterator, Optional

from engine.core.request import RequestMetrics, RequestOutput
from engine.core.sampling_params import SamplingParams
from engine.engine import Engine, Prompt

# Put on a request's output queue by AsyncEngine.end_all: the request was ended by the server.
_ENDED = object()


@dataclass
class StreamOutput:
    request_id: str
    delta_text: str
    delta_token_ids: list[int]
    text: str  # everything sent so far, including this delta
    token_ids: list[int]
    finished: bool
    finish_reason: Optional[str]
    prompt_token_ids: list[int]
    metrics: RequestMetrics
    # Log-probabilities of token_ids (all so far) when the request asked for them, and the
    # top alternatives at each position (SamplingParams.top_logprobs).
    logprobs: Optional[list[float]] = None
    top_logprobs: Optional[list[list[tuple[int, float]]]] = None


def _settle(fut: "asyncio.Future", result, exc: Optional[BaseException]) -> None:
    if fut.cancelled():
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(result)


def stream_delta(text: str, sent: str, hold: int, finished: bool) -> str:
    """The part of ``text`` (all output decoded so far) that may be sent after ``sent``.

    Unfinished: hold back the last ``hold`` characters (a stop string may still remove them)
    and any trailing U+FFFD (bytes of a character whose remaining bytes are still to come).
    Finished: a trailing U+FFFD is a character that max_tokens cut in half; it is dropped (as
    vLLM does), never sent. Text already sent is never sent again, even if decoding revised it."""
    end = len(text) - (0 if finished else hold)
    while end > len(sent) and text[end - 1] == "\ufffd":
        end -= 1
    text = text[: max(end, len(sent))]
    return text[len(sent):] if len(text) > len(sent) else ""


class AsyncEngine:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        # request id → (its consumer's event loop, its output queue)
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._commands: "queue.SimpleQueue" = queue.SimpleQueue()
        self._wakeup = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._stopping = False
        self.num_requests = 0
        self.num_finished: dict[str, int] = {}
        self.ending = False  # end_all() was called: the server is going away

    # ---- the engine thread ------------------------------------------------------------
    def _ensure_thread(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._stopping = False
            self._thread = threading.Thread(target=self._run, name="medusa-engine-loop", daemon=True)
            self._thread.start()

    def _call(self, fn, *args) -> "asyncio.Future":
        """Run ``fn(*args)`` on the engine thread between steps; the future gets its result."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._commands.put((loop, fut, fn, args))
        self._ensure_thread()
        self._wakeup.set()
        return fut

    def _drain_commands(self) -> None:
        while True:
            try:
                loop, fut, fn, args = self._commands.get_nowait()
            except queue.Empty:
                return
            try:
                result, exc = fn(*args), None
            except Exception as e:  # bad input: the caller's ValueError
                result, exc = None, e
            if fut is not None:
                loop.call_soon_threadsafe(_settle, fut, result, exc)

    def _run(self) -> None:
        while not self._stopping:
            self._drain_commands()
            if not self.engine.has_unfinished():
                self._wakeup.wait(timeout=1.0)
                self._wakeup.clear()
                continue
            try:
                outputs = self.engine.step()
            except Exception as exc:  # the engine died (a worker failed): every request fails, loudly
                for rid, (loop, q) in list(self._queues.items()):
                    self.engine.abort(rid)
                    loop.call_soon_threadsafe(q.put_nowait, exc)
                continue
            for out in outputs:
                entry = self._queues.get(out.request_id)
                if entry is not None:
                    entry[0].call_soon_threadsafe(entry[1].put_nowait, out)
        self._drain_commands()  # aborts sent before shutdown still free their blocks

    def _abort(self, rid: str) -> None:
        """Abort ``rid`` on the engine thread, between steps (any thread may call this)."""
        self._queues.pop(rid, None)
        self._commands.put((None, None, self.engine.abort, (rid,)))
        self._wakeup.set()

    async def end_all(self) -> None:
        """End every request in flight now (a server's drain deadline): each is aborted in the
        engine, its blocks freed, and its stream gets a last output with finish_reason 'abort'
        — a client sees the stream end, not a cut connection. ``ending`` stays True after."""
        self.ending = True

        def end() -> None:
            for rid, (loop, q) in list(self._queues.items()):
                self.engine.abort(rid)
                loop.call_soon_threadsafe(q.put_nowait, _ENDED)
            self._queues.clear()
        await self._call(end)

    async def shutdown(self) -> None:
        if self._thread is not None:
            self._stopping = True
            self._wakeup.set()
            await asyncio.to_thread(self._thread.join)
        self.engine.shutdown()

    # ---- requests ---------------------------------------------------------------------
    async def generate(self, prompt: Prompt, params: Optional[SamplingParams] = None,
                       request_id: Optional[str] = None, chat: bool = False,
                       prompt_token_ids: Optional[list[int]] = None,
                       cache_salt: Optional[str] = None) -> AsyncIterator[StreamOutput]:
        """Stream one request (``cache_salt``: Engine.add_request's). Bad input raises
        ValueError before anything is queued."""
        params = params or SamplingParams()
        if prompt_token_ids is None:  # tokenising a long prompt takes a while: not on the loop
            prompt_token_ids = await asyncio.to_thread(self.engine.encode, prompt, chat)
        outputs: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()

        def add() -> str:
            rid = self.engine.add_request(prompt_token_ids, params, request_id=request_id, cache_salt=cache_salt)
            self._queues[rid] = (loop, outputs)  # before the next step can produce its output
            return rid

        added = self._call(add)
        try:
            rid = await asyncio.shield(added)
        except asyncio.CancelledError:
            # The consumer left before the engine thread added the request: abort it once added.
            added.add_done_callback(lambda f: f.exception() is None and self._abort(f.result()))
            raise
        self.num_requests += 1
        hold = max((len(s) for s in params.stop), default=1) - 1
        sent_text, sent_tokens = "", 0
        finished = False
        last: Optional[RequestOutput] = None
        try:
            while not finished:
                item = await outputs.get()
                if isinstance(item, Exception):
                    raise RuntimeError(f"engine step failed: {item}") from item
                if item is _ENDED:  # end_all: what was generated, finished as aborted
                    item = (dataclasses.replace(last, finished=True, finish_reason="abort") if last is not None
                            else RequestOutput(request_id=rid, prompt_token_ids=list(prompt_token_ids),
                                               finish_reason="abort", metrics=RequestMetrics()))
                out: RequestOutput = item
                last = out
                finished = out.finished
                delta = stream_delta(out.text, sent_text, hold, finished)
                sent_text += delta
                new_tokens = out.token_ids[sent_tokens:]
                if delta or finished:
                    sent_tokens = len(out.token_ids)
                if finished:
                    self.num_finished[out.finish_reason] = self.num_finished.get(out.finish_reason, 0) + 1
                # Tokens whose text is still held back wait for the next output: no empty deltas.
                if delta or finished:
                    yield StreamOutput(rid, delta, new_tokens, sent_text, list(out.token_ids), finished,
                                       out.finish_reason, out.prompt_token_ids, out.metrics, out.logprobs,
                                       out.top_logprobs)
        finally:
            self._queues.pop(rid, None)
            if not finished:
                self._abort(rid)
                self.num_finished["abort"] = self.num_finished.get("abort", 0) + 1

    async def generate_full(self, prompt: Prompt, params: Optional[SamplingParams] = None,
                            request_id: Optional[str] = None, chat: bool = False) -> StreamOutput:
        """Run one request to completion and return its last output (text and tokens in full)."""
        last = None
        async for out in self.generate(prompt, params, request_id, chat):
            last = out
        return last
