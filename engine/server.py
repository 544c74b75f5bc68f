"""OpenAI-compatible HTTP server (Starlette/FastAPI + uvicorn) over AsyncEngine.

Routes: POST /v1/completions, POST /v1/chat/completions (stream and non-stream), GET /v1/models,
GET /health, GET /metrics (Prometheus text). Request bodies are decoded with msgspec into typed
Structs: a wrong type, a missing field or a bad value is a 400 naming the field; an unknown
model is a 404. A client that disconnects mid-stream aborts its request.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Optional, Union

import msgspec
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from engine.async_engine import AsyncEngine, StreamOutput
from engine.sampling import SamplingParams


class ChatMessage(msgspec.Struct, forbid_unknown_fields=False):
    role: str
    content: str


class _Common(msgspec.Struct, kw_only=True, forbid_unknown_fields=False):
    model: str
    max_tokens: Optional[int] = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop: Union[str, list[str], None] = None
    seed: Optional[int] = None
    stream: bool = False
    n: int = 1
    min_tokens: int = 0
    ignore_eos: bool = False


class CompletionRequest(_Common, kw_only=True):
    prompt: Union[str, list[int]]


class ChatCompletionRequest(_Common, kw_only=True):
    messages: list[ChatMessage]
    max_completion_tokens: Optional[int] = None


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
        param = text.split("at `$.", 1)[1].rstrip("`").split("`")[0] if "at `$." in text else None
        raise APIError(400, f"invalid request: {text}", param) from None
    except msgspec.DecodeError as e:
        raise APIError(400, f"malformed JSON: {e}") from None


def build_app(engine: AsyncEngine, model_name: str):
    app = FastAPI(title="medusa-engine")
    eng = engine.engine
    started = int(time.time())

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError):
        return JSONResponse({"error": {"message": exc.message, "type": exc.kind, "param": exc.param,
                                       "code": exc.status}}, status_code=exc.status)

    def _check_model(req: _Common) -> None:
        if req.model != model_name:
            raise APIError(404, f"model {req.model!r} does not exist; this server serves {model_name!r}",
                           "model", "model_not_found")

    def _params(req: _Common, prompt_len: int) -> SamplingParams:
        if req.n != 1:
            raise APIError(400, "n: only 1 is supported", "n")
        if prompt_len >= eng.max_model_len:
            raise APIError(400, f"prompt: {prompt_len} tokens, but the context holds {eng.max_model_len}", "prompt")
        room = eng.max_model_len - prompt_len
        max_tokens = getattr(req, "max_completion_tokens", None) or req.max_tokens
        if max_tokens is None:
            max_tokens = max(1, min(room, 256))
        if max_tokens > room:
            raise APIError(400, f"max_tokens: {max_tokens} requested, but the prompt ({prompt_len} tokens) "
                                f"leaves room for {room} in the {eng.max_model_len}-token context", "max_tokens")
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        try:
            return SamplingParams(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p,
                                  top_k=req.top_k, stop=stop, seed=req.seed, min_tokens=req.min_tokens,
                                  ignore_eos=req.ignore_eos)
        except ValueError as e:
            raise APIError.bad_input(e) from None

    def _encode(fn, *args):
        try:
            return fn(*args)
        except ValueError as e:
            raise APIError.bad_input(e) from None

    async def _run(ids, params, body_stream: bool, render_chunk, render_final):
        rid = f"cmpl-{uuid.uuid4().hex}"
        try:
            gen = engine.generate(None, params, request_id=rid, prompt_token_ids=ids)
            first = await gen.__anext__()
        except ValueError as e:
            raise APIError.bad_input(e) from None
        if not body_stream:
            last = first
            async for out in gen:
                last = out
            return JSONResponse(render_final(rid, last))

        async def sse():
            try:
                out = first
                while True:
                    yield f"data: {json.dumps(render_chunk(rid, out))}\n\n"
                    if out.finished:
                        break
                    out = await gen.__anext__()
                yield "data: [DONE]\n\n"
            finally:
                await gen.aclose()  # aborts the request if the client went away

        return StreamingResponse(sse(), media_type="text/event-stream")

    def _usage(out: StreamOutput) -> dict:
        p, c = len(out.prompt_token_ids), len(out.token_ids)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    def _reason(out: StreamOutput) -> Optional[str]:
        return out.finish_reason if out.finished else None

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = _decode(await request.body(), CompletionRequest)
        _check_model(req)
        ids = _encode(eng.encode, req.prompt)
        params = _params(req, len(ids))

        def chunk(rid, out):
            return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model_name,
                    "choices": [{"index": 0, "text": out.delta_text, "logprobs": None,
                                 "finish_reason": _reason(out)}]}

        def final(rid, out):
            return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model_name,
                    "choices": [{"index": 0, "text": out.text, "logprobs": None, "finish_reason": out.finish_reason}],
                    "usage": _usage(out)}

        return await _run(ids, params, req.stream, chunk, final)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req = _decode(await request.body(), ChatCompletionRequest)
        _check_model(req)
        ids = _encode(eng.encode_messages, [{"role": m.role, "content": m.content} for m in req.messages])
        params = _params(req, len(ids))
        sent_role: set[str] = set()

        def chunk(rid, out):
            delta = {"content": out.delta_text}
            if rid not in sent_role:
                sent_role.add(rid)
                delta["role"] = "assistant"
            return {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model_name,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": _reason(out)}]}

        def final(rid, out):
            return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model_name,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": out.text},
                                 "finish_reason": out.finish_reason}],
                    "usage": _usage(out)}

        return await _run(ids, params, req.stream, chunk, final)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": started,
                                            "owned_by": "medusa-engine", "max_model_len": eng.max_model_len}]}

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
    metric("decode_steps_by_tree_size_total", "counter",
           "Back-off: decode steps per tree size (candidates per sequence; 0 = plain decoding).",
           [(f'{{candidates="{n}"}}', c) for n, c in sorted(s.steps_by_tree_size.items())])
    return "\n".join(lines) + "\n"


def serve(engine_kwargs: dict, model: str, host: str, port: int, served_model_name: Optional[str]) -> None:
    import uvicorn

    from engine.engine import Engine

    name = served_model_name or ("SmolLM2-135M-Instruct" if model == "default" else model)
    engine = Engine(model, **engine_kwargs)
    try:
        uvicorn.run(build_app(AsyncEngine(engine), name), host=host, port=port, log_level="info")
    finally:
        engine.shutdown()  # Ray workers and their placement group go with the server
