"""KV-cache helpers shared by the code that computes a piece of prompt once and reuses its keys
and values for several rows (:mod:`steerkern.prefill` for sweeps, :mod:`steerkern.capture`'s
prefix tree for extraction).

Only a ``transformers`` dynamic cache is handled (keys and values ``[B, H, S, head_dim]`` per
layer): its rows can be gathered and its columns grow by concatenation. Sliding-window layers
qualify while the sequence fits their window (they then behave as full layers); quantised,
offloaded, static or recurrent caches do not, and callers fall back to running every row in
full.
"""

from __future__ import annotations

import inspect

import torch


def cache_argument(model) -> str | None:
    """The name ``model.forward`` takes a KV cache under, or ``None``."""
    params = inspect.signature(model.forward).parameters
    for name in ("cache", "past_key_values"):
        if name in params:
            return name
    return None


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Position ids ``[B, T]`` that count real tokens: ``cumsum(mask) - 1`` (pads get 0 and are
    masked anyway), so padding anywhere in a row leaves every real token's position unchanged."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def is_gatherable(cache, max_length: int = 0) -> bool:
    """Whether ``cache`` is a ``DynamicCache`` (not offloaded) whose rows can be gathered and
    whose columns can grow to ``max_length`` without changing what any query attends to: every
    layer a ``DynamicLayer``, or a ``DynamicSlidingWindowLayer`` whose window is longer than
    ``max_length`` (it then keeps every column and its mask hides none, as a full layer would)."""
    try:
        from transformers.cache_utils import DynamicCache, DynamicLayer, DynamicSlidingWindowLayer
    except ImportError:  # pragma: no cover - transformers without the Cache classes
        return False
    if type(cache) is not DynamicCache or getattr(cache, "offloading", False):
        return False
    layers = getattr(cache, "layers", None)
    if layers is None:
        return False
    for layer in layers:
        if type(layer) is DynamicSlidingWindowLayer:
            if not max_length < layer.sliding_window:
                return False
        elif type(layer) is not DynamicLayer:
            return False
    return True


def empty_model_cache(model, max_length: int):
    """The empty cache ``model`` builds for itself (``DynamicCache(config=...)``) when it
    :func:`is_gatherable` up to ``max_length`` columns; ``None`` otherwise (no cache argument,
    windows shorter than ``max_length``, other cache layers, or a transformers without
    ``DynamicCache(config=...)``)."""
    if cache_argument(model) is None:
        return None
    try:
        from transformers.cache_utils import DynamicCache

        cache = DynamicCache(config=model.config)
    except (ImportError, TypeError, ValueError, AttributeError):
        return None
    return cache if is_gatherable(cache, max_length) else None


def filled_layers(cache):
    """``(layer_index, layer)`` for the layers of ``cache`` that hold keys (a forward pass that
    stopped early fills only the layers it ran)."""
    for index, layer in enumerate(cache.layers):
        if getattr(layer, "keys", None) is not None and getattr(layer, "is_initialized", True):
            yield index, layer


def select_rows(cache, index: torch.Tensor):
    """Rows ``index`` of every filled layer's keys and values, in place (``[B, H, S, D]`` ->
    ``[len(index), H, S, D]``); the index moves to each layer's device (models split over
    devices). Returns ``cache``."""
    for _, layer in filled_layers(cache):
        layer.keys = layer.keys.index_select(0, index.to(layer.keys.device))
        layer.values = layer.values.index_select(0, index.to(layer.values.device))
    return cache
