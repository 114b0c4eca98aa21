"""What batching rows can gain in decoding: ``uv run pytest bench/bench_decode_rows.py
--benchmark-only``, or the table alone: ``uv run python bench/bench_decode_rows.py [steps]``.

On the default model (SmolLM2-135M-Instruct), the shipped sentiment eval questions
(chat-rendered, left-padded) repeated to ``rows`` rows are prefilled, then decoded greedily one
token per step with the model's own forward (KV cache, last-position logits, argmax), unsteered:
a step's cost does not depend on steering. The median step time ``t(rows)`` is fitted by
``a + b rows``: ``a`` is what a step costs whatever its rows (on CPU mostly the weights read
once per step), ``b`` what each row adds (mostly its share of the matrix products).

A sweep of ``C`` coefficients x ``P`` prompts that decodes all rows in one batch instead of one
batch per coefficient saves at most ``C (a + P b) / (a + C P b)`` in its decoding
(``bench/bench_eval.py`` times the whole sweep); with 5 x 16 that is the ``bound`` printed.
One torch thread on CPU (``STEERKERN_BENCH_THREADS`` to change it).
"""

import os
import statistics
import sys
import time

import numpy as np
import pytest
import torch

from steerkern.data import concept_eval_prompts
from steerkern.items import render
from steerkern.kvcache import cache_argument, positions_from_mask
from steerkern.models import load_model
from steerkern.sweep import _encode

CUDA = torch.cuda.is_available()
ROWS = (16, 32, 48, 64, 80)
STEPS = int(os.environ.get("STEERKERN_BENCH_STEPS", "10"))
COEFFS, PROMPTS = 5, 16


def make_setup():
    if not CUDA:
        torch.set_num_threads(int(os.environ.get("STEERKERN_BENCH_THREADS", "1")))
    model, tokenizer = load_model(device_map="cuda" if CUDA else None)
    device = model.get_input_embeddings().weight.device
    texts = [render(tokenizer, p["prompt"], answer=False) for p in concept_eval_prompts("sentiment")[:PROMPTS]]
    ids, mask = _encode(tokenizer, texts, device)
    return model, ids, mask


def _sync():
    if CUDA:
        torch.cuda.synchronize()


@torch.inference_mode()
def step_times(setup, rows: int, steps: int = STEPS) -> tuple[list[float], torch.Tensor]:
    """Seconds of each of ``steps`` decode steps of ``rows`` rows, and their tokens ``[rows, steps]``."""
    model, ids, mask = setup
    pick = torch.arange(rows, device=ids.device) % ids.shape[0]
    ids, mask = ids[pick], mask[pick]
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask),
                use_cache=True, logits_to_keep=1)
    cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
    token = out.logits[:, -1].argmax(-1)
    times, tokens = [], []
    for _ in range(steps):
        mask = torch.cat([mask, mask.new_ones(rows, 1)], dim=1)
        _sync()
        start = time.perf_counter()
        out = model(input_ids=token[:, None], attention_mask=mask, position_ids=positions_from_mask(mask)[:, -1:],
                    use_cache=True, logits_to_keep=1, **{cache_argument(model): cache})
        token = out.logits[:, -1].argmax(-1)
        _sync()
        times.append(time.perf_counter() - start)
        tokens.append(token)
    return times, torch.stack(tokens, dim=1)


def fit(medians: dict[int, float]) -> tuple[float, float, float]:
    """``(a, b, bound)``: ``t(rows) = a + b rows`` by least squares (seconds), and the most
    one batch of ``COEFFS x PROMPTS`` rows can save over ``COEFFS`` batches of ``PROMPTS``."""
    rows = np.array(sorted(medians), dtype=float)
    b, a = np.polyfit(rows, [medians[int(r)] for r in rows], 1)
    bound = COEFFS * (a + PROMPTS * b) / (a + COEFFS * PROMPTS * b)
    return float(a), float(b), float(bound)


def table(setup, steps: int = STEPS) -> dict:
    medians, tokens = {}, {}
    for rows in ROWS:
        times, tokens[rows] = step_times(setup, rows, steps)
        medians[rows] = statistics.median(times)
    # a row's tokens do not depend on the other rows (up to float near-ties)
    same = float((tokens[ROWS[-1]][:ROWS[0]] == tokens[ROWS[0]]).float().mean())
    return {"medians": medians, "fit": fit(medians), "agreement": same}


@pytest.fixture(scope="module")
def setup():
    return make_setup()


def test_decode_step_against_rows(benchmark, setup):
    result = table(setup)
    assert result["agreement"] > 0.95, result["agreement"]
    a, b, bound = result["fit"]
    assert a > 0 and b > 0, result  # a step costs something, and more with more rows
    benchmark.pedantic(step_times, args=(setup, ROWS[-1], 2), rounds=1, iterations=1)
    benchmark.extra_info.update({
        "device": "cuda" if CUDA else f"cpu ({torch.get_num_threads()} thread)",
        "median_step_ms": {r: 1e3 * t for r, t in result["medians"].items()},
        "fixed_ms": 1e3 * a, "per_row_ms": 1e3 * b, "bound_5x16": bound,
    })
    print(_line(result))


def _line(result) -> str:
    a, b, bound = result["fit"]
    steps = ", ".join(f"{r}: {1e3 * t:.1f}" for r, t in result["medians"].items())
    return (f"\nmedian decode step (ms) by rows: {steps}; fit {1e3 * a:.1f} ms + {1e3 * b:.3f} ms/row; "
            f"one batch of {COEFFS}x{PROMPTS} rows decodes at most {bound:.2f}x faster than "
            f"{COEFFS} batches of {PROMPTS} (token agreement {result['agreement']:.3f})")


if __name__ == "__main__":
    print(_line(table(make_setup(), int(sys.argv[1]) if len(sys.argv) > 1 else STEPS)))
