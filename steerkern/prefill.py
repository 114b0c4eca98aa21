"""Shared prefill for batched sweeps: compute each distinct piece of prompt once, copy its KV
cache to every row that needs it, and run only what differs per row.

A sweep batch has ``R`` rows; row ``r`` is prompt ``p(r)`` (of ``P`` distinct prompts,
left-padded ``ids``/``mask`` ``[P, T]``) under an *arm* (a steering slot and coefficient).
Two facts make most of the prompt work shared:

1. **Common prefix.** Chat-rendered prompts start with the same template tokens (for
   SmolLM2-Instruct: the 24-token system turn and ``<|im_start|>user\\n``). Let ``k`` be the
   length of the longest token prefix common to every row's real tokens, capped at
   ``min_p len_p - 1`` so that each row keeps at least one token of its own. The prompts are
   re-laid out as ``[prefix (k) | left-padded suffix (T - k)]``: row ``p`` with ``len_p`` real
   tokens becomes ``ids'[p] = prefix ++ pad^(T - len_p) ++ suffix_p``, with
   ``mask'[p] = 1^k ++ 0^(T - len_p) ++ 1^(len_p - k)``. The padding now sits between prefix
   and suffix instead of before the prefix; position ids ``cumsum(mask') - 1`` give every real
   token the same position as before, and masked keys get zero attention weight, so every
   real token's hidden states equal the original layout's (up to float summation order).
2. **Unsteered prompts.** When steering acts only on generated tokens (or only on the answer
   position when scoring), every prompt token is computed by the unsteered model, so its
   KV entries are the same for every coefficient.

Two modes, by whether the prompt tokens are steered:

- ``groups`` given (prompt tokens steered, e.g. ``positions="all"``): rows with the same group
  id (the same arm) share the prefix. Stage A runs the prefix, ``U`` rows (one per distinct
  group) x ``k`` tokens, under the caller's steering; the cache is then gathered to the ``R``
  rows. Cached: columns ``[0, k)``. Work: ``U k + R (T - k)`` token rows instead of ``R T``.
  When the caller also says which decoder layers no row steers (``unsteered_layers = d``) and
  gives the steering of all rows, the bottom layers ``[0, d)`` are shared too
  (:mod:`steerkern.trunk`): stage A runs them once for the prefix, and stage B runs the
  suffixes but their last token, ``[k, T - 1)``, through them once per prompt and through the
  layers above per row. Cached: ``[0, T - 1)``. Work over ``N`` layers, in layer-token-rows:
  ``d (k + P' (T - 1 - k)) + (N - d) (U k + R (T - 1 - k))``, plus ``R`` last tokens.
- ``groups=None`` (prompt tokens unsteered): stage A runs the prefix once (1 row x ``k``),
  stage B the suffixes except their last token, ``P' x (T - 1 - k)`` (``P'`` distinct prompts
  among the rows), and the cache is gathered to the ``R`` rows. Cached: columns
  ``[0, T - 1)``. Work: ``k + P' (T - 1 - k) + R`` token rows instead of ``R T``.

The caller then runs columns ``[cached, T)`` (and generates) for all ``R`` rows with the
returned cache, under its own per-row steering. :func:`shared_prefill` returns ``None`` when
nothing would be saved, or when the model's cache cannot be shared
(:func:`steerkern.kvcache.is_gatherable`: quantised, recurrent or static caches, or sliding
windows shorter than prompt plus generation), or when the sweep runs inside a ``steer`` context
that steers by position (:func:`steerkern.kvcache.steers_by_position`: it would see other passes
than the plain batch's), so the caller falls back to the plain batch.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch

from steerkern.kvcache import (
    cache_argument,
    empty_model_cache,
    filled_layers,
    is_gatherable,
    positions_from_mask,
    select_rows,
)
from steerkern.trunk import bottom_layers, run_bottom, select_sequences, skip_bottom


@dataclass
class SharedPrompt:
    """Prompts prefilled for ``R`` rows.

    Attributes:
        ids, mask: ``[R, T]`` the rows' prompts in the re-laid-out order
            ``[prefix | left-padded suffix]`` (see the module docstring).
        cache: the model's KV cache of columns ``[0, cached)`` for the ``R`` rows.
        cached: number of prompt columns already in ``cache`` (``0 < cached < T``).
        cache_arg: the keyword the model's ``forward`` and ``generate`` take the cache as
            (``"cache"`` in transformers >= 5.x, ``"past_key_values"`` before).
        prefix: ``k``, the shared prefix length.
    """

    ids: torch.Tensor
    mask: torch.Tensor
    cache: object
    cached: int
    cache_arg: str
    prefix: int


def common_prefix_length(ids: torch.Tensor, mask: torch.Tensor) -> int:
    """Length ``k`` of the token prefix shared by every row's real tokens, at most
    ``min_r len_r - 1`` (every row keeps one token of its own).

    Args:
        ids, mask: ``[P, T]`` left-padded token ids and attention mask.
    """
    lengths = mask.sum(-1)
    shortest = int(lengths.min())
    if ids.shape[0] == 0 or shortest < 2:
        return 0
    T = ids.shape[1]
    # row p's real tokens are ids[p, T - len_p:]; take the first `shortest` of each
    start = (T - lengths)[:, None] + torch.arange(shortest, device=ids.device)[None, :]
    heads = ids.gather(1, start)  # [P, shortest]
    same = (heads == heads[:1]).all(0)  # [shortest]
    differs = (~same).nonzero()
    k = shortest if differs.numel() == 0 else int(differs[0, 0])
    return min(k, shortest - 1)


def relayout(ids: torch.Tensor, mask: torch.Tensor, k: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[pad | prefix | suffix]`` -> ``[prefix | pad | suffix]`` for a prefix of ``k`` tokens
    common to every row (left padding in, ``[P, T]`` out, same ``T``)."""
    P, T = ids.shape
    lengths = mask.sum(-1)
    col = torch.arange(T, device=ids.device)[None, :].expand(P, T)
    in_prefix = col < k
    in_suffix = col >= (T - (lengths[:, None] - k))
    new_ids = torch.full_like(ids, pad_id)
    new_ids[in_prefix] = ids[0, T - int(lengths[0]):][:k].repeat(P)
    new_ids[in_suffix] = ids[in_suffix]  # the suffix keeps its columns (right-aligned)
    new_mask = (in_prefix | in_suffix).to(mask.dtype)
    return new_ids, new_mask


def _run(model, cache_arg, ids, mask, cache, start: int):
    """Forward columns ``[start, mask.shape[1])`` of the rows, with ``cache`` holding
    ``[0, start)``; returns the grown cache (``None`` when the model gave none back)."""
    kwargs = dict(input_ids=ids[:, start:], attention_mask=mask,
                  position_ids=positions_from_mask(mask)[:, start:], use_cache=True)
    kwargs[cache_arg] = cache
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        kwargs["logits_to_keep"] = 1
    out = model(**kwargs)
    return getattr(out, "cache", None) if getattr(out, "cache", None) is not None \
        else getattr(out, "past_key_values", None)


@torch.no_grad()
def shared_prefill(model, ids: torch.Tensor, mask: torch.Tensor, prompt_of_row: torch.Tensor, *,
                   pad_id: int, groups: list | None = None,
                   steer_prefix: Callable[[list[int]], contextlib.AbstractContextManager] | None = None,
                   extra_columns: int = 0,
                   steer_rows: Callable[[], contextlib.AbstractContextManager] | None = None,
                   unsteered_layers: int = 0) -> SharedPrompt | None:
    """Prefill the rows' prompts, computing shared pieces once (see the module docstring).

    Args:
        model: a causal LM whose ``forward`` takes a KV cache.
        ids, mask: ``[P, T]`` left-padded prompts.
        prompt_of_row: ``[R]`` int64, row ``r``'s prompt index.
        pad_id: token id written into the re-laid-out padding.
        groups: ``None`` when no prompt token is steered (mode B); else ``[R]`` hashable group
            ids, rows of one group steering their prompt identically (mode A).
        steer_prefix: mode A: ``steer_prefix(rows)`` returns the context that steers the
            prefix pass, whose batch row ``i`` is row ``rows[i]`` of the sweep.
        extra_columns: how many columns the caller will add to the cache after the prompt
            (generated tokens); sliding-window layers are shared only if the whole fits their
            window (:func:`steerkern.kvcache.is_gatherable`).
        steer_rows: mode A: the context that steers a pass over all ``R`` rows (each its own
            arm). With ``unsteered_layers = d >= 1`` (no row steers decoder layers ``[0, d)``),
            the suffix columns but the last also run here: layers ``[0, d)`` once per prompt,
            the rest per row (:mod:`steerkern.trunk`), so the cache holds ``T - 1`` columns.

    Returns:
        :class:`SharedPrompt`, or ``None`` when sharing saves nothing or the model's cache
        cannot be shared (then run the plain batch).
    """
    cache_arg = cache_argument(model)
    if cache_arg is None:
        return None
    device = ids.device
    prompt_of_row = prompt_of_row.to(device)
    used, row_prompt = torch.unique(prompt_of_row, return_inverse=True)  # P' prompts
    ids_u, mask_u = ids[used], mask[used]
    # drop the columns that are padding in every used prompt
    width = int(mask_u.sum(-1).max())
    ids_u, mask_u = ids_u[:, -width:], mask_u[:, -width:]
    rows, T = prompt_of_row.numel(), width
    if empty_model_cache(model, T + extra_columns) is None:
        return None
    shareable = lambda cache: is_gatherable(cache, T + extra_columns)
    k = common_prefix_length(ids_u, mask_u)
    new_ids, new_mask = relayout(ids_u, mask_u, k, pad_id)
    if groups is not None:
        keys = list(dict.fromkeys(groups))
        group_of_row = torch.tensor([keys.index(g) for g in groups], device=device)
        representatives = [groups.index(g) for g in keys]
        bottom = bottom_layers(model, unsteered_layers) if steer_rows is not None else None
        share_prefix = k > 0 and len(keys) < rows
        share_bottom = bottom is not None and used.numel() < rows and T - 1 > k
        if not (share_prefix or share_bottom):
            return None
        cache, cached = None, 0
        if k > 0:
            one = torch.zeros(len(keys), dtype=torch.long, device=device)
            cache = _run_rows(model, cache_arg, new_ids[:1, :k], new_mask[:1, :k], None, 0, one,
                              lambda: steer_prefix(representatives), bottom, T + extra_columns)
            if not shareable(cache):
                return None
            cache, cached = select_rows(cache, group_of_row), k
        if share_bottom:
            cache = _run_rows(model, cache_arg, new_ids[:, :T - 1], new_mask[:, :T - 1], cache, k,
                              row_prompt, steer_rows, bottom, T + extra_columns)
            if not shareable(cache):
                return None
            cached = T - 1
    else:
        cached = T - 1
        if cached == 0 or (k == 0 and used.numel() == rows):
            return None
        cache = None
        if k > 0:
            cache = _run(model, cache_arg, new_ids[:1, :k], new_mask[:1, :k], None, 0)
            if not shareable(cache):
                return None
            cache = select_rows(cache, torch.zeros(used.numel(), dtype=torch.long, device=device))
        if cached > k:
            cache = _run(model, cache_arg, new_ids[:, :cached], new_mask[:, :cached], cache, k)
            if not shareable(cache):
                return None
        cache = select_rows(cache, row_prompt)
    return SharedPrompt(new_ids[row_prompt], new_mask[row_prompt], cache, cached, cache_arg, k)


def _run_rows(model, cache_arg, ids, mask, cache, start: int, row_seq: torch.Tensor, steering,
              bottom: list | None, max_length: int):
    """Columns ``[start, T')`` of ``R`` rows under ``steering()``, row ``r`` being sequence
    ``row_seq[r]`` of ``ids``/``mask`` ``[S, T']``; ``cache`` holds the rows' ``[0, start)``
    (``None``: nothing yet). With ``bottom`` (the unsteered decoder layers ``[0, d)``,
    :mod:`steerkern.trunk`) and ``S < R``, those layers run the ``S`` sequences once and the
    rest runs per row; their new cache columns are then copied to the rows. Returns the rows'
    cache of ``[0, T')``."""
    rows = row_seq.numel()
    ids_r, mask_r = ids[row_seq], mask[row_seq]
    ran = None
    if bottom is not None and ids.shape[0] < rows:
        sequence_cache = empty_model_cache(model, max_length)
        if sequence_cache is not None:
            if cache is not None:  # every layer, so that all report `start` cached columns
                seqs = row_seq.tolist()
                first = torch.tensor([seqs.index(q) for q in range(ids.shape[0])])
                for index, layer in filled_layers(cache):
                    pick = first.to(layer.keys.device)
                    sequence_cache.update(layer.keys.index_select(0, pick),
                                          layer.values.index_select(0, pick), index)
            ran = run_bottom(model, bottom,
                             lambda: _run(model, cache_arg, ids, mask, sequence_cache, start))
    if ran is None:
        with steering():
            return _run(model, cache_arg, ids_r, mask_r, cache, start)
    hidden, layout = ran
    # with no cache yet the model builds its own, as in a plain pass: the caller checks it
    with skip_bottom(bottom, select_sequences(hidden, row_seq), layout), steering():
        cache = _run(model, cache_arg, ids_r, mask_r, cache, start)
    if not is_gatherable(cache, max_length):
        return cache
    for index, layer in filled_layers(sequence_cache):
        if index < len(bottom):
            keys, values = layer.keys[:, :, start:], layer.values[:, :, start:]
            cache.update(keys.index_select(0, row_seq.to(keys.device)),
                         values.index_select(0, row_seq.to(values.device)), index)
    return cache


def forward_rest(model, shared: SharedPrompt, ids: torch.Tensor, mask: torch.Tensor, keep: int) -> torch.Tensor:
    """Logits of the last ``keep`` columns ``[R, keep, V]`` of ``ids``/``mask`` ``[R, T2]``
    (``T2 >= T``: the re-laid-out prompt, optionally followed by more tokens), running only
    columns ``[shared.cached, T2)`` on top of ``shared.cache`` (which this consumes)."""
    start = shared.cached
    if keep > ids.shape[1] - start:
        raise ValueError(f"keep={keep} exceeds the {ids.shape[1] - start} uncached columns")
    kwargs = dict(input_ids=ids[:, start:], attention_mask=mask,
                  position_ids=positions_from_mask(mask)[:, start:], use_cache=True)
    kwargs[shared.cache_arg] = shared.cache
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        kwargs["logits_to_keep"] = keep
    return model(**kwargs).logits[:, -keep:]
