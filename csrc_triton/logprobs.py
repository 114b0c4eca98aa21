"""Fused per-token log-probs: Triton kernels (SPEC section 2). Reference: ``logprobs_ref.py``.

Maths (``h [N, D]``, ``W [V, D]``, labels ``y [N]``, upstream gradient ``g [N]``, optional
logit soft-cap ``c``)::

    u[n, v]  = h[n] . W[v]
    z[n, v]  = u[n, v], or c tanh(u[n, v] / c) with a cap
    lse[n]   = logsumexp_v z[n, v]        online over vocabulary tiles: m <- max(m, max z),
                                          s <- s * exp(m_old - m) + sum exp(z - m)
    logp[n]  = z[n, y[n]] - lse[n]        (0 where y[n] == ignore_index)
    du[n, v] = g[n] * (onehot(y[n])[v] - exp(z[n, v] - lse[n]))  (times 1 - tanh(u / c)^2 with a cap)
    dh       = sum over vocabulary chunks of du_chunk @ W_chunk
    dW_chunk = du_chunk^T @ h

Kernels:

- ``_fwd_kernel``: a program owns ``BLOCK_N`` rows and one slice of the vocabulary (the slices
  ``split`` the vocabulary so that small ``N`` still fills the GPU); it walks its slice in
  ``BLOCK_V`` tiles, each tile's logits made by a ``BLOCK_D`` loop of ``tl.dot``, keeping only a
  running max, sum of exponentials and target logit per row. Writes ``[splits, N]`` partials;
  ``token_logprobs_fwd`` merges them (O(splits * N)). Nothing of size ``[N, V]`` exists.
- ``_dlogits_kernel``: backward, one vocabulary chunk: recomputes the chunk's logits with the
  same ``tl.dot`` loop and writes ``q = sign(g) (onehot - p)`` (``dz = |g| q``) for the chunk
  into a ``[rows, chunk]`` scratch block (in the weights' dtype, so that the two products below
  run on tensor cores for bf16/fp16; ``q`` is in [-1, 1] whatever ``g``, so fp16 neither
  flushes small gradients to 0 nor overflows on large ones).
- ``_matmul_kernel``: ``C (+)= A @ B`` with fp32 accumulation into an fp32 ``C``, any strides
  (the transpose ``q^T`` is a strided view): ``dh += q @ W_chunk`` (rows scaled by ``|g|`` in
  fp32 at the end) and ``dW_chunk = g_max * q^T @ (h * |g| / g_max)``.

The backward works only on the rows whose upstream gradient is non-zero (compacted on the host:
a margin-loss token whose penalty is inactive, or an ignored row, costs nothing); scratch is one
``[rows, chunk]`` block with ``rows * chunk <= SCRATCH_ELEMENTS`` (128 MiB in bf16), an fp32
``[rows, D]`` accumulator for dh (and ``[chunk, D]`` for dW), gathered copies of the active
rows of h when not all rows are active, and (for dW, when the rows' ``|g|`` differ) one copy of
those rows scaled by ``|g| / g_max``. At N=32768, D=4096, all rows active: 128 + 512 MiB.

Precision: products accumulate in fp32. bf16/fp16 operands go to ``tl.dot`` as they are on a GPU
(tensor cores; each product of two bf16 values is exact in fp32). fp32 operands use
``input_precision="tf32x3"``: Triton's default for fp32 is one TF32 pass (10-bit mantissa), which
would put errors of ~1e-3 * |z| into logits that torch computes in full fp32 (``allow_tf32`` is
off by default for matmuls); "ieee" is exact but runs on the FMA units and spills registers at
these tiles (measured: sm_80 STACK 5880 bytes for 64x128x64); tf32x3 splits each operand into a
TF32 high and low part and keeps ~fp32 accuracy on tensor cores. float64 operands (gradcheck)
use "ieee" with float64 accumulators. Under the interpreter ``input_precision`` is ignored (it
computes in the operands' dtype) and bf16/fp16 operands are upcast to fp32 before ``tl.dot``,
whose bf16 path returns garbage there.

Offsets: row and column indices are widened to int64 before they multiply a stride, so that
``N * D``, ``V * D`` and the scratch sizes may pass 2**31 elements (64 x 8192 tokens at D = 4096
is exactly 2**31).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from steerkern.ops import interpreting

# Elements of the backward's [rows, chunk] dz scratch block (64 Mi elements = 128 MiB in bf16).
SCRATCH_ELEMENTS = 1 << 26
# Vocabulary columns of one forward split: a multiple of every BLOCK_V below.
SPLIT_ALIGN = 512


# (tile, num_warps, num_stages) per operand family. 16-bit operands and fp32 operands (three
# TF32 passes hold more registers) have separate lists, each free of register spills on sm_80
# and sm_90 (tests/test_logprobs_compile.py); the autotuner prunes to the list of h's dtype.
# The interpreter runs only the very first config (of the 16-bit list).
LOGITS_TILE_CONFIGS = {  # (BLOCK_N, BLOCK_V, BLOCK_D)
    "half": [
        ((64, 128, 64), 4, 3),
        ((128, 128, 32), 8, 3),
        ((64, 256, 32), 8, 3),
        ((128, 64, 32), 4, 4),
    ],
    "fp32": [
        ((64, 128, 32), 8, 3),
        ((64, 64, 32), 4, 3),
        ((128, 64, 32), 8, 3),
        ((32, 128, 32), 4, 3),
    ],
}
MATMUL_CONFIGS = {  # (BLOCK_M, BLOCK_N, BLOCK_K)
    "half": [
        ((64, 64, 64), 4, 3),
        ((128, 128, 32), 8, 3),
        ((128, 64, 32), 4, 4),
        ((64, 128, 32), 4, 4),
    ],
    "fp32": [
        ((64, 64, 32), 4, 3),
        ((128, 64, 32), 8, 3),
        ((64, 128, 32), 8, 3),
        ((64, 64, 64), 8, 3),
    ],
}
LOGITS_TILE_NAMES = ("BLOCK_N", "BLOCK_V", "BLOCK_D")
MATMUL_TILE_NAMES = ("BLOCK_M", "BLOCK_N", "BLOCK_K")


def dtype_family(dtype) -> str:
    """ "half" for bf16/fp16 operands, "fp32" otherwise (torch or triton dtype)."""
    return (
        "half" if str(dtype).split(".")[-1] in ("bfloat16", "float16", "bf16", "fp16") else "fp32"
    )


def _configs(table, names):
    configs = []
    for family in ("half", "fp32"):
        for tile, warps, stages in table[family]:
            config = triton.Config(dict(zip(names, tile)), num_warps=warps, num_stages=stages)
            config.family = family
            configs.append(config)
    # The interpreter cannot autotune over two or more configs: keep the first one.
    return configs[:1] if interpreting() else configs


def _prune_by_dtype(operand):
    """early_config_prune keeping the configs of the family of ``operand``'s dtype."""

    def prune(configs, named_args, **kwargs):
        if len(configs) == 1:
            return configs
        family = dtype_family(named_args[operand].dtype)
        return [c for c in configs if c.family == family]

    return {"early_config_prune": prune}


@triton.jit
def _logits_tile(
    h_ptr,
    w_ptr,
    rows,
    cols,
    row_ok,
    col_ok,
    D,
    stride_hn,
    stride_wv,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    ACC: tl.constexpr,
):
    """z[BLOCK_N, BLOCK_V] = h[rows] @ W[cols]^T in ACC (rows, cols: index vectors)."""
    z = tl.zeros((BLOCK_N, BLOCK_V), dtype=ACC)
    offs_d = tl.arange(0, BLOCK_D)
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + offs_d
        d_ok = ds < D
        a = tl.load(
            h_ptr + rows[:, None].to(tl.int64) * stride_hn + ds[None, :],
            mask=row_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        # W tile loaded transposed, [BLOCK_D, BLOCK_V]
        b = tl.load(
            w_ptr + cols[None, :].to(tl.int64) * stride_wv + ds[:, None],
            mask=col_ok[None, :] & d_ok[:, None],
            other=0.0,
        )
        if UPCAST:
            a = a.to(ACC)
            b = b.to(ACC)
        z = tl.dot(a, b, z, input_precision=PRECISION)
    return z


@triton.jit
def _tanh(x):
    """tanh from exp (``tl`` has none the interpreter runs): 1 - 2 / (exp(2x) + 1), exact at
    both saturations (exp overflowing to inf gives 1), absolute error ~1 ulp near 0."""
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def _cap(hi, lo, ACC: tl.constexpr):
    """The soft-cap in ACC from its two fp32 parts (:func:`_softcap_args`): ``hi`` in fp32,
    ``hi + lo`` to within 1e-15 in float64."""
    return tl.cast(hi, ACC) + tl.cast(lo, ACC)


def _softcap_args(softcap: float | None) -> tuple[float, float]:
    """``softcap`` as two fp32 numbers ``(hi, lo)``, ``hi`` the cap rounded to fp32 and ``lo``
    the rest: Triton passes a Python float to a compiled kernel as fp32, which would round the
    cap of the float64 kernels (2.3 -> 2.29999995, log-probs 1e-7 off); ``(0, 0)`` for None."""
    if softcap is None:
        return 0.0, 0.0
    hi = float(torch.tensor(softcap, dtype=torch.float32))
    return hi, float(torch.tensor(softcap - hi, dtype=torch.float32))


@triton.autotune(
    configs=_configs(LOGITS_TILE_CONFIGS, LOGITS_TILE_NAMES),
    key=["V", "D"],
    prune_configs_by=_prune_by_dtype("h_ptr"),
)
@triton.jit
def _fwd_kernel(
    h_ptr,
    w_ptr,
    y_ptr,
    m_ptr,
    s_ptr,
    t_ptr,
    N,
    V,
    D,
    V_PER_SPLIT,
    stride_hn,
    stride_wv,
    ignore_index,
    softcap,
    softcap_lo,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    ACC: tl.constexpr,
    SOFTCAP: tl.constexpr = False,
):
    """Partials of one (row block, vocabulary split): running max m, sum of exp(z - m) s and
    target logit t, each [splits, N] fp32 (t = 0 where the label is outside the split); with
    ``SOFTCAP`` the logits are ``softcap * tanh(u / softcap)``."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    y = tl.load(y_ptr + rows, mask=row_ok, other=ignore_index)
    v_lo = pid_s * V_PER_SPLIT
    v_hi = tl.minimum(v_lo + V_PER_SPLIT, V)
    m = tl.full((BLOCK_N,), float("-inf"), dtype=ACC)
    s = tl.zeros((BLOCK_N,), dtype=ACC)
    t = tl.zeros((BLOCK_N,), dtype=ACC)
    for v0 in range(v_lo, v_hi, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < v_hi
        z = _logits_tile(
            h_ptr,
            w_ptr,
            rows,
            cols,
            row_ok,
            col_ok,
            D,
            stride_hn,
            stride_wv,
            BLOCK_N,
            BLOCK_V,
            BLOCK_D,
            UPCAST,
            PRECISION,
            ACC,
        )
        if SOFTCAP:
            cap = _cap(softcap, softcap_lo, ACC)
            z = cap * _tanh(z / cap)
        z = tl.where(col_ok[None, :], z, float("-inf"))
        # t += z[n, y[n]] when y[n] is in this tile
        t += tl.sum(tl.where(cols[None, :] == y[:, None], z, 0.0), axis=1)
        m_new = tl.maximum(m, tl.max(z, axis=1))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new[:, None]), axis=1)
        m = m_new
    out = pid_s * N + rows
    tl.store(m_ptr + out, m, mask=row_ok)
    tl.store(s_ptr + out, s, mask=row_ok)
    tl.store(t_ptr + out, t, mask=row_ok)


@triton.autotune(
    configs=_configs(LOGITS_TILE_CONFIGS, LOGITS_TILE_NAMES),
    key=["V", "D"],
    prune_configs_by=_prune_by_dtype("h_ptr"),
)
@triton.jit
def _dlogits_kernel(
    h_ptr,
    w_ptr,
    y_ptr,
    lse_ptr,
    g_ptr,
    dz_ptr,
    N,
    V,
    D,
    v_start,
    chunk,
    stride_hn,
    stride_wv,
    stride_dzn,
    softcap,
    softcap_lo,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    ACC: tl.constexpr,
    SOFTCAP: tl.constexpr = False,
):
    """du[n, j] = g[n] * (onehot(y[n])[v] - exp(z[n, v] - lse[n])), v = v_start + j, for the
    chunk's columns j < chunk, times ``1 - tanh(u / softcap)^2`` with ``SOFTCAP`` (z = softcap
    tanh(u / softcap)); du [N, chunk] in dz_ptr's dtype. ``token_logprobs_bwd`` passes
    ``g = sign(upstream gradient)`` and applies ``|upstream gradient|`` in fp32 afterwards."""
    pid_n = tl.program_id(0)
    pid_v = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    local = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    col_ok = local < chunk
    cols = v_start + local
    z = _logits_tile(
        h_ptr,
        w_ptr,
        rows,
        cols,
        row_ok,
        col_ok,
        D,
        stride_hn,
        stride_wv,
        BLOCK_N,
        BLOCK_V,
        BLOCK_D,
        UPCAST,
        PRECISION,
        ACC,
    )
    y = tl.load(y_ptr + rows, mask=row_ok, other=-1)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    g = tl.load(g_ptr + rows, mask=row_ok, other=0.0)
    if SOFTCAP:
        cap = _cap(softcap, softcap_lo, ACC)
        t = _tanh(z / cap)
        z = cap * t
    p = tl.exp(z - lse[:, None])
    onehot = tl.where(cols[None, :] == y[:, None], 1.0, 0.0)
    dz = g[:, None] * (onehot - p)
    if SOFTCAP:
        dz = dz * (1.0 - t * t)
    tl.store(
        dz_ptr + rows[:, None].to(tl.int64) * stride_dzn + local[None, :],
        dz.to(dz_ptr.dtype.element_ty),
        mask=row_ok[:, None] & col_ok[None, :],
    )


@triton.autotune(
    configs=_configs(MATMUL_CONFIGS, MATMUL_TILE_NAMES),
    key=["NN"],
    restore_value=["c_ptr"],
    prune_configs_by=_prune_by_dtype("a_ptr"),
)
@triton.jit
def _matmul_kernel(
    a_ptr,
    b_ptr,
    c_ptr,
    M,
    NN,
    K,
    stride_am,
    stride_ak,
    stride_bk,
    stride_bn,
    stride_cm,
    ACCUMULATE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    ACC: tl.constexpr,
):
    """C[M, NN] (+)= A[M, K] @ B[K, NN]; C in ACC (fp32) with unit column stride."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < M
    n_ok = rn < NN
    offs_k = tl.arange(0, BLOCK_K)
    # int64 row / column offsets once; the K loop advances the pointers by BLOCK_K rows
    a_ptrs = a_ptr + rm[:, None].to(tl.int64) * stride_am + offs_k[None, :].to(tl.int64) * stride_ak
    b_ptrs = b_ptr + offs_k[:, None].to(tl.int64) * stride_bk + rn[None, :].to(tl.int64) * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for k0 in range(0, K, BLOCK_K):
        k_ok = k0 + offs_k < K
        a = tl.load(a_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if UPCAST:
            a = a.to(ACC)
            b = b.to(ACC)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    c_ptrs = c_ptr + rm[:, None].to(tl.int64) * stride_cm + rn[None, :]
    c_mask = m_ok[:, None] & n_ok[None, :]
    if ACCUMULATE:
        acc += tl.load(c_ptrs, mask=c_mask, other=0.0)
    tl.store(c_ptrs, acc, mask=c_mask)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 accumulation; float64 inputs (gradcheck) accumulate in float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _dot_flags(dtype: torch.dtype) -> dict:
    """UPCAST, PRECISION and ACC constexprs for operands of ``dtype`` (module docstring)."""
    half = dtype in (torch.float16, torch.bfloat16)
    return {
        "UPCAST": interpreting() and half,
        # fp32: three TF32 tensor-core passes (near-fp32 accuracy); ignored for 16-bit operands
        "PRECISION": "tf32" if half else ("tf32x3" if dtype == torch.float32 else "ieee"),
        "ACC": tl.float64 if dtype == torch.float64 else tl.float32,
    }


def _num_splits(N: int, V: int, device: torch.device) -> int:
    """Vocabulary splits of the forward: enough programs to fill the GPU (about 4 per SM)."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    row_blocks = triton.cdiv(N, 64)
    return max(1, min(4 * sms // row_blocks, triton.cdiv(V, 4 * SPLIT_ALIGN)))


def token_logprobs_fwd(
    h: torch.Tensor,
    W: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    splits: int | None = None,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """h [N, D] (unit column stride), W [V, D] (unit column stride, same dtype), labels [N]
    contiguous int -> (logp [N] fp32, lse [N] fp32). ``splits``: vocabulary slices run by
    separate programs (default: enough to fill the GPU; 1 under the interpreter). ``softcap``:
    the logits are ``softcap * tanh(u / softcap)``."""
    N, D = h.shape
    V = W.shape[0]
    if splits is None:
        splits = _num_splits(N, V, h.device)
    per_split = triton.cdiv(triton.cdiv(V, splits), SPLIT_ALIGN) * SPLIT_ALIGN
    splits = triton.cdiv(V, per_split)
    m = torch.empty(splits, N, dtype=_acc_dtype(h.dtype), device=h.device)
    s = torch.empty_like(m)
    t = torch.empty_like(m)
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), splits)
    _fwd_kernel[grid](
        h,
        W,
        labels,
        m,
        s,
        t,
        N,
        V,
        D,
        per_split,
        h.stride(0),
        W.stride(0),
        ignore_index,
        *_softcap_args(softcap),
        SOFTCAP=softcap is not None,
        **_dot_flags(h.dtype),
    )
    m_all = m.amax(dim=0)
    lse = m_all + torch.log((s * torch.exp(m - m_all)).sum(dim=0))
    logp = torch.where(labels != ignore_index, t.sum(dim=0) - lse, torch.zeros_like(lse))
    return logp, lse


def _matmul(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, accumulate: bool) -> None:
    """c (+)= a @ b: a [M, K], b [K, NN] any strides, same dtype; c [M, NN] fp32, unit column
    stride."""
    M, K = a.shape
    NN = b.shape[1]
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(NN, meta["BLOCK_N"]))
    _matmul_kernel[grid](
        a,
        b,
        c,
        M,
        NN,
        K,
        a.stride(0),
        a.stride(1),
        b.stride(0),
        b.stride(1),
        c.stride(0),
        ACCUMULATE=accumulate,
        **_dot_flags(a.dtype),
    )


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
    """Chunked backward on the rows with ``grad != 0`` (and a real label): (dh [N, D] in
    h.dtype or None, dW [V, D] in W.dtype or None). ``chunk``: vocabulary columns per chunk
    (default: ``SCRATCH_ELEMENTS // active rows``, at least 256). ``softcap``: as in the
    forward."""
    N, D = h.shape
    V = W.shape[0]
    active = ((grad != 0) & (labels != ignore_index)).nonzero()[:, 0]
    Na = active.numel()
    dh = torch.zeros(N, D, dtype=h.dtype, device=h.device) if need_h and Na < N else None
    dW = torch.zeros(V, D, dtype=W.dtype, device=W.device) if need_W else None
    if Na == 0 or not (need_h or need_W):
        return dh, dW
    acc = _acc_dtype(h.dtype)
    if Na == N:  # every row active: no gathered copies
        ha, ya, ga, lse_a = h, labels, grad.to(acc), lse.to(acc).contiguous()
    else:
        ha = h.index_select(0, active)
        ya = labels.index_select(0, active)
        ga = grad.index_select(0, active).to(acc)
        lse_a = lse.index_select(0, active).to(acc).contiguous()
    # The dz scratch holds sign(g) (onehot - p), in [-1, 1]; |g| is applied in fp32 outside it:
    # dh = |g| * (scratch @ W), dW = g_max * scratch^T (h * |g| / g_max). A plain g * (onehot - p)
    # in fp16 flushes to 0 below 6e-8 (g ~ 1e-4 from a mean over many tokens times p ~ 1e-4),
    # and overflows above 65504.
    abs_g = ga.abs()
    sign_g = torch.sign(ga).contiguous()
    g_max = abs_g.max()
    if need_W and not bool((abs_g == g_max).all()):
        hw = (ha.to(acc) * (abs_g / g_max)[:, None]).to(h.dtype)
    else:
        hw = ha
    if chunk is None:  # a multiple of 256 keeps chunk starts and widths 16-aligned
        chunk = max(256, SCRATCH_ELEMENTS // Na // 256 * 256)
    chunk = min(chunk, V)
    dz = torch.empty(Na, chunk, dtype=W.dtype, device=h.device)
    dh_acc = torch.zeros(Na, D, dtype=acc, device=h.device) if need_h else None
    dW_acc = torch.empty(chunk, D, dtype=acc, device=h.device) if need_W else None
    flags = _dot_flags(h.dtype)
    for v0 in range(0, V, chunk):
        width = min(chunk, V - v0)
        grid = lambda meta, width=width: (
            triton.cdiv(Na, meta["BLOCK_N"]),
            triton.cdiv(width, meta["BLOCK_V"]),
        )
        _dlogits_kernel[grid](
            ha,
            W,
            ya,
            lse_a,
            sign_g,
            dz,
            Na,
            V,
            D,
            v0,
            width,
            ha.stride(0),
            W.stride(0),
            dz.stride(0),
            *_softcap_args(softcap),
            SOFTCAP=softcap is not None,
            **flags,
        )
        dz_c = dz[:, :width]
        if need_h:
            _matmul(dz_c, W[v0 : v0 + width], dh_acc, accumulate=True)
        if need_W:
            _matmul(dz_c.T, hw, dW_acc[:width], accumulate=False)
            dW[v0 : v0 + width] = (dW_acc[:width] * g_max).to(W.dtype)
    if need_h:
        dh_acc.mul_(abs_g[:, None])
        if Na == N:
            dh = dh_acc.to(h.dtype)
        else:
            dh.index_copy_(0, active, dh_acc.to(h.dtype))
    return dh, dW
