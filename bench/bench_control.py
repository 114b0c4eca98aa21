"""Steered generation throughput on the default model (issue 3's targets).

Each benchmark times the steerkern variant with pytest-benchmark and a baseline in the same
run, alternating the two (A B A B ...) so that machine drift hits both, and records the ratio
of medians in ``extra_info``:

- per_request_batch: 8 prompts, each with its own vector, in one steered batch, against the
  same work done one vector at a time (8 generate calls, as libraries that steer a whole batch
  with one vector must). Target: 5x or more.
- one_vector_overhead: one vector on every row against no steering. Target: 3% or less.
- many_vectors: 64 distinct vectors in one batch of 64 against 1 vector. Target: 0.95 or more
  of the throughput.

Run: ``uv run pytest bench/bench_control.py --benchmark-only``. On CUDA the model runs on the GPU.
"""

import statistics
import time

import pytest
import torch

from steerkern import load_model, steer
from steerkern.vectors import SteeringVector

NEW_TOKENS = 16
PROMPTS = [
    "Tell me about your weekend.", "What do you think of the ocean?", "Describe your home town.",
    "How was the concert?", "Write a note to a friend.", "What is your favourite season?",
    "Summarise the news today.", "Give advice to a new student.",
]


@pytest.fixture(scope="module")
def setup():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tokenizer = load_model(dtype=torch.bfloat16 if device == "cuda" else torch.float32)
    model.to(device)
    gen = torch.Generator().manual_seed(0)
    vectors = [SteeringVector.from_directions({layer: 4 * torch.randn(576, generator=gen) for layer in (10, 14)})
               for _ in range(64)]
    return model, tokenizer, vectors, device


def _generate(model, batch, tokenizer):
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id)
    if out.is_cuda:
        torch.cuda.synchronize()
    return out


def _paired_medians(candidate, baseline, rounds):
    """After one warm-up call of each, alternate candidate and baseline; return their medians and the median of the per-pair
    ratios candidate / baseline (robust to drift of the machine's speed during the run)."""
    candidate(), baseline()  # warm-up: first calls pay one-off allocation and dispatch costs
    times = {"candidate": [], "baseline": []}
    for _ in range(rounds):
        for name, fn in (("candidate", candidate), ("baseline", baseline)):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    ratios = [c / b for c, b in zip(times["candidate"], times["baseline"])]
    return statistics.median(times["candidate"]), statistics.median(times["baseline"]), statistics.median(ratios)


def _batch(tokenizer, prompts, device):
    return tokenizer(prompts, return_tensors="pt", padding=True).to(device)


def _new_tokens(out, batch) -> torch.Tensor:
    """The generated tokens ``[rows, NEW_TOKENS]`` of a ``generate`` output (on the CPU)."""
    return out[:, batch["input_ids"].shape[1]:].cpu()


def _agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fraction of equal tokens between two ``[rows, NEW_TOKENS]`` tensors."""
    return float((a == b).float().mean())


def test_per_request_batch_vs_one_vector_at_a_time(benchmark, setup):
    model, tokenizer, vectors, device = setup
    batch = _batch(tokenizer, PROMPTS, device)
    singles = [_batch(tokenizer, [p], device) for p in PROMPTS]
    mine = vectors[:8]

    def batched():
        with steer(model, mine, slots=list(range(8)), coeff=[1.0] * 8):
            return _generate(model, batch, tokenizer)

    def one_at_a_time():
        outputs = []
        for vector, single in zip(mine, singles):
            with steer(model, vector, coeff=1.0):
                outputs.append(_new_tokens(_generate(model, single, tokenizer), single))
        return torch.cat(outputs)

    # the same work: each row of the batch generates what its vector gives it alone (greedy; a
    # few tokens may flip where left padding changes float summation order, more so in bf16)
    agreement = _agreement(_new_tokens(batched(), batch), one_at_a_time())
    assert agreement >= 0.9, f"per-row steering in one batch disagrees with one vector at a time: {agreement:.2f}"
    fast, slow, ratio = _paired_medians(batched, one_at_a_time, rounds=3)
    benchmark.extra_info.update(speedup=1 / ratio, target=">= 5", baseline_s=slow, steered_s=fast,
                                token_agreement=agreement)
    benchmark.pedantic(batched, rounds=3, iterations=1)


def test_one_vector_overhead(benchmark, setup):
    model, tokenizer, vectors, device = setup
    batch = _batch(tokenizer, PROMPTS, device)

    def steered():
        with steer(model, vectors[0], coeff=1.0):
            return _generate(model, batch, tokenizer)

    def plain():
        return _generate(model, batch, tokenizer)

    changed = 1 - _agreement(_new_tokens(steered(), batch), _new_tokens(plain(), batch))
    assert changed > 0, "the vector changed no generated token: the overhead would be of nothing"
    fast, slow, ratio = _paired_medians(steered, plain, rounds=11)
    benchmark.extra_info.update(overhead=ratio - 1, target="<= 0.03", baseline_s=slow, steered_s=fast)
    benchmark.pedantic(steered, rounds=3, iterations=1)


def test_many_vectors_vs_one(benchmark, setup):
    model, tokenizer, vectors, device = setup
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(64)]
    batch = _batch(tokenizer, prompts, device)

    def many():
        with steer(model, vectors, slots=list(range(64)), coeff=[1.0] * 64):
            return _generate(model, batch, tokenizer)

    def one():
        with steer(model, vectors[0], coeff=1.0):
            return _generate(model, batch, tokenizer)

    # row 0 has vectors[0] in both: 63 other vectors in the batch must not change it
    first_many, first_one = _new_tokens(many(), batch)[0], _new_tokens(one(), batch)[0]
    assert torch.equal(first_many, first_one), "a row's steering depends on the other rows' vectors"
    t_many, t_one, ratio = _paired_medians(many, one, rounds=3)
    benchmark.extra_info.update(relative_throughput=1 / ratio, target=">= 0.95",
                                baseline_s=t_one, steered_s=t_many)
    benchmark.pedantic(many, rounds=2, iterations=1)
