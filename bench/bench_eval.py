"""Coefficient sweep cost: ``uv run pytest bench/bench_eval.py --benchmark-only``, or the
paired table alone: ``uv run python bench/bench_eval.py [rounds]``.

On the default model (SmolLM2-135M-Instruct), 16 prompts (the shipped sentiment eval
questions, chat-rendered) x 5 coefficients, greedy, up to ``NEW_TOKENS`` new tokens per row with
the generation config ``evaluate`` uses (``_greedy_config``: a call stops when all its rows have
ended), for each steering ``positions`` setting ("generated": only new tokens steered; "all":
prompt too). ``STEERKERN_BENCH_FORCE_LENGTH=1`` adds ``min_new_tokens = max_new_tokens`` (the
setting of the notes before 2026-11-30 session 7): every call then decodes exactly
``NEW_TOKENS`` steps, but generate's two min-length logits processors copy and rewrite the
whole ``[rows, vocab]`` score matrix at every step, work ``evaluate`` does not do and that costs
the 80-row batch more per row than 16-row calls whose scores stay in cache:

- ``shared``: what ``steerkern.evaluate`` does — ``steerkern.sweep.sweep_generate``: one
  ``generate`` of 80 rows, each row with its own coefficient (``steer(model, [v],
  slots=..., coeff=per_row)``; coefficient 0 = slot -1), with the shared prefill of
  ``steerkern.prefill``: the chat template's common prefix is run once per coefficient
  ("all") or once in all, and under "generated" each prompt but its last token once for all
  coefficients; under "all" the layers below the vector's (0-11) run the prefix once and each
  prompt's suffix once (``steerkern.trunk``); its KV cache is copied to the 80 rows, into
  buffers with room for every generated column (``steerkern.kvcache.reserve_columns``: no
  reallocating concatenation per layer and step);
- ``plain``: the same 80-row ``generate`` with every row's whole prompt (``share_prefill=False``,
  what ``evaluate`` did before);
- ``per_coeff``: what a library that steers a whole batch with one scalar coefficient must
  do (repeng, steering-vectors) — one ``generate`` of 16 rows per coefficient, 5 calls,
  ``steer(model, v, coeff=c, positions=...)``.

All three give the same token ids up to float near-ties (checked). Timings are paired
(``bench/paired.py``): each round runs the three in turn (the order reversed every other
round) so load on a shared machine hits them alike; the reported speedup is the median over
rounds of the per-round ratio, with its range, in wall time and in process CPU time (which
other processes on a shared machine inflate less). One torch thread on CPU (``STEERKERN_BENCH_THREADS`` to change it).

Where the default model cannot be installed (the device machine: its package is over the
64 MiB that travels there), ``STEERKERN_BENCH_SKELETON=DIR`` runs the same sweep on a model of
the default model's config with seeded random weights and its real tokenizer (so the same
prompt lengths and shared template prefix), both read from ``DIR``; write ``DIR`` here with
``uv run python bench/bench_eval.py --write-skeleton DIR`` (config and tokenizer, about 4 MB).
The sweep's cost depends on the shapes, not the weights, but random weights rarely end a row
early and the greedy tokens of the three variants agree less (near-ties are common).
"""

import os
import sys

import paired
import pytest
import torch

from steerkern.control import steer
from steerkern.data import concept_eval_prompts
from steerkern.items import render
from steerkern.models import load_model, prepare_tokenizer
from steerkern.sweep import _encode, _greedy_config, sweep_generate
from steerkern.vectors import SteeringVector

CUDA = torch.cuda.is_available()
COEFFS = (-2.0, -1.0, 0.0, 1.0, 2.0)
PROMPTS = 16
NEW_TOKENS = int(os.environ.get("STEERKERN_BENCH_TOKENS", "16"))
ROUNDS = int(os.environ.get("STEERKERN_BENCH_ROUNDS", "3"))
POSITIONS = ("generated", "all")
FORCE_LENGTH = os.environ.get("STEERKERN_BENCH_FORCE_LENGTH", "0") == "1"


def make_setup():
    if not CUDA:
        torch.set_num_threads(int(os.environ.get("STEERKERN_BENCH_THREADS", "1")))
    skeleton = os.environ.get("STEERKERN_BENCH_SKELETON")
    if skeleton:
        model, tokenizer = skeleton_model(skeleton)
    else:
        model, tokenizer = load_model(device_map="cuda" if CUDA else None)
    device = model.get_input_embeddings().weight.device
    texts = [render(tokenizer, p["prompt"], answer=False)
             for p in concept_eval_prompts("sentiment")[:PROMPTS]]
    ids, mask = _encode(tokenizer, texts, device)
    generator = torch.Generator().manual_seed(0)
    direction = torch.randn(576, generator=generator)
    vector = SteeringVector.from_directions({12: 6.0 * direction / direction.norm()})
    config = _greedy_config(model, tokenizer, NEW_TOKENS)
    if FORCE_LENGTH:
        config.min_new_tokens = NEW_TOKENS
    return model, tokenizer, vector, ids, mask, config


def write_skeleton(directory: str) -> None:
    """The default model's config and tokenizer (no weights) into ``directory``."""
    model, tokenizer = load_model()
    model.config.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def skeleton_model(directory: str):
    """A model of ``directory``'s config with seeded random weights, and its tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(directory)
    torch.manual_seed(0)
    with torch.device("cuda" if CUDA else "cpu"):
        model = AutoModelForCausalLM.from_config(config).eval()
    return model, prepare_tokenizer(AutoTokenizer.from_pretrained(directory))


@pytest.fixture(scope="module")
def setup():
    return make_setup()


def batched(setup, positions, share=True):
    """``[80, NEW_TOKENS]`` new tokens, rows ordered (coefficient, prompt)."""
    model, tokenizer, vector, ids, mask, config = setup
    count = ids.shape[0]
    index = torch.arange(count, device=ids.device).repeat(len(COEFFS))
    coeffs = [c for c in COEFFS for _ in range(count)]
    slots = [-1 if c == 0 else 0 for c in coeffs]
    with torch.inference_mode():
        return sweep_generate(model, tokenizer, [vector], ids, mask, index, slots, coeffs,
                              config=config, positions=positions, share_prefill=share)


def per_coeff(setup, positions):
    model, _, vector, ids, mask, config = setup
    outs = []
    with torch.inference_mode():
        for c in COEFFS:
            with steer(model, vector, coeff=c, positions=positions):
                out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
            outs.append(out[:, ids.shape[1]:])
    return _stack(outs, config.pad_token_id)


def _stack(outputs: list[torch.Tensor], pad_id: int) -> torch.Tensor:
    """Rows of calls that stopped after different numbers of steps, right-padded as
    ``generate`` pads rows that ended early."""
    width = max(out.shape[1] for out in outputs)
    return torch.cat([torch.nn.functional.pad(out, (0, width - out.shape[1]), value=pad_id)
                      for out in outputs])


def _agreement(a: torch.Tensor, b: torch.Tensor, pad_id: int) -> float:
    """Fraction of equal token ids, the shorter output right-padded."""
    width = max(a.shape[1], b.shape[1])
    a, b = (torch.nn.functional.pad(out, (0, width - out.shape[1]), value=pad_id) for out in (a, b))
    return (a == b).float().mean().item()


def paired_rounds(setup, positions, rounds=ROUNDS) -> dict:
    """Paired rounds (``bench/paired.py``) of per_coeff / shared / plain; times and ratios."""
    variants = {"per_coeff": lambda: per_coeff(setup, positions),
                "shared": lambda: batched(setup, positions, share=True),
                "plain": lambda: batched(setup, positions, share=False)}
    run = paired.paired_rounds(variants, rounds)
    times, cpu, outputs = run["wall"], run["cpu"], run["outputs"]
    pad_id = setup[5].pad_token_id
    agree = {f"shared_vs_{k}": _agreement(outputs["shared"], outputs[k], pad_id)
             for k in ("plain", "per_coeff")}
    speedup, low, high = paired.ratios(times, "per_coeff", "shared")
    cpu_speedup, cpu_low, cpu_high = paired.ratios(cpu, "per_coeff", "shared")
    return {"times": times, "cpu": cpu, "agreement": agree,
            "steps": {k: int(v.shape[1]) for k, v in outputs.items()},
            "cpu_median_s": paired.medians(cpu), "median_s": paired.medians(times),
            "cpu_speedup": cpu_speedup, "cpu_speedup_range": (cpu_low, cpu_high),
            "speedup": speedup, "speedup_range": (low, high),
            "shared_vs_plain": paired.ratios(times, "plain", "shared")[0],
            "plain_vs_per_coeff": paired.ratios(times, "per_coeff", "plain")[0]}


@pytest.mark.parametrize("positions", POSITIONS)
def test_sweep_batched_vs_per_coefficient(benchmark, setup, positions):
    result = paired_rounds(setup, positions)
    agree = result["agreement"]
    # identical greedy tokens except where batch shape changes float rounding enough to flip a tie
    assert min(agree.values()) > 0.95, agree
    benchmark.pedantic(batched, args=(setup, positions), rounds=1, iterations=1)
    benchmark.extra_info.update({
        "device": "cuda" if CUDA else f"cpu ({torch.get_num_threads()} thread)",
        "positions": positions, "rows": len(COEFFS) * PROMPTS, "new_tokens": NEW_TOKENS,
        "token_agreement": agree, "rounds": ROUNDS, "force_length": FORCE_LENGTH,
        "new_tokens_per_variant": result["steps"], **{f"{k}_s": v for k, v in result["median_s"].items()},
        "speedup": result["speedup"], "speedup_range": result["speedup_range"],
        "shared_vs_plain": result["shared_vs_plain"], "cpu_speedup": result["cpu_speedup"],
        **{f"{k}_cpu_s": v for k, v in result["cpu_median_s"].items()},
    })
    print(_line(positions, result))


def _line(positions, result) -> str:
    m = result["median_s"]
    low, high = result["speedup_range"]
    return (f"\npositions={positions}: {len(COEFFS)} coeffs x {PROMPTS} prompts x {NEW_TOKENS} tokens, "
            f"{len(result['times']['shared'])} paired rounds (medians): shared {m['shared']:.2f} s, "
            f"plain batched {m['plain']:.2f} s, per-coefficient {m['per_coeff']:.2f} s; speedup vs "
            f"per-coefficient {result['speedup']:.2f}x (range {low:.2f}-{high:.2f}), vs plain "
            f"batched {result['shared_vs_plain']:.2f}x; plain batched vs per-coefficient "
            f"{result['plain_vs_per_coeff']:.2f}x; CPU-time speedup vs per-coefficient "
            f"{result['cpu_speedup']:.2f}x (range {result['cpu_speedup_range'][0]:.2f}-"
            f"{result['cpu_speedup_range'][1]:.2f})")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--write-skeleton"]:
        write_skeleton(sys.argv[2])
        sys.exit()
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else ROUNDS
    chosen = sys.argv[2:] or POSITIONS
    state = make_setup()
    for pos in chosen:
        res = paired_rounds(state, pos, rounds)
        print(_line(pos, res), flush=True)
        print("token agreement:", res["agreement"], "new tokens (widest row):", res["steps"],
              "forced length:", FORCE_LENGTH, flush=True)
        print("per-round wall seconds:", {k: [round(x, 2) for x in v] for k, v in res["times"].items()}, flush=True)
        print("per-round CPU seconds:", {k: [round(x, 2) for x in v] for k, v in res["cpu"].items()}, flush=True)
