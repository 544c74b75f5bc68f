"""Acceptance rules: which path of a verified tree to keep, and the bonus token after it.

Inputs for one sequence: ``node_tokens`` [N] (root = the pending token, then one candidate per
tree node), ``logits`` [N, V] (the model at every node: row i predicts the token after node i).
Output: the accepted node ids (starting with the root) and the bonus token sampled from the
model at the last accepted node. Randomness is keyed by the produced token's position.

- greedy (exact match): a candidate is accepted while it equals the model's argmax at its
  parent; output equals plain greedy decoding token for token. With temperature > 0 the
  "argmax" is the keyed sample plain decoding would draw there, so output still equals plain
  decoding with the same seed, token for token.
- typical (Medusa): accept x at a node if p(x) > min(epsilon, alpha * exp(-H(p))) with p the
  model's processed distribution at the parent; the longest accepted path wins, ties go to
  the higher path likelihood.
- rejection (SpecInfer-style multi-candidate speculative sampling with deterministic drafts):
  at a node, try its children in rank order: accept child x with probability p(x) / r, r the
  mass not yet rejected at that node (the same as zeroing each rejected token and
  renormalising); if all are rejected, sample the next token from what remains. The token
  distribution equals plain sampling from p at every position.
Greedy requests (temperature 0) always use the greedy rule: for them all three coincide.

Each rule exists twice: per sequence on the host (the readable reference, ``accept``) and
batched on the device without a host sync (``greedy_tree_accept``, ``typical_tree_accept``,
``rejection_tree_walk``; engine/sample/tail.py captures them in a CUDA graph). Both draw their
randomness from ``engine.sample.sampler.keyed_uniform`` with the same keys: (seed, position of the
produced token, draw = the child's rank, or ``RESIDUAL_DRAW``), so for the same logits they
accept the same path and produce the same tokens (tests/test_acceptance.py checks it).

A rule is one unit (``AcceptanceRule``): its host function, optionally its batched device
version (``BatchedVerify`` in, path / accepted count / bonus out), whether it is lossless, and
a summary. Rules are registered by name (``ACCEPTANCE_RULES``); the engine, the CLI and the
device tail take their choices from there, so a new rule is one function plus one
``register_rule`` — with ``device=`` its steps decide inside the captured tail, without it
they decide on the host path, by the host function.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from engine.core.sampling_params import SamplingParams
from engine.sample.sampler import RESIDUAL_DRAW, keyed_uniform, processed_probs, sample_rows, sample_token, seed_key
from engine.spec.tree import MedusaTree


@dataclass
class Accepted:
    path: list[int]  # node ids, root first
    bonus: int


@dataclass(frozen=True)
class BatchedVerify:
    """A uniform verify step of B sequences of one tree (N nodes, vocabulary V) on the device,
    as a rule's batched version reads it. Only the rows a rule asks for are ever processed
    (``probs_of``): at 16 sequences of a 64-node tree each row skipped saves a pass over the
    vocabulary."""
    tree: MedusaTree
    tokens: torch.Tensor  # [B, N] the pending token, then the candidates
    logits: torch.Tensor  # [B, N, V] raw
    positions: torch.Tensor  # [B, N] the position of the token each node's row produces
    keys: torch.Tensor  # [B] seed keys (engine/sample/sampler.py ``seed_key``)
    temperature: torch.Tensor  # [B]
    filtered: bool  # some sequence uses top-k / top-p (else processed = softmax(logits / T))
    probs_of: Callable[[torch.Tensor], torch.Tensor]  # logits rows [B, R, V] → processed [B, R, V]
    tree_tensor: Callable[[str], torch.Tensor]  # tree.<name> on the device, made once
    epsilon: float  # typical acceptance's
    alpha: float
    triton: bool  # Triton kernels may run here (the tail's choice; its tests compare both ways)

    def probs_at(self, node: torch.Tensor) -> torch.Tensor:
        """Each sequence's processed probabilities [B, V] at its ``node`` [B]."""
        seq = torch.arange(node.shape[0], device=node.device)
        return self.probs_of(self.logits[seq, node][:, None])[:, 0]

    def draw_at(self, node: torch.Tensor) -> torch.Tensor:
        """Plain decoding's keyed draw at each sequence's ``node`` [B]."""
        return keyed_targets(self.probs_at(node)[:, None], self.keys, self.positions.gather(1, node[:, None]))[:, 0]

    def with_bonus(self, best: torch.Tensor, n_acc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(path, accepted count, bonus) for each sequence's accepted path (its index ``best``
        in the tree's paths, ``n_acc`` candidates on it): the bonus is plain decoding's draw at
        its last accepted node."""
        path = self.tree_tensor("paths")[best]
        return path, n_acc, self.draw_at(path.clamp(min=0).gather(1, n_acc[:, None])[:, 0])


# (tree, node_tokens, logits, params, seed, first_pos, epsilon, alpha) -> Accepted
HostRule = Callable[..., Accepted]
# BatchedVerify -> (path [B, depth + 1] root first, accepted count [B], bonus token [B])
DeviceRule = Callable[[BatchedVerify], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class AcceptanceRule:
    name: str
    accept: HostRule  # per sequence, on the host: the readable reference
    # Output tokens follow plain sampling's distribution exactly (greedy: the same tokens).
    lossless: bool
    summary: str
    # The same decision batched on the device, no host sync (captured after a verify graph);
    # None: the rule's steps decide on the host path.
    device: Optional[DeviceRule] = None


ACCEPTANCE_RULES: dict[str, AcceptanceRule] = {}


def register_rule(name: str, lossless: bool, summary: str, device: Optional[DeviceRule] = None):
    """Decorator registering a host rule (and its optional batched device version) by name."""
    def add(fn: HostRule) -> HostRule:
        if name in ACCEPTANCE_RULES:
            raise ValueError(f"acceptance rule {name!r} is registered twice")
        ACCEPTANCE_RULES[name] = AcceptanceRule(name, fn, lossless, summary, device)
        return fn
    return add


def device_rules() -> tuple[str, ...]:
    """The rules with a device version, in registration order: a sequence's rule travels to
    the device tail as its index here."""
    return tuple(name for name, rule in ACCEPTANCE_RULES.items() if rule.device is not None)


def _best_path(tree: MedusaTree, ok: torch.Tensor, score: torch.Tensor | None = None) -> list[int]:
    """ok: [P, D] per path and depth, was the edge into that depth accepted."""
    acc_len = ok.int().cumprod(dim=1).sum(dim=1)
    key = acc_len.double()
    if score is not None:
        # Among the longest, prefer the likeliest: score is the accepted prefix's log-likelihood.
        key = key * 1e6 + score
    best = int(torch.argmax(key))
    return tree.paths[best, : int(acc_len[best]) + 1].tolist()


def _edges(tree: MedusaTree, node_tokens: torch.Tensor):
    return _path_edges(tree.paths.to(node_tokens.device))


def _path_edges(paths: torch.Tensor):
    """(parent, child, valid) [P, D] for every edge along every root-to-leaf path."""
    valid = paths[:, 1:] >= 0
    p = paths.clamp(min=0)
    return p[:, :-1], p[:, 1:], valid


def accept_exact(tree: MedusaTree, node_tokens: torch.Tensor, logits: torch.Tensor,
                 params: SamplingParams, seed: int, first_pos: int) -> Accepted:
    """Accept while the candidate equals the token plain decoding draws at its parent (the
    argmax when greedy; with temperature, the keyed sample — so even sampled output is the
    very same token sequence as without speculation)."""
    if params.greedy:
        target = logits.argmax(dim=-1)
    else:
        probs = processed_probs(logits, params)
        target = torch.tensor([sample_token(probs[i], params, seed, first_pos + tree.depths[i])
                               for i in range(tree.num_nodes)], device=logits.device)
    parent, child, valid = _edges(tree, node_tokens)
    ok = (node_tokens[child] == target[parent]) & valid
    path = _best_path(tree, ok.cpu())
    return Accepted(path, int(target[path[-1]]))


def greedy_tree_accept(paths: torch.Tensor, node_tokens: torch.Tensor,
                       argmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy acceptance on the device, no host sync (CUDA graphs capture it): ``paths`` is
    ``tree.paths`` on the device, node_tokens and argmax [S, N]. Returns per sequence the
    index of the accepted path in ``paths`` and how many candidates on it were accepted
    (the first longest path wins, as in ``accept_exact``)."""
    parent, child, valid = _path_edges(paths)
    ok = (node_tokens[:, child] == argmax[:, parent]) & valid  # [S, P, D]
    acc_len = ok.int().cumprod(dim=2).sum(dim=2)  # [S, P]
    best = acc_len.argmax(dim=1)
    return best, acc_len.gather(1, best[:, None])[:, 0]


def accept_greedy_batch(tree: MedusaTree, node_tokens: torch.Tensor, logits: torch.Tensor) -> list[Accepted]:
    """Greedy acceptance for S sequences sharing ``tree`` at once (node_tokens [S, N], logits
    [S, N, V]): one pass on the device and one copy to the host, instead of a few small syncs
    per sequence. Same result as ``accept_exact`` on each sequence (first longest path wins)."""
    argmax = logits.argmax(dim=-1)  # [S, N]
    best, best_len = greedy_tree_accept(tree.paths.to(node_tokens.device), node_tokens, argmax)
    best, best_len, argmax = best.tolist(), best_len.tolist(), argmax.tolist()
    out = []
    for i, (b, n) in enumerate(zip(best, best_len)):
        path = tree.paths[b, : n + 1].tolist()
        out.append(Accepted(path, argmax[i][path[-1]]))
    return out


def accept_typical(tree: MedusaTree, node_tokens: torch.Tensor, logits: torch.Tensor,
                   params: SamplingParams, seed: int, first_pos: int, epsilon: float,
                   alpha: float) -> Accepted:
    probs = processed_probs(logits, params)
    entropy = torch.special.entr(probs).sum(-1)  # -sum p log p, one pass
    threshold = torch.clamp(alpha * torch.exp(-entropy), max=epsilon)
    parent, child, valid = _edges(tree, node_tokens)
    cand_p = probs[parent, node_tokens[child]]
    ok = (cand_p > threshold[parent]) & valid
    loglik = (torch.log(cand_p.clamp_min(1e-30)) * ok.int().cumprod(1)).sum(1)
    path = _best_path(tree, ok.cpu(), loglik.double().cpu())
    last = path[-1]
    bonus = sample_token(probs[last], params, seed, first_pos + tree.depths[last])
    return Accepted(path, bonus)


def accept_rejection(tree: MedusaTree, node_tokens: torch.Tensor, logits: torch.Tensor,
                     params: SamplingParams, seed: int, first_pos: int) -> Accepted:
    probs = processed_probs(logits, params)
    tokens = node_tokens.tolist()
    key = torch.tensor([seed_key(seed)], device=probs.device)
    node, path = 0, [0]
    while True:
        position = first_pos + tree.depths[node]
        p = probs[node]
        rejected: list[int] = []
        rejected_mass = 0.0  # float64, summed in rank order
        nxt = None
        for draw, child in enumerate(tree.children[node]):
            x = tokens[child]
            px = 0.0 if x in rejected else float(p[x])  # a repeated guess was zeroed already
            residual = 1.0 - rejected_mass
            if residual <= 0:
                break
            if float(keyed_uniform(key, position, draw)) < px / residual:
                nxt = child
                break
            rejected.append(x)
            rejected_mass += px
        if nxt is None:
            rest = p.clone()
            rest[rejected] = 0.0
            bonus = sample_rows(rest[None], keyed_uniform(key, position, RESIDUAL_DRAW))
            return Accepted(path, int(bonus[0]))
        path.append(nxt)
        node = nxt


def keyed_targets(probs: torch.Tensor, keys: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """probs [S, N, V] processed, keys [S] (``seed_key``), positions [S, N] of the token each
    node's row produces → [S, N] the token plain decoding draws there (draw 0; the argmax for
    greedy rows, whose probs are one-hot)."""
    s, n, v = probs.shape
    u = keyed_uniform(keys[:, None], positions, 0)
    return sample_rows(probs.reshape(s * n, v), u.flatten()).view(s, n)


def typical_tree_accept(paths: torch.Tensor, node_tokens: torch.Tensor, probs: torch.Tensor,
                        parent_row: torch.Tensor, epsilon: float, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``accept_typical`` for S sequences on the device: probs [S, R, V] processed, at the
    tree's nodes that have children only (``tree.parent_nodes``: a leaf's row is never
    compared against, and at 16 sequences of a 64-node tree each row skipped saves a pass over
    49k numbers), parent_row [N] = ``tree.parent_row``, node_tokens [S, N]. Returns the
    accepted path's index in ``paths`` and its accepted count (longest first, then the
    likeliest; the bonus is drawn at its last node)."""
    s, r, v = probs.shape
    entropy = torch.special.entr(probs).sum(-1)  # [S, R], as accept_typical computes it
    threshold = torch.clamp(alpha * torch.exp(-entropy), max=epsilon)
    parent, child, valid = _path_edges(paths)
    parent = parent_row[parent]  # (padding edges land on row 0, and are masked by valid)
    cand_p = probs.reshape(s, r * v).gather(1, (parent[None] * v + node_tokens[:, child]).flatten(1))
    cand_p = cand_p.view(s, *parent.shape)  # [S, P, D]
    ok = (cand_p > threshold[:, parent]) & valid
    run = ok.int().cumprod(2)
    loglik = (torch.log(cand_p.clamp_min(1e-30)) * run).sum(2)
    key = run.sum(2).double() * 1e6 + loglik.double()
    best = key.argmax(dim=1)
    return best, run.sum(2).gather(1, best[:, None])[:, 0]


def rejection_tree_walk(tree: MedusaTree, children: torch.Tensor, depths: torch.Tensor,
                        node_tokens: torch.Tensor, probs_at: Callable[[torch.Tensor], torch.Tensor],
                        keys: torch.Tensor, first_pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``accept_rejection`` for S sequences on the device, one tree depth per iteration (no
    host sync): children = tree.children_table, depths = tree.depths on the device,
    node_tokens [S, N], probs_at(node [S]) → [S, V] each sequence's processed probabilities
    at its node (only the walked rows are ever computed), keys [S], first_pos [S]. Returns
    the accepted nodes [S, depth + 1] (root first, -1 after the last), the accepted count and
    the bonus token."""
    s = node_tokens.shape[0]
    dev = node_tokens.device
    width = children.shape[1]
    earlier = torch.ones(width, width, dtype=torch.bool, device=dev).tril(-1)  # [j, i]: i < j
    draws = torch.arange(width, device=dev)
    node = torch.zeros(s, dtype=torch.long, device=dev)
    path = torch.full((s, tree.depth + 1), -1, dtype=torch.long, device=dev)
    path[:, 0] = 0
    n_acc = torch.zeros(s, dtype=torch.long, device=dev)
    bonus = torch.zeros(s, dtype=torch.long, device=dev)
    done = torch.zeros(s, dtype=torch.bool, device=dev)
    for step in range(tree.depth + 1):  # a leaf's turn only draws the residual
        kids = children[node]  # [S, C]
        valid = kids >= 0
        x = node_tokens.gather(1, kids.clamp(min=0))
        p = probs_at(node)  # [S, V]
        v = p.shape[-1]
        px = p.gather(1, x).double()
        repeated = ((x[:, :, None] == x[:, None, :]) & valid[:, None, :] & earlier).any(2)
        px = torch.where(valid & ~repeated, px, 0.0)
        residual = 1.0 - (px.cumsum(1) - px)  # mass not yet rejected when child j is tried
        position = first_pos + depths[node]
        u = keyed_uniform(keys[:, None], position[:, None], draws[None])
        # Children are tried until one is accepted, or no mass is left (residual <= 0).
        tried = valid & (residual > 0).int().cumprod(1).bool()
        ok = tried & (u < px / residual.clamp_min(1e-300))
        first = ok.int().argmax(1)
        moved = ok.any(1) & ~done
        finish = ~ok.any(1) & ~done
        # Every tried child was rejected: sample what remains (counts, since guesses repeat).
        hits = torch.zeros(s, v, dtype=torch.int32, device=dev).scatter_add_(1, x, tried.int())
        rest = p.masked_fill(hits > 0, 0.0)
        drawn = sample_rows(rest, keyed_uniform(keys, position, RESIDUAL_DRAW))
        bonus = torch.where(finish, drawn, bonus)
        if step < tree.depth:
            chosen = kids.gather(1, first[:, None])[:, 0]
            path[:, step + 1] = torch.where(moved, chosen, -1)
            node = torch.where(moved, chosen, node)
        n_acc += moved.long()
        done |= finish
    return path, n_acc, bonus


def exact_on_device(v: BatchedVerify) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``accept_exact`` batched: the candidates against plain decoding's draw at every node."""
    paths = v.tree_tensor("paths")
    return v.with_bonus(*greedy_tree_accept(paths, v.tokens, keyed_targets(v.probs_of(v.logits), v.keys, v.positions)))


def typical_on_device(v: BatchedVerify) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``accept_typical`` batched: the rows of nodes with children only, then one draw at the
    last accepted node. Without top-k / top-p and where Triton runs, straight from the logits
    in two launches (engine/kernels/typical_acceptance.py) instead of ~35 small kernels."""
    paths, parent_row = v.tree_tensor("paths"), v.tree_tensor("parent_row")
    if v.triton and not v.filtered:
        from engine.kernels.typical_acceptance import typical_accept

        best, n_acc = typical_accept(v.logits.flatten(0, 1), v.tokens, paths, v.tree_tensor("parent_nodes"),
                                     parent_row, v.temperature, v.epsilon, v.alpha)
    else:
        parents = v.probs_of(v.logits[:, v.tree_tensor("parent_nodes")])
        best, n_acc = typical_tree_accept(paths, v.tokens, parents, parent_row, v.epsilon, v.alpha)
    return v.with_bonus(best, n_acc)


def rejection_on_device(v: BatchedVerify) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``accept_rejection`` batched: one tree depth per iteration."""
    return rejection_tree_walk(v.tree, v.tree_tensor("children_table"), v.tree_tensor("depths"), v.tokens,
                               v.probs_at, v.keys, v.positions[:, 0])


register_rule("greedy", lossless=True, summary="exact match with plain decoding's token", device=exact_on_device)(
    lambda tree, tokens, logits, params, seed, first_pos, epsilon, alpha:
    accept_exact(tree, tokens, logits, params, seed, first_pos))
register_rule("typical", lossless=False, summary="Medusa's typical acceptance (entropy-scaled threshold)",
              device=typical_on_device)(accept_typical)
register_rule("rejection", lossless=True, summary="multi-candidate speculative sampling", device=rejection_on_device)(
    lambda tree, tokens, logits, params, seed, first_pos, epsilon, alpha:
    accept_rejection(tree, tokens, logits, params, seed, first_pos))


def check_rule(name: object, field: str) -> None:
    """ValueError naming ``field`` unless ``name`` is a registered rule."""
    if name not in ACCEPTANCE_RULES:
        raise ValueError(f"{field}: expected one of {tuple(ACCEPTANCE_RULES)}, got {name!r:.100}")


def accept(rule: str, tree: MedusaTree, node_tokens: torch.Tensor, logits: torch.Tensor,
           params: SamplingParams, seed: int, first_pos: int, epsilon: float = 0.09,
           alpha: float = 0.3) -> Accepted:
    """Dispatch on the rule; ``first_pos`` is the position of the token the root's row predicts.
    Greedy requests always take the greedy rule (for them every rule coincides)."""
    name = "greedy" if params.greedy else rule
    if name not in ACCEPTANCE_RULES:
        raise ValueError(f"acceptance: unknown rule {rule!r}; known: {sorted(ACCEPTANCE_RULES)}")
    return ACCEPTANCE_RULES[name].accept(tree, node_tokens, logits, params, seed, first_pos, epsilon, alpha)
