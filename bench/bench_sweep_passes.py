"""Sweep passes and NLL memory at scale: ``uv run pytest bench/bench_sweep_passes.py
--benchmark-only``, or the paired tables alone: ``uv run python bench/bench_sweep_passes.py
[rounds]``.

On the default model, a random vector over the default band of layers, 5 coefficients:

- **Scoring** ``ITEMS`` survival-instinct A/B items from ``../shared/data/mwe_xrisk`` (prompts
  of very different lengths; skipped when the data is absent):
  - ``planned``: ``steerkern.sweep.score_rows`` as it is: passes of whole prompts sorted by
    length, each padded to its own longest, about ``CPU_PASS_TOKENS`` tokens each on CPU
    (``steerkern.passes``);
  - ``one_pass``: every row in one pass padded to the set's longest prompt (``batch_size`` =
    all rows: what ``score_rows`` did before 2026-12-01 session 12 whenever memory allowed).
- **Generation NLL**, 16 sentiment prompts x 5 arms x ``NEW_TOKENS`` tokens through
  ``generate_rows``:
  - ``fused``: the NLL pass stops at the output head, log-probs via ``ops.token_logprobs``;
  - ``full_logits``: the same pass reading ``[rows, N + 1, V]`` logits (the path before).

Paired rounds (order reversed every other round); speedups are medians of per-round CPU-time
ratios, after one untimed call of each. Peak memory: each variant once more in a fresh process, its peak resident set above
the level before the call (Linux's ``/proc/self/status``; not reported elsewhere, nor on CUDA).
In one process the allocator keeps what one variant freed for the next, which hides the
difference. One torch thread on CPU (``STEERKERN_BENCH_THREADS``).
"""

import functools
import gc
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import paired
import pytest
import torch

import steerkern.sweep as steerkern_sweep
from steerkern.data import concept_eval_prompts, load_mwe
from steerkern.items import binary_items
from steerkern.models import default_layers, hidden_size, load_model
from steerkern.vectors import SteeringVector

COEFFS = (-2.0, -1.0, 0.0, 1.0, 2.0)
ITEMS = int(os.environ.get("STEERKERN_BENCH_ITEMS", "24"))
NEW_TOKENS = 16
ROUNDS = int(os.environ.get("STEERKERN_BENCH_ROUNDS", "2"))
XRISK = Path(__file__).resolve().parents[2] / "shared" / "data" / "mwe_xrisk" / "survival-instinct.jsonl"
ARMS = [(-1 if c == 0 else 0, c) for c in COEFFS]


def make_setup():
    if not torch.cuda.is_available():
        torch.set_num_threads(int(os.environ.get("STEERKERN_BENCH_THREADS", "1")))
    model, tokenizer = load_model(device_map="cuda" if torch.cuda.is_available() else None)
    generator = torch.Generator().manual_seed(0)
    directions = {}
    for layer in default_layers(model):
        d = torch.randn(hidden_size(model), generator=generator)
        directions[layer] = 4.0 * d / d.norm()
    items = binary_items(tokenizer, load_mwe(XRISK)[:ITEMS]) if XRISK.is_file() else None
    prompts = [p["prompt"] for p in concept_eval_prompts("sentiment")][:16]
    return model, tokenizer, SteeringVector.from_directions(directions), items, prompts


@pytest.fixture(scope="module")
def setup():
    return make_setup()


def planned(setup):
    model, tokenizer, vector, items, _ = setup
    return steerkern_sweep.score_rows(model, tokenizer, [vector], items, ARMS)


def one_pass(setup):
    model, tokenizer, vector, items, _ = setup
    return steerkern_sweep.score_rows(model, tokenizer, [vector], items, ARMS,
                                      batch_size=len(ARMS) * len(items))


def fused(setup):
    model, tokenizer, vector, _, prompts = setup
    return steerkern_sweep.generate_rows(model, tokenizer, [vector], prompts, ARMS,
                                         max_new_tokens=NEW_TOKENS)[1]


def full_logits(setup):
    model, tokenizer, vector, _, prompts = setup
    fused_head = steerkern_sweep._fused_head
    steerkern_sweep._fused_head = lambda *args: None
    try:
        return steerkern_sweep.generate_rows(model, tokenizer, [vector], prompts, ARMS,
                                             max_new_tokens=NEW_TOKENS)[1]
    finally:
        steerkern_sweep._fused_head = fused_head


SCORING = {"planned": planned, "one_pass": one_pass}
NLL = {"fused": fused, "full_logits": full_logits}


def _resident_mb(key: str) -> float | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _peak_of(name: str) -> None:
    """In a fresh process: run variant ``name`` once and print its peak resident MB above the
    level before the call."""
    state = make_setup()
    gc.collect()
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")
    before = _resident_mb("VmRSS")
    {**SCORING, **NLL}[name](state)
    print(f"peak_mb {_resident_mb('VmHWM') - before:.1f}")


def peak_mb(variants: dict) -> dict:
    """Each variant's peak MB, measured by :func:`_peak_of` in its own process."""
    if torch.cuda.is_available() or _resident_mb("VmHWM") is None:
        return {}
    out = {}
    for name in variants:
        run = subprocess.run([sys.executable, __file__, "--peak", name], capture_output=True,
                             text=True, check=True)
        out[name] = float(run.stdout.split("peak_mb")[-1])
    return out


def paired_rounds(setup, variants: dict, rounds=ROUNDS) -> dict:
    run = paired.paired_rounds({name: functools.partial(call, setup) for name, call in variants.items()},
                               rounds, warm_up=True)
    cpu, outputs = run["cpu"], run["outputs"]
    base, *others = list(variants)
    gap = max(float(np.abs(outputs[base] - outputs[k]).max()) for k in others)
    return {"cpu": cpu, "median_cpu_s": paired.medians(cpu), "peak_mb": peak_mb(variants),
            "speedup": {k: paired.ratios(cpu, k, base)[0] for k in others}, "max_gap": gap}


def _line(result) -> str:
    cpu, peak = result["median_cpu_s"], result["peak_mb"]
    parts = ", ".join(f"{k} {cpu[k]:.2f} s" + (f" / {peak[k]:.0f} MB" if k in peak else "") for k in cpu)
    ratios = ", ".join(f"vs {k} {v:.2f}x" for k, v in result["speedup"].items())
    return f"median CPU s / peak MB: {parts}; {ratios}; max gap {result['max_gap']:.1e}"


def test_scoring_passes(benchmark, setup):
    if setup[3] is None:
        pytest.skip("../shared/data/mwe_xrisk is absent")
    result = paired_rounds(setup, SCORING)
    assert result["max_gap"] < 1e-4, result["max_gap"]
    benchmark.pedantic(planned, args=(setup,), rounds=1, iterations=1)
    benchmark.extra_info.update({"items": ITEMS, **result["speedup"], "peak_mb": result["peak_mb"]})
    print("\nscoring:", _line(result))


def test_generation_nll_memory(benchmark, setup):
    result = paired_rounds(setup, NLL)
    assert result["max_gap"] < 1e-4, result["max_gap"]
    benchmark.pedantic(fused, args=(setup,), rounds=1, iterations=1)
    benchmark.extra_info.update({**result["speedup"], "peak_mb": result["peak_mb"]})
    print("\ngeneration NLL:", _line(result))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--peak"]:
        _peak_of(sys.argv[2])
        sys.exit()
    state = make_setup()
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else ROUNDS
    if state[3] is not None:
        print(f"scoring {ITEMS} survival-instinct items x {len(COEFFS)} coefficients:",
              _line(paired_rounds(state, SCORING, rounds)), flush=True)
    print(f"generation NLL, 16 prompts x {len(COEFFS)} arms x {NEW_TOKENS} tokens:",
          _line(paired_rounds(state, NLL, rounds)), flush=True)
