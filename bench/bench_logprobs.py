"""Fused margin loss (token_logprobs + coherence penalty), forward + backward, against plain
PyTorch (materialised [N, V] logits, log_softmax, gather) in the same run.

Run: ``uv run pytest bench/bench_logprobs.py --benchmark-only -s``.

Time: pytest-benchmark times the fused loss; the plain baseline is timed in the same test with
the same rounds, interleaved, and the ratio of the minima goes into ``extra_info``.

Peak extra memory:
- CPU: each variant runs once in a fresh subprocess that builds its inputs, then resets the
  kernel's resident-set high-water mark (``echo 5 > /proc/self/clear_refs``), runs forward +
  backward and reads ``VmHWM`` from ``/proc/self/status``; peak extra = VmHWM - VmRSS at the
  reset. tracemalloc does not see torch's allocations; RSS does, and a fresh process keeps the
  allocator caches of one variant out of the other's number. Large torch CPU tensors are
  mmap-backed and returned on free, so the high-water mark is the true peak of live memory.
- CUDA: ``torch.cuda.max_memory_allocated()`` minus the allocation before the run, after
  ``reset_peak_memory_stats()``.

The W head is frozen (as in steering training, where lm_head does not train): only h gets a
gradient. ``active`` is the fraction of tokens beyond the margin (d > tau): 1.0 is the fused
path's worst case (every token's logits are recomputed in the backward).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from steerkern.loss import coherence_penalty, margin_loss  # noqa: E402

TAU = 0.5
CPU_SHAPE = (2048, 576, 49152)
CUDA_SHAPE = (32768, 4096, 128256)


def make_inputs(N, D, V, active, device="cpu", dtype=torch.float32, seed=0):
    """h [N, D], W [V, D], labels [N], logp_ref [N] with a fraction ``active`` of tokens whose
    d = logp_ref - logp_pi lies beyond the margin tau."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    h = (torch.randn(N, D, generator=g) * 0.05).to(device, dtype)
    W = (torch.randn(V, D, generator=g) * 0.05).to(device, dtype)
    y = torch.randint(0, V, (N,), generator=g).to(device)
    from steerkern import ops

    with torch.no_grad():
        logp = ops.token_logprobs(h, W, y)
    beyond = torch.rand(N, generator=g).to(device) < active
    d = torch.where(
        beyond, TAU + 0.1 + torch.rand(N, generator=g).to(device), torch.zeros(N, device=device)
    )
    return h, W, y, logp + d


def fused_step(h, W, y, logp_ref):
    hh = h.detach().requires_grad_()
    loss = margin_loss(hh, W, y, logp_ref, tau=TAU)
    loss.backward()
    return loss.detach(), hh.grad


def plain_step(h, W, y, logp_ref):
    hh = h.detach().requires_grad_()
    logits = hh @ W.T
    logp = torch.log_softmax(logits.float(), dim=-1).gather(1, y[:, None])[:, 0]
    loss = coherence_penalty(logp_ref - logp, "log_barrier", TAU, 1.0).mean()
    loss.backward()
    return loss.detach(), hh.grad


STEPS = {"fused": fused_step, "plain": plain_step}


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _status(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_extra_bytes_cpu(variant, N, D, V, active):
    """Run ``variant`` once in a fresh process; its peak RSS above the state before the run."""
    out = subprocess.run(
        [sys.executable, __file__, "--peak", variant, str(N), str(D), str(V), str(active)],
        check=True,
        capture_output=True,
        text=True,
        cwd=ROOT,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_extra_bytes"]


def peak_extra_bytes_cuda(variant, inputs):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    STEPS[variant](*inputs)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def _compare(benchmark, device, shape, dtype, active, rounds):
    N, D, V = shape
    inputs = make_inputs(N, D, V, active, device, dtype)
    want, _ = plain_step(*inputs)
    got, _ = fused_step(*inputs)
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-3, atol=2e-3)
    plain_times = []

    def time_plain_baseline():  # runs before each fused round: both see the same machine load
        _sync(device)
        t = time.perf_counter()
        plain_step(*inputs)
        _sync(device)
        plain_times.append(time.perf_counter() - t)

    def fused():
        fused_step(*inputs)
        _sync(device)

    benchmark.pedantic(fused, setup=time_plain_baseline, rounds=rounds, iterations=1, warmup_rounds=0)
    if benchmark.disabled:  # --benchmark-disable: one untimed call, no stats to record
        return
    fused_min = benchmark.stats.stats.min
    plain_min = min(plain_times)
    if device == "cuda":
        mem = {v: peak_extra_bytes_cuda(v, inputs) for v in STEPS}
    else:
        mem = {v: peak_extra_bytes_cpu(v, N, D, V, active) for v in STEPS}
    info = {
        "shape": [N, D, V],
        "dtype": str(dtype),
        "active_fraction": active,
        "fused_s": fused_min,
        "plain_s": plain_min,
        "time_ratio": fused_min / plain_min,
        "fused_peak_extra_MiB": mem["fused"] / 2**20,
        "plain_peak_extra_MiB": mem["plain"] / 2**20,
        "memory_ratio": mem["fused"] / mem["plain"],
    }
    benchmark.extra_info.update(info)
    print("\n" + json.dumps(info, indent=1))


@pytest.mark.parametrize("active", [1.0, 0.25])
def test_margin_loss_cpu(benchmark, active):
    torch.manual_seed(0)
    _compare(benchmark, "cpu", CPU_SHAPE, torch.float32, active, rounds=3)


@pytest.mark.gpu
@pytest.mark.parametrize("active", [1.0, 0.25])
def test_margin_loss_cuda_bf16(benchmark, active):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    _compare(benchmark, "cuda", CUDA_SHAPE, torch.bfloat16, active, rounds=5)


def _peak_main(variant, N, D, V, active):
    torch.manual_seed(0)
    inputs = make_inputs(N, D, V, active)
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = _status("VmRSS")
    STEPS[variant](*inputs)
    print(json.dumps({"peak_extra_bytes": _status("VmHWM") - before}))


if __name__ == "__main__" and len(sys.argv) == 7 and sys.argv[1] == "--peak":
    _peak_main(
        sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), float(sys.argv[6])
    )
