"""Every extraction method's effect and coherence on the shipped concepts (honesty, formality).

For each shipped concept and each method of ``steerkern.extract``: a vector from the concept's
persona contrast pairs (the training data, ``concept_pairs``), evaluated with
``steerkern.evaluate`` on the concept's shipped, labelled yes/no eval prompts (held out: they
are never used for extraction). Each row has two sweeps:

- **shared scale**: coefficients -2..2 (coefficient 1 = the mean projected pair separation, the
  scale every method shares, see ``steerkern.directions``); effect = mean per-prompt slope ± SE
  (nats of score per unit coefficient), ΔNLL at the ends.
- **calibrated**: ``steerkern.calibrate`` (one round over 0.5, 1, 2, ..., 64, so ``c*`` has
  factor-2 resolution) picks the largest magnitude ``c*`` whose ΔNLL stays within a budget
  (both signs; 0 when even 0.5 exceeds it), then the sweep is ``-c*, -c*/2, 0, c*/2, c*``; reported as
  the shift over ``[0, c*]`` = effect x c* ± SE x c* (nats), so methods whose vectors differ in
  effective size are compared at the same coherence cost.

``weight_svd`` needs a linear target: it steers ``mlp.down_proj`` of the same layers (every
other method steers the residual stream). Run:
``uv run pytest bench/bench_methods.py --benchmark-only -s`` (the ``METHOD {...}`` lines are the
rows). Settings through the environment:

- ``STEERKERN_METHODS``: comma list (default: all six methods).
- ``STEERKERN_METHODS_CONCEPTS``: comma list (default "honesty,formality").
- ``STEERKERN_METHODS_LAYERS`` (default "10,12"), ``STEERKERN_METHODS_SUFFIXES`` (8),
  ``STEERKERN_METHODS_CUTS`` (2), ``STEERKERN_METHODS_RANK`` (1, for lowrank / weight_svd).
- ``STEERKERN_CALIB_BUDGET`` (0.5 nats/token), ``STEERKERN_CALIB_MAX`` (64),
  ``STEERKERN_GEN_TOKENS`` (16), ``STEERKERN_GEN_PROMPTS`` (2 of the defaults below).
- ``STEERKERN_BENCH_THREADS`` (1).
"""

import json
import os
import time

import pytest
import torch

from steerkern import calibrate, concept_eval_prompts, concept_pairs, evaluate, extract, load_model

ALL_METHODS = ("mean_diff", "pca_diff", "pca_center", "logistic", "lowrank", "weight_svd", "grad")
METHODS = tuple(os.environ.get("STEERKERN_METHODS", ",".join(ALL_METHODS)).split(","))
CONCEPTS = tuple(os.environ.get("STEERKERN_METHODS_CONCEPTS", "honesty,formality").split(","))
LAYERS = [int(x) for x in os.environ.get("STEERKERN_METHODS_LAYERS", "10,12").split(",")]
SUFFIXES = int(os.environ.get("STEERKERN_METHODS_SUFFIXES", "8"))
CUTS = int(os.environ.get("STEERKERN_METHODS_CUTS", "2"))
RANK = int(os.environ.get("STEERKERN_METHODS_RANK", "1"))
SHARED_COEFFS = (-2.0, -1.0, 0.0, 1.0, 2.0)
CALIB_BUDGET = float(os.environ.get("STEERKERN_CALIB_BUDGET", "0.5"))
CALIB_MAX = float(os.environ.get("STEERKERN_CALIB_MAX", "64"))
CALIB_GRID = 8  # CALIB_MAX / 2**7 .. CALIB_MAX: 0.5, 1, 2, ..., 64 (one round)
GEN_TOKENS = int(os.environ.get("STEERKERN_GEN_TOKENS", "16"))
GEN_PROMPTS = ("Tell me about yourself.", "What matters most to you?",
               "Describe your favourite meal.", "Write a short note to a friend.")
GEN_PROMPTS = GEN_PROMPTS[: int(os.environ.get("STEERKERN_GEN_PROMPTS", "2"))]
THREADS = int(os.environ.get("STEERKERN_BENCH_THREADS", "1"))


def method_kwargs(method: str) -> dict:
    """Extraction arguments per method: weight_svd steers a Linear (``mlp.down_proj``)."""
    if method == "weight_svd":
        return {"target": "mlp.down_proj", "rank": RANK}
    if method == "lowrank":
        return {"rank": RANK}
    return {}


def _delta(history: dict, c: float) -> float:
    """ΔNLL at coefficient ``c`` from calibrate's history (``nan`` where it was not tried)."""
    if c == 0:
        return 0.0
    return history.get(abs(c), {}).get("+" if c > 0 else "-", float("nan"))


def method_row(model, tokenizer, pairs, prompts, method: str, layers=LAYERS) -> dict:
    """Extract with ``method``, calibrate, then score sweeps at the shared scale and at the
    calibrated range. Returns one flat dict (JSON-serialisable).

    The generations are made once, by ``calibrate`` (one batched round over the magnitudes
    ``CALIB_MAX / 2**k``, k = 0..7, both signs): since those magnitudes are powers of 2 they
    include 1 and 2 and, for the calibrated sweep, ``c*`` and ``c*/2``, so every ΔNLL below is
    read from its history (same greedy generations ``evaluate`` would make). The score sweeps
    then need no generation (``max_new_tokens=0``)."""
    torch.manual_seed(0)
    start = time.perf_counter()
    kwargs = method_kwargs(method)
    vector = extract(model, tokenizer, pairs, layers=layers, method=method, progress=False,
                     **kwargs)
    extract_s = time.perf_counter() - start
    c_star, history = calibrate(model, tokenizer, vector, max_delta_nll=CALIB_BUDGET,
                                max_coeff=CALIB_MAX, grid=CALIB_GRID, rounds=1,
                                gen_prompts=list(GEN_PROMPTS), max_new_tokens=GEN_TOKENS,
                                return_history=True)
    history = dict(history)
    shared = evaluate(model, tokenizer, vector, coeffs=SHARED_COEFFS, prompts=prompts,
                      max_new_tokens=0)
    row = dict(
        method=method, target=kwargs.get("target", "residual"), rank=kwargs.get("rank"),
        layers=list(layers), n_pairs=len(pairs), n_eval=len(prompts),
        vector_norm={str(k[0]): float(p.bias.norm()) if p.bias is not None
                     else float((p.B @ p.A.T).norm()) for k, p in vector.parts.items()},
        effect=shared.effect, se=shared.effect_se, scores=shared.scores,
        delta_nll=[_delta(history, c) for c in SHARED_COEFFS],
        c_star=c_star, calib_history=sorted(history.items()),
    )
    if c_star > 0:
        coeffs = (-c_star, -c_star / 2, 0.0, c_star / 2, c_star)
        calibrated = evaluate(model, tokenizer, vector, coeffs=coeffs, prompts=prompts,
                              max_new_tokens=0)
        row.update(cal_effect=calibrated.effect, cal_se=calibrated.effect_se,
                   cal_shift=calibrated.effect * c_star, cal_shift_se=calibrated.effect_se * c_star,
                   cal_scores=calibrated.scores,
                   cal_delta_nll=[_delta(history, c) for c in coeffs])
    row["wall_s"] = time.perf_counter() - start
    row["extract_s"] = extract_s
    return row


@pytest.fixture(scope="module")
def model_and_tokenizer():
    previous = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield load_model()
    torch.set_num_threads(previous)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("concept", CONCEPTS)
def test_concept_methods(benchmark, model_and_tokenizer, concept, method):
    model, tokenizer = model_and_tokenizer
    pairs = concept_pairs(concept, tokenizer, max_suffixes=SUFFIXES, cuts=CUTS)
    prompts = concept_eval_prompts(concept)
    row = benchmark.pedantic(lambda: method_row(model, tokenizer, pairs, prompts, method),
                             rounds=1, iterations=1)
    row = dict(concept=concept, **row)
    benchmark.extra_info.update({k: v for k, v in row.items() if k != "cal_samples"})
    print("\nMETHOD " + json.dumps(row))
