"""CAA / steering-bench style steerability on the published persona sets.

For each persona file in ``../shared/data/mwe_persona`` and each extraction method: a vector from
the training split (question + matching answer vs question + non-matching answer, read at the
answer token), evaluated on held-out items: steerability = mean per-item slope of
log p(matching) - log p(not matching) against the coefficient, with its standard error (paired
by item), and ΔNLL of steered generations; at the shared scale (coefficients -2..2) and at the
coefficient ``steerkern.calibrate`` picks for a ΔNLL budget (``bench_methods.method_row``
describes both sweeps; ``weight_svd`` steers ``mlp.down_proj``). Skips when ``../shared/data``
is absent.

Run: ``uv run pytest bench/bench_persona.py --benchmark-only -s`` (the ``PERSONA {...}`` lines
are the rows; 1-3 minutes per row on a shared 2-core CPU). Settings through the environment:
``STEERKERN_PERSONA_METHODS`` (default: all six methods), ``STEERKERN_PERSONAS`` (default: every
file), ``STEERKERN_PERSONA_LAYERS`` (default "10,12"), ``STEERKERN_PERSONA_TRAIN`` (64),
``STEERKERN_PERSONA_HELD`` (24), and those of ``bench_methods`` (calibration budget, generation).
"""

import json
import os
from pathlib import Path

import pytest
from bench_methods import ALL_METHODS, method_row, model_and_tokenizer  # noqa: F401,F811 (fixture)

from steerkern import load_mwe, mwe_pairs, split_items

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "mwe_persona"
PERSONAS = sorted(p.stem for p in DATA.glob("*.jsonl")) if DATA.is_dir() else []
if os.environ.get("STEERKERN_PERSONAS"):
    PERSONAS = [p for p in os.environ["STEERKERN_PERSONAS"].split(",") if p in PERSONAS]
METHODS = tuple(os.environ.get("STEERKERN_PERSONA_METHODS", ",".join(ALL_METHODS)).split(","))
LAYERS = [int(x) for x in os.environ.get("STEERKERN_PERSONA_LAYERS", "10,12").split(",")]
TRAIN = int(os.environ.get("STEERKERN_PERSONA_TRAIN", "64"))
HELD = int(os.environ.get("STEERKERN_PERSONA_HELD", "24"))

pytestmark = pytest.mark.skipif(not PERSONAS, reason="../shared/data/mwe_persona is absent")


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("persona", PERSONAS)
def test_persona_steerability(benchmark, model_and_tokenizer, persona, method):  # noqa: F811
    model, tokenizer = model_and_tokenizer
    train, held = split_items(load_mwe(DATA / f"{persona}.jsonl"), held_out=HELD, seed=0)

    pairs = mwe_pairs(train[:TRAIN], tokenizer, concept=persona)
    row = benchmark.pedantic(lambda: method_row(model, tokenizer, pairs, held, method, LAYERS),
                             rounds=1, iterations=1)
    row = dict(persona=persona, train=min(TRAIN, len(train)), held=len(held), **row)
    benchmark.extra_info.update(row)
    print("\nPERSONA " + json.dumps(row))
