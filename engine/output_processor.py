"""The output processor: token ids → text, stop strings, and the RequestOutputs of a step.

Runs in the driver after the scheduler has applied a step's tokens (which stops what token ids
alone decide: EOS, stop token ids, lengths). Here each request's text grows incrementally and
stop strings are checked token by token, so a stop string ends the request at the very token
that completed it — even when one Medusa step appended several tokens — and the tokens after
it are dropped (the scheduler frees the request's blocks).

Detokenization follows the prefix/read-offset scheme serving engines use (vLLM's
``detokenize_incrementally``): decode a short window ending at the new tokens twice — with and
without them — and take the difference; while the newest bytes do not yet form a whole
character (the window ends in U+FFFD) nothing is emitted and the offsets stay, so text never
ends inside a character before the request finishes. Every read offset is therefore a
character boundary, which makes the concatenated text equal to decoding all the ids at once.
Text is produced only when someone reads it (a stream every step, ``generate_batch`` once at
the end) or when stop strings must be checked, so requests nobody watches cost nothing here.
"""

from __future__ import annotations

import time
from typing import Callable

from engine.core.detokenizer import IncrementalDetokenizer
from engine.core.request import Request, RequestOutput


class OutputProcessor:
    def __init__(self, tokenizer, finish: Callable[[Request, str], None]) -> None:
        """``finish(request, reason)`` ends a request in the scheduler (frees its blocks)."""
        self.tokenizer = tokenizer
        self.finish = finish

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def new_detokenizer(self) -> IncrementalDetokenizer:
        return IncrementalDetokenizer(self.decode)

    def check_stop_strings(self, req: Request) -> None:
        """Advance the request's text one new token at a time; at the first token whose text
        completes a stop string, cut the text before the stop string, drop the later tokens
        and finish the request with reason "stop"."""
        stops = req.params.stop
        detok = req.detokenizer
        if not stops or detok.limit is not None:
            return
        longest = max(len(s) for s in stops)
        ids = req.output_token_ids
        for n in range(detok.read_offset + 1, len(ids) + 1):
            delta = detok.advance(ids, n)
            if not delta:
                continue
            # A stop string this token completed ends inside its delta.
            start = max(0, len(detok.text) - len(delta) - longest + 1)
            hits = [i for s in stops if (i := detok.text.find(s, start)) != -1]
            if hits:
                detok.limit = min(hits)
                del ids[n:]
                del req.output_logprobs[n:]
                del req.output_top_logprobs[n:]
                self.finish(req, "stop")
                return

    def process(self, touched: list[Request]) -> list[RequestOutput]:
        """The step's outputs, one per request that got tokens or finished."""
        now = time.perf_counter()
        outputs = []
        for req in touched:
            self.check_stop_strings(req)
            if req.metrics.first_token_time is None and req.output_token_ids:
                req.metrics.first_token_time = now
            if req.finished:
                req.metrics.finish_time = now
            outputs.append(self.output(req))
        return outputs

    def output(self, req: Request) -> RequestOutput:
        n = len(req.output_token_ids)
        finished = req.finished

        def text() -> str:
            detok = req.detokenizer
            ids = req.output_token_ids
            if n < detok.read_offset:  # an old output read late: decode it on its own
                return self.decode(ids[:n])
            detok.advance(ids, n)
            if finished:
                detok.flush(ids)
            return detok.output_text()

        return RequestOutput(
            request_id=req.request_id,
            prompt_token_ids=req.prompt_token_ids,
            source_token_ids=req.output_token_ids,
            source_logprobs=req.output_logprobs if req.params.logprobs else None,
            source_top_logprobs=req.output_top_logprobs if req.params.top_logprobs else None,
            num_tokens=n,
            text_source=text,
            finish_reason=req.finish_reason,
            metrics=req.metrics,
            finished=finished,
        )
