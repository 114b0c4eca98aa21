"""Fused in-place steering kernel (SPEC section 1). Reference: ``csrc_triton/steer_ref.py``.

For every row ``n`` of ``out[N, D]`` with slot ``k = slot[n] >= 0`` and ``c = coeff[n]``:

    z      = A[k]^T @ src[n]                      [R]      (src defaults to out, read first)
    y      = out[n] + c * (bias[k] + B[k] @ z)    [D]
    out[n] = y * ||out[n]|| / ||y||                        (preserve_norm; else out[n] = y)

One launch. Each program owns ``BLOCK_N`` consecutive rows and walks D in ``BLOCK_D`` chunks:

    pass 1 (low rank only): z[BLOCK_N, R_PAD] = sum over D_src chunks of src_tile @ A_tile
    pass 2: y_tile = x_tile + c * (bias_tile + z @ B_tile^T); stored directly, or, with
            preserve_norm, only reduced into ||x||^2 and ||y||^2
    pass 3 (preserve_norm only): recompute y_tile, scale by ||x|| / ||y||, store.

Rows with ``slot < 0`` are never loaded nor stored. A program's rows can select different bank
entries (per-request steering); the low-rank path loops over the distinct slots present in the
block, each iteration handling the rows of one entry with tensor-core dots (``tl.dot``), so the
A/B tiles are reused across ``BLOCK_N`` rows. Re-reads in passes 2/3 hit L2: DRAM traffic stays
one read and one write of each steered row (plus the small bank).

Accumulation is fp32. In the first dot, 16-bit src and A of one dtype feed ``tl.dot`` natively
(products of fp16/bf16 are exact in fp32); other inputs are upcast and use ``tf32x3`` (about
fp32 accuracy). The second dot (fp32 z times B) uses one tf32 pass for bf16 outputs (error far
below a bf16 ulp) and tf32x3 otherwise. Under the interpreter every dot operand is upcast to
fp32 (its bf16 dot is broken) and computed in plain fp32. Row offsets are 64-bit, so ``N * D``
may pass 2**31. Rows with ``slot >= K`` (only possible when validation is skipped) are treated
like ``slot < 0``: never read out of bounds.

Autotuning keys on (D, D_src, R, flags, dtypes), never on N; the first call per key times the
configs (restoring ``out`` after each), so warm up before capturing a CUDA graph.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

_INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"

# Elementwise (bias-only) path: (BLOCK_N, BLOCK_D, num_warps). The first is the only one used
# under the interpreter and must be valid everywhere.
ADDITIVE_CONFIGS = [(1, 1024, 4), (2, 2048, 8), (4, 1024, 4), (8, 512, 4)]
# Low-rank path: BLOCK_N >= 16 and R_PAD >= 16 for tl.dot. Pruned per call so that the A/B
# tiles (BLOCK_D x R_PAD) fit registers without spills (checked by tests/test_steer_compile.py):
# BLOCK_D * R_PAD <= 4096 for bf16, 2048 for fp16 (tf32x3 second dot), 1024 when any input is
# fp32 (tf32x3 on both dots); 8 warps on a 16 x 32 tile when nothing wider fits.
LOWRANK_CONFIGS = [(16, 64, 4), (16, 128, 4), (32, 64, 4), (16, 32, 8)]
# spill-free for every dtype and R_PAD <= 64 (measured): the fallback when no other config fits
NARROW_LOWRANK_CONFIG = (16, 32, 8)


def _triton_configs(table):
    if _INTERPRETING:
        table = table[:1]
    return [triton.Config({"BLOCK_N": bn, "BLOCK_D": bd}, num_warps=w) for bn, bd, w in table]


def lowrank_tile_budget(out_dtype, src_dtype=None, a_dtype=None, b_dtype=None) -> int:
    """Largest BLOCK_D * R_PAD of the low-rank tiles without register spills (dtypes default
    to ``out_dtype``): 1024 when a dot runs tf32x3 on fp32 operands (any fp32 input, or src and
    A of different dtypes), else 4096 for bf16 and 2048 for fp16 outputs."""
    src_dtype, a_dtype, b_dtype = (d or out_dtype for d in (src_dtype, a_dtype, b_dtype))
    if torch.float32 in (out_dtype, src_dtype, a_dtype, b_dtype) or src_dtype != a_dtype:
        return 1024
    return 4096 if out_dtype == torch.bfloat16 else 2048


def lowrank_candidates(r_pad: int, budget: int) -> list[tuple[int, int, int]]:
    """The LOWRANK_CONFIGS the autotuner tries for this rank and budget: the wide ones whose
    tiles fit, else the narrow fallback."""
    fits = [c for c in LOWRANK_CONFIGS if c != NARROW_LOWRANK_CONFIG and c[1] * r_pad <= budget]
    return fits or [NARROW_LOWRANK_CONFIG]


def _prune_lowrank(configs, named_args, **kwargs):
    budget = lowrank_tile_budget(*(named_args[n].dtype for n in ("out_ptr", "src_ptr", "a_ptr", "b_ptr")))
    keep = lowrank_candidates(kwargs["R_PAD"], budget)
    kept = [c for c in configs if (c.kwargs["BLOCK_N"], c.kwargs["BLOCK_D"], c.num_warps) in keep]
    return kept or configs[:1]


@triton.jit
def _steered_tile(
    out_rows, bias_rows, b_ptr, k, s_b_k, s_b_d, z, c, cols, sel, r_idx, R, D,
    HAS_BIAS: tl.constexpr, HAS_LOWRANK: tl.constexpr, EVEN_R: tl.constexpr,
    DOT_UPCAST: tl.constexpr, Z_PRECISION: tl.constexpr,
):
    """x (fp32 [BLOCK_N, BLOCK_D]) and y = x + c * (bias[k] + z @ B[k]^T) for one D chunk."""
    cmask = cols < D
    tile_mask = sel[:, None] & cmask[None, :]
    x = tl.load(out_rows + cols[None, :], mask=tile_mask, other=0.0).to(tl.float32)
    v = tl.zeros(x.shape, dtype=tl.float32)
    if HAS_BIAS:
        # torch: bias[slot[n], cols]
        v += tl.load(bias_rows + cols[None, :], mask=tile_mask, other=0.0).to(tl.float32)
    if HAS_LOWRANK:
        # torch: z @ B[k][cols].T, the tile read as B^T [R_PAD, BLOCK_D]
        bt = tl.load(
            b_ptr + tl.cast(k, tl.int64) * s_b_k + cols[None, :].to(tl.int64) * s_b_d + r_idx[:, None],
            mask=((r_idx[:, None] < R) | EVEN_R) & cmask[None, :],
            other=0.0,
        ).to(tl.float32)
        if DOT_UPCAST:
            v += tl.dot(z, bt)
        else:
            v += tl.dot(z, bt, input_precision=Z_PRECISION)
    y = x + c[:, None] * v
    return x, y, tile_mask


@triton.jit
def _steer_kernel(
    out_ptr, src_ptr, slot_ptr, coeff_ptr, bias_ptr, a_ptr, b_ptr,
    N, D, D_src, R, K,
    s_out, s_src, s_slot, s_coeff, s_bias_k, s_a_k, s_a_d, s_b_k, s_b_d,
    HAS_BIAS: tl.constexpr, HAS_LOWRANK: tl.constexpr, PRESERVE_NORM: tl.constexpr,
    R_PAD: tl.constexpr, EVEN_R: tl.constexpr, DOT_NATIVE: tl.constexpr,
    DOT_UPCAST: tl.constexpr, Z_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    # clamped to [-1, K] in the slot's own dtype first, so an int64 slot >= 2**31 cannot wrap
    # into the bank when narrowed to int32
    raw = tl.load(slot_ptr + rows * s_slot, mask=rmask, other=-1)
    slots = tl.minimum(tl.maximum(raw, -1), K).to(tl.int32)
    active = (slots >= 0) & (slots < K)  # slot >= K (unvalidated input) is left untouched
    if tl.max(active.to(tl.int32), axis=0) > 0:
        c = tl.load(coeff_ptr + rows * s_coeff, mask=active, other=0.0).to(tl.float32)
        out_rows = out_ptr + rows[:, None] * s_out
        src_rows = src_ptr + rows[:, None] * s_src
        bias_rows = bias_ptr + tl.where(active, slots, 0).to(tl.int64)[:, None] * s_bias_k
        r_idx = tl.arange(0, R_PAD)
        if HAS_LOWRANK:
            k_lo = tl.min(tl.where(active, slots, 2147483647), axis=0)
            k_hi = tl.max(tl.where(active, slots, -1), axis=0) + 1
        else:
            k_lo = 0
            k_hi = 1
        for k in range(k_lo, k_hi):
            if HAS_LOWRANK:
                sel = active & (slots == k)
            else:
                sel = active
            if tl.max(sel.to(tl.int32), axis=0) > 0:
                # pass 1 -- torch: z = src[rows] @ A[k]
                z = tl.zeros((BLOCK_N, R_PAD), dtype=tl.float32)
                if HAS_LOWRANK:
                    a_base = a_ptr + tl.cast(k, tl.int64) * s_a_k
                    for d0 in range(0, D_src, BLOCK_D):
                        cols = d0 + tl.arange(0, BLOCK_D)
                        cm = cols < D_src
                        s = tl.load(src_rows + cols[None, :], mask=sel[:, None] & cm[None, :], other=0.0)
                        a = tl.load(
                            a_base + cols[:, None].to(tl.int64) * s_a_d + r_idx[None, :],
                            mask=cm[:, None] & ((r_idx[None, :] < R) | EVEN_R),
                            other=0.0,
                        )
                        if DOT_NATIVE:
                            z = tl.dot(s, a, z)
                        elif DOT_UPCAST:
                            z = tl.dot(s.to(tl.float32), a.to(tl.float32), z)
                        else:
                            z = tl.dot(s.to(tl.float32), a.to(tl.float32), z, input_precision="tf32x3")
                # pass 2
                ss_x = tl.zeros((BLOCK_N,), dtype=tl.float32)
                ss_y = tl.zeros((BLOCK_N,), dtype=tl.float32)
                for d0 in range(0, D, BLOCK_D):
                    cols = d0 + tl.arange(0, BLOCK_D)
                    x, y, tile_mask = _steered_tile(
                        out_rows, bias_rows, b_ptr, k, s_b_k, s_b_d, z, c, cols, sel, r_idx, R, D,
                        HAS_BIAS, HAS_LOWRANK, EVEN_R, DOT_UPCAST, Z_PRECISION,
                    )
                    if PRESERVE_NORM:
                        ss_x += tl.sum(x * x, axis=1)
                        ss_y += tl.sum(y * y, axis=1)
                    else:
                        tl.store(out_rows + cols[None, :], y.to(out_ptr.dtype.element_ty), mask=tile_mask)
                # pass 3 -- torch: y * ||x|| / ||y||  (scale 1 where ||y|| == 0)
                if PRESERVE_NORM:
                    scale = tl.where(ss_y > 0, tl.sqrt(ss_x) / tl.sqrt(tl.where(ss_y > 0, ss_y, 1.0)), 1.0)
                    for d0 in range(0, D, BLOCK_D):
                        cols = d0 + tl.arange(0, BLOCK_D)
                        x, y, tile_mask = _steered_tile(
                            out_rows, bias_rows, b_ptr, k, s_b_k, s_b_d, z, c, cols, sel, r_idx, R, D,
                            HAS_BIAS, HAS_LOWRANK, EVEN_R, DOT_UPCAST, Z_PRECISION,
                        )
                        y = y * scale[:, None]
                        tl.store(out_rows + cols[None, :], y.to(out_ptr.dtype.element_ty), mask=tile_mask)


_KEY = ["D", "D_src", "R", "HAS_BIAS", "HAS_LOWRANK", "PRESERVE_NORM", "DOT_NATIVE"]

steer_additive_kernel = triton.autotune(
    configs=_triton_configs(ADDITIVE_CONFIGS), key=_KEY, restore_value=["out_ptr"]
)(_steer_kernel)
steer_lowrank_kernel = triton.autotune(
    configs=_triton_configs(LOWRANK_CONFIGS),
    key=_KEY,
    restore_value=["out_ptr"],
    prune_configs_by={"early_config_prune": _prune_lowrank},
)(_steer_kernel)


def rank_pad(rank: int) -> int:
    """The constexpr rank of the low-rank tiles: a power of two, at least 16 (tl.dot minimum)."""
    return max(16, triton.next_power_of_2(rank)) if rank > 0 else 16


def z_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` precision of the second product ``z @ B^T`` (fp32 z): one tf32 pass is far
    below a bf16 output's rounding; fp16/fp32 outputs need tf32x3 (about fp32 accuracy)."""
    return "tf32" if dtype == torch.bfloat16 else "tf32x3"


# autotuner key -> the config it chose, filled by the first launch of each key
_TUNED: dict[tuple, triton.Config] = {}


def steer_triton_(out, slot, coeff, bias=None, A=None, B=None, src=None, preserve_norm=False):
    """Launch the fused kernel on validated inputs (see ``steerkern.ops.steer_``): in place on
    ``out``, which must have unit stride along D; returns ``out``.

    Expects ``bias``, ``A``, ``B`` with unit stride in their last dim and ``src`` with unit
    stride along D_src (the caller makes them so); ``slot`` and ``coeff`` may be strided.
    """
    N, D = out.shape
    has_bias = bias is not None
    has_lowrank = A is not None
    if N == 0 or not (has_bias or has_lowrank):
        return out
    source = out if src is None else src
    num_entries = bias.shape[0] if has_bias else A.shape[0]
    rank = A.shape[-1] if has_lowrank else 0
    d_src = source.shape[1]
    dot_native = (
        has_lowrank
        and not _INTERPRETING
        and source.dtype == A.dtype
        and source.dtype in (torch.float16, torch.bfloat16)
    )
    # Absent tensors: pass ``out`` as a never-dereferenced placeholder pointer.
    bias_t = bias if has_bias else out
    a_t = A if has_lowrank else out
    b_t = B if has_lowrank else out
    kernel = steer_lowrank_kernel if has_lowrank else steer_additive_kernel
    args = (
        out, source, slot, coeff, bias_t, a_t, b_t,
        N, D, d_src, rank, num_entries,
        out.stride(0), source.stride(0), slot.stride(0), coeff.stride(0),
        bias.stride(0) if has_bias else 0,
        A.stride(0) if has_lowrank else 0, A.stride(1) if has_lowrank else 0,
        B.stride(0) if has_lowrank else 0, B.stride(1) if has_lowrank else 0,
    )
    constexprs = dict(
        HAS_BIAS=has_bias, HAS_LOWRANK=has_lowrank, PRESERVE_NORM=bool(preserve_norm),
        R_PAD=rank_pad(rank), EVEN_R=rank == rank_pad(rank), DOT_NATIVE=dot_native,
        DOT_UPCAST=_INTERPRETING, Z_PRECISION=z_precision(out.dtype),
    )
    # The autotuner's own key: _KEY's values and every tensor argument's dtype.
    key = (has_lowrank, D, d_src, rank, has_bias, bool(preserve_norm), dot_native,
           *(t.dtype for t in args[:7]))
    config = None if _INTERPRETING else _TUNED.get(key)
    if config is None:
        kernel[lambda meta: (triton.cdiv(N, meta["BLOCK_N"]),)](*args, **constexprs)
        if not _INTERPRETING and getattr(kernel, "best_config", None) is not None:
            _TUNED[key] = kernel.best_config
    else:
        # Decode steps launch this kernel once per steered layer: skipping the autotuner's
        # per-call bookkeeping roughly halves the host time of a launch (research_notes.md).
        kernel.fn.run(*args, grid=(triton.cdiv(N, config.kwargs["BLOCK_N"]),), warmup=False,
                      **constexprs, **config.all_kwargs())
    return out

