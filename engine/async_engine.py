"""AsyncEngine: streaming on top of Engine, for services.

One engine loop (an asyncio task in the caller's event loop) steps the engine whenever any
request is unfinished and hands each step's outputs to the request's queue; there is no thread
per request, and no thread at all: add_request/abort run between steps on the same loop. A
step blocks the loop for its duration (tens of ms), which bounds the server's reaction time.

Text is streamed incrementally: a delta never ends inside a multi-byte character (a trailing
U+FFFD from an incomplete byte sequence is held back), and while stop strings are set, the
last (longest stop - 1) characters are held back until the request finishes, so text that a
stop string later removes is never sent. Leaving the ``async for`` early (or cancelling the
consumer) aborts the request and frees its KV blocks.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import AsyncIterator, Optional

from engine.engine import Engine, Prompt
from engine.request import RequestMetrics, RequestOutput
from engine.sampling import SamplingParams


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


def stream_delta(text: str, sent: str, hold: int, finished: bool) -> str:
    """The part of ``text`` (all output decoded so far) that may be sent after ``sent``.

    Unfinished: hold back the last ``hold`` characters (a stop string may still remove them)
    and any trailing U+FFFD (bytes of a character whose remaining bytes are still to come).
    Text already sent is never sent again, even if decoding revised it."""
    if not finished:
        end = len(text) - hold
        while end > len(sent) and text[end - 1] == "\ufffd":
            end -= 1
        text = text[: max(end, len(sent))]
    return text[len(sent):] if len(text) > len(sent) else ""


class AsyncEngine:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._queues: dict[str, asyncio.Queue] = {}
        self._wakeup: Optional[asyncio.Event] = None
        self._loop_task: Optional[asyncio.Task] = None
        self.num_requests = 0
        self.num_finished: dict[str, int] = {}

    # ---- the engine loop --------------------------------------------------------------
    def _ensure_loop(self) -> None:
        if self._wakeup is None:
            self._wakeup = asyncio.Event()
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.get_running_loop().create_task(self._run(), name="medusa-engine-loop")

    async def _run(self) -> None:
        while True:
            if not self.engine.has_unfinished():
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            try:
                outputs = self.engine.step()
            except Exception as exc:  # a broken step fails every in-flight request, loudly
                for rid, q in list(self._queues.items()):
                    self.engine.abort(rid)
                    q.put_nowait(exc)
                continue
            for out in outputs:
                q = self._queues.get(out.request_id)
                if q is not None:
                    q.put_nowait(out)
            await asyncio.sleep(0)  # let handlers add/abort requests and write responses

    async def shutdown(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
            try:
                await self._loop_task
            except asyncio.CancelledError:
                pass
        self.engine.shutdown()

    # ---- requests ---------------------------------------------------------------------
    async def generate(self, prompt: Prompt, params: Optional[SamplingParams] = None,
                       request_id: Optional[str] = None, chat: bool = False,
                       prompt_token_ids: Optional[list[int]] = None) -> AsyncIterator[StreamOutput]:
        """Stream one request. Bad input raises ValueError before anything is queued."""
        params = params or SamplingParams()
        ids = prompt_token_ids if prompt_token_ids is not None else self.engine.encode(prompt, chat)
        rid = self.engine.add_request(ids, params, request_id=request_id)
        self.num_requests += 1
        queue: asyncio.Queue = asyncio.Queue()
        self._queues[rid] = queue
        self._ensure_loop()
        self._wakeup.set()
        hold = max((len(s) for s in params.stop), default=1) - 1
        sent_text, sent_tokens = "", 0
        finished = False
        try:
            while not finished:
                item = await queue.get()
                if isinstance(item, Exception):
                    raise RuntimeError(f"engine step failed: {item}") from item
                out: RequestOutput = item
                finished = out.finished
                delta = stream_delta(out.text, sent_text, hold, finished)
                sent_text += delta
                new_tokens = out.token_ids[sent_tokens:]
                sent_tokens = len(out.token_ids)
                if finished:
                    self.num_finished[out.finish_reason] = self.num_finished.get(out.finish_reason, 0) + 1
                if delta or new_tokens or finished:
                    yield StreamOutput(rid, delta, new_tokens, sent_text, list(out.token_ids), finished,
                                       out.finish_reason, out.prompt_token_ids, out.metrics)
        finally:
            self._queues.pop(rid, None)
            if not finished:
                self.engine.abort(rid)
                self.num_finished["abort"] = self.num_finished.get("abort", 0) + 1

    async def generate_full(self, prompt: Prompt, params: Optional[SamplingParams] = None,
                            request_id: Optional[str] = None, chat: bool = False) -> StreamOutput:
        """Run one request to completion and return its last output (text and tokens in full)."""
        last = None
        async for out in self.generate(prompt, params, request_id, chat):
            last = out
        return last
