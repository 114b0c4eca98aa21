"""Compile the log-prob kernels for real GPUs (sm_80, sm_90) without one: no register spills,
16-byte global loads on the hot path, shared memory within the device limit.

Default run: each kernel's first autotune config for each dtype on both architectures.
``-m slow``: every other config. ``python -m tests.test_logprobs_compile`` prints registers per
kernel / dtype / arch / config as a markdown table.

On sm_80/sm_90 the ``tl.dot`` operand tiles are pipelined with ``cp.async`` (global -> shared),
so the hot path's 16-byte loads appear as ``cp.async.cg.shared.global [..], [..], 0x10`` rather
than ``ld.global.v4``; a scalar fallback would show ``0x4``/``0x2`` copies or ``ld.global.b16``.
"""

import re

import pytest
import triton.language as tl

from csrc_triton import logprobs as K
from tests.kernel_compile import compile_for_gpu

DTYPES = ("fp32", "bf16", "fp16")
# dynamic shared memory per block (bytes): A100 163 KiB, H100 227 KiB
SMEM_LIMIT = {80: 166912, 90: 232448}
INTS_DIVISIBLE = (
    "D",
    "V_PER_SPLIT",
    "stride_hn",
    "stride_wv",
    "stride_dzn",
    "NN",
    "stride_bk",
    "stride_am",
    "stride_ak",
    "stride_cm",
    "K",
    "M",
    "chunk",
    "v_start",
)
# (integers the host keeps multiples of 16 on the hot path: D and V of real heads, the backward's
# chunk width and start; Triton specialises such values to divisibility 16 at run time)


def _precision(dt):
    return "tf32x3" if dt == "fp32" else "tf32"


def _spec(kernel_name, dt, cfg, softcap=False):
    """(kernel, signature, constexprs) for one kernel / dtype / autotune config (``softcap``:
    the logits kernels' soft-capped variant)."""
    common = {"UPCAST": False, "PRECISION": _precision(dt), "ACC": tl.float32}
    if kernel_name in ("fwd", "dlogits"):
        common["SOFTCAP"] = softcap
    if kernel_name == "fwd":
        sig = {
            "h_ptr": f"*{dt}",
            "w_ptr": f"*{dt}",
            "y_ptr": "*i64",
            "m_ptr": "*fp32",
            "s_ptr": "*fp32",
            "t_ptr": "*fp32",
            "N": "i32",
            "V": "i32",
            "D": "i32",
            "V_PER_SPLIT": "i32",
            "stride_hn": "i32",
            "stride_wv": "i32",
            "ignore_index": "i32",
            "softcap": "fp32",
            "softcap_lo": "fp32",
        }
        return K._fwd_kernel, sig, {**cfg, **common}
    if kernel_name == "dlogits":
        sig = {
            "h_ptr": f"*{dt}",
            "w_ptr": f"*{dt}",
            "y_ptr": "*i64",
            "lse_ptr": "*fp32",
            "g_ptr": "*fp32",
            "dz_ptr": f"*{dt}",
            "N": "i32",
            "V": "i32",
            "D": "i32",
            "v_start": "i32",
            "chunk": "i32",
            "stride_hn": "i32",
            "stride_wv": "i32",
            "stride_dzn": "i32",
            "softcap": "fp32",
            "softcap_lo": "fp32",
        }
        return K._dlogits_kernel, sig, {**cfg, **common}
    # matmul: B row-major (stride_bn = 1, specialised by Triton at run time like any 1)
    sig = {
        "a_ptr": f"*{dt}",
        "b_ptr": f"*{dt}",
        "c_ptr": "*fp32",
        "M": "i32",
        "NN": "i32",
        "K": "i32",
        "stride_bk": "i32",
        "stride_cm": "i32",
    }
    if kernel_name == "matmul":  # dh += dz @ W_chunk: A row-major
        sig["stride_am"] = "i32"
        return (
            K._matmul_kernel,
            sig,
            {**cfg, **common, "ACCUMULATE": True, "stride_ak": 1, "stride_bn": 1},
        )
    # matmul_t: dW_chunk = dz^T @ h: A is the transposed view of dz (stride_am = 1)
    sig["stride_ak"] = "i32"
    return (
        K._matmul_kernel,
        sig,
        {**cfg, **common, "ACCUMULATE": False, "stride_am": 1, "stride_bn": 1},
    )


def _configs(kernel_name, dt):
    """The autotune configs the kernel keeps for operands of dtype ``dt``."""
    table, names = (
        (K.MATMUL_CONFIGS, K.MATMUL_TILE_NAMES)
        if kernel_name.startswith("matmul")
        else (K.LOGITS_TILE_CONFIGS, K.LOGITS_TILE_NAMES)
    )
    return [(dict(zip(names, t)), w, s) for t, w, s in table[K.dtype_family(dt)]]


def _operand_smem(kernel_name, cfg, stages, dt):
    """Bytes of the pipelined dot-operand buffers: stages * (A tile + B tile)."""
    size = 4 if dt == "fp32" else 2
    if kernel_name.startswith("matmul"):
        m, n, k = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    else:
        m, n, k = cfg["BLOCK_N"], cfg["BLOCK_V"], cfg["BLOCK_D"]
    return stages * (m * k + k * n) * size


def compile_one(kernel_name, dt, arch, index, softcap=False):
    cfg, warps, stages = _configs(kernel_name, dt)[index]
    kernel, sig, constexprs = _spec(kernel_name, dt, cfg, softcap)
    divisible = tuple(n for n, t in sig.items() if t.startswith("*") or n in INTS_DIVISIBLE)
    k = compile_for_gpu(
        kernel, sig, constexprs, arch=arch, num_warps=warps, num_stages=stages, divisible=divisible
    )
    return k, cfg, warps, stages


def _check(kernel_name, dt, arch, index, softcap=False):
    k, cfg, warps, stages = compile_one(kernel_name, dt, arch, index, softcap)
    where = (f"{kernel_name} {dt} sm_{arch} config {index} {cfg} warps={warps} stages={stages}"
             f"{' soft-capped' if softcap else ''}")
    assert k.local_bytes == 0 and k.stack_bytes == 0, (
        f"register spills in {where}:\n{k.resource_usage}"
    )
    copies = re.findall(r"cp\.async\.cg\.shared\.global \[[^]]*\], \[[^]]*\], (0x[0-9a-f]+)", k.ptx)
    vector_loads = [line for line in k.global_loads() if "ld.global.v4" in line]
    assert copies or vector_loads, f"no global operand loads found in {where}"
    assert all(c == "0x10" for c in copies), f"non-16-byte async copies in {where}: {set(copies)}"
    assert not any(re.search(r"ld\.global(\.\w+)*\.b16", line) for line in k.global_loads()), (
        f"scalar 16-bit global loads in {where}"
    )
    assert _operand_smem(kernel_name, cfg, stages, dt) <= SMEM_LIMIT[arch], (
        f"shared memory over the limit in {where}"
    )


KERNELS = ["fwd", "dlogits", "matmul", "matmul_t"]
# the default run compiles each config family once (about 4 s per compilation here)
FAST = [("bf16", 80), ("fp32", 90)]


@pytest.mark.parametrize(("dt", "arch"), FAST)
@pytest.mark.parametrize("kernel_name", KERNELS)
def test_first_config_compiles_without_spills(kernel_name, dt, arch):
    _check(kernel_name, dt, arch, 0)


@pytest.mark.parametrize(("dt", "arch"), FAST)
@pytest.mark.parametrize("kernel_name", ["fwd", "dlogits"])
def test_softcapped_first_config_compiles_without_spills(kernel_name, dt, arch):
    _check(kernel_name, dt, arch, 0, softcap=True)


@pytest.mark.slow
@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("dt", list(DTYPES))
@pytest.mark.parametrize("kernel_name", KERNELS)
def test_every_config_compiles_without_spills(kernel_name, dt, arch):
    for index in range(len(_configs(kernel_name, dt))):
        if (dt, arch) in FAST and index == 0:
            continue  # the default run covers it
        _check(kernel_name, dt, arch, index)
        if kernel_name in ("fwd", "dlogits"):
            _check(kernel_name, dt, arch, index, softcap=True)


def register_table():
    """Rows (kernel, dtype, arch, config, warps, stages, registers, spill bytes) for every
    config; ``python -m tests.test_logprobs_compile`` prints them as a markdown table."""
    rows = []
    for kernel_name in KERNELS:
        for dt in DTYPES:
            for arch in (80, 90):
                for index in range(len(_configs(kernel_name, dt))):
                    k, cfg, warps, stages = compile_one(kernel_name, dt, arch, index)
                    rows.append(
                        (
                            kernel_name,
                            dt,
                            arch,
                            tuple(cfg.values()),
                            warps,
                            stages,
                            k.registers,
                            k.local_bytes + k.stack_bytes,
                        )
                    )
    return rows


if __name__ == "__main__":
    print("| kernel | dtype | arch | tile | warps | stages | registers | spill bytes |")
    print("|---|---|---|---|---|---|---|---|")
    for row in register_table():
        print("| " + " | ".join(str(x) for x in row) + " |")
