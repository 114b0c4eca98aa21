"""KV-cache helpers shared by the code that computes a piece of prompt once and reuses its keys
and values for several rows (:mod:`steerkern.prefill` for sweeps, :mod:`steerkern.capture`'s
prefix tree for extraction).

Only a ``transformers`` dynamic cache is handled (keys and values ``[B, H, S, head_dim]`` per
layer): its rows can be gathered and its columns grow by concatenation. Sliding-window layers
qualify while the sequence fits their window (they then behave as full layers); quantised,
offloaded, static or recurrent caches do not, and callers fall back to running every row in
full.

:func:`reserve_columns` makes such a cache write new columns in place instead of concatenating:
a dynamic layer's ``torch.cat`` reallocates and copies the whole layer at every decode step,
which for a batch of many rows costs more per row than for a small one (a fresh multi-megabyte
allocation per layer and step, outside the CPU caches).
"""

from __future__ import annotations

import functools
import inspect
import sys

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
    ``max_length`` (it then keeps every column and its mask hides none, as a full layer would).
    Before transformers 4.54 a ``DynamicCache`` holds ``key_cache`` / ``value_cache`` lists that
    keep every column; it qualifies as it is."""
    try:
        from transformers.cache_utils import DynamicCache
    except ImportError:  # pragma: no cover - transformers without the Cache classes
        return False
    if type(cache) is not DynamicCache or getattr(cache, "offloading", False):
        return False
    layers = getattr(cache, "layers", None)
    if layers is None:
        return isinstance(getattr(cache, "key_cache", None), list)
    import transformers.cache_utils as cache_utils

    full = (cache_utils.DynamicLayer, _reserved_layer_class())
    sliding = getattr(cache_utils, "DynamicSlidingWindowLayer", None)  # transformers >= 4.56
    for layer in layers:
        if sliding is not None and type(layer) is sliding:
            if not max_length < layer.sliding_window:
                return False
        elif type(layer) not in full:
            return False
    return True


def reserve_columns(cache, columns: int):
    """Turn every full dynamic layer of ``cache`` into one that keeps its keys and values in
    buffers of ``columns`` columns (``[B, H, columns, head_dim]``, the filled ones copied in):
    each ``update`` then writes its new columns in place and the layer's ``keys`` / ``values``
    are views ``buffer[:, :, :used]``, the same values a concatenating layer would hold. A
    layer that outgrows its buffer, or whose keys were replaced (rows gathered, beams
    reordered, moved to another device), gets a new buffer at its next update (twice the
    columns when it outgrew it). Layers the cache adds later are reserved too. Sliding-window
    layers, offloaded caches and caches of other kinds (or of transformers before 4.54, which
    keeps lists) are left as they are. Returns ``cache``."""
    layers = getattr(cache, "layers", None)
    reserved = _reserved_layer_class()
    if reserved is None or not isinstance(layers, list) or getattr(cache, "offloading", False):
        return cache  # an offloaded layer's keys move to the host and back at every step
    import transformers.cache_utils as cache_utils

    for index, layer in enumerate(layers):
        if type(layer) is cache_utils.DynamicLayer:
            layers[index] = reserved.replacing(layer, columns)
    # layers a dynamic cache adds on the fly: `layer_class_to_replicate()` (transformers >=
    # 4.57) or `layer_classes(**kwargs)` (4.55-4.56)
    for attribute in ("layer_class_to_replicate", "layer_classes"):
        if getattr(cache, attribute, None) is cache_utils.DynamicLayer:
            setattr(cache, attribute, lambda **kwargs: reserved.replacing(
                cache_utils.DynamicLayer(**kwargs), columns))
    return cache


@functools.cache
def _reserved_layer_class():
    """The ``DynamicLayer`` subclass behind :func:`reserve_columns` (built on first use, as
    its base exists only in transformers >= 4.54); ``None`` without it."""
    try:
        from transformers.cache_utils import DynamicLayer
    except ImportError:
        return None

    class ReservedColumnsLayer(DynamicLayer):
        """A dynamic cache layer whose keys and values are prefixes of preallocated buffers
        (:func:`reserve_columns`)."""

        @classmethod
        def replacing(cls, layer, columns: int):
            new = cls.__new__(cls)
            new.__dict__.update(layer.__dict__)
            new.columns, new._buffers = max(int(columns), 1), None
            return new

        def _backs(self, tensor, buffer) -> bool:
            """Whether ``tensor`` is a prefix ``buffer[:, :, :n]``."""
            return (isinstance(tensor, torch.Tensor) and tensor.dim() == 4
                    and tensor.device == buffer.device and tensor.dtype == buffer.dtype
                    and tensor.data_ptr() == buffer.data_ptr() and tensor.stride() == buffer.stride()
                    and tensor.shape[:2] == buffer.shape[:2] and tensor.shape[3] == buffer.shape[3])

        def update(self, key_states, value_states, *args, **kwargs):
            keys, values = getattr(self, "keys", None), getattr(self, "values", None)
            filled = (getattr(self, "is_initialized", True) and isinstance(keys, torch.Tensor)
                      and keys.dim() == 4 and keys.numel() > 0)
            used = keys.shape[2] if filled else 0
            needed = used + key_states.shape[2]
            buffers = self._buffers
            fits = buffers is not None and needed <= buffers[0].shape[2] and all(
                buffer.shape[:2] == states.shape[:2] and buffer.shape[3] == states.shape[3]
                and buffer.dtype == states.dtype and buffer.device == states.device
                for buffer, states in zip(buffers, (key_states, value_states)))
            if filled and fits:
                fits = self._backs(keys, buffers[0]) and self._backs(values, buffers[1])
            if not fits:
                grown = buffers is not None and needed > buffers[0].shape[2]
                capacity = max(needed, 2 * buffers[0].shape[2] if grown else self.columns)
                buffers = tuple(states.new_empty(*states.shape[:2], capacity, states.shape[3])
                                for states in (key_states, value_states))
                if filled:
                    buffers[0][:, :, :used].copy_(keys)
                    buffers[1][:, :, :used].copy_(values)
                self._buffers = buffers
            buffers[0][:, :, used:needed].copy_(key_states)
            buffers[1][:, :, used:needed].copy_(value_states)
            self.keys, self.values = buffers[0][:, :, :needed], buffers[1][:, :, :needed]
            self.dtype, self.device = key_states.dtype, key_states.device
            self.is_initialized = True
            return self.keys, self.values

        def reset(self) -> None:
            self._buffers = None
            super().reset()

    return ReservedColumnsLayer


def _rope_parameter_sets(config) -> list[dict]:
    """The rotary-embedding settings of ``config`` (``rope_parameters`` in transformers 5.x,
    possibly one per attention type; ``rope_scaling`` before), of its text config too."""
    found = []
    for cfg in {id(c): c for c in (config, getattr(config, "get_text_config", lambda: config)())}.values():
        for name in ("rope_parameters", "rope_scaling"):
            value = getattr(cfg, name, None)
            if isinstance(value, dict):
                nested = [v for v in value.values() if isinstance(v, dict)]
                found.extend(nested if nested and not ("rope_type" in value or "type" in value) else [value])
    return found


def rope_depends_on_length(config, length: int) -> bool:
    """Whether the rotary frequencies of a pass change with its length before ``length``
    tokens: "dynamic" NTK scaling and "longrope" switch once a pass runs past the original
    context. A prefix run alone would then cache keys rotated unlike a whole pass's."""
    for params in _rope_parameter_sets(config):
        if params.get("rope_type", params.get("type")) in ("dynamic", "longrope"):
            limits = [v for v in (params.get("original_max_position_embeddings"),
                                  getattr(config, "original_max_position_embeddings", None),
                                  getattr(config, "max_position_embeddings", None)) if isinstance(v, int)]
            if not limits or length > min(limits):
                return True
    return False


def _keeps_rope_deltas_before_5(model) -> bool:
    """Qwen2-VL-style models (a module with ``rope_deltas``) under transformers 4.x: their
    ``generate`` handed a filled cache derives positions from the uncached columns against the
    whole mask and fails; 5.x recomputes them (``steerkern.sweep._generate`` clears the stored
    offsets for it)."""
    import transformers

    return int(transformers.__version__.split(".")[0]) < 5 and any(
        hasattr(module, "rope_deltas") for module in model.modules())


def empty_model_cache(model, max_length: int):
    """The empty cache ``model`` builds for itself (``DynamicCache(config=...)``, or
    ``DynamicCache()`` before transformers 4.56) when it :func:`is_gatherable` up to
    ``max_length`` columns; ``None`` otherwise (no cache argument, windows shorter than
    ``max_length``, other cache layers; models whose ``forward`` takes no ``position_ids``:
    they place tokens by column (MPT's ALiBi), so the padding gap between a shared prefix and
    each row's rest would move them; models inside a ``steer`` context that steers by position,
    :func:`steers_by_position`; Qwen2-VL-style models before transformers 5). Before 4.56 a dynamic cache does not know the model's
    sliding windows, and some models of that era expect a windowed cache: those qualify only
    while ``max_length`` is shorter than the config's ``sliding_window``."""
    if cache_argument(model) is None or "position_ids" not in inspect.signature(model.forward).parameters:
        return None
    if steers_by_position(model):
        return None
    if rope_depends_on_length(model.config, max_length):
        return None
    if getattr(model, "_supports_cache_class", True) is False:
        return None  # models that still take tuples (GPT-2 before transformers 4.53)
    if _has_own_cache_class(model):
        return None
    if _keeps_rope_deltas_before_5(model):
        return None
    try:
        from transformers.cache_utils import DynamicCache
    except ImportError:  # pragma: no cover - transformers without the Cache classes
        return None
    try:
        cache = DynamicCache(config=model.config)
    except (TypeError, ValueError, AttributeError):
        cache = DynamicCache()
        window = _config_sliding_window(model.config)
        if window is not None and not max_length < window:
            return None
    return cache if is_gatherable(cache, max_length) else None


def _has_own_cache_class(model) -> bool:
    """Whether the model's modeling module defines a cache class of its own (LFM2's
    ``Lfm2HybridConvCache`` before transformers 5): the model expects that cache, not a
    dynamic one."""
    module = sys.modules.get(type(model).__module__)
    return module is not None and any(
        isinstance(value, type) and name.endswith("Cache") and value.__module__ == module.__name__
        for name, value in vars(module).items())


def steers_by_position(model) -> bool:
    """Whether a ``steer`` context attached to ``model`` (or to one of its sub-modules) steers
    only some positions (``positions="prompt"`` / ``"generated"`` or a mask). Such a context
    tells prompt from generated tokens by the forward passes it sees (a one-token pass on top of
    a cache is a generated token), and sharing splits a prompt into other passes than the plain
    batch's (the last prompt token alone on top of the shared cache): its tokens would be
    steered differently, so callers run the plain batch instead."""
    control = sys.modules.get("steerkern.control")
    if control is None:  # never imported: no steering context can be attached
        return False
    for module in model.modules():
        for hook in module._forward_pre_hooks.values():
            bank = getattr(hook, "__self__", None)
            if isinstance(bank, control.SteeringBank) and bank.positions != "all":
                return True
    return False


def _config_sliding_window(config) -> int | None:
    """The config's (or its text config's) ``sliding_window``, when it has one."""
    for part in (config, getattr(config, "text_config", None)):
        window = getattr(part, "sliding_window", None) if part is not None else None
        if isinstance(window, int) and window > 0:
            return window
    return None


class _ListLayer:
    """Layer ``index`` of a transformers < 4.54 ``DynamicCache`` (``key_cache`` /
    ``value_cache`` lists), with the ``keys`` / ``values`` attributes of later cache layers."""

    def __init__(self, cache, index: int):
        self._cache, self._index = cache, index

    @property
    def keys(self):
        return self._cache.key_cache[self._index]

    @keys.setter
    def keys(self, value):
        self._cache.key_cache[self._index] = value

    @property
    def values(self):
        return self._cache.value_cache[self._index]

    @values.setter
    def values(self, value):
        self._cache.value_cache[self._index] = value


def _layers(cache):
    layers = getattr(cache, "layers", None)
    if layers is not None:
        return layers
    return [_ListLayer(cache, index) for index in range(len(cache.key_cache))]


def filled_layers(cache):
    """``(layer_index, layer)`` for the layers of ``cache`` that hold keys (a forward pass that
    stopped early fills only the layers it ran)."""
    for index, layer in enumerate(_layers(cache)):
        keys = getattr(layer, "keys", None)
        # transformers < 4.54 marks a layer a pass skipped with an empty list
        if isinstance(keys, torch.Tensor) and getattr(layer, "is_initialized", True):
            yield index, layer


def select_rows(cache, index: torch.Tensor):
    """Rows ``index`` of every filled layer's keys and values, in place (``[B, H, S, D]`` ->
    ``[len(index), H, S, D]``); the index moves to each layer's device (models split over
    devices). Returns ``cache``."""
    for _, layer in filled_layers(cache):
        layer.keys = layer.keys.index_select(0, index.to(layer.keys.device))
        layer.values = layer.values.index_select(0, index.to(layer.values.device))
    return cache
