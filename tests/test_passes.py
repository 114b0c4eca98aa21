"""steerkern.passes: how a sweep's rows are cut into passes, and sweeps run that way."""

import itertools
import math
import random

import numpy as np
import pytest
import torch

from steerkern import memory, sweep
from steerkern.items import binary_items
from steerkern.passes import plan_passes
from steerkern.vectors import SteeringVector
from tests.test_eval import word_tokenizer


def padded_tokens(plan, lengths):
    return sum(len(part.rows) * max(lengths[p] for p in part.prompts) for part in plan)


def check_covers(plan, prompts, arms):
    rows = [row for part in plan for row in part.rows]
    assert sorted(rows) == sorted(itertools.product(range(arms), range(prompts)))


def test_whole_prompts_fewest_passes_then_least_padding():
    """Brute force over every way to group the prompts into passes of at most ``max_rows //
    arms``: the plan has the fewest passes, and among those the fewest padded tokens."""
    rng = random.Random(0)
    for _ in range(40):
        lengths = [rng.randint(1, 30) for _ in range(rng.randint(1, 6))]
        arms, max_rows = rng.randint(1, 4), rng.randint(1, 12)
        if arms > max_rows:
            continue
        plan = plan_passes(lengths, arms, max_rows=max_rows)
        check_covers(plan, len(lengths), arms)
        assert all(part.arms == range(arms) and len(part.rows) <= max_rows for part in plan)
        per_pass = max_rows // arms
        assert len(plan) == math.ceil(len(lengths) / per_pass)
        best = min(sum(arms * len(b) * max(lengths[p] for p in b) for b in grouping)
                   for grouping in groupings(list(range(len(lengths))), per_pass)
                   if len(grouping) == len(plan))
        assert padded_tokens(plan, lengths) == best


def groupings(items, size):
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for k in range(min(size, len(items))):
        for others in itertools.combinations(rest, k):
            for tail in groupings([i for i in rest if i not in others], size):
                yield [[first, *others], *tail]


def test_long_and_short_prompts_do_not_share_a_pass():
    lengths = [100, 5, 6, 101, 7, 99]
    plan = plan_passes(lengths, 5, max_rows=15)
    assert [sorted(part.prompts) for part in plan] == [[1, 2, 4], [0, 3, 5]]
    assert padded_tokens(plan, lengths) == 15 * 7 + 15 * 101


def test_token_budget_is_soft_and_rows_are_a_limit():
    lengths = [10, 10, 10, 10, 40]
    plan = plan_passes(lengths, 2, max_rows=100, max_tokens=40)
    check_covers(plan, 5, 2)
    assert [len(part.prompts) for part in plan] == [2, 2, 1]  # 2 x 2 rows x 10; the long prompt alone
    assert all(len(part.rows) * max(lengths[p] for p in part.prompts) <= 80 for part in plan)
    assert len(plan_passes(lengths, 2, max_rows=100)) == 1


def test_arms_beyond_the_row_cap_split_evenly_per_prompt():
    plan = plan_passes([3, 1], 7, max_rows=3)
    check_covers(plan, 2, 7)
    assert [part.prompts for part in plan] == [(1,)] * 3 + [(0,)] * 3  # shortest first
    assert [len(part.arms) for part in plan] == [3, 3, 1] * 2
    with pytest.raises(ValueError, match="max_rows"):
        plan_passes([3], 1, max_rows=0)
    assert plan_passes([], 3, max_rows=4) == []


PROMPTS = [{"prompt": "Are you happy ?", "label": 1},
           {"prompt": "Tell me about your weekend , Tell me about your weekend , I like cats ? "
                      "Tell me about your weekend , I like cats", "label": -1},
           {"prompt": "I like cats", "label": -1},
           {"prompt": "Hello ! Are you sad ?", "label": 1}]


@pytest.mark.parametrize("share_prefill", [True, False])
def test_sweep_passes_are_padded_to_their_own_prompts(tiny_model_factory, share_prefill):
    """Cut into passes of whole prompts by length, no pass feeds the model more columns than its
    longest prompt has tokens (the long prompt does not widen the short ones' passes), and the
    scores and generations equal those of one batch."""
    model = tiny_model_factory("llama")
    tokenizer = word_tokenizer("left")
    vector = SteeringVector.from_directions({1: torch.randn(64, generator=torch.Generator().manual_seed(0))})
    items = binary_items(tokenizer, PROMPTS)
    arms = [(0, -3.0), (-1, 0.0), (0, 3.0)]
    lengths = [len(sweep.text_token_ids(tokenizer, [sweep.render(tokenizer, it.question, it.prefix)])[0])
               for it in items]
    longest, second = sorted(lengths)[-1], sorted(lengths)[-2]
    assert longest > 2 * second

    widths = []

    def record(module, args, kwargs):
        ids = kwargs.get("input_ids")
        mask = kwargs.get("attention_mask")
        if ids is not None and mask is not None:
            widths.append((ids.shape[0], mask.shape[1]))

    one = sweep.score_rows(model, tokenizer, [vector], items, arms, share_prefill=share_prefill)
    handle = model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        split = sweep.score_rows(model, tokenizer, [vector], items, arms, batch_size=9,
                                 share_prefill=share_prefill)
    finally:
        handle.remove()
    np.testing.assert_allclose(split, one, rtol=1e-5, atol=1e-5)
    # passes: the three short prompts (9 rows), then the long one alone (3 rows)
    assert widths and max(width for rows, width in widths if rows > 3) <= second

    gens = [p["prompt"] for p in PROMPTS]
    texts, nll = sweep.generate_rows(model, tokenizer, [vector], gens, arms, max_new_tokens=3,
                                     share_prefill=share_prefill)
    texts2, nll2 = sweep.generate_rows(model, tokenizer, [vector], gens, arms, max_new_tokens=3,
                                       batch_size=3, share_prefill=share_prefill)
    assert texts2 == texts
    np.testing.assert_allclose(nll2, nll, rtol=1e-5, atol=1e-5)


def test_cpu_scoring_passes_keep_to_the_token_budget(monkeypatch, tiny_model_factory):
    """Without ``batch_size``, a CPU scoring sweep over the token budget runs in passes under it
    (memory permitting all rows at once), with the same scores."""
    model = tiny_model_factory("llama")
    tokenizer = word_tokenizer("left")
    vector = SteeringVector.from_directions({1: torch.randn(64, generator=torch.Generator().manual_seed(1))})
    items = binary_items(tokenizer, PROMPTS)
    arms = [(0, -2.0), (0, 2.0)]
    one = sweep.score_rows(model, tokenizer, [vector], items, arms, share_prefill=False)
    rows_seen = []
    monkeypatch.setattr(memory, "free_bytes", lambda device: 10**15)
    monkeypatch.setattr(sweep, "CPU_PASS_TOKENS", 2 * 2 * 6)
    handle = model.register_forward_pre_hook(
        lambda module, args, kwargs: rows_seen.append(kwargs["input_ids"].shape[0]), with_kwargs=True)
    try:
        split = sweep.score_rows(model, tokenizer, [vector], items, arms, share_prefill=False)
    finally:
        handle.remove()
    np.testing.assert_allclose(split, one, rtol=1e-5, atol=1e-5)
    assert len(rows_seen) > 1 and sum(rows_seen) == len(items) * len(arms)
