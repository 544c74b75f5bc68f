"""Medusa-1 head training on a frozen base model, with self-distilled data.

1. distill: the engine itself answers the training prompts (chat template, batched, keyed
   seeds → deterministic); rows are appended to a JSONL cache, so a stopped run resumes.
2. hidden states: the frozen backbone runs once over prompt + response (no grad); the final
   hidden states of the response region are kept.
3. train: head k learns token t+k+2 from h_t with cross-entropy, loss weight decay**k, AdamW,
   linear warm-up then cosine decay, bf16 autocast on CUDA; checkpoint after every epoch.
4. evaluate on held-out prompts: per-head top-1/top-5 and per-rank accuracy (which builds the
   tree, tree.json) and, through the engine, mean accepted length with mc_sim_7b_63 + typical.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch
from tqdm import tqdm

from engine.sampling import SamplingParams
from spec_decode.data import DEFAULT_PROMPTS, read_prompts
from spec_decode.heads import MedusaHeads
from spec_decode.tree import MAX_TOPK, MedusaTree, build_tree_from_accuracy, expected_accept_length


@dataclass
class TrainConfig:
    out: str
    prompts: str = str(DEFAULT_PROMPTS)
    num_heads: int = 4
    num_layers: int = 1
    max_train_prompts: int = 2000
    max_eval_prompts: int = 64
    max_prompt_chars: int = 1500
    gen_max_tokens: int = 128
    # 0: greedy self-distillation (the heads then learn exactly what greedy decoding emits).
    gen_temperature: float = 0.0
    gen_batch: int = 256
    seed: int = 0
    epochs: int = 3
    lr: float = 1e-3
    weight_decay: float = 0.0
    batch_rows: int = 1024
    warmup_frac: float = 0.05
    head_decay: float = 0.8
    tree_budget: int = 63
    eval_tokens: int = 128


# ---- 1. self-distillation ------------------------------------------------------------

def distill(engine, rows: list[tuple[str, str]], path: Path, max_tokens: int, temperature: float,
            seed: int, batch: int, chat: bool = True) -> list[dict]:
    """Responses of the engine's model to ``rows`` (id, prompt), cached in ``path`` (JSONL).
    Rows already in the file are reused; the rest are generated and appended batch by batch."""
    done: dict[str, dict] = {}
    if path.exists():
        with open(path) as f:
            for line in f:
                if line.strip():
                    r = json.loads(line)
                    done[r["id"]] = r
    todo = [(i, p) for i, p in rows if i not in done]
    with open(path, "a") as f, tqdm(total=len(rows), initial=len(rows) - len(todo), desc="distill") as bar:
        for start in range(0, len(todo), batch):
            chunk = todo[start:start + batch]
            params = [SamplingParams(temperature=temperature, max_tokens=max_tokens,
                                     seed=_row_seed(seed, i)) for i, _ in chunk]
            prompt_ids = [engine.encode(p, chat=chat) for _, p in chunk]
            outs = engine.generate_batch(prompt_ids, params)
            for (pid, _), ids, o in zip(chunk, prompt_ids, outs):
                r = {"id": pid, "prompt_ids": ids, "response_ids": o.token_ids}
                done[pid] = r
                f.write(json.dumps(r) + "\n")
            f.flush()
            bar.update(len(chunk))
    return [done[i] for i, _ in rows]


def _row_seed(seed: int, pid: str) -> int:
    import hashlib

    return int(hashlib.sha1(f"{seed}:{pid}".encode()).hexdigest()[:15], 16)


# ---- 2. frozen backbone ---------------------------------------------------------------

class DenseCausalBackend:
    """Attention for packed full sequences without a KV cache (block-diagonal causal mask)."""

    def __init__(self, lengths: list[int], device: torch.device) -> None:
        seg = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths)).to(device)
        idx = torch.arange(len(seg), device=device)
        self.mask = (seg[:, None] == seg[None, :]) & (idx[:, None] >= idx[None, :])

    def forward(self, layer, q, k, v, meta):
        out = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
            attn_mask=self.mask[None, None], enable_gqa=True)
        return out[0].transpose(0, 1)


@torch.inference_mode()
def response_hidden_states(model, examples: list[dict], device: torch.device, num_heads: int,
                           pack_tokens: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows (h_t, labels[t+2 .. t+K+1]) for every t from the last prompt token on.
    Returns hidden [N, H] and labels [N, K] (-100 where the sequence has ended)."""
    hiddens, labels = [], []
    pack: list[dict] = []

    def flush():
        if not pack:
            return
        seqs = [e["prompt_ids"] + e["response_ids"] for e in pack]
        lengths = [len(s) for s in seqs]
        ids = torch.tensor([t for s in seqs for t in s], device=device)
        pos = torch.cat([torch.arange(n) for n in lengths]).to(device)
        h = model(ids, pos, DenseCausalBackend(lengths, device), None)
        off = 0
        for e, s in zip(pack, seqs):
            p, n = len(e["prompt_ids"]), len(s)
            ts = torch.arange(p - 1, n - 1)
            if len(ts):
                hiddens.append(h[off + ts.to(device)].float().cpu())
                lab = torch.full((len(ts), num_heads), -100, dtype=torch.long)
                st = torch.tensor(s)
                for k in range(num_heads):
                    tgt = ts + k + 2
                    ok = tgt < n
                    lab[ok, k] = st[tgt[ok]]
                labels.append(lab)
            off += n
        pack.clear()

    total = 0
    for e in tqdm(examples, desc="hidden states"):
        n = len(e["prompt_ids"]) + len(e["response_ids"])
        if total + n > pack_tokens and pack:
            flush()
            total = 0
        pack.append(e)
        total += n
    flush()
    return torch.cat(hiddens), torch.cat(labels)


# ---- 3. training ------------------------------------------------------------------------

def head_loss(heads: MedusaHeads, lm_head, h: torch.Tensor, labels: torch.Tensor, decay: float):
    logits = heads.logits(h, lm_head)  # [B, K, V]
    losses, top1 = [], []
    for k in range(heads.num_heads):
        lk = torch.nn.functional.cross_entropy(logits[:, k], labels[:, k], ignore_index=-100)
        losses.append(lk * decay ** k)
        valid = labels[:, k] != -100
        top1.append(((logits[:, k].argmax(-1) == labels[:, k]) & valid).sum().item() / max(1, int(valid.sum())))
    return sum(losses), top1


def train_heads(heads: MedusaHeads, lm_head, hidden: torch.Tensor, labels: torch.Tensor, cfg: TrainConfig,
                device: torch.device, ckpt: Optional[Path] = None) -> dict:
    heads.to(device).train()
    for p in lm_head.parameters():
        p.requires_grad_(False)
    opt = torch.optim.AdamW(heads.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(hidden) / cfg.batch_rows)
    total = steps_per_epoch * cfg.epochs
    warm = max(1, int(total * cfg.warmup_frac))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, total - warm))))
    start_epoch = 0
    if ckpt is not None and ckpt.exists():
        state = torch.load(ckpt, map_location=device, weights_only=False)
        heads.load_state_dict(state["heads"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        start_epoch = state["epoch"]
    gen = torch.Generator().manual_seed(cfg.seed)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else _nullcontext()
    history = []
    for epoch in range(cfg.epochs):
        order = torch.randperm(len(hidden), generator=gen)
        if epoch < start_epoch:
            continue  # keep the permutation stream identical when resuming
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{cfg.epochs}")
        for step in bar:
            idx = order[step * cfg.batch_rows:(step + 1) * cfg.batch_rows]
            h, lab = hidden[idx].to(device), labels[idx].to(device)
            with autocast:
                loss, top1 = head_loss(heads, lm_head, h, lab, cfg.head_decay)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.set_postfix(loss=f"{loss.item():.3f}", top1=" ".join(f"{a:.2f}" for a in top1))
        history.append({"epoch": epoch + 1, "loss": loss.item(), "top1": top1})
        if ckpt is not None:
            torch.save({"heads": heads.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                        "epoch": epoch + 1}, ckpt)
    heads.eval()
    return {"steps": total, "history": history}


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


# ---- 4. evaluation ----------------------------------------------------------------------

@torch.no_grad()
def rank_accuracy(heads: MedusaHeads, lm_head, hidden: torch.Tensor, labels: torch.Tensor,
                  device: torch.device, batch: int = 1024) -> torch.Tensor:
    """acc[k, r]: how often head k's rank-r guess is the right token (held-out rows)."""
    hits = torch.zeros(heads.num_heads, MAX_TOPK)
    counts = torch.zeros(heads.num_heads)
    for s in range(0, len(hidden), batch):
        h, lab = hidden[s:s + batch].to(device), labels[s:s + batch].to(device)
        top = torch.topk(heads.logits(h.to(next(heads.parameters()).dtype), lm_head), MAX_TOPK, dim=-1).indices
        valid = lab != -100
        eq = (top == lab[..., None]) & valid[..., None]  # [B, K, R]
        hits += eq.sum(0).float().cpu()
        counts += valid.sum(0).float().cpu()
    return hits / counts.clamp_min(1)[:, None]


def run_training(cfg: TrainConfig, engine) -> dict:
    """The whole recipe; ``engine`` is a plain (non-speculative) Engine on the base model."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    prompts = Path(cfg.prompts)
    train_rows = _take(read_prompts(prompts, "train", cfg.max_prompt_chars), cfg.max_train_prompts)
    eval_rows = _take(read_prompts(prompts, "heldout", cfg.max_prompt_chars), cfg.max_eval_prompts)
    if not train_rows or not eval_rows:
        raise ValueError(f"prompts: {prompts} gave {len(train_rows)} training and {len(eval_rows)} held-out prompts")
    train_ex = distill(engine, train_rows, out / "distill_train.jsonl", cfg.gen_max_tokens,
                       cfg.gen_temperature, cfg.seed, cfg.gen_batch)
    eval_ex = distill(engine, eval_rows, out / "distill_eval.jsonl", cfg.gen_max_tokens,
                      cfg.gen_temperature, cfg.seed, cfg.gen_batch)
    t_data = time.perf_counter() - t0
    model, arch, device = engine.model, engine.arch, engine.device
    h_train, y_train = response_hidden_states(model, train_ex, device, cfg.num_heads)
    h_eval, y_eval = response_hidden_states(model, eval_ex, device, cfg.num_heads)
    torch.manual_seed(cfg.seed)
    heads = MedusaHeads(cfg.num_heads, cfg.num_layers, arch.hidden_size, arch.vocab_size, shared_lm_head=True)
    lm_head = _float_lm_head(model.lm_head, device)
    t1 = time.perf_counter()
    log = train_heads(heads, lm_head, h_train, y_train, cfg, device, ckpt=out / "checkpoint.pt")
    t_train = time.perf_counter() - t1
    acc = rank_accuracy(heads, lm_head, h_eval, y_eval, device)
    tree = build_tree_from_accuracy(acc.tolist(), cfg.tree_budget)
    heads.cpu().save(out, base_model=str(engine.model_path))
    (out / "tree.json").write_text(json.dumps({
        "choices": [list(c) for c in tree.choices],
        "budget": cfg.tree_budget,
        "expected_accept_length": expected_accept_length(tree.choices, acc.tolist()),
        "rank_accuracy": [[round(a, 4) for a in row] for row in acc.tolist()],
    }, indent=1))
    report = {
        "config": asdict(cfg),
        "train_prompts": len(train_rows), "eval_prompts": len(eval_rows),
        "train_rows": len(h_train), "eval_rows": len(h_eval),
        "distill_seconds": round(t_data, 1), "train_seconds": round(t_train, 1),
        "device": str(device), "steps": log["steps"], "history": log["history"],
        "heldout_top1": [round(a, 4) for a in acc[:, 0].tolist()],
        "heldout_top5": [round(a, 4) for a in acc[:, :5].sum(1).tolist()],
    }
    (out / "train_report.json").write_text(json.dumps(report, indent=1))
    return report


def measure_acceptance(model: str, heads_dir: str, prompts: list[str], max_tokens: int, tree: str = "mc_sim_7b_63",
                       acceptance: str = "typical", **engine_kwargs) -> float:
    """Mean accepted length (tokens per decode step) of the heads on ``prompts``, greedy."""
    from engine.engine import Engine

    eng = Engine(model, speculative={"heads": heads_dir, "tree": tree, "acceptance": acceptance}, **engine_kwargs)
    eng.generate_batch(prompts, SamplingParams(temperature=0, max_tokens=max_tokens), chat=True)
    return eng.stats.mean_accepted_length


def _float_lm_head(lm_head, device):
    head = torch.nn.Linear(lm_head.in_features, lm_head.out_features, bias=False).to(device)
    with torch.no_grad():
        head.weight.copy_(lm_head.weight.float())
    return head


def _take(it, n: int) -> list:
    out = []
    for x in it:
        out.append(x)
        if len(out) >= n:
            break
    return out
