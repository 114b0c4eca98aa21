"""Where the host time of a steered eager decode step goes, on CUDA (not a pytest file).

``python3 bench/profile_steered_decode.py`` prints, in microseconds of host time per call with
the GPU idle (decode-sized work: the launch cost is the whole cost):

- the building blocks: a plain ``out.add_(v)``, ``ops.steer_`` (validation off), the Triton
  launch through the autotuner, and the bare ``JITFunction.run`` with the chosen config;
- the marginal cost of one steered layer in a real decode step (0, 1, 10, 30 steered layers of
  the default model's shape);
- the top host-time entries of torch's profiler over steered decode steps;
- ``roofline``: the kernel's device time (``triton.testing.do_bench``, median, rotating over
  buffers larger than L2) against a device-to-device copy of the same bytes, at D=4096 bf16;
- ``logprobs``: forward + backward of the fused margin loss through the Triton kernels and
  through the chunked torch reference (cuBLAS per vocabulary chunk) against plain PyTorch.

Sections: ``python3 bench/profile_steered_decode.py [blocks] [layers] [hooks] [roofline]
[logprobs]``; ``hooks`` is a cProfile of the hook path in eager decode steps.
"""

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_cuda_decode import StaticDecoder, random_model  # noqa: E402
from csrc_triton.steer import steer_additive_kernel, steer_triton_  # noqa: E402
from steerkern import SteeringVector, ops  # noqa: E402
from steerkern.control import SteeringBank  # noqa: E402


def host_us(fn, calls=3000):
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - t
    torch.cuda.synchronize()
    return elapsed / calls * 1e6


def building_blocks():
    out = torch.randn(8, 576, device="cuda", dtype=torch.bfloat16)
    slot = torch.zeros(8, dtype=torch.int64, device="cuda")
    coeff = torch.full((8,), 1e-3, device="cuda")
    bias = torch.randn(1, 576, device="cuda", dtype=torch.bfloat16)
    steer_triton_(out, slot, coeff, bias)
    config = next(iter(steer_additive_kernel.cache.values()))
    N, D = out.shape

    def bare_run():
        steer_additive_kernel.fn.run(
            out, out, slot, coeff, bias, out, out, N, D, D, 0, 1,
            out.stride(0), out.stride(0), slot.stride(0), coeff.stride(0), bias.stride(0),
            0, 0, 0, 0, HAS_BIAS=True, HAS_LOWRANK=False, PRESERVE_NORM=False, R_PAD=16,
            EVEN_R=False, DOT_NATIVE=False, DOT_UPCAST=False, Z_PRECISION="tf32",
            grid=(triton.cdiv(N, config.kwargs["BLOCK_N"]), 1, 1), warmup=False,
            **config.all_kwargs())

    rows = {
        "out.add_(v)": host_us(lambda: out.add_(bias[0])),
        "out.add_(c[:, None] * v)": host_us(lambda: out.add_(coeff[:, None] * bias[0])),
        "ops.steer_(validate=False)": host_us(lambda: ops.steer_(out, slot, coeff, bias, validate=False)),
        "steer_triton_ (autotuner)": host_us(lambda: steer_triton_(out, slot, coeff, bias)),
        "JITFunction.run (config fixed)": host_us(bare_run),
    }
    for name, value in rows.items():
        print(f"BLOCK {name:34s} {value:8.1f} us")


def per_layer_cost():
    model = random_model({}, "smollm2-135m")
    width = model.config.hidden_size
    g = torch.Generator().manual_seed(0)
    results = {}
    for count in (0, 1, 10, 30):
        decoder = StaticDecoder(model, 8, 64)
        vector = (SteeringVector.from_directions({i: torch.randn(width, generator=g) * 1e-3 for i in range(count)})
                  if count else None)
        bank = SteeringBank(model, vector) if vector else None
        times = []
        for _ in range(7):
            decoder.rewind()
            torch.cuda.synchronize()
            if bank:
                bank.attach()
            t = time.perf_counter()
            with torch.no_grad():
                for _ in range(32):
                    decoder.step()
            torch.cuda.synchronize()
            times.append((time.perf_counter() - t) / 32 * 1e3)
            if bank:
                bank.detach()
        results[count] = statistics.median(times[1:])
        print(f"LAYERS steered={count:2d}: {results[count]:.3f} ms per decode step (batch 8)")
    for count in (1, 10, 30):
        print(f"LAYERS marginal cost per steered layer ({count}): "
              f"{(results[count] - results[0]) / count * 1e3:.1f} us")
    return model


def profile(model):
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    width = model.config.hidden_size
    vector = SteeringVector.from_directions({i: torch.ones(width) * 1e-3 for i in range(10, 20)})
    bank = SteeringBank(model, vector)
    decoder = StaticDecoder(model, 8, 64)
    with torch.no_grad(), bank.attached():
        for _ in range(3):
            decoder.step()
        decoder.rewind()
        with torch_profile(activities=[ProfilerActivity.CPU], with_stack=False) as prof:
            for _ in range(8):
                decoder.step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


def hooks_cprofile():
    """cProfile of 16 steered eager decode steps (10 layers): the Python functions of the hook
    path with their cumulative host time, against the same steps unsteered."""
    import cProfile
    import pstats

    model = random_model({}, "smollm2-135m")
    width = model.config.hidden_size
    vector = SteeringVector.from_directions({i: torch.ones(width) * 1e-3 for i in range(10, 20)})
    bank = SteeringBank(model, vector)
    for steered in (False, True):
        decoder = StaticDecoder(model, 8, 64)
        with torch.no_grad():
            if steered:
                bank.attach()
            for _ in range(4):
                decoder.step()
            decoder.rewind()
            torch.cuda.synchronize()
            profiler = cProfile.Profile()
            profiler.enable()
            for _ in range(16):
                decoder.step()
            torch.cuda.synchronize()
            profiler.disable()
            if steered:
                bank.detach()
        stats = pstats.Stats(profiler)
        print(f"HOOKS steered={steered}: total {stats.total_tt * 1e3 / 16:.2f} ms per step")
        stats.sort_stats("cumulative").print_stats("steerkern|csrc_triton|triton/runtime|module.py", 14)


def roofline():
    for N in (8192, 65536):
        for R in (0, 16):
            roofline_case(N, R)


def roofline_case(N, R, D=4096):
    from triton.testing import do_bench

    copies = 4 if N * D * 2 < 2**28 else 1  # rotate over buffers past the 50 MB L2
    outs = [torch.randn(N, D, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
    sources = [torch.empty_like(o) for o in outs]
    slot = torch.arange(N, device="cuda") * 4 // N
    coeff = torch.full((N,), 1e-3, device="cuda")
    bias = torch.randn(4, D, device="cuda", dtype=torch.bfloat16)
    A = B = None
    if R:
        A = torch.randn(4, D, R, device="cuda", dtype=torch.bfloat16) / D**0.5
        B = torch.randn(4, D, R, device="cuda", dtype=torch.bfloat16) / R**0.5
    state = {"i": 0}

    def steer_once():
        state["i"] = (state["i"] + 1) % copies
        ops.steer_(outs[state["i"]], slot, coeff, bias, A, B, validate=False)

    def copy_once():
        state["i"] = (state["i"] + 1) % copies
        outs[state["i"]].copy_(sources[state["i"]])

    steer_ms = do_bench(steer_once, warmup=50, rep=300, return_mode="median")
    copy_ms = do_bench(copy_once, warmup=50, rep=300, return_mode="median")
    floor = 2 * N * D * 2
    print(f"ROOFLINE N={N} D={D} R={R} bf16: steer {steer_ms * 1e3:.1f} us "
          f"({floor / steer_ms / 1e6:.0f} GB/s), copy of the same bytes {copy_ms * 1e3:.1f} us "
          f"({floor / copy_ms / 1e6:.0f} GB/s): {copy_ms / steer_ms:.0%} of copy bandwidth")


def logprobs():
    from bench.bench_logprobs import CUDA_SHAPE, fused_step, make_inputs, plain_step

    N, D, V = CUDA_SHAPE
    for active in (1.0, 0.25):
        inputs = make_inputs(N, D, V, active, "cuda", torch.bfloat16)
        variants = {"fused triton": fused_step, "plain": plain_step}

        def fused_torch(*args):
            with ops.use_backend("torch"):
                return fused_step(*args)

        variants["fused torch-chunked"] = fused_torch
        for name, fn in variants.items():
            fn(*inputs)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            times = []
            for _ in range(3):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn(*inputs)
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            peak = (torch.cuda.max_memory_allocated() - before) / 2**20
            print(f"LOGPROBS active={active} {name:20s} {statistics.median(times):8.1f} ms, "
                  f"peak extra {peak:8.0f} MiB")
        del inputs
        torch.cuda.empty_cache()


if __name__ == "__main__":
    import triton  # noqa: F401  (bare_run's grid)

    globals()["triton"] = triton
    sections = sys.argv[1:] or ["blocks", "layers"]
    if "blocks" in sections:
        building_blocks()
    if "layers" in sections:
        profile(per_layer_cost())
    if "hooks" in sections:
        hooks_cprofile()
    if "roofline" in sections:
        roofline()
    if "logprobs" in sections:
        logprobs()
