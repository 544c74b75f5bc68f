"""The per-row sampler: penalties, processed probabilities and keyed draws.

Randomness is keyed by (request seed, token position, draw): a uniform number is a hash of the
three (``keyed_uniform``, counter-based like Philox, integer arithmetic only), so it is the
same on the host and inside a captured CUDA graph, on any device. No generator state lives
anywhere between steps. A token is drawn by inverting the cumulative distribution at that
uniform (``sample_rows``).
"""

from __future__ import annotations

import torch

from engine.core.sampling_params import SamplingParams
from engine.kernels import triton_applies


def apply_penalties(logits: torch.Tensor, params: SamplingParams, prompt: list[int], output: list[int],
                    paths: list[list[int]]) -> None:
    """In place: row r of ``logits`` [R, V] predicts the token after ``output`` + ``paths[r]``
    (a tree node's candidates on its path; [] for the plain row). Plain decoding calls this
    with one row and the same history, so a tree node's processed logits equal what plain
    decoding computes at that position."""
    v = logits.shape[-1]
    dev = logits.device
    if params.logit_bias:
        ids = torch.tensor([k for k in params.logit_bias if k < v], dtype=torch.long, device=dev)
        bias = torch.tensor([b for k, b in params.logit_bias.items() if k < v], dtype=logits.dtype, device=dev)
        logits[:, ids] += bias
    base_out = torch.bincount(torch.tensor(output, dtype=torch.long, device=dev), minlength=v).to(logits.dtype) \
        if output else torch.zeros(v, dtype=logits.dtype, device=dev)
    seen_prompt = torch.zeros(v, dtype=torch.bool, device=dev)
    if prompt:
        seen_prompt[torch.tensor(prompt, dtype=torch.long, device=dev)] = True
    for r, path in enumerate(paths):
        counts = base_out.clone()
        if path:
            counts += torch.bincount(torch.tensor(path, dtype=torch.long, device=dev), minlength=v).to(logits.dtype)
        row = logits[r]
        if params.repetition_penalty != 1.0:
            seen = seen_prompt | (counts > 0)
            rp = params.repetition_penalty
            row[:] = torch.where(seen, torch.where(row > 0, row / rp, row * rp), row)
        if params.frequency_penalty or params.presence_penalty:
            row -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0).to(logits.dtype)


def apply_token_bitmask(logits: torch.Tensor, bitmask: bytes) -> None:
    """In place: -inf on every token a grammar forbids. ``bitmask`` holds one mask per row of
    ``logits`` [R, V], token t allowed when bit t % 8 of byte t // 8 of its row's mask is set
    (engine/core/structured.py; the same bits as its int32 little-endian words)."""
    rows, v = logits.shape
    packed = torch.frombuffer(bytearray(bitmask), dtype=torch.uint8).view(rows, -1).to(logits.device)
    bits = (packed[:, :, None] >> torch.arange(8, dtype=torch.uint8, device=logits.device)) & 1
    allowed = bits.view(rows, -1)[:, :v].bool()
    logits.masked_fill_(~allowed, float("-inf"))


# The draw of a rejection walk's residual sample (after every child of a node is rejected);
# draws 0, 1, … are a node's children in rank order, draw 0 also a plain sample's.
RESIDUAL_DRAW = 0xFFFF


def seed_key(seed: int) -> int:
    """A request's seed (any 64-bit int) folded to the 32-bit key ``keyed_uniform`` hashes."""
    seed &= 0xFFFF_FFFF_FFFF_FFFF
    return _mix32((seed & 0xFFFF_FFFF) ^ _mix32(seed >> 32))  # on Python ints: ~1 us, no tensors


def _mix32(x):
    """A 32-bit integer hash (Chris Wellons' hash-prospector "hash32": 15, 0x2c1b3c6d, 12,
    0x297a2d39, 15), on an int64 tensor or a Python int in [0, 2**32). Both multipliers are
    below 2**30, so x * c stays below 2**62: exact in int64 on every device, no overflow, and
    two operations a multiply — the whole draw is ~35 elementwise kernels in a captured tail."""
    x = x ^ (x >> 15)
    x = (x * 0x2C1B3C6D) & 0xFFFF_FFFF
    x = x ^ (x >> 12)
    x = (x * 0x297A2D39) & 0xFFFF_FFFF
    return x ^ (x >> 15)


def keyed_uniform(key: torch.Tensor, position, draw) -> torch.Tensor:
    """Uniform numbers in (0, 1), float64, one per element of the broadcast of ``key`` (a
    ``seed_key``), ``position`` (the produced token's) and ``draw`` (int64 tensors or ints)."""
    # (Python ints stay Python ints: a host→device copy cannot be captured in a CUDA graph.)
    tensors = [x for x in (key, position, draw) if isinstance(x, torch.Tensor)]
    if tensors and triton_applies(tensors[0]) and len(torch.broadcast_shapes(*(x.shape for x in tensors))) <= 2:
        from engine.kernels import \
            keyed_sampling as sampling_kernel  # the same hash in one launch, not ~35 (bit for bit)

        return sampling_kernel.keyed_uniform(key, position, draw)
    h = _mix32(key & 0xFFFF_FFFF)
    h = _mix32(h ^ (position & 0xFFFF_FFFF))
    h = _mix32(h ^ ((draw * 0x9E37 + 0x79B9) & 0xFFFF_FFFF))
    return (h.double() + 0.5) / 2.0 ** 32


def sample_rows(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """probs [R, V] (rows need not sum to 1), u [R] uniforms in (0, 1) → tokens [R]: the first
    token whose cumulative mass reaches u times the row's total (never a zero-mass token). On
    CUDA one Triton program per row, summing in float64 (engine/kernels/keyed_sampling.py): every CUDA
    draw, the device tails' and the host rules', is that program's."""
    if triton_applies(probs):
        from engine.kernels import keyed_sampling as sampling_kernel

        return sampling_kernel.sample_rows(probs, u)
    cdf = probs.float().cumsum(-1)
    x = (u.double() * cdf[:, -1].double()).float().clamp(min=torch.finfo(torch.float32).tiny)
    return torch.searchsorted(cdf, x[:, None]).clamp(max=probs.shape[-1] - 1)[:, 0]


def processed_probs_rows(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                         top_p: torch.Tensor, filters: bool = True, greedy_rows: bool = True) -> torch.Tensor:
    """Probabilities after temperature, top-k and top-p, each row [R, V] with its own
    temperature [R] (0: greedy, the one-hot of the argmax), top_k [R] (0: off) and top_p [R]
    (1: off). ``filters`` False skips top-k/top-p (every row has them off): no sort;
    ``greedy_rows`` False: no row is greedy, no one-hot (each skips passes over [R, V], which
    at 16 sequences of a 64-node tree is 50M numbers a pass; a row's values never change)."""
    greedy = temperature <= 0
    # (bf16 logits / float32 temperatures: promoted to float32 in the one pass)
    x = logits / torch.where(greedy, 1.0, temperature.float())[:, None]
    if x.dtype != torch.float32:
        x = x.float()
    if filters:
        v = x.shape[-1]
        ordered = torch.sort(x, dim=-1, descending=True).values
        k = top_k.long().clamp(min=0)
        kth = ordered.gather(1, (k - 1).clamp(min=0, max=v - 1)[:, None])
        x = x.masked_fill(((k > 0) & (k < v))[:, None] & (x < kth), float("-inf"))
    probs = torch.softmax(x, dim=-1)
    if filters:
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        sorted_p, idx = torch.sort(probs, dim=-1, descending=True)
        drop = ((sorted_p.cumsum(-1) - sorted_p) >= top_p.float()[:, None]) & (top_p < 1.0)[:, None]
        probs = torch.zeros_like(probs).scatter_(-1, idx, sorted_p.masked_fill(drop, 0.0))
        # Only rows that dropped mass are renormalised: a row's result never depends on
        # whether another row of the batch turned the filters on.
        probs = torch.where((top_p < 1.0)[:, None], probs / probs.sum(-1, keepdim=True), probs)
    if not greedy_rows:
        return probs
    one_hot = torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    return torch.where(greedy[:, None], one_hot, probs)


def params_rows(params: list["SamplingParams"], device: torch.device) -> tuple[torch.Tensor, ...]:
    """(temperature, top_k (0: off), top_p) [len(params)], one row per params, for
    ``processed_probs_rows``."""
    return (torch.tensor([float(p.temperature) for p in params], device=device),
            torch.tensor([max(p.top_k, 0) for p in params], dtype=torch.long, device=device),
            torch.tensor([float(p.top_p) for p in params], device=device))


def processed_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Probabilities after temperature, top-k and top-p (rows of ``logits`` share ``params``).

    For greedy params this is the one-hot of the argmax, so acceptance rules can treat
    greedy as the zero-temperature limit. The same function as the device tails' (one row's
    result does not depend on the others)."""
    rows = logits.reshape(-1, logits.shape[-1])
    out = processed_probs_rows(rows, *params_rows([params] * rows.shape[0], logits.device), filters=params.filtered,
                               greedy_rows=params.greedy)
    return out.view(logits.shape)


def sample_token(probs: torch.Tensor, params: SamplingParams, seed: int, position: int) -> int:
    """Draw one token from a processed distribution [V] (argmax when greedy), keyed by the
    request's seed and the token's position (draw 0, plain decoding's)."""
    if params.greedy:
        return int(probs.argmax())
    key = torch.tensor([seed_key(seed)], device=probs.device)
    return int(sample_rows(probs[None], keyed_uniform(key, position, 0))[0])
