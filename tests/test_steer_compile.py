"""Compile the steering kernel for real GPUs (sm_80, sm_90) without one.

For every autotune config, dtype and arch: the compiler accepts the kernel, nothing spills
(``LOCAL:0 STACK:0``), and, for aligned inputs (16-byte aligned pointers, D and strides
multiples of 16, R a power of two), the hidden-state rows move through 16-byte vector
accesses (``ld.global.v4`` / ``st.global.v4``, no scalar 16-bit accesses).

The default run compiles a representative subset (23 kernels); ``-m "slow or not slow"``
compiles all 120 configs the autotuner can pick. ``python -m tests.test_steer_compile`` prints
the register table.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from csrc_triton import steer
from tests.kernel_compile import compile_for_gpu

TORCH_DTYPE = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
INT_ARGS = ["N", "D", "D_src", "R", "K", "s_out", "s_src", "s_slot", "s_coeff",
            "s_bias_k", "s_a_k", "s_a_d", "s_b_k", "s_b_d"]
# what Triton specialises as multiples of 16 at run time for aligned inputs
DIVISIBLE = ("out_ptr", "src_ptr", "slot_ptr", "coeff_ptr", "bias_ptr", "a_ptr", "b_ptr",
             "D", "D_src", "R", "s_out", "s_src", "s_bias_k", "s_a_k", "s_a_d", "s_b_k", "s_b_d")


def signature(dt: str) -> dict[str, str]:
    sig = {"out_ptr": f"*{dt}", "src_ptr": f"*{dt}", "slot_ptr": "*i64", "coeff_ptr": "*fp32",
           "bias_ptr": f"*{dt}", "a_ptr": f"*{dt}", "b_ptr": f"*{dt}"}
    sig.update({name: "i32" for name in INT_ARGS})
    return sig


def all_cases():
    """(arch, dtype, path, preserve_norm, (BLOCK_N, BLOCK_D, warps), R_PAD) for every config
    the autotuner can pick."""
    for arch, dt, pn in itertools.product((80, 90), ("bf16", "fp16", "fp32"), (False, True)):
        for cfg in steer.ADDITIVE_CONFIGS:
            yield arch, dt, "additive", pn, cfg, 16
        for r_pad in (16, 32, 64):
            budget = steer.lowrank_tile_budget(TORCH_DTYPE[dt])
            for cfg in steer.lowrank_candidates(r_pad, budget):
                yield arch, dt, "lowrank", pn, cfg, r_pad


def is_default(case) -> bool:
    """The subset compiled by the default (fast) run."""
    arch, dt, path, pn, cfg, r_pad = case
    if path == "additive":
        return not pn and (dt == "bf16" or cfg == steer.ADDITIVE_CONFIGS[0]) or (
            pn and dt == "bf16" and cfg == steer.ADDITIVE_CONFIGS[0])
    first_fit = steer.lowrank_candidates(r_pad, steer.lowrank_tile_budget(TORCH_DTYPE[dt]))[0]
    return cfg == first_fit and not pn and (r_pad == 16 or (r_pad == 64 and arch == 90))


def case_id(case):
    arch, dt, path, pn, (bn, bd, w), r_pad = case
    return f"sm{arch}-{dt}-{path}{'-pn' if pn else ''}-n{bn}-d{bd}-w{w}" + (f"-r{r_pad}" if path == "lowrank" else "")


CASES = [pytest.param(c, id=case_id(c), marks=() if is_default(c) else pytest.mark.slow) for c in all_cases()]


def compile_case(case):
    arch, dt, path, pn, (bn, bd, warps), r_pad = case
    lowrank = path == "lowrank"
    constexprs = dict(
        HAS_BIAS=True, HAS_LOWRANK=lowrank, PRESERVE_NORM=pn, R_PAD=r_pad, EVEN_R=True,
        DOT_NATIVE=lowrank and dt != "fp32", DOT_UPCAST=False,
        Z_PRECISION=steer.z_precision(TORCH_DTYPE[dt]), BLOCK_N=bn, BLOCK_D=bd,
    )
    return compile_for_gpu(steer._steer_kernel, signature(dt), constexprs, arch=arch,
                           num_warps=warps, divisible=DIVISIBLE)


@pytest.mark.parametrize("case", CASES)
def test_compiles_without_spills_and_with_vector_accesses(case):
    k = compile_case(case)
    assert k.local_bytes == 0 and k.stack_bytes == 0, k.resource_usage
    loads, stores = k.global_loads(), k.global_stores()
    arch, dt, path, pn, (bn, bd, warps), r_pad = case
    row_tile_bytes_per_thread = bn * bd * TORCH_DTYPE[dt].itemsize // (32 * warps)
    if row_tile_bytes_per_thread >= 16:  # the tile gives each thread 16 bytes: use them at once
        assert any("ld.global.v4" in line for line in loads), loads
        assert any("st.global.v4" in line for line in stores), stores
    if dt != "fp32":  # no scalar 16-bit accesses, whatever the tile width
        assert not any(".b16" in line for line in loads + stores), "scalar 16-bit accesses"


def register_table(cases=None) -> list[str]:
    """Markdown rows: arch, dtype, path, preserve_norm, config, R_PAD, REG, STACK, LOCAL."""
    rows = ["| arch | dtype | path | preserve_norm | BLOCK_N x BLOCK_D, warps | R_PAD | REG | STACK | LOCAL |",
            "|---|---|---|---|---|---|---|---|---|"]
    for case in cases or list(all_cases()):
        arch, dt, path, pn, (bn, bd, w), r_pad = case
        k = compile_case(case)
        rows.append(f"| sm_{arch} | {dt} | {path} | {pn} | {bn} x {bd}, {w} | "
                    f"{r_pad if path == 'lowrank' else '-'} | {k.registers} | {k.stack_bytes} | {k.local_bytes} |")
    return rows


if __name__ == "__main__":
    print("\n".join(register_table()))


@pytest.mark.parametrize("dtype", list(TORCH_DTYPE.values()), ids=list(TORCH_DTYPE))
@pytest.mark.parametrize("r_pad", [16, 32, 64])
def test_autotune_prune_keeps_exactly_the_compiled_candidates(dtype, r_pad):
    """The configs the autotuner may time at run time are the ones compiled above."""
    import triton

    configs = [triton.Config({"BLOCK_N": n, "BLOCK_D": d}, num_warps=w) for n, d, w in steer.LOWRANK_CONFIGS]
    t = torch.empty(0, dtype=dtype)
    named = {"out_ptr": t, "src_ptr": t, "a_ptr": t, "b_ptr": t}
    kept = steer._prune_lowrank(configs, named, R_PAD=r_pad)
    got = [(c.kwargs["BLOCK_N"], c.kwargs["BLOCK_D"], c.num_warps) for c in kept]
    assert got == steer.lowrank_candidates(r_pad, steer.lowrank_tile_budget(dtype))
    assert all(d * r_pad <= steer.lowrank_tile_budget(dtype) for _, d, _ in got) or got == [steer.NARROW_LOWRANK_CONFIG]
