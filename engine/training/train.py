"""Medusa head training on a frozen base model, with self-distilled data.

1. distill: the engine itself answers the training prompts (chat template, batched, keyed
   seeds → deterministic); rows are appended to a JSONL cache, so a stopped run resumes.
2. hidden states: the frozen backbone runs once over prompt + response (no grad); the final
   hidden states of the response region are kept (on the GPU, in the model's dtype, when
   training there), with each row's root token x_{t+1} and labels x_{t+2..t+K+1}.
3. train: head k learns token t+k+2 from h_t (and, by head kind, x_{t+1} or x_{t+1..t+k+1},
   teacher-forced), loss
   weight decay**k, AdamW, linear warm-up then cosine decay, bf16 autocast on CUDA; a
   checkpoint after every epoch. Loss ``ce``: cross-entropy to the greedy token (what greedy
   decoding emits); ``kl``: KL divergence to the base model's whole distribution at t+k+1
   (lm_head of the stored h_{t+k+1}, so the soft labels cost one more projection, no storage)
   — Medusa-2's self-distillation loss: the heads also learn the runner-up tokens a tree's
   lower ranks need.
4. evaluate on held-out prompts: per-head top-1/top-5 and per-rank accuracy (which builds the
   tree, tree.json) and, through the engine, mean accepted length with mc_sim_7b_63.
5. the proposal vocabulary (proposal_vocab.json): the most frequent tokens of the distilled
   responses; the proposer projects onto them only (engine/spec/proposer.py).
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch
from tqdm import tqdm

from engine.core.sampling_params import SamplingParams
from engine.spec.heads import HEAD_KINDS, MedusaHeads
from engine.spec.proposer import PROPOSAL_VOCAB_FILE
from engine.spec.tree import MAX_TOPK, MedusaTree, build_tree_from_accuracy, expected_accept_length
from engine.training.data import default_prompt_files, read_prompts

LOSSES = ("ce", "kl")
TRAIN_CHOICES = {"head_kind": list(HEAD_KINDS), "loss": list(LOSSES)}


def _opt(default, help_: str, show_default: bool = True):
    """A TrainConfig field: its default, and what its command-line flag says about it."""
    return field(default=default, metadata={"help": help_ + (" (default: %(default)s)" if show_default else "")})


@dataclass
class TrainConfig:
    """Defaults are the recipe of the bundled heads (benchmarks/RESULTS.md, "Head recipes"):
    ``medusa-engine train-heads --out DIR`` on an H100 reproduces them."""
    out: str
    prompts: str = _opt("", "one JSONL of prompts, or several separated by commas (ids must not repeat across "
                            "them); prompts of the held-out sources are never trained on "
                            "(engine/training/data.py) (default: train_prompts.jsonl and train_prompts_extra.jsonl "
                            "in the data directory)", show_default=False)
    data_dir: str = _opt("", "the data directory of the default prompts (default: $MEDUSA_ENGINE_DATA, else "
                             "../shared/data beside a source checkout)", show_default=False)
    num_heads: int = _opt(4, "heads: head k guesses token t+k+2")
    num_layers: int = _opt(2, "ResBlocks per head")
    head_kind: str = _opt("sequential", "medusa (Medusa-1: h_t only), root_conditioned (also x_{t+1}) or sequential "
                                        "(Hydra: x_{t+1} and the tree path), see engine/spec/heads.py")
    loss: str = _opt("ce", "ce: cross-entropy to the greedy tokens; kl: KL to the base model's distribution")
    max_train_prompts: int = _opt(30000, "at most this many training prompts")
    max_eval_prompts: int = _opt(64, "held-out prompts to measure the heads on")
    max_prompt_chars: int = _opt(1500, "longer prompts are skipped")
    gen_max_tokens: int = _opt(256, "tokens the model answers each prompt with (self-distillation)")
    gen_temperature: float = _opt(0.0, "0: greedy self-distillation (the heads then learn exactly what greedy "
                                        "decoding emits)")
    gen_batch: int = _opt(512, "prompts the distilling engine answers at once")
    seed: int = _opt(0, "seed of the heads' initialisation, data order and sampled distillation")
    epochs: int = _opt(3, "passes over the training rows")
    lr: float = _opt(1e-3, "peak learning rate (AdamW)")
    weight_decay: float = _opt(0.0, "AdamW weight decay")
    batch_rows: int = _opt(2048, "response positions per optimiser step")
    warmup_frac: float = _opt(0.05, "share of the steps spent warming the learning rate up")
    head_decay: float = _opt(0.8, "head k's loss is weighted head_decay**k")
    tree_budget: int = _opt(63, "candidates in the tree built from the heads' measured accuracy (tree.json)")
    eval_tokens: int = _opt(128, "tokens per held-out prompt when measuring accepted length through the engine")
    proposal_vocab_size: int = _opt(8192, "tokens the heads may propose (the most frequent of the distilled "
                                          "responses); 0: all")

    def __post_init__(self) -> None:
        if self.head_kind not in HEAD_KINDS:
            raise ValueError(f"head_kind: expected one of {HEAD_KINDS}, got {self.head_kind!r}")
        if self.loss not in LOSSES:
            raise ValueError(f"loss: expected one of {LOSSES}, got {self.loss!r}")
        for name in ("num_heads", "num_layers", "max_train_prompts", "max_eval_prompts", "gen_max_tokens",
                     "gen_batch", "epochs", "batch_rows", "tree_budget", "eval_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.proposal_vocab_size < 0:
            raise ValueError(f"proposal_vocab_size: must be >= 0, got {self.proposal_vocab_size}")
        if not self.prompts:  # the project's prompt files (ValueError naming --data-dir if none)
            self.prompts = default_prompt_files(self.data_dir)


@dataclass
class HeadData:
    """Training rows, one per response position t: h_t [N, H], the root token x_{t+1} [N] and
    the heads' labels x_{t+2..t+K+1} [N, K] (-100 past the end). A sequence's rows are
    consecutive, so row r + k + 1 holds h_{t+k+1}, the base model's state that predicts head
    k's label (its soft label under ``loss="kl"``) wherever that label exists."""
    hidden: torch.Tensor
    roots: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.hidden)


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
                           pack_tokens: int = 4096, store: Optional[torch.device] = None) -> HeadData:
    """Rows for every t from the last prompt token on (see HeadData). ``store``: where the rows
    are kept (default: the GPU the model runs on, in its dtype — training reads them there —
    else the CPU, float32)."""
    store = store or (device if device.type == "cuda" else torch.device("cpu"))
    dtype = torch.float32 if store.type == "cpu" else model.dtype
    hiddens, roots, labels = [], [], []
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
                hiddens.append(h[off + ts.to(device)].to(store, dtype))
                st = torch.tensor(s)
                roots.append(st[ts + 1])
                lab = torch.full((len(ts), num_heads), -100, dtype=torch.long)
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
    return HeadData(torch.cat(hiddens), torch.cat(roots).to(store), torch.cat(labels).to(store))


# ---- 3. training ------------------------------------------------------------------------

def path_embeddings(heads: MedusaHeads, data: HeadData, idx: torch.Tensor,
                    embed_w: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """Teacher forcing: the embeddings of the true path [B, K, H] of rows ``idx`` — the root
    x_{t+1}, then x_{t+2}…x_{t+K} (head k's label x_{t+k+2} follows them) — for heads that
    read it; None for Medusa-1 heads."""
    if not heads.root_conditioned:
        return None
    tokens = torch.cat([data.roots[idx, None], data.labels[idx, : heads.num_heads - 1]], dim=1)
    # Past the end of a response the label is -100; so is every later head's, which the loss
    # masks, so any token stands in.
    return torch.nn.functional.embedding(tokens.clamp(min=0).to(embed_w.device), embed_w)


def head_loss(heads: MedusaHeads, lm_head, embed_w: Optional[torch.Tensor], data: HeadData, idx: torch.Tensor,
              decay: float, loss: str = "ce"):
    """Loss and per-head top-1 of the rows ``idx`` of ``data``."""
    dev = lm_head.weight.device
    idx_d = idx.to(data.hidden.device)
    h = data.hidden[idx_d].to(dev, lm_head.weight.dtype)
    labels = data.labels[idx_d].to(dev)
    logits = heads.logits(h, lm_head, path_embeddings(heads, data, idx_d, embed_w))  # [B, K, V]
    losses, top1 = [], []
    for k in range(heads.num_heads):
        valid = labels[:, k] != -100
        if loss == "ce":
            lk = torch.nn.functional.cross_entropy(logits[:, k], labels[:, k], ignore_index=-100)
        else:
            # The teacher's row for head k is r + k + 1 (same sequence wherever the label exists).
            rows = (idx_d + k + 1).clamp(max=len(data) - 1)
            with torch.no_grad():
                teacher = torch.log_softmax(lm_head(data.hidden[rows].to(dev, lm_head.weight.dtype)).float(), -1)
            student = torch.log_softmax(logits[:, k], -1)
            kl = (teacher.exp() * (teacher - student)).sum(-1)
            lk = (kl * valid).sum() / valid.sum().clamp_min(1)
        losses.append(lk * decay ** k)
        top1.append(((logits[:, k].argmax(-1) == labels[:, k]) & valid).sum().item() / max(1, int(valid.sum())))
    return sum(losses), top1


def train_heads(heads: MedusaHeads, lm_head, data: HeadData, cfg: TrainConfig, device: torch.device,
                ckpt: Optional[Path] = None, embed_w: Optional[torch.Tensor] = None) -> dict:
    heads.to(device).train()
    for p in lm_head.parameters():
        p.requires_grad_(False)
    if heads.root_conditioned and embed_w is None:
        raise ValueError("train_heads: root-conditioned heads need the base model's embedding weight")
    opt = torch.optim.AdamW(heads.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(data) / cfg.batch_rows)
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
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    history = []
    for epoch in range(cfg.epochs):
        order = torch.randperm(len(data), generator=gen)
        if epoch < start_epoch:
            continue  # keep the permutation stream identical when resuming
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{cfg.epochs}")
        for step in bar:
            idx = order[step * cfg.batch_rows:(step + 1) * cfg.batch_rows]
            with autocast:
                loss, top1 = head_loss(heads, lm_head, embed_w, data, idx, cfg.head_decay, cfg.loss)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if step % 20 == 0 or step == steps_per_epoch - 1:
                bar.set_postfix(loss=f"{loss.item():.3f}", top1=" ".join(f"{a:.2f}" for a in top1))
        history.append({"epoch": epoch + 1, "loss": loss.item(), "top1": top1})
        if ckpt is not None:
            torch.save({"heads": heads.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                        "epoch": epoch + 1}, ckpt)
    heads.eval()
    return {"steps": total, "history": history}


# ---- 4. evaluation ----------------------------------------------------------------------

@torch.no_grad()
def rank_accuracy(heads: MedusaHeads, lm_head, data: HeadData, device: torch.device, batch: int = 1024,
                  embed_w: Optional[torch.Tensor] = None) -> torch.Tensor:
    """acc[k, r]: how often head k's rank-r guess is the right token (held-out rows; heads that
    read the path read the true one, so for sequential heads this is the chance a node is
    accepted given its parent was)."""
    hits = torch.zeros(heads.num_heads, MAX_TOPK)
    counts = torch.zeros(heads.num_heads)
    dtype = next(heads.parameters()).dtype
    for s in range(0, len(data), batch):
        sl = slice(s, s + batch)
        h, lab = data.hidden[sl].to(device, dtype), data.labels[sl].to(device)
        emb = path_embeddings(heads, data, torch.arange(s, min(s + batch, len(data)), device=data.roots.device), embed_w)
        top = torch.topk(heads.logits(h, lm_head, emb), MAX_TOPK, dim=-1).indices
        valid = lab != -100
        eq = (top == lab[..., None]) & valid[..., None]  # [B, K, R]
        hits += eq.sum(0).float().cpu()
        counts += valid.sum(0).float().cpu()
    return hits / counts.clamp_min(1)[:, None]


def proposal_vocab(examples: list[dict], size: int) -> list[int]:
    """The ``size`` most frequent tokens of the distilled responses (ties: lower id first)."""
    counts = Counter(t for e in examples for t in e["response_ids"])
    return [t for t, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:size]]


def vocab_coverage(examples: list[dict], vocab: list[int]) -> float:
    """Share of the response tokens of ``examples`` inside ``vocab``."""
    keep = set(vocab)
    toks = [t for e in examples for t in e["response_ids"]]
    return sum(t in keep for t in toks) / max(1, len(toks))


def read_training_prompts(spec: str, split: str, max_chars: int) -> list[tuple[str, str]]:
    """(id, prompt) rows of ``split`` from one JSONL or several (comma-separated); a prompt
    text seen before is skipped, an id seen before is an error."""
    rows, seen_ids, seen_text = [], set(), set()
    for path in [p for p in spec.split(",") if p]:
        for pid, prompt in read_prompts(Path(path), split, max_chars):
            if pid in seen_ids:
                raise ValueError(f"prompts: id {pid!r} appears twice ({path})")
            seen_ids.add(pid)
            if prompt not in seen_text:
                seen_text.add(prompt)
                rows.append((pid, prompt))
    return rows


def distill_split(cfg: TrainConfig, engine) -> tuple[list[dict], list[dict]]:
    """Self-distilled (training, held-out) examples of ``cfg``'s prompts (cached in cfg.out)."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    train_rows = read_training_prompts(cfg.prompts, "train", cfg.max_prompt_chars)[: cfg.max_train_prompts]
    eval_rows = read_training_prompts(cfg.prompts, "heldout", cfg.max_prompt_chars)[: cfg.max_eval_prompts]
    if not train_rows or not eval_rows:
        raise ValueError(f"prompts: {cfg.prompts} gave {len(train_rows)} training and {len(eval_rows)} held-out prompts")
    train_ex = distill(engine, train_rows, out / "distill_train.jsonl", cfg.gen_max_tokens,
                       cfg.gen_temperature, cfg.seed, cfg.gen_batch)
    eval_ex = distill(engine, eval_rows, out / "distill_eval.jsonl", cfg.gen_max_tokens,
                      cfg.gen_temperature, cfg.seed, cfg.gen_batch)
    return train_ex, eval_ex


def fit_heads(cfg: TrainConfig, engine, train_data: HeadData, eval_data: HeadData,
              train_ex: list[dict], eval_ex: list[dict], extra: Optional[dict] = None) -> dict:
    """Train heads per ``cfg`` on the rows, evaluate them on the held-out rows and write the
    heads directory (weights, tree.json, proposal_vocab.json, train_report.json) to cfg.out."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    model, arch, device = engine.model, engine.arch, engine.device
    torch.manual_seed(cfg.seed)
    heads = MedusaHeads(cfg.num_heads, cfg.num_layers, arch.hidden_size, arch.vocab_size, shared_lm_head=True,
                        kind=cfg.head_kind)
    lm_head = _float_lm_head(model.lm_head, device)
    embed_w = model.model.embed_tokens.weight.detach().float().clone()
    t1 = time.perf_counter()
    log = train_heads(heads, lm_head, train_data, cfg, device, ckpt=out / "checkpoint.pt", embed_w=embed_w)
    t_train = time.perf_counter() - t1
    acc = rank_accuracy(heads, lm_head, eval_data, device, embed_w=embed_w)
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
        "train_prompts": len(train_ex), "eval_prompts": len(eval_ex),
        "train_rows": len(train_data), "eval_rows": len(eval_data),
        "train_seconds": round(t_train, 1), "device": str(device), "steps": log["steps"], "history": log["history"],
        "heldout_top1": [round(a, 4) for a in acc[:, 0].tolist()],
        "heldout_top5": [round(a, 4) for a in acc[:, :5].sum(1).tolist()],
        "expected_accept_length_tree_json": round(expected_accept_length(tree.choices, acc.tolist()), 4),
    }
    if cfg.proposal_vocab_size:
        vocab = proposal_vocab(train_ex, cfg.proposal_vocab_size)
        coverage = vocab_coverage(eval_ex, vocab)
        (out / PROPOSAL_VOCAB_FILE).write_text(json.dumps({
            "token_ids": vocab, "heldout_coverage": round(coverage, 5),
            "source": f"the {len(vocab)} most frequent tokens of {len(train_ex)} distilled training responses"}))
        report["proposal_vocab"] = {"size": len(vocab), "heldout_coverage": round(coverage, 5)}
    else:
        (out / PROPOSAL_VOCAB_FILE).unlink(missing_ok=True)
    report.update(extra or {})
    (out / "train_report.json").write_text(json.dumps(report, indent=1))
    return report


def run_training(cfg: TrainConfig, engine) -> dict:
    """The whole recipe; ``engine`` is a plain (non-speculative) Engine on the base model."""
    t0 = time.perf_counter()
    train_ex, eval_ex = distill_split(cfg, engine)
    t_data = time.perf_counter() - t0
    train_data = response_hidden_states(engine.model, train_ex, engine.device, cfg.num_heads)
    eval_data = response_hidden_states(engine.model, eval_ex, engine.device, cfg.num_heads)
    return fit_heads(cfg, engine, train_data, eval_data, train_ex, eval_ex, {"distill_seconds": round(t_data, 1)})


def measure_acceptance(model: str, heads_dir: str, prompts: list[str], max_tokens: int, tree="mc_sim_7b_63",
                       acceptance: str = "typical", temperature: float = 0.0, seed: int = 0,
                       proposal_vocab: str = "heads", **engine_kwargs) -> dict:
    """Tokens per decode step of the heads on ``prompts`` (all at once), and which trees the
    decode steps verified: the step token budget is raised to hold every sequence's tree, so
    none is verified without one (``tree_steps`` says; a report that measured plain steps
    would be meaningless)."""
    from engine.engine import Engine

    spec = {"heads": heads_dir, "tree": tree, "acceptance": acceptance, "proposal_vocab": proposal_vocab}
    nodes = len(tree) + 1 if isinstance(tree, list) else MedusaTree.build(tree, 16).num_nodes
    budget = max(2048, len(prompts) * nodes, max(len(p) for p in prompts) + 256)
    eng = Engine(model, speculative=spec, max_num_seqs=len(prompts), max_num_batched_tokens=budget, **engine_kwargs)
    params = [SamplingParams(temperature=temperature, max_tokens=max_tokens, seed=seed + i) for i in range(len(prompts))]
    outs = eng.generate_batch(prompts, params, chat=True)
    st = eng.stats
    return {"mean_accepted": round(st.mean_accepted_length, 4), "decode_steps": st.num_decode_steps,
            "accepted_hist": list(st.accepted_hist), "per_head_acceptance": [round(a, 4) for a in st.per_head_acceptance],
            "tree_steps": dict(st.steps_by_tree_size), "tree_nodes": nodes, "tokens": sum(len(o.token_ids) for o in outs)}


def _float_lm_head(lm_head, device):
    head = torch.nn.Linear(lm_head.in_features, lm_head.out_features, bias=False).to(device)
    with torch.no_grad():
        head.weight.copy_(lm_head.weight.float())
    return head
