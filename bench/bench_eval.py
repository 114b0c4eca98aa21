"""Coefficient sweep cost: ``uv run pytest bench/bench_eval.py --benchmark-only``.

On the default model (SmolLM2-135M-Instruct), 16 prompts (the shipped sentiment eval
questions, chat-rendered) x 5 coefficients, greedy, exactly ``NEW_TOKENS`` new tokens per row
(``min_new_tokens = max_new_tokens``, so both variants do the same work):

- ``batched``: what ``steerkern.evaluate`` does — one ``generate`` of 80 rows, each row with its
  own coefficient (``steer(model, [v], slots=..., coeff=per_row)``; coefficient 0 = slot -1);
- ``per_coeff``: what a library that steers a whole batch with one scalar coefficient must do
  (repeng, steering-vectors) — one ``generate`` of 16 rows per coefficient, 5 calls.

Both produce the same token ids (checked). ``extra_info`` records the median wall seconds of
both from the same run and their ratio (target on CPU: >= 3x). One torch thread on CPU (the
benchmark machine is shared; set ``STEERKERN_BENCH_THREADS`` to change it).
"""

import os
import statistics
import time

import pytest
import torch

from steerkern.control import steer
from steerkern.data import concept_eval_prompts
from steerkern.eval import _encode, _greedy_config, render
from steerkern.models import load_model
from steerkern.vectors import SteeringVector

CUDA = torch.cuda.is_available()
COEFFS = (-2.0, -1.0, 0.0, 1.0, 2.0)
PROMPTS = 16
NEW_TOKENS = int(os.environ.get("STEERKERN_BENCH_TOKENS", "16"))
ROUNDS = int(os.environ.get("STEERKERN_BENCH_ROUNDS", "3"))


@pytest.fixture(scope="module")
def setup():
    if not CUDA:
        torch.set_num_threads(int(os.environ.get("STEERKERN_BENCH_THREADS", "1")))
    model, tokenizer = load_model(device_map="cuda" if CUDA else None)
    device = model.get_input_embeddings().weight.device
    texts = [render(tokenizer, p["prompt"], answer=False)
             for p in concept_eval_prompts("sentiment")[:PROMPTS]]
    ids, mask = _encode(tokenizer, texts, device)
    generator = torch.Generator().manual_seed(0)
    direction = torch.randn(576, generator=generator)
    vector = SteeringVector.from_directions({12: 6.0 * direction / direction.norm()})
    config = _greedy_config(model, tokenizer, NEW_TOKENS)
    config.min_new_tokens = NEW_TOKENS
    return model, vector, ids, mask, config


def batched(model, vector, ids, mask, config):
    rows = len(COEFFS) * ids.shape[0]
    coeff = torch.tensor([c for c in COEFFS for _ in range(ids.shape[0])])
    slots = torch.where(coeff == 0, -1, 0)
    with torch.inference_mode(), steer(model, [vector], coeff=coeff, slots=slots):
        out = model.generate(input_ids=ids.repeat(len(COEFFS), 1),
                             attention_mask=mask.repeat(len(COEFFS), 1), generation_config=config)
    assert out.shape[0] == rows
    return out


def per_coeff(model, vector, ids, mask, config):
    outs = []
    with torch.inference_mode():
        for c in COEFFS:
            with steer(model, vector, coeff=c):
                outs.append(model.generate(input_ids=ids, attention_mask=mask, generation_config=config))
    return torch.cat(outs)


def _median_seconds(fn, *args):
    times = []
    for _ in range(ROUNDS):
        if CUDA:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn(*args)
        if CUDA:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def test_sweep_batched_vs_per_coefficient(benchmark, setup):
    model, vector, ids, mask, config = setup
    one, many = batched(*setup), per_coeff(*setup)
    assert one.shape == many.shape
    # identical greedy tokens except where padding changes float rounding enough to flip a tie
    agree = (one == many).float().mean().item()
    assert agree > 0.95, agree
    baseline = _median_seconds(per_coeff, *setup)
    benchmark.pedantic(batched, args=setup, rounds=ROUNDS, iterations=1)
    ours = benchmark.stats.stats.median
    benchmark.extra_info.update({
        "device": "cuda" if CUDA else f"cpu ({torch.get_num_threads()} thread)",
        "rows": len(COEFFS) * PROMPTS, "new_tokens": NEW_TOKENS, "token_agreement": agree,
        "batched_s": ours, "per_coeff_s": baseline, "speedup": baseline / ours,
    })
    print(f"\nsweep {len(COEFFS)} coeffs x {PROMPTS} prompts x {NEW_TOKENS} tokens: batched "
          f"{ours:.2f} s, per-coefficient {baseline:.2f} s, speedup {baseline / ours:.2f}x")
