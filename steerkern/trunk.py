"""The unsteered bottom of the model, run once per prompt for every row that shares the prompt.

Steering sits at some decoder layers; call ``d`` the lowest layer any row of a sweep steers (a
residual part at layer ``d`` or a part on one of its sub-modules). Layers ``[0, d)`` then see
the same input for every row of one prompt, whatever its steering: their output over the
prompt tokens is a function of the prompt alone. A sweep of ``R = C x P`` rows whose prompt
tokens are steered can therefore run those columns in two passes:

- **bottom**: the ``P`` distinct prompts through layers ``[0, d)`` (:func:`run_bottom`, which
  stops the forward pass after layer ``d - 1`` and returns its output ``h [P, L, D]``), filling
  the bottom layers of a ``P``-row KV cache;
- **top**: the ``R`` rows under their steering with layers ``[0, d)`` not computing
  (:func:`skip_bottom`: layer ``d - 1`` returns ``h[prompt_of_row]``, the layers below return
  their input), filling the top layers of the ``R``-row cache; the bottom layers' new columns
  are then copied from the ``P``-row cache.

Token work over those columns drops from ``R N`` layer-rows to ``P d + R (N - d)`` for ``N``
layers. :mod:`steerkern.prefill` uses it for the prompt suffixes of sweeps that steer the
prompt (``positions="all"`` / ``"prompt"``).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from steerkern.models import decoder_layers


class _StopAfterBottom(Exception):
    """Raised by the hook on layer ``d - 1`` to end the bottom pass."""


def lowest_steered_layer(vectors, slots) -> int:
    """``d``: the lowest decoder layer that a row's vector has a part at (``slots``: each row's
    index into ``vectors``, -1 for an unsteered row); 0 when no row is steered."""
    layers = [layer for slot in set(int(s) for s in slots) if slot >= 0
              for layer, _target in vectors[slot].parts]
    return min(layers) if layers else 0


def bottom_layers(model: nn.Module, depth: int) -> list[nn.Module] | None:
    """Layers ``[0, depth)`` when they can be run once for many rows: ``depth >= 1`` and no
    hook on any of their modules (a hook there could be steering or reading them per row);
    ``None`` otherwise."""
    if depth < 1:
        return None
    try:
        layers = list(decoder_layers(model))[:depth]
    except ValueError:
        return None
    if len(layers) < depth:
        return None
    for layer in layers:
        for module in layer.modules():
            if module._forward_hooks or module._forward_pre_hooks:
                return None
    return layers


def _hidden_of(args, kwargs) -> torch.Tensor:
    hidden = args[0] if args else kwargs.get("hidden_states")
    if not isinstance(hidden, torch.Tensor):
        raise TypeError("the decoder layer was called without hidden states")
    return hidden


def _layout(output) -> int | None:
    """``0`` for a tensor output, ``n`` for an ``n``-tuple ``(hidden, None, ...)``; ``None`` for
    anything else (extra outputs per row cannot be reproduced without running the layer)."""
    if isinstance(output, torch.Tensor):
        return 0
    if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor) \
            and all(extra is None for extra in output[1:]):
        return len(output)
    return None


def _as_layout(hidden: torch.Tensor, layout: int):
    return hidden if layout == 0 else (hidden,) + (None,) * (layout - 1)


def run_bottom(model: nn.Module, layers: list[nn.Module], call) -> tuple[torch.Tensor, int] | None:
    """Run ``call()`` (a forward pass of ``model``) only through ``layers`` (the bottom ones).

    Returns:
        ``(hidden, layout)``: the last bottom layer's output ``[B, L, D]`` (``[S, B, L, D]``
        for a residual stream kept in ``S`` copies, Gemma 3n) and how the layers return it (see
        :func:`skip_bottom`); ``None`` when the pass never reached that layer or its output
        carries more than the hidden states.
    """
    seen: dict = {}

    def stop(module, args, output):
        seen["output"] = output
        raise _StopAfterBottom

    handle = layers[-1].register_forward_hook(stop)
    try:
        call()
    except _StopAfterBottom:
        pass
    finally:
        handle.remove()
    output = seen.get("output")
    layout = _layout(output) if output is not None else None
    if layout is None:
        return None
    hidden = output if layout == 0 else output[0]
    if hidden.dim() < 3:
        return None
    return hidden.detach(), layout


def select_sequences(hidden: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Rows ``rows`` (``[R]`` indices of sequences) of a bottom output: along its batch axis,
    the third from last (``[B, L, D]`` -> ``[R, L, D]``; a residual stream kept in ``S`` copies,
    Gemma 3n's ``[S, B, L, D]`` -> ``[S, R, L, D]``)."""
    return hidden.index_select(hidden.dim() - 3, rows.to(hidden.device))


@contextlib.contextmanager
def skip_bottom(layers: list[nn.Module], hidden: torch.Tensor, layout: int):
    """Within the context, ``layers`` (the bottom ones) do not compute: the last returns
    ``hidden`` (``[B, L, D]`` or ``[S, B, L, D]``, the rows and columns of the pass to come,
    :func:`select_sequences`), the others return
    their input, each in ``layout`` (a tensor, or a tuple padded with ``None``). Their own
    ``forward`` is restored on exit, exceptions included."""

    def passthrough(*args, **kwargs):
        return _as_layout(_hidden_of(args, kwargs), layout)

    def last(*args, **kwargs):
        given = _hidden_of(args, kwargs)
        if given.shape[:-1] != hidden.shape[:-1]:
            raise RuntimeError(f"skip_bottom: the pass has hidden states of shape "
                               f"{tuple(given.shape)}, the precomputed bottom {tuple(hidden.shape)}")
        return _as_layout(hidden.to(given.dtype), layout)

    saved = [layer.__dict__.get("forward") for layer in layers]
    try:
        for index, layer in enumerate(layers):
            layer.forward = last if index == len(layers) - 1 else passthrough
        yield
    finally:
        for layer, forward in zip(layers, saved):
            if forward is None:
                del layer.forward
            else:
                layer.forward = forward
