"""``steerkern.kvcache.reserve_columns``: a dynamic cache whose layers write new columns into
preallocated buffers must hold, return and generate exactly what the concatenating cache does."""

import pytest
import torch

from steerkern.kvcache import (
    cache_argument,
    empty_model_cache,
    is_gatherable,
    reserve_columns,
    select_rows,
)
from tests.tiny_models import build_tiny_model


def _layered_cache():
    cache_utils = pytest.importorskip("transformers.cache_utils")
    if not hasattr(cache_utils, "DynamicLayer"):
        pytest.skip("transformers before 4.54 keeps key/value lists: nothing to reserve")
    model = build_tiny_model("llama")
    cache = empty_model_cache(model, 64)
    assert cache is not None
    return model, cache


def _updates(seed=0, rows=3, heads=2, dim=8, widths=(5, 1, 1, 3, 1)):
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(rows, heads, w, dim, generator=generator),
             torch.randn(rows, heads, w, dim + 2, generator=generator)) for w in widths]


def _run(cache, updates, layer=0):
    returned = [cache.update(k, v, layer) for k, v in updates]
    return returned, cache.layers[layer]


@pytest.mark.parametrize("columns", [1, 7, 11, 64])
def test_reserved_layers_hold_and_return_what_concatenation_does(columns):
    """Keys and values (of different head sizes) after each update equal ``torch.cat`` of all
    updates so far, whether the buffer is larger than needed, exactly full or outgrown."""
    _, cache = _layered_cache()
    reserve_columns(cache, columns)
    updates = _updates()
    returned, layer = _run(cache, updates)
    for step, (keys, values) in enumerate(returned):
        torch.testing.assert_close(keys, torch.cat([k for k, _ in updates[:step + 1]], dim=2))
        torch.testing.assert_close(values, torch.cat([v for _, v in updates[:step + 1]], dim=2))
    assert cache.get_seq_length(0) == sum(k.shape[2] for k, _ in updates)
    assert layer.keys.shape[2] == layer.values.shape[2] == 11
    if columns >= 11:  # written in place: every returned tensor views the one buffer
        assert all(k.data_ptr() == layer.keys.data_ptr() for k, _ in returned)
    assert is_gatherable(cache, 64)


def test_reserved_layers_survive_gathered_rows_and_crops():
    """Rows gathered (``select_rows``) or a crop replace or shorten the keys: later updates
    still append after exactly the columns the layer holds."""
    _, cache = _layered_cache()
    (k0, v0), (k1, v1), (k2, v2) = _updates(widths=(4, 1, 2))
    reserve_columns(cache, 16)
    cache.update(k0, v0, 0)
    rows = torch.tensor([2, 0, 0, 1])
    select_rows(cache, rows)
    keys, values = cache.update(k1[rows], v1[rows], 0)
    torch.testing.assert_close(keys, torch.cat([k0, k1], dim=2)[rows])
    torch.testing.assert_close(values, torch.cat([v0, v1], dim=2)[rows])
    cache.layers[0].crop(-2)
    keys, values = cache.update(k2[rows], v2[rows], 0)
    torch.testing.assert_close(keys, torch.cat([k0[:, :, :3], k2], dim=2)[rows])
    torch.testing.assert_close(values, torch.cat([v0[:, :, :3], v2], dim=2)[rows])


def test_a_filled_cache_keeps_its_columns_when_reserved():
    """Reserving a cache that already holds columns (a shared prompt) keeps them: the first
    update copies them into the buffer."""
    _, cache = _layered_cache()
    (k0, v0), (k1, v1) = _updates(widths=(6, 1))
    cache.update(k0, v0, 0)
    reserve_columns(cache, 9)
    keys, values = cache.update(k1, v1, 0)
    torch.testing.assert_close(keys, torch.cat([k0, k1], dim=2))
    torch.testing.assert_close(values, torch.cat([v0, v1], dim=2))
    assert type(cache.layers[0]).__name__ == "ReservedColumnsLayer"


def test_generate_with_a_reserved_cache_gives_the_same_tokens_and_scores():
    """Greedy generation from a reserved cache (prefilled prompt, left padding) equals
    generation with the model's own concatenating cache, scores included."""
    model, cache = _layered_cache()
    torch.manual_seed(0)
    ids = torch.randint(3, 128, (3, 7))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    mask[1, :1] = 0
    kwargs = dict(max_new_tokens=9, do_sample=False, pad_token_id=0, eos_token_id=None,
                  output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        plain = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
        reserved = model.generate(input_ids=ids, attention_mask=mask, **kwargs,
                                  **{cache_argument(model): reserve_columns(cache, ids.shape[1] + 9)})
    assert torch.equal(plain.sequences, reserved.sequences)
    torch.testing.assert_close(torch.stack(reserved.scores), torch.stack(plain.scores))
    assert all(type(layer).__name__ == "ReservedColumnsLayer" for layer in cache.layers)


def test_layers_a_cache_adds_on_the_fly_are_reserved_too():
    """A dynamic cache built without a config adds a layer at its first update of that
    layer: reserved caches add reserved layers, holding what concatenation would."""
    cache_utils = pytest.importorskip("transformers.cache_utils")
    if not hasattr(cache_utils, "DynamicLayer"):
        pytest.skip("transformers before 4.54 keeps key/value lists: nothing to reserve")
    cache = reserve_columns(cache_utils.DynamicCache(), 8)
    updates = _updates(widths=(3, 1))
    for layer in (0, 1, 2):
        for k, v in updates:
            keys, values = cache.update(k, v, layer)
        torch.testing.assert_close(keys, torch.cat([k for k, _ in updates], dim=2))
        torch.testing.assert_close(values, torch.cat([v for _, v in updates], dim=2))
    assert [type(layer).__name__ for layer in cache.layers] == ["ReservedColumnsLayer"] * 3
