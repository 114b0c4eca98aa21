"""Attaching steering banks to a model: the banks of one thread at a time
(:func:`claim_for_this_thread`), ``model.generate`` wrapped while any is attached so that each
bank learns the prompt length and rows of every call (:func:`track_generate`), prefill chunks
routed through the model's forward hooks, and :func:`whole_prompt_passes` for the cache-less
passes of capture and training."""

from __future__ import annotations

import contextlib
import functools
import inspect
import threading
import types
import weakref
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from steerkern.control import SteeringBank


_CLAIMS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> [(bank, thread id)]
_CLAIMS_LOCK = threading.Lock()


def claim_for_this_thread(model: nn.Module, bank: SteeringBank) -> None:
    """Record that ``bank`` steers ``model`` from the calling thread; refuse while a bank
    attached from another thread steers it. Hooks act on every forward pass of the module,
    whichever thread runs it, so two threads' contexts would each steer both threads' passes.
    Checked once per ``steer()`` entry, never in a forward pass."""
    me = threading.get_ident()
    with _CLAIMS_LOCK:
        claims = _CLAIMS.setdefault(model, [])
        if any(thread != me for _, thread in claims):
            raise RuntimeError(
                f"steer(): this {type(model).__name__} is already steered by a context entered in "
                "another thread. Hooks act on every forward pass of the model, whichever thread runs "
                "it, so each thread's passes would be steered by both contexts: serve concurrent "
                "requests as rows of one batch (a list of vectors with per-row slots and coeff), give "
                "each thread its own copy of the model, or hold a lock around each with block")
        claims.append((bank, me))


def release_claim(model: nn.Module, bank: SteeringBank) -> None:
    with _CLAIMS_LOCK:
        claims = _CLAIMS.get(model)
        if claims is not None:
            claims[:] = [(b, t) for b, t in claims if b is not bank]
            if not claims:
                del _CLAIMS[model]


_MISSING = object()
_GENERATE = "_steerkern_generate"  # (banks, replaced generate, replaced __deepcopy__) while any is attached


def track_generate(model: nn.Module, bank: SteeringBank) -> None:
    """While ``bank`` is attached, ``model.generate`` tells it the prompt length ``P`` and the
    rows of each call's ``input_ids`` / ``inputs_embeds``, and ``copy.deepcopy(model)`` is
    refused (the copy would carry hooks that act for this model). One wrapper per model, an
    instance attribute over the class's method, serves every attached bank; it is removed when
    the last one detaches, in whatever order they detach."""
    state = model.__dict__.get(_GENERATE)
    if state is None:
        inner = getattr(model, "generate", None)
        if inner is None:
            return
        banks: list = []

        @functools.wraps(inner)
        def generate(*args, **kwargs):
            prompt = kwargs.get("inputs_embeds")
            if prompt is None:
                prompt = kwargs.get("input_ids", kwargs.get("inputs", args[0] if args else None))
            given = isinstance(prompt, torch.Tensor) and prompt.dim() >= 2
            length, rows = (prompt.shape[1], prompt.shape[0]) if given else (None, None)
            mask = kwargs.get("attention_mask")
            mask = mask if given and isinstance(mask, torch.Tensor) and mask.shape == prompt.shape[:2] else None
            outer = [(b, b._generate_prompt, b._generate_rows, b._generate_mask, b._generate_index)
                     for b in banks]
            for b, *_ in outer:
                b._generate_prompt, b._generate_rows = length, rows
                b._generate_mask, b._generate_index = mask, {}
                b._in_generate += 1
            try:
                with _chunks_through_hooks(model), _inferred_mask(model, banks if given and mask is None else (),
                                                                  tuple(prompt.shape[:2]) if given else None):
                    return inner(*args, **kwargs)
            finally:
                for b, prompt_length, prompt_rows, prompt_mask, prompt_index in outer:
                    b._generate_prompt, b._generate_rows = prompt_length, prompt_rows
                    b._generate_mask, b._generate_index = prompt_mask, prompt_index
                    b._in_generate -= 1

        def refuse_deepcopy(memo):
            raise RuntimeError(
                f"copy.deepcopy of {type(model).__name__} inside steer() would copy its steering hooks, "
                "which then act for this model from inside the copy: copy the model before or after "
                "the with block")

        state = (banks, model.__dict__.get("generate", _MISSING), model.__dict__.get("__deepcopy__", _MISSING))
        object.__setattr__(model, _GENERATE, state)
        object.__setattr__(model, "generate", generate)
        object.__setattr__(model, "__deepcopy__", refuse_deepcopy)
    state[0].append(bank)


@contextlib.contextmanager
def whole_prompt_passes(model: nn.Module):
    """Inside, every cache-less forward pass of ``model`` is a prompt of its own for the banks
    steering it (``steer(..., positions=...)``): capture, gradient and training passes run whole
    texts, so a pass that repeats the last one plus a token (a suffix cut one token longer,
    read after the shorter cut) is not taken for the decode step of a model that re-runs the
    whole sequence each step."""
    state = model.__dict__.get(_GENERATE)
    banks = list(state[0]) if state is not None else []
    for bank in banks:
        bank._whole_prompts += 1
    try:
        yield
    finally:
        for bank in banks:
            bank._whole_prompts -= 1


_SKIPS_HOOKS: dict[type, bool] = {}


def _chunking_skips_hooks(model: nn.Module) -> bool:
    """Whether ``generate(prefill_chunk_size=...)`` runs the chunks through ``self.forward``,
    past the model's forward hooks (transformers 4.53-4.57's ``_prefill_chunking``; 5.x calls
    the model itself)."""
    cls = type(model)
    if cls not in _SKIPS_HOOKS:
        method = getattr(cls, "_prefill_chunking", None)
        try:
            source = inspect.getsource(method) if method is not None else ""
        except (OSError, TypeError):
            source = ""
        _SKIPS_HOOKS[cls] = "= self.forward" in source
    return _SKIPS_HOOKS[cls]


@contextlib.contextmanager
def _chunks_through_hooks(model: nn.Module):
    """Inside the context, the prefill chunks of a ``generate`` call go through the model's
    forward hooks (where the steering bank learns each pass's tokens) when the installed
    transformers calls ``self.forward`` for them: ``_prefill_chunking`` is wrapped so that,
    while it runs, ``model.forward`` enters ``model.__call__`` once (hooks run once, then the
    real forward)."""
    if not _chunking_skips_hooks(model) or "_prefill_chunking" in model.__dict__:
        yield
        return
    chunking = model._prefill_chunking

    def prefill_chunking(*args, **kwargs):
        own = model.__dict__.get("forward")  # accelerate's device hooks, if any
        real = own if own is not None else types.MethodType(type(model).forward, model)
        inside = []

        def forward(*f_args, **f_kwargs):
            if inside:  # called back by __call__: the real forward
                return real(*f_args, **f_kwargs)
            inside.append(True)
            try:
                return model(*f_args, **f_kwargs)
            finally:
                inside.pop()

        object.__setattr__(model, "forward", forward)
        try:
            return chunking(*args, **kwargs)
        finally:
            if own is None:
                model.__dict__.pop("forward", None)
            else:
                object.__setattr__(model, "forward", own)

    object.__setattr__(model, "_prefill_chunking", prefill_chunking)
    try:
        yield
    finally:
        model.__dict__.pop("_prefill_chunking", None)


@contextlib.contextmanager
def _inferred_mask(model: nn.Module, banks, shape):
    """Inside, the 2-D attention mask that ``generate`` infers for a call given none (left pads
    told from ``pad_token_id``: ``_prepare_attention_mask_for_generation``) becomes the call's
    mask for ``banks``, as a given one would: a static cache's passes come with a 4-D mask only,
    so ``positions=k`` counts each row's real tokens from it."""
    method = getattr(model, "_prepare_attention_mask_for_generation", None)
    if not banks or method is None or "_prepare_attention_mask_for_generation" in model.__dict__:
        yield
        return

    def prepare(*args, **kwargs):
        mask = method(*args, **kwargs)
        if isinstance(mask, torch.Tensor) and tuple(mask.shape) == shape:
            for bank in banks:
                bank._generate_mask, bank._generate_index = mask, {}
        return mask

    object.__setattr__(model, "_prepare_attention_mask_for_generation", prepare)
    try:
        yield
    finally:
        model.__dict__.pop("_prepare_attention_mask_for_generation", None)


def untrack_generate(model: nn.Module, bank: SteeringBank) -> None:
    state = model.__dict__.get(_GENERATE)
    if state is None or not any(b is bank for b in state[0]):
        return
    banks, replaced_generate, replaced_deepcopy = state
    banks[:] = [b for b in banks if b is not bank]
    bank._generate_prompt = bank._generate_rows = None
    if not banks:
        del model.__dict__[_GENERATE]
        for name, replaced in (("generate", replaced_generate), ("__deepcopy__", replaced_deepcopy)):
            if replaced is _MISSING:
                model.__dict__.pop(name, None)
            else:
                object.__setattr__(model, name, replaced)
