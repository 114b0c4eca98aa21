"""Score-sweep cost (binary-choice log-prob scoring, no generation):
``uv run pytest bench/bench_score_sweep.py --benchmark-only``, or the paired table alone:
``uv run python bench/bench_score_sweep.py [rounds]``.

On the default model (SmolLM2-135M-Instruct, 30 layers), the 24 shipped sentiment eval items
(chat-rendered, one forward pass each) x 5 coefficients, a vector with residual parts at the
default band of layers (10-19), prompts steered (``positions="all"``, what ``evaluate`` does):

- ``bottom``: ``steerkern.sweep.score_rows`` as it is: the template prefix once per
  coefficient with layers 0-9 run once, then each prompt's suffix through layers 0-9 once
  and through layers 10-29 per row (``steerkern.trunk``);
- ``prefix``: the same without the bottom-layer sharing (the template prefix once per
  coefficient, every suffix per row through all layers: the path before ``steerkern.trunk``);
- ``plain``: one batch of 120 rows with every row's whole prompt (``share_prefill=False``);
- ``per_coeff``: one ``score_rows`` call of 24 rows per coefficient, whole prompts (what a
  library that steers a batch with one scalar coefficient does).

The scores agree to 1e-4 (checked). Paired rounds as in ``bench/bench_eval.py``: each round runs
the variants in turn, the order reversed every other round; speedups are medians of per-round
ratios of process CPU time. One torch thread on CPU (``STEERKERN_BENCH_THREADS``).
"""

import functools
import os
import sys

import numpy as np
import paired
import pytest
import torch

import steerkern.sweep as steerkern_sweep
from steerkern.data import concept_eval_prompts
from steerkern.items import binary_items
from steerkern.models import default_layers, load_model
from steerkern.vectors import SteeringVector

COEFFS = (-2.0, -1.0, 0.0, 1.0, 2.0)
ROUNDS = int(os.environ.get("STEERKERN_BENCH_ROUNDS", "3"))


def make_setup():
    if not torch.cuda.is_available():
        torch.set_num_threads(int(os.environ.get("STEERKERN_BENCH_THREADS", "1")))
    model, tokenizer = load_model(device_map="cuda" if torch.cuda.is_available() else None)
    items = binary_items(tokenizer, concept_eval_prompts("sentiment"))
    generator = torch.Generator().manual_seed(0)
    directions = {}
    for layer in default_layers(model):
        d = torch.randn(576, generator=generator)
        directions[layer] = 4.0 * d / d.norm()
    vector = SteeringVector.from_directions(directions)
    return model, tokenizer, vector, items


@pytest.fixture(scope="module")
def setup():
    return make_setup()


def _arms(coeffs):
    return [(-1 if c == 0 else 0, c) for c in coeffs]


def bottom(setup):
    model, tokenizer, vector, items = setup
    return steerkern_sweep.score_rows(model, tokenizer, [vector], items, _arms(COEFFS))


def prefix(setup):
    model, tokenizer, vector, items = setup
    shared_bottom = steerkern_sweep.lowest_steered_layer
    steerkern_sweep.lowest_steered_layer = lambda vectors, slots: 0  # no layer left unsteered
    try:
        return steerkern_sweep.score_rows(model, tokenizer, [vector], items, _arms(COEFFS))
    finally:
        steerkern_sweep.lowest_steered_layer = shared_bottom


def plain(setup):
    model, tokenizer, vector, items = setup
    return steerkern_sweep.score_rows(model, tokenizer, [vector], items, _arms(COEFFS),
                                     share_prefill=False)


def per_coeff(setup):
    model, tokenizer, vector, items = setup
    return np.concatenate([steerkern_sweep.score_rows(model, tokenizer, [vector], items, _arms([c]),
                                                     share_prefill=False) for c in COEFFS])


VARIANTS = {"bottom": bottom, "prefix": prefix, "plain": plain, "per_coeff": per_coeff}


def paired_rounds(setup, rounds=ROUNDS) -> dict:
    run = paired.paired_rounds({name: functools.partial(call, setup) for name, call in VARIANTS.items()},
                               rounds)
    cpu, scores = run["cpu"], run["outputs"]
    gap = max(float(np.abs(scores["bottom"] - scores[k]).max()) for k in VARIANTS)
    ratio = {k: paired.ratios(cpu, k, "bottom") for k in VARIANTS if k != "bottom"}
    return {"cpu": cpu, "max_score_gap": gap, "median_cpu_s": paired.medians(cpu),
            "speedup": {k: r[0] for k, r in ratio.items()},
            "range": {k: r[1:] for k, r in ratio.items()}}


def test_score_sweep_sharing(benchmark, setup):
    result = paired_rounds(setup)
    assert result["max_score_gap"] < 1e-4, result["max_score_gap"]
    benchmark.pedantic(bottom, args=(setup,), rounds=1, iterations=1)
    benchmark.extra_info.update({"rows": len(COEFFS) * len(setup[3]), "rounds": ROUNDS,
                                 "threads": torch.get_num_threads(), **result["speedup"],
                                 **{f"{k}_cpu_s": v for k, v in result["median_cpu_s"].items()}})
    print(_line(result))


def _line(result) -> str:
    m, s, r = result["median_cpu_s"], result["speedup"], result["range"]
    rows = ", ".join(f"{k} {m[k]:.2f} s" for k in VARIANTS)
    ratios = ", ".join(f"vs {k} {s[k]:.2f}x ({r[k][0]:.2f}-{r[k][1]:.2f})" for k in s)
    return (f"\n{len(COEFFS)} coeffs x {len(result['cpu']['bottom'])} paired rounds, median CPU "
            f"seconds: {rows}; bottom-shared sweep {ratios}; max score gap "
            f"{result['max_score_gap']:.1e}")


if __name__ == "__main__":
    state = make_setup()
    res = paired_rounds(state, int(sys.argv[1]) if len(sys.argv) > 1 else ROUNDS)
    print(_line(res), flush=True)
    print("per-round CPU seconds:", {k: [round(x, 2) for x in v] for k, v in res["cpu"].items()})
