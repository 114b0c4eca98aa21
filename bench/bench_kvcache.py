"""Decoding into reserved KV columns against the concatenating dynamic cache:
``uv run pytest bench/bench_kvcache.py --benchmark-only``, or the paired table alone:
``uv run python bench/bench_kvcache.py [rounds] [rows ...]``.

On the default model (SmolLM2-135M-Instruct), the shipped sentiment eval questions
(chat-rendered, left-padded) repeated to ``rows`` rows, greedy, ``NEW_TOKENS`` new tokens (48,
``evaluate``'s default), unsteered (the cache's cost does not depend on steering):

- ``reserved``: ``generate`` handed the model's empty dynamic cache after
  ``steerkern.kvcache.reserve_columns`` (what shared sweeps decode into): each layer writes its
  new columns into buffers sized for prompt plus generation;
- ``dynamic``: the same empty cache as it is: each layer grows by ``torch.cat`` at every step,
  reallocating and copying itself.

Both give the same tokens (checked). Rounds alternate the order; the speedup is the median of
the per-round ratios of process CPU time. One torch thread on CPU
(``STEERKERN_BENCH_THREADS`` to change it).
"""

import os
import statistics
import sys
import time

import pytest
import torch

from steerkern.data import concept_eval_prompts
from steerkern.items import render
from steerkern.kvcache import cache_argument, empty_model_cache, reserve_columns
from steerkern.models import load_model
from steerkern.sweep import _encode, _greedy_config

CUDA = torch.cuda.is_available()
NEW_TOKENS = int(os.environ.get("STEERKERN_BENCH_TOKENS", "48"))
ROUNDS = int(os.environ.get("STEERKERN_BENCH_ROUNDS", "3"))
ROWS = (16, 80)


def make_setup():
    if not CUDA:
        torch.set_num_threads(int(os.environ.get("STEERKERN_BENCH_THREADS", "1")))
    model, tokenizer = load_model(device_map="cuda" if CUDA else None)
    device = model.get_input_embeddings().weight.device
    texts = [render(tokenizer, p["prompt"], answer=False) for p in concept_eval_prompts("sentiment")]
    ids, mask = _encode(tokenizer, texts, device)
    return model, ids, mask, _greedy_config(model, tokenizer, NEW_TOKENS)


@pytest.fixture(scope="module")
def setup():
    return make_setup()


def decode(setup, rows: int, reserved: bool) -> torch.Tensor:
    model, ids, mask, config = setup
    index = torch.arange(rows, device=ids.device) % ids.shape[0]
    columns = ids.shape[1] + NEW_TOKENS
    cache = empty_model_cache(model, columns)
    if cache is None:
        pytest.skip("the model's cache is not a dynamic one steerkern can reserve")
    if reserved:
        reserve_columns(cache, columns)
    with torch.inference_mode():
        out = model.generate(input_ids=ids[index], attention_mask=mask[index], generation_config=config,
                             **{cache_argument(model): cache})
    return out[:, ids.shape[1]:]


def paired_rounds(setup, rows: int, rounds: int = ROUNDS) -> dict:
    """Alternating rounds of both variants: seconds per round (process CPU time on CPU, wall
    time on CUDA), medians and the per-round speedup of ``reserved``."""
    variants = {"reserved": True, "dynamic": False}
    clock = time.perf_counter if CUDA else time.process_time
    seconds = {name: [] for name in variants}
    outputs = {}
    for r in range(rounds):
        for name in (list(variants) if r % 2 == 0 else list(variants)[::-1]):
            if CUDA:
                torch.cuda.synchronize()
            start = clock()
            out = decode(setup, rows, variants[name])
            if CUDA:
                torch.cuda.synchronize()
            seconds[name].append(clock() - start)
            outputs.setdefault(name, out)
    ratios = [d / s for d, s in zip(seconds["dynamic"], seconds["reserved"])]
    return {"seconds": seconds, "same_tokens": torch.equal(outputs["reserved"], outputs["dynamic"]),
            "median_s": {k: statistics.median(v) for k, v in seconds.items()},
            "speedup": statistics.median(ratios), "range": (min(ratios), max(ratios))}


@pytest.mark.parametrize("rows", ROWS)
def test_reserved_columns_vs_concatenation(benchmark, setup, rows):
    result = paired_rounds(setup, rows)
    assert result["same_tokens"]
    benchmark.pedantic(decode, args=(setup, rows, True), rounds=1, iterations=1)
    benchmark.extra_info.update({"rows": rows, "new_tokens": NEW_TOKENS, "rounds": ROUNDS,
                                 "device": "cuda" if CUDA else f"cpu ({torch.get_num_threads()} thread)",
                                 **{f"{k}_s": v for k, v in result["median_s"].items()},
                                 "speedup": result["speedup"], "speedup_range": result["range"]})
    print(_line(rows, result))


def _line(rows, result) -> str:
    m, (low, high) = result["median_s"], result["range"]
    clock = "wall" if CUDA else "CPU"
    return (f"\n{rows} rows x {NEW_TOKENS} tokens, {len(result['seconds']['reserved'])} paired rounds "
            f"(median {clock} s): reserved {m['reserved']:.2f}, dynamic {m['dynamic']:.2f}; speedup "
            f"{result['speedup']:.3f}x (range {low:.3f}-{high:.3f}); same tokens: {result['same_tokens']}")


if __name__ == "__main__":
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else ROUNDS
    chosen = [int(r) for r in sys.argv[2:]] or ROWS
    state = make_setup()
    for count in chosen:
        res = paired_rounds(state, count, rounds)
        print(_line(count, res), flush=True)
        print("per-round seconds:", {k: [round(x, 2) for x in v] for k, v in res["seconds"].items()}, flush=True)
