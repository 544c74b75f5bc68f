"""OpenAI-compatible HTTP server (Starlette/FastAPI + uvicorn) over AsyncEngine.

Routes: POST /v1/completions, POST /v1/chat/completions (stream and non-stream), GET /v1/models,
GET /health, GET /metrics (Prometheus text). Request bodies are decoded with msgspec into typed
Structs: a wrong type, a missing field or a bad value is a 400 naming the field; an unknown
model is a 404. A client that disconnects mid-stream aborts its request.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from typing import Any, Optional, Union

import msgspec
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from engine.async_engine import AsyncEngine, StreamOutput
from engine.core.config import validation_field
from engine.core.sampling_params import SamplingParams, StructuredOutputs

# How often a non-streaming request checks whether its client is still there.
DISCONNECT_POLL_S = 0.25
logger = logging.getLogger("medusa_engine")

# Request bodies larger than this are refused with 413 before they are read in full.
DEFAULT_MAX_REQUEST_BYTES = 8 * 1024 * 1024


class TextPart(msgspec.Struct, forbid_unknown_fields=True):
    type: str
    text: str


class ChatMessage(msgspec.Struct, forbid_unknown_fields=True):
    role: str
    # A string, text parts (joined), or null (an assistant turn that only called tools).
    content: Union[str, list[TextPart], None] = None
    name: Optional[str] = None
    tool_call_id: Optional[str] = None


class StreamOptions(msgspec.Struct, forbid_unknown_fields=True):
    include_usage: bool = False
    # vLLM's extension (load tools such as guidellm always send it): with include_usage, every
    # chunk carries the usage so far.
    continuous_usage_stats: bool = False


class _Common(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Fields both endpoints take. Unknown fields are a 400 (nothing is silently ignored);
    known fields this server does not implement are a 400 naming them unless they hold their
    no-op value (see ``_refuse_unsupported``)."""
    model: Optional[str] = None
    max_tokens: Optional[int] = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop: Union[str, list[str], None] = None
    seed: Optional[int] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    n: int = 1
    min_tokens: int = 0
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: Optional[dict[str, float]] = None
    user: Optional[str] = None  # an end-user id for the caller's records; it does not change the output
    # vLLM's extension: prefix-cache blocks are shared only between requests of the same salt
    # (a tenant's cache kept apart from another's).
    cache_salt: Optional[str] = None
    # Structured outputs (``_structured``): OpenAI's response_format (json_object, json_schema),
    # vLLM's structured_outputs object and its older guided_* fields; at most one of them.
    response_format: Optional[dict[str, Any]] = None
    structured_outputs: Optional[dict[str, Any]] = None
    guided_json: Union[dict[str, Any], str, None] = None
    guided_regex: Optional[str] = None
    guided_choice: Optional[list[str]] = None
    guided_grammar: Optional[str] = None


class CompletionRequest(_Common, kw_only=True):
    # A string, a list of strings, a list of token ids, or a list of token-id lists.
    prompt: Union[str, list[Any]]
    logprobs: Optional[int] = None
    echo: bool = False
    suffix: Optional[str] = None
    best_of: Optional[int] = None


class ChatCompletionRequest(_Common, kw_only=True):
    messages: list[ChatMessage]
    max_completion_tokens: Optional[int] = None
    logprobs: bool = False
    top_logprobs: Optional[int] = None
    tools: Optional[list[Any]] = None
    tool_choice: Union[str, dict[str, Any], None] = None
    parallel_tool_calls: Optional[bool] = None


class APIError(Exception):
    def __init__(self, status: int, message: str, param: Optional[str] = None,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind

    @classmethod
    def bad_input(cls, exc: ValueError) -> "APIError":
        """400 from the engine's ValueErrors, which start with the field: "field: what is wrong"."""
        text = str(exc)
        return cls(400, text, text.split(":", 1)[0].removeprefix("SamplingParams."))


def _decode(body: bytes, cls):
    try:
        return msgspec.json.decode(body, type=cls)
    except msgspec.ValidationError as e:
        text = str(e)
        raise APIError(400, f"invalid request: {text}", validation_field(text)) from None
    except msgspec.DecodeError as e:
        raise APIError(400, f"malformed JSON: {e}") from None
    except RecursionError:  # e.g. a prompt nested 10,000 deep: msgspec recurses per level
        raise APIError(400, "malformed JSON: nested too deeply") from None
    except UnicodeDecodeError as e:
        raise APIError(400, f"request body: not valid UTF-8 ({e.reason} at byte {e.start})") from None


def _refuse_unsupported(req: _Common) -> None:
    """400 for a field this server does not implement, unless it holds its no-op value."""
    def no(field: str, why: str = "is not supported by this server") -> None:
        raise APIError(400, f"{field}: {why}", field)

    if not 1 <= req.n <= 16:
        no("n", "must be in [1, 16]")
    if isinstance(req, CompletionRequest):
        if req.logprobs is not None and not 0 <= req.logprobs <= 20:
            no("logprobs", "must be in [0, 20] (alternatives per token)")
        if req.suffix:
            no("suffix")
        if req.best_of is not None and req.best_of != req.n:
            no("best_of", "must equal n (no server-side best-of selection)")
    else:
        if req.top_logprobs and not req.logprobs:
            no("top_logprobs", "needs logprobs=true")
        if req.tools:
            no("tools", "tool calling is not supported")
        if req.tool_choice not in (None, "none"):
            no("tool_choice", "tool calling is not supported")


def _structured(req: _Common) -> tuple[Optional[StructuredOutputs], str]:
    """The request's output constraint and the field it came from (400 naming it if malformed,
    or if more than one field sets one)."""
    found = []
    rf = req.response_format
    if rf is not None:
        kind = rf.get("type", "text")
        if kind == "json_object":
            found.append(("response_format", {"json_object": True}))
        elif kind == "json_schema":
            js = rf.get("json_schema")
            if not isinstance(js, dict) or not isinstance(js.get("schema", {}), dict) \
                    or not set(js) <= {"name", "description", "schema", "strict"}:
                raise APIError(400, "response_format.json_schema: expected {name, description?, schema, strict?}",
                               "response_format.json_schema")
            # strict or not, the schema is enforced exactly (strict's guarantee, always).
            found.append(("response_format", {"json": js.get("schema", {})}))
        elif kind != "text" or set(rf) - {"type"}:
            raise APIError(400, f"response_format: expected type text, json_object or json_schema, got {kind!r:.40}",
                           "response_format")
    if req.structured_outputs is not None:
        found.append(("structured_outputs", req.structured_outputs))
    for name, kind in (("guided_json", "json"), ("guided_regex", "regex"), ("guided_choice", "choice"),
                       ("guided_grammar", "grammar")):
        if getattr(req, name) is not None:
            found.append((name, {kind: getattr(req, name)}))
    if len(found) > 1:
        raise APIError(400, f"{found[1][0]}: only one output constraint per request (also got {found[0][0]})",
                       found[1][0])
    if not found:
        return None, ""
    field, spec = found[0]
    try:
        return msgspec.convert(spec, StructuredOutputs), field
    except (msgspec.ValidationError, ValueError) as e:
        raise APIError(400, f"{field}: {e}", field) from None


def _top_logprobs(req: _Common) -> int:
    """Alternatives per token: completions' logprobs=k, chat's top_logprobs."""
    if isinstance(req, CompletionRequest):
        return req.logprobs or 0
    return req.top_logprobs or 0


def _message_dicts(messages: list[ChatMessage]) -> list[dict]:
    """OpenAI message shapes → the chat template's {role, content}: text parts are joined,
    assistant content null is empty, 'developer' is the system role of newer clients."""
    out = []
    for i, m in enumerate(messages):
        content = m.content
        if isinstance(content, list):
            bad = [p.type for p in content if p.type != "text"]
            if bad:
                raise APIError(400, f"messages[{i}].content: only text parts are supported, got {bad[0]!r}",
                               f"messages[{i}].content")
            content = "".join(p.text for p in content)
        if content is None:
            if m.role != "assistant":
                raise APIError(400, f"messages[{i}].content: null is only allowed for assistant messages",
                               f"messages[{i}].content")
            content = ""
        out.append({"role": "system" if m.role == "developer" else m.role, "content": content})
    return out


def _completion_prompts(prompt) -> list:
    """The prompts of a completions request: a string, a list of strings, a token-id list, or
    a list of token-id lists."""
    def is_ids(x) -> bool:
        return isinstance(x, list) and bool(x) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)

    if isinstance(prompt, str) or is_ids(prompt):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) or is_ids(p) for p in prompt):
        return list(prompt)
    raise APIError(400, "prompt: expected a string, a list of strings, a list of token ids or a list of "
                        "token-id lists (none empty)", "prompt")


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 past ``limit`` bytes (without reading it all)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"request body: {int(declared)} bytes, the limit is {limit}", None, "request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"request body: more than {limit} bytes", None, "request_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def build_app(engine: AsyncEngine, model_name: str, max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
              api_key: Optional[str] = None):
    """The OpenAI-compatible app. ``api_key``: every ``/v1`` route then needs the header
    ``Authorization: Bearer <api_key>`` (401 JSON otherwise; compared in constant time, as
    vLLM's ``--api-key``); ``/health`` and ``/metrics`` stay open for probes and scrapers."""
    if api_key is not None and not api_key:
        raise ValueError("api_key: must not be empty (None: no key)")
    app = FastAPI(title="medusa-engine")
    eng = engine.engine
    started = int(time.time())

    if api_key is not None:
        expected = f"Bearer {api_key}".encode()

        @app.middleware("http")
        async def _require_key(request: Request, call_next):
            if request.url.path.startswith("/v1"):
                given = request.headers.get("authorization", "").encode()
                if not hmac.compare_digest(given, expected):
                    return JSONResponse({"error": {"message": "missing or wrong API key (Authorization: Bearer ...)",
                                                   "type": "authentication_error", "param": None,
                                                   "code": "invalid_api_key"}}, status_code=401)
            return await call_next(request)

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError):
        return JSONResponse({"error": {"message": exc.message, "type": exc.kind, "param": exc.param,
                                       "code": exc.status}}, status_code=exc.status)

    def _check_model(req: _Common) -> None:
        if req.model is not None and req.model != model_name:
            raise APIError(404, f"model {req.model!r} does not exist; this server serves {model_name!r}",
                           "model", "model_not_found")

    def _params(req: _Common, prompt_len: int, index: int,
                structured: Optional[StructuredOutputs] = None) -> SamplingParams:
        if prompt_len >= eng.max_model_len:
            raise APIError(400, f"prompt: {prompt_len} tokens, but the context holds {eng.max_model_len}", "prompt")
        room = eng.max_model_len - prompt_len
        max_tokens = getattr(req, "max_completion_tokens", None) or req.max_tokens
        if max_tokens is None:
            max_tokens = room  # OpenAI and vLLM: the rest of the context
        if max_tokens > room:
            raise APIError(400, f"max_tokens: {max_tokens} requested, but the prompt ({prompt_len} tokens) "
                                f"leaves room for {room} in the {eng.max_model_len}-token context", "max_tokens")
        # n > 1 with a seed: choice i samples with seed + i (distinct, and reproducible).
        seed = req.seed + index if req.seed is not None and req.n > 1 else req.seed
        bias = {}
        for k, v in (req.logit_bias or {}).items():
            # ASCII digits only ("²".isdigit() is true, int("²") raises) and no longer than the
            # vocabulary's largest id (Python refuses to parse ints of over 4,300 digits).
            if not (k.isascii() and k.isdigit()) or len(k) > len(str(eng.arch.vocab_size)) \
                    or int(k) >= eng.arch.vocab_size:
                raise APIError(400, f"logit_bias: key {k[:40]!r} is not a token id below {eng.arch.vocab_size}",
                               "logit_bias")
            bias[int(k)] = v
        try:
            return SamplingParams(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p,
                                  top_k=req.top_k, stop=req.stop, seed=seed, min_tokens=req.min_tokens,
                                  ignore_eos=req.ignore_eos, logprobs=bool(req.logprobs is not None
                                                                           and req.logprobs is not False),
                                  top_logprobs=_top_logprobs(req),
                                  presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
                                  repetition_penalty=req.repetition_penalty, logit_bias=bias,
                                  structured_outputs=structured)
        except ValueError as e:
            raise APIError.bad_input(e) from None

    async def _encode(fn, *args):
        try:  # tokenising a large prompt takes a while: off the event loop
            return await asyncio.to_thread(fn, *args)
        except ValueError as e:
            raise APIError.bad_input(e) from None
        except UnicodeError as e:  # e.g. a lone surrogate escape in the JSON text
            raise APIError(400, f"prompt: text is not valid Unicode ({e.reason})", "prompt") from None

    def _token_logprobs(out: StreamOutput, tokens: list[int]) -> list[tuple[str, float, list[tuple[str, float]]]]:
        """(token text, logprob, [(alternative text, logprob)]) for ``tokens``, the last of out's."""
        lps, tops = out.logprobs or [], out.top_logprobs or []
        first = len(out.token_ids) - len(tokens)
        return [(eng.tokenizer.decode([t]), lps[first + i],
                 [(eng.tokenizer.decode([a]), v) for a, v in tops[first + i]] if first + i < len(tops) else [])
                for i, t in enumerate(tokens) if first + i < len(lps)]

    async def _run(request: Request, prompts: list[list[int]], req: _Common, render_chunk, render_final,
                   render_usage):
        """One engine request per choice (prompt x n); stream their chunks as they come, or
        answer once all are done. A client that leaves aborts every choice."""
        structured, field = _structured(req)
        if structured is not None:
            try:  # compiled off the event loop (then cached), so a bad schema is a 400 naming its field
                await asyncio.to_thread(eng.structured.check, structured)
            except ValueError as e:
                raise APIError(400, f"{field}: {str(e).split(': ', 1)[-1]}", field) from None
        choices = [(i * req.n + k, ids, _params(req, len(ids), k, structured)) for i, ids in enumerate(prompts)
                   for k in range(req.n)]
        rid = f"cmpl-{uuid.uuid4().hex}"
        gens = []
        for index, ids, params in choices:
            gens.append(engine.generate(None, params, request_id=f"{rid}-{index}", prompt_token_ids=ids,
                                        cache_salt=req.cache_salt))
        # Every choice is queued at once (each generator submits its request on its first step),
        # so they run in the same engine steps; awaited one by one, n choices were admitted one
        # per step (64 prompts x 1 token: 66 steps instead of 3).
        firsts = await asyncio.gather(*(g.__anext__() for g in gens), return_exceptions=True)
        failed = next((f for f in firsts if isinstance(f, BaseException)), None)
        if failed is not None:
            for g in gens:
                await g.aclose()
            if isinstance(failed, ValueError):
                raise APIError.bad_input(failed) from None
            raise failed
        if not req.stream:
            async def consume(g, first):
                last = first
                async for out in g:
                    last = out
                return last

            # Nobody notices a client that hangs up on a non-streaming request unless we look:
            # poll for the disconnect while the request runs, and abort it (cancelling the
            # consumers closes the streams, whose exits abort the requests and free their blocks).
            task = asyncio.ensure_future(asyncio.gather(*(consume(g, f) for g, f in zip(gens, firsts))))
            while not task.done():
                await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
                if not task.done() and await request.is_disconnected():
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
                    return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
            lasts = task.result()
            if engine.ending and any(out.finish_reason == "abort" for out in lasts):
                # Ended by the server's drain deadline: not an answer, a retry elsewhere.
                raise APIError(503, "the server is shutting down; retry the request", None, "service_unavailable")
            return JSONResponse(render_final(rid, [(c[0], out) for c, out in zip(choices, lasts)]))

        async def sse():
            merged: asyncio.Queue = asyncio.Queue()

            async def pump(index, g, first):
                out = first
                await merged.put((index, out))
                while not out.finished:
                    out = await g.__anext__()
                    await merged.put((index, out))

            tasks = [asyncio.ensure_future(pump(c[0], g, f)) for c, g, f in zip(choices, gens, firsts)]
            lasts, latest = {}, {}
            opts = req.stream_options
            continuous = opts is not None and opts.include_usage and opts.continuous_usage_stats
            try:
                while len(lasts) < len(choices):
                    index, out = await merged.get()
                    chunk = render_chunk(rid, index, out)
                    if continuous:  # the usage of every choice so far
                        latest[index] = out
                        chunk["usage"] = render_usage(rid, list(latest.values()))["usage"]
                    yield f"data: {json.dumps(chunk)}\n\n"
                    if out.finished:
                        lasts[index] = out
                if req.stream_options is not None and req.stream_options.include_usage:
                    yield f"data: {json.dumps(render_usage(rid, list(lasts.values())))}\n\n"
                yield "data: [DONE]\n\n"
            finally:
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                for g in gens:
                    await g.aclose()  # aborts the requests if the client went away

        return StreamingResponse(sse(), media_type="text/event-stream")

    def _usage(prompts: list[list[int]], outs: list[StreamOutput]) -> dict:
        # n choices of one prompt share it: each prompt counts once (as OpenAI counts), with the
        # prompt tokens its first choice found in the prefix cache.
        p = sum(len(ids) for ids in prompts)
        c = sum(len(o.token_ids) for o in outs)
        n = max(1, len(outs) // max(1, len(prompts)))
        cached = sum(o.metrics.num_cached_tokens for o in outs if int(o.request_id.rsplit("-", 1)[1]) % n == 0)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c,
                "prompt_tokens_details": {"cached_tokens": cached}}

    def _reason(out: StreamOutput) -> Optional[str]:
        return out.finish_reason if out.finished else None

    def _usage_chunk(obj: str, prompts: list[list[int]]):
        def render(rid, outs):
            return {"id": rid, "object": obj, "created": int(time.time()), "model": model_name, "choices": [],
                    "usage": _usage(prompts, outs)}
        return render

    async def _body(request: Request, cls):
        req = _decode(await read_body(request, max_request_bytes), cls)
        _check_model(req)
        _refuse_unsupported(req)
        if req.stream_options is not None and not req.stream:
            raise APIError(400, "stream_options: only allowed with stream=true", "stream_options")
        return req

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = await _body(request, CompletionRequest)
        prompts = [await _encode(eng.encode, p) for p in _completion_prompts(req.prompt)]
        echo = {i: eng.tokenizer.decode(ids, skip_special_tokens=True) if req.echo else "" for i, ids in enumerate(prompts)}
        sent_echo: set[int] = set()

        def lp(out, tokens):
            rows = _token_logprobs(out, tokens)
            return {"tokens": [t for t, _, _ in rows], "token_logprobs": [v for _, v, _ in rows],
                    "top_logprobs": [dict(alts) for _, _, alts in rows] if req.logprobs else None,
                    "text_offset": None}

        def chunk(rid, index, out):
            text = out.delta_text
            if index not in sent_echo:
                sent_echo.add(index)
                text = echo[index // req.n] + text
            return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model_name,
                    "choices": [{"index": index, "text": text,
                                 "logprobs": lp(out, out.delta_token_ids) if req.logprobs is not None else None,
                                 "finish_reason": _reason(out)}]}

        def final(rid, results):
            return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model_name,
                    "choices": [{"index": i, "text": echo[i // req.n] + out.text,
                                 "logprobs": lp(out, out.token_ids) if req.logprobs is not None else None,
                                 "finish_reason": out.finish_reason} for i, out in results],
                    "usage": _usage(prompts, [out for _, out in results])}

        return await _run(request, prompts, req, chunk, final, _usage_chunk("text_completion", prompts))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req = await _body(request, ChatCompletionRequest)
        ids = await _encode(eng.encode_messages, _message_dicts(req.messages))
        sent_role: set[int] = set()

        def lp(out, tokens):
            return {"content": [{"token": t, "logprob": v, "bytes": list(t.encode()),
                                 "top_logprobs": [{"token": a, "logprob": av, "bytes": list(a.encode())}
                                                  for a, av in alts]}
                                for t, v, alts in _token_logprobs(out, tokens)]}

        def chunk(rid, index, out):
            delta = {"content": out.delta_text}
            if index not in sent_role:
                sent_role.add(index)
                delta["role"] = "assistant"
            return {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model_name,
                    "choices": [{"index": index, "delta": delta,
                                 "logprobs": lp(out, out.delta_token_ids) if req.logprobs else None,
                                 "finish_reason": _reason(out)}]}

        def final(rid, results):
            return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model_name,
                    "choices": [{"index": i, "message": {"role": "assistant", "content": out.text},
                                 "logprobs": lp(out, out.token_ids) if req.logprobs else None,
                                 "finish_reason": out.finish_reason} for i, out in results],
                    "usage": _usage([ids], [out for _, out in results])}

        return await _run(request, [ids], req, chunk, final, _usage_chunk("chat.completion.chunk", [ids]))

    def _model_card() -> dict:
        return {"id": model_name, "object": "model", "created": started, "owned_by": "medusa-engine",
                "max_model_len": eng.max_model_len}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [_model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id != model_name:
            raise APIError(404, f"model {model_id!r} does not exist; this server serves {model_name!r}",
                           "model", "model_not_found")
        return _model_card()

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(prometheus_text(engine), media_type="text/plain; version=0.0.4")

    return app


def prometheus_text(engine: AsyncEngine) -> str:
    eng = engine.engine
    s, bm, sched = eng.stats, eng.block_manager, eng.scheduler
    lines = []

    def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float]]):
        lines.append(f"# HELP medusa_{name} {help_}")
        lines.append(f"# TYPE medusa_{name} {kind}")
        for labels, value in samples:
            lines.append(f"medusa_{name}{labels} {value}")

    metric("requests_total", "counter", "Requests accepted.", [("", engine.num_requests)])
    metric("requests_finished_total", "counter", "Requests finished, by reason.",
           [(f'{{reason="{r}"}}', n) for r, n in sorted(engine.num_finished.items())] or [('{reason="stop"}', 0)])
    metric("generation_tokens_total", "counter", "Tokens generated by finished requests.", [("", s.num_generated_tokens)])
    metric("engine_steps_total", "counter", "Engine steps.", [("", s.num_steps)])
    metric("preemptions_total", "counter", "Requests preempted (recomputed later).", [("", sched.num_preemptions)])
    metric("prefix_cache_queries_total", "counter", "Prompt tokens looked up in the prefix cache at admission.",
           [("", sched.prefix_cache_queries)])
    metric("prefix_cache_hits_total", "counter", "Prompt tokens served from the prefix cache.",
           [("", sched.prefix_cache_hits)])
    metric("requests_waiting", "gauge", "Requests in the waiting queue.", [("", len(sched.waiting))])
    metric("requests_running", "gauge", "Requests running.", [("", len(sched.running))])
    metric("kv_blocks_used", "gauge", "KV cache blocks in use.", [("", bm.num_used_blocks)])
    metric("kv_usage_ratio", "gauge", "Fraction of KV blocks in use.", [("", bm.num_used_blocks / bm.num_blocks)])
    metric("mean_accepted_tokens_per_step", "gauge", "Tokens per decode step (1 without speculation).",
           [("", round(s.mean_accepted_length, 4))])
    metric("head_acceptance_ratio", "gauge", "Fraction of decode steps in which head k's guess was accepted.",
           [(f'{{head="{k}"}}', round(a, 4)) for k, a in enumerate(s.per_head_acceptance)])
    metric("decode_step_seconds", "gauge", "Mean wall time of steps in which every sequence decoded.",
           [("", round(s.decode_step_ms / 1e3, 6))])
    metric("cuda_graphs", "gauge", "CUDA graphs captured at start-up (0: steps run eagerly).",
           [("", eng.num_graphs)])
    metric("cuda_graph_capture_seconds", "gauge", "Seconds start-up spent capturing CUDA graphs.",
           [("", eng.graph_capture_s)])
    metric("cuda_graph_memory_bytes", "gauge", "Device memory the captured CUDA graphs hold.",
           [("", int(eng.graph_memory_gb * 2 ** 30))])
    metric("startup_seconds", "gauge", "Seconds from starting the workers to the engine being ready.",
           [("", round(eng.startup_s, 3))])
    metric("graph_capture_steps_total", "counter", "Served steps that captured a CUDA graph (always 0: "
           "graphs are captured at start-up).", [("", s.num_capture_steps)])
    metric("graph_miss_steps_total", "counter", "Served steps with a part that had no CUDA graph of its shape "
           "and ran eagerly.", [("", s.num_graph_miss_steps)])
    metric("decode_steps_by_tree_size_total", "counter",
           "Back-off: decode steps per tree size (candidates per sequence; 0 = plain decoding).",
           [(f'{{candidates="{n}"}}', c) for n, c in sorted(s.steps_by_tree_size.items())])
    return "\n".join(lines) + "\n"


def serve(engine_kwargs: dict, model: str, host: str, port: int, served_model_name: Optional[str],
          max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES, drain_timeout_s: float = 30.0,
          api_key: Optional[str] = None, log_level: str = "info") -> None:
    """Run the server until SIGTERM/SIGINT. Then: no new connections; in-flight requests get
    ``drain_timeout_s`` to finish, after which uvicorn cancels them (each ends with 'abort',
    its blocks freed); the engine (and its Ray workers) shut down; exit status 0."""
    import contextlib
    import signal
    import threading

    import uvicorn

    from engine.engine import Engine

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    name = served_model_name or ("SmolLM2-135M-Instruct" if model == "default" else model)
    engine = Engine(model, **engine_kwargs)

    class DrainingServer(uvicorn.Server):
        """uvicorn re-raises a captured SIGTERM/SIGINT after its graceful shutdown, so the
        process would die by the signal (status -15). Here the signal is the orderly way to
        stop: drain, shut the engine down, exit 0."""

        @contextlib.contextmanager
        def capture_signals(self):
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            original = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in original.items():
                    signal.signal(sig, handler)

        async def shutdown(self, sockets=None) -> None:
            """uvicorn's graceful shutdown (no new connections, in-flight requests finish), but at
            the drain deadline every request still running is ended in the engine: each stream
            gets its last chunk (finish_reason 'abort') and [DONE], each waiting non-streaming
            request a 503 JSON error — instead of uvicorn cancelling the handlers (cut streams,
            500 text/plain, a CancelledError traceback per request)."""
            graceful = asyncio.ensure_future(super().shutdown(sockets))
            done, _ = await asyncio.wait({graceful}, timeout=drain_timeout_s)
            if not done:
                logger.info("drain deadline (%.0f s): ending the requests still in flight", drain_timeout_s)
                await async_engine.end_all()
            await graceful

    async_engine = AsyncEngine(engine)
    # uvicorn's own deadline (it cancels the handlers) comes after ours, with time for the ended
    # requests' last chunks to go out.
    config = uvicorn.Config(build_app(async_engine, name, max_request_bytes, api_key), host=host, port=port,
                            log_level=log_level, timeout_graceful_shutdown=drain_timeout_s + 10)
    try:
        DrainingServer(config).run()
    finally:
        # The engine thread finishes its step and the aborts of the cut requests, then the
        # workers stop (Ray: the actors and their placement group go with the server).
        asyncio.run(async_engine.shutdown())
