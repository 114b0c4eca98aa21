"""CAA / steering-bench style steerability on the published persona sets.

For each persona file in ``../shared/data/mwe_persona`` and each extraction method: a vector from
the training split (question + matching answer vs question + non-matching answer, read at the
answer token), evaluated on held-out items: steerability = mean per-item slope of
log p(matching) - log p(not matching) against the coefficient, with its standard error (paired
by item), and ΔNLL of steered generations. Skips when ``../shared/data`` is absent.

Run: ``uv run pytest bench/bench_persona.py --benchmark-only -s`` (about a minute per row on
2 CPU cores). Settings through the environment: ``STEERKERN_PERSONA_LAYERS`` (default "10,12"),
``STEERKERN_PERSONA_TRAIN`` (64), ``STEERKERN_PERSONA_HELD`` (24).
"""

import json
import os
from pathlib import Path

import pytest

from steerkern import evaluate, extract, load_model, load_mwe, mwe_pairs, split_items

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "mwe_persona"
PERSONAS = sorted(p.stem for p in DATA.glob("*.jsonl")) if DATA.is_dir() else []
METHODS = ("mean_diff", "pca_center", "pca_diff")
COEFFS = (-2, -1, 0, 1, 2)
LAYERS = [int(x) for x in os.environ.get("STEERKERN_PERSONA_LAYERS", "10,12").split(",")]
TRAIN = int(os.environ.get("STEERKERN_PERSONA_TRAIN", "64"))
HELD = int(os.environ.get("STEERKERN_PERSONA_HELD", "24"))

pytestmark = pytest.mark.skipif(not PERSONAS, reason="../shared/data/mwe_persona is absent")


@pytest.fixture(scope="module")
def model_and_tokenizer():
    return load_model()


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("persona", PERSONAS)
def test_persona_steerability(benchmark, model_and_tokenizer, persona, method):
    model, tokenizer = model_and_tokenizer
    train, held = split_items(load_mwe(DATA / f"{persona}.jsonl"), held_out=HELD, seed=0)

    def run():
        vector = extract(model, tokenizer, mwe_pairs(train[:TRAIN], tokenizer, concept=persona),
                         layers=LAYERS, method=method, progress=False)
        return evaluate(model, tokenizer, vector, coeffs=COEFFS, prompts=held,
                        max_new_tokens=16, gen_prompts=["Tell me about yourself.",
                                                        "What matters most to you?"])

    report = benchmark.pedantic(run, rounds=1, iterations=1)
    row = dict(persona=persona, method=method, layers=LAYERS, train=TRAIN, held=len(held),
               steerability=report.effect, se=report.effect_se,
               delta_nll_min=report.delta_nll[0], delta_nll_max=report.delta_nll[-1])
    benchmark.extra_info.update(row)
    print("\nPERSONA " + json.dumps(row))
