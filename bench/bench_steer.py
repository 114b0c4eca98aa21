"""Steering operator throughput: ``uv run pytest bench/bench_steer.py --benchmark-only``.

Three implementations of ``out[n] += c[n] * (bias[k] + B[k] @ (A[k]^T @ out[n]))`` on the same
inputs (K = 4 requests; decode: N = 64 one-token rows, interleaved requests; prefill:
N = 8192 tokens, four contiguous requests):

- ``op``: ``steerkern.ops.steer_`` (the Triton kernel on CUDA, the torch reference on CPU);
- ``reference``: ``csrc_triton.steer_ref.steer_ref_`` (plain torch);
- ``loop``: a per-request Python loop ``out[rows_k] += c * v_k`` as hook-based libraries do.

``extra_info`` records, from the same run: ``baseline_add_s`` (a plain ``out.add_(v)`` of the
same tensor, the cheapest possible steering), ``ratio_vs_add_``, and ``GBps`` against the
floor of one read and one write of the steered rows (``floor_bytes``; meaningful on CUDA).
On CPU the inputs are fp32 and torch runs one thread (see ``_one_cpu_thread``); on CUDA, bf16.
"""

import time

import pytest
import torch

from csrc_triton.steer_ref import steer_ref_
from steerkern import ops

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.bfloat16 if CUDA else torch.float32
K = 4


@pytest.fixture(autouse=True, scope="module")
def _one_cpu_thread():
    """On a shared CPU, intra-op threads waiting on each other at every op barrier turn
    microsecond ops into milliseconds; one thread measures the work itself."""
    if CUDA:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _sync():
    if CUDA:
        torch.cuda.synchronize()


def make_inputs(N, D, R, decode):
    g = torch.Generator().manual_seed(0)
    out = torch.randn(N, D, generator=g).to(DEVICE, DTYPE)
    slot = (torch.arange(N) % K) if decode else (torch.arange(N) * K // N)
    coeff = torch.full((N,), 0.01)
    bias = torch.randn(K, D, generator=g).to(DEVICE, DTYPE)
    A = B = None
    if R:
        A = (torch.randn(K, D, R, generator=g) / D**0.5).to(DEVICE, DTYPE)
        B = (torch.randn(K, D, R, generator=g) / R**0.5).to(DEVICE, DTYPE)
    return out, slot.to(DEVICE), coeff.to(DEVICE), bias, A, B


def loop_steer_(out, slot, coeff, bias, A, B, rows_per_request):
    """One indexed update per request, as a forward hook per request would do it."""
    for k, rows in enumerate(rows_per_request):
        x = out[rows]
        v = bias[k].expand_as(x).float()
        if A is not None:
            v = v + (x.float() @ A[k].float()) @ B[k].float().T
        out[rows] = (x.float() + coeff[rows, None] * v).to(out.dtype)
    return out


def _median_time(fn, reps):
    fn()
    _sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


SHAPES = [pytest.param(64, True, id="decode64"), pytest.param(8192, False, id="prefill8192")]


@pytest.mark.parametrize("impl", ["op", "reference", "loop"])
@pytest.mark.parametrize("R", [0, 16])
@pytest.mark.parametrize("D", [576, 4096])
@pytest.mark.parametrize("N,decode", SHAPES)
def test_steer_throughput(benchmark, N, decode, D, R, impl):
    out, slot, coeff, bias, A, B = make_inputs(N, D, R, decode)
    rows_per_request = [torch.nonzero(slot == k).flatten() for k in range(K)]
    if impl == "op":
        fn = lambda: ops.steer_(out, slot, coeff, bias, A, B, validate=False)
    elif impl == "reference":
        fn = lambda: steer_ref_(out, slot, coeff, bias, A, B)
    else:
        fn = lambda: loop_steer_(out, slot, coeff, bias, A, B, rows_per_request)

    def run():
        fn()
        _sync()

    heavy = N * D * max(R, 1) > 2**24
    reps = 3 if (heavy and not CUDA) else 20
    benchmark.pedantic(run, rounds=reps, warmup_rounds=1, iterations=1)
    assert torch.isfinite(out).all()
    if benchmark.disabled:  # --benchmark-disable: one untimed call, no stats to record
        return
    v = bias[0].expand(N, D)
    baseline = _median_time(lambda: out.add_(v), reps)
    mean = benchmark.stats.stats.median
    floor_bytes = 2 * N * D * out.element_size()
    benchmark.extra_info.update(
        device=torch.cuda.get_device_name() if CUDA else "cpu",
        dtype=str(DTYPE),
        baseline_add_s=baseline,
        ratio_vs_add_=mean / baseline,
        floor_bytes=floor_bytes,
        GBps=floor_bytes / mean / 1e9,
    )
