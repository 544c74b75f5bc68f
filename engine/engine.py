"""The public API: Engine (add_request / step / abort / generate_batch)."""

from __future__ import annotations

import itertools
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch

from engine.attention.torch_ref import TorchAttentionBackend
from engine.config import EngineConfig, build_engine_config
from engine.executor.uniproc import UniprocExecutor
from engine.kv_cache import PagedKVCache
from engine.model_runner import ModelRunner
from engine.models.loader import load_model, resolve_model_path
from engine.request import DecodeCounters, Request, RequestOutput
from engine.sampling import SamplingParams
from scheduler.block_manager import BlockManager
from scheduler.scheduler import Scheduler
from spec_decode.tree import MedusaTree, build_tree_from_accuracy

Prompt = Union[str, list[int]]

BUNDLED_HEADS_DIR = Path(__file__).resolve().parent.parent / "spec_decode" / "bundled_heads"


@dataclass
class EngineStats(DecodeCounters):
    num_steps: int = 0
    num_generated_tokens: int = 0


def _pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {name!r} requested but CUDA is not available")
    return dev


def _pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


class Engine:
    def __init__(self, model: str = "default", speculative: Any = None, **kwargs: Any) -> None:
        self.config: EngineConfig = build_engine_config(model, speculative, **kwargs)
        mc, cc = self.config.model, self.config.cache
        self.device = _pick_device(mc.device)
        self.dtype = _pick_dtype(mc.dtype, self.device)
        self.model_path = resolve_model_path(mc.model)
        self.model, self.arch = load_model(self.model_path, self.dtype, self.device)
        self.tokenizer = _load_tokenizer(self.model_path)
        eos = self.tokenizer.eos_token_id
        self.eos_token_id: Optional[int] = eos if eos is not None else (self.arch.eos_token_ids or (None,))[0]
        eos_ids = tuple(sorted(set(self.arch.eos_token_ids) | ({eos} if eos is not None else set())))

        proposer, self.head_accuracy = _build_proposer(self.config, self.model, self.arch, self.device, self.dtype)

        block_size = cc.block_size if cc.block_size != "auto" else (64 if self.device.type == "cuda" else 16)
        backend_name = mc.attention_backend
        if backend_name == "auto":
            backend_name = "xformers" if self.device.type == "cuda" else "torch"
        if backend_name == "xformers" and self.dtype == torch.float32:
            raise ValueError("dtype: xformers' paged kernels take float16/bfloat16 only; "
                             "use dtype='bfloat16' or attention_backend='torch' for float32")
        if backend_name == "xformers" and block_size % 64:
            raise ValueError(f"block_size: xformers' paged kernels need a multiple of 64, got {block_size}")
        per_block = PagedKVCache.bytes_per_block(self.arch.num_layers, block_size, self.arch.num_kv_heads,
                                                 self.arch.head_dim, self.dtype)
        num_blocks = cc.num_blocks or max(1, int(cc.kv_cache_memory_gb * 2**30) // per_block)
        self.kv_cache = PagedKVCache(self.arch.num_layers, num_blocks, block_size, self.arch.num_kv_heads,
                                     self.arch.head_dim, self.dtype, self.device)
        backend = _build_backend(backend_name, self.kv_cache, self.device)

        runner = ModelRunner(self.model, backend, self.device, eos_ids, proposer, self.config.speculative)
        # tree="auto": time the verify step for several tree sizes on this device, keep the best.
        self.tree_autotune: Optional[list[dict]] = None
        if proposer is not None and self.config.speculative.tree == "auto":
            self.tree_autotune = _autotune_tree(runner, self.head_accuracy, block_size, num_blocks)
        tree_depth = runner.tree.depth if runner.tree else 0
        # A request must fit the cache alone (plus a tree's lookahead), or it could never run.
        limit = mc.max_model_len or self.arch.max_position_embeddings
        self.max_model_len = min(limit, num_blocks * block_size - tree_depth)
        if self.max_model_len < 2:
            raise ValueError(f"num_blocks={num_blocks} x block_size={block_size}: KV cache too small for any request")
        self.block_manager = BlockManager(num_blocks, block_size)
        self.scheduler = Scheduler(self.config.scheduler, self.block_manager, self.max_model_len, tree_depth)
        self.executor = UniprocExecutor(runner)
        self.stats = EngineStats()
        self._seed_rng = random.Random(mc.seed)
        self._ids = itertools.count()
        self._requests: dict[str, Request] = {}

    # ---- requests ---------------------------------------------------------------------
    def encode(self, prompt: Prompt, chat: bool = False) -> list[int]:
        if isinstance(prompt, str):
            if chat:
                return self.encode_messages([{"role": "user", "content": prompt}])
            return list(self.tokenizer.encode(prompt))
        if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) for t in prompt):
            if chat:
                raise ValueError("prompt: chat=True needs a string prompt, got token ids")
            vocab = self.arch.vocab_size
            bad = [t for t in prompt if not 0 <= t < vocab]
            if bad:
                raise ValueError(f"prompt: token ids must be in [0, {vocab}), got {bad[:5]}")
            return list(prompt)
        raise ValueError(f"prompt: expected a string or a list of token ids, got {type(prompt).__name__}")

    def encode_messages(self, messages: Sequence[dict]) -> list[int]:
        """Chat messages ({"role", "content"}) → prompt ids through the model's chat template."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("chat: this model's tokenizer has no chat template")
        if not messages:
            raise ValueError("messages: must not be empty")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") \
                    or not isinstance(m.get("content"), str):
                raise ValueError(f"messages[{i}]: expected {{'role': system|user|assistant, 'content': str}}")
        text = self.tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def _validate(self, ids: list[int], params: SamplingParams) -> None:
        if not ids:
            raise ValueError("prompt: must not be empty")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"prompt: {len(ids)} tokens, but the context holds {self.max_model_len} "
                             "(prompt plus at least one generated token must fit)")
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params: expected SamplingParams, got {type(params).__name__}")
        rule = params.acceptance
        if rule is not None and self.config.speculative is None:
            raise ValueError("params.acceptance: set, but speculation is off for this engine")

    def add_request(self, prompt: Prompt, params: Optional[SamplingParams] = None,
                    request_id: Optional[str] = None, chat: bool = False) -> str:
        """Queue one request. Raises ValueError (and changes nothing) for bad input."""
        params = params if params is not None else SamplingParams()
        ids = self.encode(prompt, chat)
        self._validate(ids, params)
        seq_id = next(self._ids)
        rid = request_id if request_id is not None else f"req-{seq_id}"
        if rid in self._requests:
            raise ValueError(f"request_id: {rid!r} is already in use")
        seed = params.seed if params.seed is not None else self._seed_rng.getrandbits(62)
        req = Request(request_id=rid, seq_id=seq_id, prompt_token_ids=ids, params=params, seed=seed,
                      eos_token_id=self.eos_token_id)
        self._requests[rid] = req
        self.scheduler.add(req)
        return rid

    def abort(self, request_id: str) -> bool:
        req = self._requests.pop(request_id, None)
        if req is None:
            return False
        self.scheduler.abort([req.seq_id])
        return True

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # ---- stepping ---------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one engine step. Returns an output for every request that got tokens or finished
        (``finished`` tells which); finished requests are forgotten by the engine."""
        out = self.scheduler.schedule()
        if not out.seqs:
            return []
        result = self.executor.execute(out)
        touched = self.scheduler.update(result, self._stop_string_check)
        self.stats.num_steps += 1
        self.stats.num_preemptions = self.scheduler.num_preemptions
        now = time.perf_counter()
        outputs = []
        for req in touched:
            if req.metrics.first_token_time is None and req.output_token_ids:
                req.metrics.first_token_time = now
            if req.finished:
                req.metrics.finish_time = now
                self._requests.pop(req.request_id, None)
                self._account(req)
            outputs.append(self._output(req))
        return outputs

    def _account(self, req: Request) -> None:
        self.stats.num_generated_tokens += len(req.output_token_ids)
        self.stats.merge(req.metrics)

    def _stop_string_check(self, req: Request) -> Optional[str]:
        stops = req.params.stop
        if not stops:
            return None
        text = self.tokenizer.decode(req.output_token_ids, skip_special_tokens=True)
        # Only the tail can hold a stop string that the newest token completed.
        window = max(len(s) for s in stops) + 16
        tail_start = max(0, len(text) - window)
        hits = [i for s in stops if (i := text.find(s, tail_start)) != -1]
        if hits:
            req.text_limit = min(hits)
            return "stop"
        return None

    def _output(self, req: Request) -> RequestOutput:
        text = self.tokenizer.decode(req.output_token_ids, skip_special_tokens=True)
        if req.text_limit is not None:
            text = text[: req.text_limit]
        return RequestOutput(
            request_id=req.request_id,
            prompt_token_ids=req.prompt_token_ids,
            token_ids=list(req.output_token_ids),
            text=text,
            finish_reason=req.finish_reason,
            metrics=req.metrics,
            logprobs=list(req.output_logprobs) if req.params.logprobs else None,
            finished=req.finished,
        )

    def generate_batch(self, prompts: Sequence[Prompt],
                       params: Union[SamplingParams, Sequence[SamplingParams], None] = None,
                       chat: bool = False) -> list[RequestOutput]:
        """Run the prompts to completion (alongside anything already queued); outputs in
        prompt order. Every prompt is validated before any is queued."""
        if params is None or isinstance(params, SamplingParams):
            plist = [params or SamplingParams()] * len(prompts)
        else:
            plist = list(params)
            if len(plist) != len(prompts):
                raise ValueError(f"params: {len(plist)} SamplingParams for {len(prompts)} prompts")
        encoded = []
        for i, (p, sp) in enumerate(zip(prompts, plist)):
            try:
                encoded.append(self.encode(p, chat))
                self._validate(encoded[-1], sp)
            except ValueError as e:
                raise ValueError(f"prompts[{i}]: {e}") from None
        # Queue the token ids validated above: each prompt is tokenised once.
        rids = [self.add_request(ids, sp) for ids, sp in zip(encoded, plist)]
        pending = set(rids)
        done: dict[str, RequestOutput] = {}
        while pending:
            for o in self.step():
                if o.finished and o.request_id in pending:
                    done[o.request_id] = o
                    pending.discard(o.request_id)
        return [done[r] for r in rids]

    def reset_stats(self) -> None:
        self.stats = EngineStats()

    def shutdown(self) -> None:
        self.executor.shutdown()


def _load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def _build_backend(name: str, kv_cache: PagedKVCache, device: torch.device):
    if name == "torch":
        return TorchAttentionBackend(kv_cache, device)
    if device.type != "cuda":
        raise ValueError("attention_backend: 'xformers' needs a CUDA device (it has no CPU kernels)")
    from engine.attention.xformers_backend import XformersAttentionBackend

    return XformersAttentionBackend(kv_cache, device)


def _build_proposer(config: EngineConfig, model, arch, device, dtype):
    from spec_decode.heads import MedusaHeads
    from spec_decode.proposer import MedusaProposer

    spec = config.speculative
    if spec is None:
        return None, None
    path = None
    if spec.heads == "random":
        heads = MedusaHeads(spec.num_heads, 1, arch.hidden_size, arch.vocab_size).randomize(config.model.seed)
    else:
        path = BUNDLED_HEADS_DIR if spec.heads == "default" else Path(spec.heads)
        if spec.heads == "default" and config.model.model != "default":
            raise ValueError("speculative.heads: 'default' heads belong to the bundled model; "
                             "pass a heads directory or 'random' for other models")
        if not path.is_dir():
            raise ValueError(f"speculative.heads: {str(path)!r} is not a directory")
        heads = MedusaHeads.load(path, arch.hidden_size, arch.vocab_size)
    acc = None
    if path is not None and (path / "tree.json").is_file():
        acc = json.loads((path / "tree.json").read_text()).get("rank_accuracy")
    if spec.tree == "auto":
        if acc is None:
            raise ValueError("speculative.tree: 'auto' needs heads with a tree.json holding rank_accuracy "
                             "(written by train-heads)")
        tree = build_tree_from_accuracy(acc, AUTO_TREE_SIZES[-1])
    else:
        tree = MedusaTree.build(spec.tree, heads.num_heads)
    return MedusaProposer(heads.to(device=device, dtype=dtype).eval(), tree, model.lm_head), acc


# Node budgets that tree="auto" times (mc_sim_7b_63's size last).
AUTO_TREE_SIZES = (1, 2, 4, 8, 16, 32, 63)


def _autotune_tree(runner: ModelRunner, acc, block_size: int, num_blocks: int, ctx: int = 128) -> list[dict]:
    """Time one verify step (batch 1, ``ctx`` tokens of context) per tree size; keep the tree
    with the most expected tokens per second. Runs before any request exists, so the KV
    blocks it scribbles on are free."""
    from scheduler.outputs import ScheduledSeq, SchedulerOutput
    from spec_decode.tree import expected_accept_length

    sync = torch.cuda.synchronize if runner.device.type == "cuda" else (lambda: None)
    rows, best = [], None
    for n in AUTO_TREE_SIZES:
        tree = build_tree_from_accuracy(acc, n)
        need = -(-(ctx + 1 + tree.depth) // block_size)
        if need > num_blocks:
            break
        runner.tree = runner.proposer.tree = tree
        seq = ScheduledSeq(seq_id=0, token_ids=[1], start_pos=ctx, block_table=list(range(need)), sample=True,
                           candidates=[1] * (tree.num_nodes - 1), params=SamplingParams(temperature=0))
        times = []
        for i in range(4):
            sync()
            t0 = time.perf_counter()
            runner.execute(SchedulerOutput(step_id=-1, seqs=[seq]))
            sync()
            if i:
                times.append(time.perf_counter() - t0)
        latency = sorted(times)[len(times) // 2]
        expected = expected_accept_length(tree.choices, acc)
        rows.append({"nodes": n, "latency_ms": round(latency * 1e3, 3), "expected_tokens_per_step": round(expected, 3),
                     "expected_tokens_per_s": round(expected / latency, 1)})
        if best is None or expected / latency > best[0]:
            best = (expected / latency, tree)
    runner.tree = runner.proposer.tree = best[1]
    return rows
