"""What a steering bank reads from one forward pass of the model: how many tokens the pass's
cache already holds (:func:`past_length`), whether the pass checks assisted decoding's drafts,
runs while being compiled or captured, or re-runs layers inside a backward pass, and the names of
the model's positional arguments."""

from __future__ import annotations

import inspect
import weakref

import torch
from torch import nn


def past_length(kwargs, mask, length, recurrent_seen) -> int | torch.Tensor:
    """Tokens already in the KV cache: from the attention mask's shape when there is one (no
    host sync), else from generate's ``cache_position`` (the column the pass starts at), else
    from the cache, where a static cache answers with a 0-dim device tensor
    (left as a tensor so that a CUDA graph capture never waits on the host); legacy tuple
    caches give their keys' length. A recurrent cache (Mamba-style state, no sequence length)
    is counted in ``recurrent_seen``: 0 while it holds no state, then the tokens this context
    has fed it; every pass is counted, also those that come with a mask (Mamba 2 and Falcon
    Mamba get the mask for the prompt only, not for the decode steps). Last,
    ``cache_position`` (older transformers' recurrent models)."""
    cache = cache_of(kwargs)
    counted = _recurrent_past(cache, length, recurrent_seen) if _is_recurrent(cache) else None
    if mask is not None:
        return mask.shape[1] - length
    if isinstance(cache, (tuple, list)) and cache and isinstance(cache[0], (tuple, list)):
        return int(cache[0][0].shape[-2])  # legacy tuples: ((keys [B, H, S, d], values), ...)
    position = kwargs.get("cache_position")
    start = position.reshape(-1)[0] if isinstance(position, torch.Tensor) and position.numel() else None
    if cache is not None and counted is None and start is not None:
        # the column this pass starts at; a static cache's get_seq_length counts the non-zero
        # keys of row 0 (transformers 4.5x: short of the prompt when row 0 starts with pads)
        return start
    if cache is not None and hasattr(cache, "get_seq_length"):
        try:
            past = cache.get_seq_length()
        except ValueError:  # recurrent layers only: no sequence length to ask
            return counted if counted is not None else _recurrent_past(cache, length, recurrent_seen)
        return past if isinstance(past, torch.Tensor) else int(past) or _later_layers_length(cache)
    return start if start is not None else 0


def padded_mask_past(cache, mask, length: int, cache_position=None):
    """Tokens ``cache`` holds before this pass when the pass's 2-D ``mask`` is not ``[B, past +
    length]`` but padded with zeros on the right to the cache's capacity (BLOOM under a static
    cache: its ``create_masks_for_generate`` keeps the 2-D mask its ALiBi needs at the cache's
    static length, so ``mask.shape[1] - length`` is not the past and ``mask[:, -length:]`` are
    not this pass's columns). ``None`` for a mask of the usual form; else the column the pass
    starts at: ``cache_position``'s first entry when the call has one (a 0-dim tensor: no host
    sync), else the cache's own count (transformers 4.5x's static cache counts the non-zero keys
    of row 0, short of the past when that row starts with pads)."""
    if mask is None or cache is None or not hasattr(cache, "get_max_length"):
        return None
    try:
        capacity = cache.get_max_length()
    except (ValueError, TypeError, AttributeError, IndexError):  # no layers yet, or no such answer
        return None
    if isinstance(capacity, torch.Tensor) or not isinstance(capacity, int) or capacity != mask.shape[1]:
        return None
    if isinstance(cache_position, torch.Tensor) and cache_position.numel():
        return cache_position.reshape(-1)[0]
    try:
        past = cache.get_seq_length()
    except (ValueError, TypeError):
        return None
    if not isinstance(past, torch.Tensor) and past + length == capacity:
        return None  # the usual form (a full cache's last pass reads the same either way)
    return past


def _later_layers_length(cache) -> int:
    """The longest key/value length of ``cache``'s layers after the first, for a cache whose
    first layer stays empty while the others fill (MiniMax keeps its linear-attention layers'
    state apart, so its ``get_seq_length()``, which asks layer 0, answers 0 while decoding)."""
    longest = 0
    for index in range(1, len(cache) if hasattr(cache, "__len__") else 0):
        try:
            length = cache.get_seq_length(index)
        except (ValueError, TypeError, IndexError):  # a layer that keeps no sequence length
            continue
        if isinstance(length, torch.Tensor):
            length = int(length)
        longest = max(longest, length)
    return longest


def _is_recurrent(cache) -> bool:
    """Whether ``cache`` has recurrent layers (a state that records whether it holds tokens,
    ``has_previous_state``, but not how many)."""
    return any(hasattr(layer, "has_previous_state") for layer in getattr(cache, "layers", None) or ())


def cache_of(kwargs):
    """The cache object a forward call was given (``None`` without one)."""
    return next((kwargs[k] for k in ("cache", "past_key_values", "cache_params")
                 if kwargs.get(k) is not None), None)


def in_backward() -> bool:
    """Whether a backward pass is running (where gradient checkpointing re-runs layers); true
    when torch cannot say."""
    task = getattr(torch._C, "_current_graph_task_id", None)
    return task is None or task() != -1


def tracing(tokens: torch.Tensor) -> bool:
    """Whether this pass is being compiled (dynamo) or captured into a CUDA graph: no host sync
    may happen then (a host value read there would be baked into the graph)."""
    compiling = getattr(torch.compiler, "is_compiling", None)
    if compiling is not None and compiling():
        return True
    return tokens.is_cuda and torch.cuda.is_current_stream_capturing()


def checks_drafts(kwargs, length: int) -> bool:
    """Whether a pass of ``length`` tokens checks assisted decoding's draft tokens: generate
    then asks for the logits of every token of the pass (``logits_to_keep == length``), where a
    prefill asks for the last one only."""
    keep = kwargs.get("logits_to_keep")
    return isinstance(keep, int) and not isinstance(keep, bool) and keep == length


def positional_names(model: nn.Module) -> tuple[str, ...]:
    """Names of ``model.forward``'s positional parameters, in order (``("input_ids",)`` when
    its signature cannot be read)."""
    try:
        parameters = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return ("input_ids",)
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    names = tuple(p.name for p in parameters if p.kind in kinds)
    return names or ("input_ids",)


def _recurrent_past(cache, length: int, seen: weakref.WeakKeyDictionary) -> int:
    started = any(any(getattr(layer, "has_previous_state", {}).values())
                  for layer in getattr(cache, "layers", ()))
    past = seen.get(cache, 0) if started else 0
    seen[cache] = past + length
    return past
