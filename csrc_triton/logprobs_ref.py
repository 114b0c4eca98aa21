"""Plain-torch references for the fused per-token log-probs (SPEC section 2).

Maths, for hidden states ``h [N, D]``, an output head ``W [V, D]``, labels ``y [N]`` and an
optional logit soft-cap ``c > 0`` (Gemma 2's ``final_logit_softcapping``)::

    u[n]     = W h[n]                                   the head's output, [V]  (never all of [N, V])
    z[n]     = u[n]                  without a cap      logits
             = c tanh(u[n] / c)      with cap c
    lse[n]   = logsumexp_v z[n, v]
    logp[n]  = z[n, y[n]] - lse[n]                      0 where y[n] == ignore_index

Backward, for an upstream gradient ``g [N]`` (``g = 0`` on ignored rows)::

    dz[n, v] = g[n] * (onehot(y[n])[v] - softmax(z[n])[v]),   softmax(z[n])[v] = exp(z[n, v] - lse[n])
    du[n, v] = dz[n, v]                  without a cap
             = dz[n, v] (1 - tanh(u[n, v] / c)^2)   with cap c
    dh       = du @ W                                   [N, D]
    dW       = du^T @ h                                 [V, D]

Two implementations:

- ``token_logprobs_naive``: the obvious unchunked formula (``log_softmax`` + ``gather`` over the
  full ``[N, V]`` logits). For tests only.
- ``token_logprobs_fwd`` / ``token_logprobs_bwd``: the chunked reference that is also the CPU
  path of ``steerkern.ops.token_logprobs``. The vocabulary is walked in chunks with an online
  logsumexp; the backward recomputes each chunk's logits from ``h``, ``W`` and the saved ``lse``
  and works only on the rows whose upstream gradient is non-zero (an inactive margin-loss token
  or an ignored row costs nothing). Scratch memory is one ``[rows, chunk]`` block (two in the
  backward with a soft-cap), independent of ``V``, and one ``[chunk, D]`` copy of the head's chunk in the accumulation dtype (for 16-bit
  heads), with ``chunk * max(rows, D) <= CHUNK_ELEMENTS``. Accumulation is in fp32 (float64 for
  float64 inputs).
"""

from __future__ import annotations

import torch

# Elements of one [rows, chunk] logits block, and of one [chunk, D] fp32 copy of a bf16/fp16
# head's chunk, of the chunked reference (8 Mi elements = 32 MiB in fp32): big enough for
# efficient CPU matmuls, small next to the [N, V] logits (or the fp32 [V, D] head) it replaces.
CHUNK_ELEMENTS = 1 << 23
MIN_CHUNK = 256


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other float dtype accumulates in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def vocab_chunk(rows: int, V: int, chunk: int | None = None, D: int = 1) -> int:
    """Columns per vocabulary chunk: ``chunk`` if given, else ``CHUNK_ELEMENTS // max(rows, D)``
    clamped to ``[MIN_CHUNK, V]``, so that neither the ``[rows, chunk]`` logits block nor the
    ``[chunk, D]`` accumulation-dtype copy of the head's chunk grows with ``V`` (with few rows,
    a bound on ``rows * chunk`` alone would copy all of a 16-bit head to fp32)."""
    if chunk is not None:
        if chunk < 1:
            raise ValueError(f"chunk must be a positive number of vocabulary columns, got {chunk}")
        return min(chunk, max(V, 1))
    return max(1, min(V, max(MIN_CHUNK, CHUNK_ELEMENTS // max(rows, D, 1))))


def token_logprobs_naive(
    h: torch.Tensor, W: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100,
    softcap: float | None = None,
) -> torch.Tensor:
    """Unchunked reference (tests only): ``log_softmax(h @ W^T)`` gathered at ``labels``, the
    logits soft-capped (``softcap * tanh(logits / softcap)``) when ``softcap`` is given.

    h [N, D], W [V, D], labels [N] -> [N] in the accumulation dtype; 0 on ignored rows.
    Differentiable by plain autograd.
    """
    acc = accumulation_dtype(h.dtype)
    logits = h.to(acc) @ W.to(acc).T
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    logp = torch.log_softmax(logits, dim=-1).gather(1, safe[:, None].long())[:, 0]
    return torch.where(valid, logp, torch.zeros_like(logp))


@torch.no_grad()
def token_logprobs_fwd(
    h: torch.Tensor,
    W: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    chunk: int | None = None,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked forward. h [N, D], W [V, D], labels [N] -> (logp [N], lse [N]) in the accumulation
    dtype (fp32, or float64 for float64 inputs); logits soft-capped by ``softcap`` when given.
    Scratch: one [N, chunk] logits block."""
    N, V = h.shape[0], W.shape[0]
    acc = accumulation_dtype(h.dtype)
    hx = h.to(acc)
    valid = labels != ignore_index
    m = torch.full((N,), float("-inf"), dtype=acc, device=h.device)
    s = torch.zeros(N, dtype=acc, device=h.device)
    target = torch.zeros(N, dtype=acc, device=h.device)
    step = vocab_chunk(N, V, chunk, h.shape[1])
    buf = torch.empty(N * step, dtype=acc, device=h.device)
    for v0 in range(0, V, step):
        v1 = min(v0 + step, V)
        zc = torch.mm(hx, W[v0:v1].to(acc).T, out=buf[: N * (v1 - v0)].view(N, v1 - v0))
        if softcap is not None:
            zc.div_(softcap).tanh_().mul_(softcap)
        # target logit: rows whose label falls in this chunk
        here = valid & (labels >= v0) & (labels < v1)
        idx = here.nonzero()[:, 0]
        if idx.numel():
            target[idx] = zc[idx, labels[idx].long() - v0]
        # online logsumexp: s <- s * exp(m - m_new) + sum exp(z - m_new)
        m_new = torch.maximum(m, zc.amax(dim=1))
        s.mul_(torch.exp(m - m_new)).add_(zc.sub_(m_new[:, None]).exp_().sum(dim=1))
        m = m_new
    lse = m + torch.log(s)
    logp = torch.where(valid, target - lse, torch.zeros_like(lse))
    return logp, lse


@torch.no_grad()
def token_logprobs_bwd(
    h: torch.Tensor,
    W: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    grad: torch.Tensor,
    ignore_index: int = -100,
    *,
    need_h: bool = True,
    need_W: bool = False,
    chunk: int | None = None,
    softcap: float | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Chunked backward: (dh [N, D] in h.dtype or None, dW [V, D] in W.dtype or None).

    Only rows with ``grad != 0`` and a label other than ``ignore_index`` do any work; their
    logits are recomputed chunk by chunk: ``du = g (onehot - exp(z - lse))`` (times
    ``1 - tanh(u / softcap)^2`` with a cap), ``dh += du @ W_chunk``, ``dW_chunk = du^T @ h``.
    """
    N, D = h.shape
    V = W.shape[0]
    acc = accumulation_dtype(h.dtype)
    active = ((grad != 0) & (labels != ignore_index)).nonzero()[:, 0]
    Na = active.numel()
    dh = torch.zeros(N, D, dtype=h.dtype, device=h.device) if need_h and Na < N else None
    dW = torch.zeros(V, D, dtype=W.dtype, device=W.device) if need_W else None
    if Na == 0 or not (need_h or need_W):
        return dh, dW
    rows = (
        (lambda t: t) if Na == N else (lambda t: t.index_select(0, active))
    )  # all active: no copy
    ha = rows(h).to(acc)
    ya = rows(labels).long()
    ga = rows(grad).to(acc)
    lse_a = rows(lse).to(acc)
    # Work with q = |g| (softmax - onehot) = -sign(g) dz, so that one addmm + exp_ makes
    # |g| softmax = exp(z - lse + log|g|); the sign goes onto the [Na, D] results instead.
    abs_g = ga.abs()
    neg_sign = -torch.sign(ga)[:, None]
    shift = (abs_g.log() - lse_a)[:, None]
    dha = torch.zeros(Na, D, dtype=acc, device=h.device) if need_h else None
    ha_signed = ha * neg_sign if need_W else None
    step = vocab_chunk(Na, V, chunk, D)
    buf = torch.empty(Na * step, dtype=acc, device=h.device)
    slope = torch.empty(Na * step, dtype=acc, device=h.device) if softcap is not None else None
    for v0 in range(0, V, step):
        v1 = min(v0 + step, V)
        Wc = W[v0:v1].to(acc)
        q = buf[: Na * (v1 - v0)].view(Na, v1 - v0)
        if softcap is None:
            torch.addmm(shift.expand(Na, v1 - v0), ha, Wc.T, out=q).exp_()  # |g| softmax
        else:
            t = torch.mm(ha, Wc.T, out=q).div_(softcap).tanh_()  # tanh(u / c), in q
            dzdu = torch.mul(t, t, out=slope[: Na * (v1 - v0)].view(Na, v1 - v0)).neg_().add_(1)
            q.mul_(softcap).add_(shift).exp_()  # |g| softmax(z), z = c tanh(u / c)
        here = ((ya >= v0) & (ya < v1)).nonzero()[:, 0]
        if here.numel():
            q[here, ya[here] - v0] -= abs_g[here]  # - |g| onehot
        if softcap is not None:
            q.mul_(dzdu)  # chain rule through the cap: du = dz (1 - tanh(u / c)^2)
        if need_h:
            dha.addmm_(q, Wc)
        if need_W:
            dW[v0:v1] = (q.T @ ha_signed).to(W.dtype)  # dz^T h = q^T (-sign(g) h)
    if need_h:
        dha.mul_(neg_sign)
        if Na == N:
            return dha.to(h.dtype), dW
        dh.index_copy_(0, active, dha.to(h.dtype))
    return dh, dW
