"""KV-cache helpers shared by the code that computes a piece of prompt once and reuses its keys
and values for several rows (:mod:`steerkern.prefill` for sweeps, :mod:`steerkern.capture`'s
prefix tree for extraction).

Only a plain ``transformers`` dynamic cache (one ``DynamicLayer`` per layer, keys and values
``[B, H, S, head_dim]``) is handled: its rows can be gathered and its columns grow by
concatenation. Sliding-window, quantised, offloaded, static or recurrent caches are not, and
callers fall back to running every row in full.
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


def is_plain_dynamic(cache) -> bool:
    """Whether ``cache`` is a ``DynamicCache`` made only of ``DynamicLayer`` s, not offloaded."""
    try:
        from transformers.cache_utils import DynamicCache, DynamicLayer
    except ImportError:  # pragma: no cover - transformers without the Cache classes
        return False
    if type(cache) is not DynamicCache or getattr(cache, "offloading", False):
        return False
    layers = getattr(cache, "layers", None)
    if layers is None:
        return False
    return all(type(layer) is DynamicLayer for layer in layers)


def empty_model_cache(model):
    """The empty cache ``model`` would build for itself (``DynamicCache(config=...)``), when it
    is a plain dynamic cache; ``None`` otherwise (no cache argument, sliding-window layers, or a
    transformers without ``DynamicCache(config=...)``)."""
    if cache_argument(model) is None:
        return None
    try:
        from transformers.cache_utils import DynamicCache

        cache = DynamicCache(config=model.config)
    except (ImportError, TypeError, ValueError, AttributeError):
        return None
    return cache if is_plain_dynamic(cache) else None


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
