"""Activation capture for extraction: hooks on the requested modules only, the last
``last_n_tokens`` non-pad positions of each text kept, the forward pass stopped after the
deepest requested module, every token prefix shared by several texts computed once (a prefix
tree over the texts, :mod:`steerkern.prefix_tree`, run on top of each parent's KV cache), and
per-example vector-Jacobian products for the ``grad`` method. Never ``output_hidden_states``.

Read positions come from the attention mask and position ids count non-pad tokens, so left and
right padding, and padding between a shared prefix and a row's own tokens, give the same
activations. Whole-text passes pad on the right whatever the tokenizer's ``padding_side``: a
causal model's states at real tokens then never depend on the pads (which come after them),
even in a model that ignores the attention mask or the position ids (RWKV ignores the mask).
"""

from __future__ import annotations

import contextlib
import numbers
from collections.abc import Sequence

import torch

from steerkern import _callable_module
from steerkern.checks import causal_lm, count, flag, model_and_tokenizer
from steerkern.control import whole_prompt_passes
from steerkern.directions import work_dtype
from steerkern.kvcache import cache_argument, empty_model_cache, filled_layers, positions_from_mask
from steerkern.models import (
    RESIDUAL,
    as_layer_list,
    check_layer,
    eval_mode,
    input_device,
    residual_stream_index,
    resolve_module,
    token_states,
)
from steerkern.prefix_tree import (
    build_prefix_tree,
    pack_by_length,
    padded_length_bound,
    tree_tokens,
)
from steerkern.tokens import check_fits_positions, short_repr, text_token_ids


class _StopForward(Exception):
    """Raised by the deepest hook to end the forward pass early (caught by the runner)."""


# --- tokens and positions ---------------------------------------------------------------------


def _check_texts(texts) -> list[str]:
    """``texts`` as a non-empty list of strings, or a clear error (a bare string would otherwise
    be read one character per text)."""
    if isinstance(texts, str):
        raise TypeError("texts must be a list of strings, got a single str: wrap it as [text]")
    texts = list(texts)
    if not texts:
        raise ValueError("texts is empty: give at least one text to capture")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"texts[{i}] must be a str, got {type(text).__name__}")
    return texts


def _text_name(i: int) -> str:
    return f"texts[{i}]"


def _tokenize(model, tokenizer, texts: list[str], name=_text_name) -> list[list[int]]:
    """Token ids per text (:func:`steerkern.tokens.text_token_ids`: the BOS the tokenizer adds
    unless the text starts with it, nothing appended after the text). A text with no tokens (an
    empty string, with a tokenizer that adds no BOS) has no state to read, and one longer than
    a learned position table cannot run: a ``ValueError`` names it as ``name(i)``."""
    ids = text_token_ids(tokenizer, texts)
    for i, (text, seq) in enumerate(zip(texts, ids)):
        if not seq:
            raise ValueError(f"{name(i)}={short_repr(text)} has no tokens: give non-empty texts")
    check_fits_positions(model, [len(seq) for seq in ids], name, fix="shorten the text")
    return ids


def _check_reads(ids: list[list[int]], last_n_tokens, name=_text_name) -> int:
    """``last_n_tokens`` as an int ``1 <= n <= len(shortest text)``, or a clear error."""
    last_n_tokens = count(last_n_tokens, "last_n_tokens")
    shortest = min(range(len(ids)), key=lambda i: len(ids[i]))
    if len(ids[shortest]) < last_n_tokens:
        raise ValueError(f"last_n_tokens={last_n_tokens} but {name(shortest)} has only "
                         f"{len(ids[shortest])} tokens: lower last_n_tokens")
    return last_n_tokens


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_read_token_index(read_token_index, n_texts: int | None = None):
    """``read_token_index`` as given when it is an int, a callable, or (``n_texts`` given) a
    sequence of ``n_texts`` ints; otherwise a ``TypeError`` / ``ValueError`` naming it."""
    if _is_int(read_token_index) or callable(read_token_index):
        return read_token_index
    if n_texts is not None and isinstance(read_token_index, Sequence) and not isinstance(read_token_index, (str, bytes)):
        if len(read_token_index) != n_texts or not all(_is_int(v) for v in read_token_index):
            raise ValueError(f"read_token_index as a sequence must hold one int per text ({n_texts}), "
                             f"got {list(read_token_index)!r}")
        return list(read_token_index)
    kinds = "an int, a callable text -> int" + (" or one int per text" if n_texts is not None else "")
    raise TypeError(f"read_token_index must be {kinds}, got {type(read_token_index).__name__}")


def read_spans(ids: list[list[int]], texts: list[str], read_token_index, last_n_tokens: int,
               name=_text_name) -> list[list[int]]:
    """The token positions read in each text: ``p - n + 1 .. p`` (``n = last_n_tokens``), where
    ``p`` is ``read_token_index`` (an int, ``read_token_index(text)``, or entry ``i`` of a
    sequence) as an index into the text's token ids (negative from the end: -1 is the last
    token). A ``ValueError`` names the text whose index is not an int inside it, or whose span
    would start before its first token."""
    spans = []
    for i, (seq, text) in enumerate(zip(ids, texts)):
        if callable(read_token_index):
            p = read_token_index(text)
            if not _is_int(p):
                raise TypeError(f"read_token_index({name(i)}) must return an int token index, got {p!r}")
        else:
            p = read_token_index[i] if isinstance(read_token_index, list) else read_token_index
        if not -len(seq) <= int(p) < len(seq):
            raise ValueError(f"read_token_index={int(p)} for {name(i)}, which has {len(seq)} tokens: give an "
                             f"index in {-len(seq)}..{len(seq) - 1} (negative counts from the last token)")
        end = int(p) % len(seq)
        if end + 1 < last_n_tokens:
            raise ValueError(f"last_n_tokens={last_n_tokens} tokens ending at token {end} of {name(i)} start "
                             "before its first token: lower last_n_tokens or read a later token")
        spans.append(list(range(end + 1 - last_n_tokens, end + 1)))
    return spans


def _layer_indices(model, layers) -> dict:
    """``{layer as given: non-negative index}`` for an int or a non-empty list of layer indices
    (negative ones count from the last layer)."""
    return {layer: check_layer(model, layer, "layers") for layer in as_layer_list(layers)}


def _pad(seqs: list[list[int]], pad_id: int, side: str):
    """``(input_ids [B, T], attention_mask [B, T], position_ids [B, T])``; positions count
    non-pad tokens, so left and right padding give every token the same position."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        span = slice(width - len(seq), width) if side == "left" else slice(0, len(seq))
        ids[row, span] = torch.tensor(seq, dtype=torch.long)
        mask[row, span] = 1
    positions = positions_from_mask(mask)
    return ids, mask, positions


def last_positions(attention_mask: torch.Tensor, n: int) -> torch.Tensor:
    """Indices ``[B, n]`` of the last ``n`` non-pad positions of each row, in order, computed
    from ``attention_mask [B, T]`` (works for left, right or mixed padding)."""
    n = count(n, "last_n_tokens")
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
        raise ValueError(f"attention_mask must be a [batch, tokens] tensor, got "
                         f"{tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask).__name__}")
    counts = attention_mask.sum(1)
    if bool((counts < n).any()):
        short = int(counts.min())
        raise ValueError(f"last_n_tokens={n} but a text has only {short} tokens: lower last_n_tokens")
    order = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    key = torch.where(attention_mask.bool(), order, torch.full_like(order, -1))
    return key.topk(n, dim=1).values.flip(1)


def _length_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def _main_tensor(output):
    return output[0] if isinstance(output, (tuple, list)) else output


def _as_btd(tensor: torch.Tensor, batch: int, width: int, stream: int = 0) -> torch.Tensor:
    """A module output as ``[B, T, D]``: as it is, unflattened from ``[B*T, D]`` (MoE internals),
    or copy ``stream`` of parallel residual streams ``[S, B, T, D]`` (Gemma 3n;
    :func:`steerkern.models.token_states`)."""
    states = token_states(tensor, batch, width, stream)
    if states is None:
        raise ValueError(f"cannot read per-token activations of a {batch} x {width}-token pass from "
                         f"an output of shape {tuple(getattr(tensor, 'shape', ()))}")
    return states


# --- capture ----------------------------------------------------------------------------------


def _pad_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    return pad


class _Runner:
    """Runs the model over tokenized texts in length-sorted batches, padded on the right (pads
    after every real token, so that no model can let them change a real token's state)."""

    def __init__(self, model, tokenizer, ids, batch_size, progress, desc):
        self.model, self.ids = model, ids
        self.batches = _length_batches([len(s) for s in ids], batch_size)
        self.pad_id = _pad_id(tokenizer)
        self.side = "right"
        self.progress, self.desc = progress, desc

    def __iter__(self):
        from tqdm.auto import tqdm

        device = input_device(self.model)
        for batch in tqdm(self.batches, desc=self.desc, disable=not self.progress, leave=False):
            ids, mask, positions = _pad([self.ids[i] for i in batch], self.pad_id, self.side)
            yield batch, ids.to(device), mask.to(device), positions.to(device)

    def forward(self, ids, mask, positions):
        try:
            self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False)
        except _StopForward:
            pass


class _Reads:
    """Where the current forward pass's reads are, and the tensors they are written to.

    ``set(rows, cols, texts, js, shape)`` names, for the next forward pass over a batch of
    ``shape = (rows, width)`` tokens, the positions ``(rows[i], cols[i])`` whose states are read
    ``js[i]`` of text ``texts[i]``; ``take(store, layer, tensor)`` copies them (CPU; float32, or
    float64 for a float64 model) into ``store[layer] [n_texts, n_reads, D]``."""

    def __init__(self, n_texts: int, n_reads: int, stream: int = 0):
        self.n_texts, self.n_reads, self.stream = n_texts, n_reads, stream
        self.where, self.shape = None, None

    def set(self, rows, cols, texts, js, shape):
        self.where = tuple(torch.as_tensor(v, dtype=torch.long).flatten() for v in (rows, cols, texts, js))
        self.shape = shape

    def take(self, store: dict, layer: int, tensor: torch.Tensor):
        rows, cols, texts, js = self.where
        tensor = _as_btd(tensor, *self.shape, self.stream)
        picked = tensor[rows.to(tensor.device), cols.to(tensor.device)].detach()
        picked = picked.to("cpu", work_dtype(picked))
        if layer not in store:
            store[layer] = torch.full((self.n_texts, self.n_reads, picked.shape[-1]), float("nan"),
                                      dtype=picked.dtype)
        store[layer][texts, js] = picked


def _plain_passes(model, tokenizer, ids, spans, batch_size, reads, progress, desc):
    """Length-sorted batches of whole texts, padded on the right (so a token's column is its
    index in the text), read at each text's positions ``spans[i]``."""
    runner = _Runner(model, tokenizer, ids, batch_size, progress, desc)
    n_reads = len(spans[0])
    for batch, input_ids, mask, positions in runner:
        cols = torch.tensor([spans[i] for i in batch], dtype=torch.long)
        rows = torch.arange(len(batch))[:, None].expand_as(cols)
        js = torch.arange(n_reads)[None, :].expand_as(cols)
        texts = torch.tensor(batch)[:, None].expand_as(cols)
        reads.set(rows, cols, texts, js, tuple(input_ids.shape))
        runner.forward(input_ids, mask, positions)


def _shared_prefix_passes(model, segments, max_length, pad_id, batch_size, reads, progress, desc):
    """Forward passes over a prefix-tree plan (:mod:`steerkern.prefix_tree`): each chunk of up
    to ``batch_size`` sibling segments (packed by length) runs on top of its parents' KV cache rows,
    left-padded within the chunk, with position ids that count real tokens; then the chunk's
    children run on top of its cache, depth first (one cache per tree level is alive)."""
    from tqdm.auto import tqdm

    cache_arg = cache_argument(model)
    device = input_device(model)
    bar = tqdm(total=tree_tokens(segments), desc=desc, unit="tok", disable=not progress, leave=False)

    def run(items, parent_cache, parent_mask):
        for batch in pack_by_length([len(segment.tokens) for segment, _ in items], batch_size):
            chunk = [items[i] for i in batch]
            width = max(len(segment.tokens) for segment, _ in chunk)
            ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            new = torch.zeros((len(chunk), width), dtype=torch.long)
            picks = []
            for row, (segment, _) in enumerate(chunk):
                pad = width - len(segment.tokens)
                ids[row, pad:] = torch.tensor(segment.tokens, dtype=torch.long)
                new[row, pad:] = 1
                picks.extend((row, pad + offset, text, j) for text, j, offset in segment.reads)
            cache, mask = empty_model_cache(model, max_length), new
            if parent_cache is not None:
                index = torch.tensor([parent for _, parent in chunk], dtype=torch.long)
                for layer_index, layer in filled_layers(parent_cache):
                    cache.update(layer.keys.index_select(0, index.to(layer.keys.device)),
                                 layer.values.index_select(0, index.to(layer.values.device)),
                                 layer_index)
                mask = torch.cat([parent_mask[index], new], 1)
            reads.set(*(zip(*picks) if picks else ([], [], [], [])), (len(chunk), width))
            try:
                model(input_ids=ids.to(device), attention_mask=mask.to(device),
                      position_ids=positions_from_mask(mask)[:, -width:].to(device),
                      use_cache=True, **{cache_arg: cache})
            except _StopForward:
                pass
            bar.update(int(new.sum()))
            children = [(child, row) for row, (segment, _) in enumerate(chunk)
                        for child in segment.children]
            if children:
                run(children, cache, mask)

    try:
        run([(segment, None) for segment in segments], None, None)
    finally:
        bar.close()


def _prefix_plan(model, ids, spans):
    """``(segments, max_length)``: the prefix-tree plan and a bound on its cache columns; or
    ``None`` when sharing would save less than a tenth of the tokens or the model's cache cannot
    be shared that far (:func:`steerkern.kvcache.is_gatherable`: a sliding window shorter than
    the bound, another kind of cache, no cache argument)."""
    if cache_argument(model) is None:
        return None
    segments = build_prefix_tree(ids, spans)
    if tree_tokens(segments) > 0.9 * sum(len(seq) for seq in ids):
        return None
    max_length = padded_length_bound(segments)
    if empty_model_cache(model, max_length) is None:
        return None
    return segments, max_length


def capture(model, tokenizer, texts, layers, *, target=RESIDUAL, last_n_tokens=1, batch_size=16,
            inputs=False, progress=True, desc="capture", share_prefixes=True, text_names=_text_name,
            read_token_index=-1):
    """Activations at the last ``last_n_tokens`` non-pad positions of each text, or at the
    ``last_n_tokens`` positions ending at ``read_token_index``.

    Returns ``{layer: Tensor [n_texts, last_n_tokens, D]}`` (CPU; float32, or float64 for a
    float64 model), keyed by the layers as given (an int or a list; negative indices count from
    the last layer); with ``inputs=True`` the tuple ``(outputs, inputs)``, ``inputs`` being the
    module inputs ``{layer: [n_texts, last_n_tokens, D_in]}``.
    Only the requested modules are hooked; the forward pass stops after the deepest one.
    ``texts`` is a list of strings, each with at least ``last_n_tokens`` tokens.

    With ``share_prefixes`` (default), token prefixes shared by several texts (the chat
    template and persona turn of persona pairs, the question of a CAA pair, a suffix cut at
    several lengths) are computed once and their KV cache reused
    (:mod:`steerkern.prefix_tree`); the activations equal those of whole-text passes up to
    float summation order. It falls back to whole-text passes when that saves under a tenth of
    the tokens or the model's cache cannot be shared (sliding windows shorter than the texts'
    padded length, quantised or recurrent caches).
    ``batch_size`` bounds the rows of every forward pass either way. ``text_names(i)`` names
    text ``i`` in errors (default ``texts[i]``; extraction names the pair it came from).

    ``read_token_index`` (default -1, the last token) is the token ``p`` whose state is read, an
    index into the text's token ids as :func:`steerkern.tokens.text_token_ids` builds them (the
    tokenizer's BOS first when it adds one; negative counts from the end): an int for every
    text, a callable ``text -> int`` called on each text, or a sequence of one int per text.
    Row ``j`` of a text's reads is token ``p - last_n_tokens + 1 + j``, so ``-2`` reads the
    state before the last token (the answer letter of ``"... (A)"``).
    """
    model_and_tokenizer(model, tokenizer)
    inputs, share_prefixes = flag(inputs, "inputs"), flag(share_prefixes, "share_prefixes")
    progress = flag(progress, "progress")
    texts = _check_texts(texts)
    read_token_index = check_read_token_index(read_token_index, len(texts))
    given = _layer_indices(model, layers)
    batch_size = count(batch_size, "batch_size")
    ids = _tokenize(model, tokenizer, texts, text_names)
    last_n_tokens = _check_reads(ids, last_n_tokens, text_names)
    spans = read_spans(ids, texts, read_token_index, last_n_tokens, text_names)
    layers = sorted(set(given.values()))
    deepest = layers[-1]  # compared after normalising: layers=[1, -1] must run to the last layer
    reads = _Reads(len(texts), last_n_tokens, residual_stream_index(model))
    outs, ins = {}, {}

    def make_hook(layer):
        def hook(module, args, kwargs, output):
            reads.take(outs, layer, _main_tensor(output))
            if inputs:
                reads.take(ins, layer, args[0] if args else kwargs.get("hidden_states", kwargs.get("input")))
            if layer == deepest:
                raise _StopForward
        return hook

    modules = [resolve_module(model, layer, target) for layer in layers]  # may raise: hook nothing yet
    plan = _prefix_plan(model, ids, spans) if share_prefixes else None
    handles = []
    try:
        for layer, module in zip(layers, modules):
            handles.append(module.register_forward_hook(make_hook(layer), with_kwargs=True))
        with torch.inference_mode(), eval_mode(model), whole_prompt_passes(model):
            if plan is None:
                _plain_passes(model, tokenizer, ids, spans, batch_size, reads, progress, desc)
            else:
                _shared_prefix_passes(model, *plan, _pad_id(tokenizer), batch_size, reads,
                                      progress, desc)
    finally:
        for handle in handles:
            handle.remove()
    _check_ran(target, [index for index in layers if index not in outs])
    # clones made outside inference mode: the caller may centre them in place or train on them
    outs = {layer: outs[index].clone() for layer, index in given.items()}
    if inputs:
        return outs, {layer: ins[index].clone() for layer, index in given.items()}
    return outs


def _check_ran(target: str, silent: list[int]) -> None:
    """Refuse a hooked module that the forward pass never called (GPT-2's ``attn.attn_dropout``
    under SDPA attention): there is nothing to read or steer there."""
    if silent:
        raise ValueError(f"target {target!r} at layer {silent[0]} never ran in the forward pass (the model does "
                         "not call that module this way): read or steer a module it calls, or the "
                         "residual stream")


def vjp_gradients(model, tokenizer, texts, layers, readout_layer, d, *, target=RESIDUAL,
                  last_n_tokens=1, batch_size=8, progress=True, text_names=_text_name,
                  read_token_index=-1):
    """Per-text gradients ``{layer: [n_texts, D]}`` of ``sum_p d · h_{L'}[p]`` (``p`` the last
    ``last_n_tokens`` positions at the read-out layer ``L'``) with respect to a bias added to
    the steered module's output at every position of layer ``L`` — ``J_{L->L'}^T d`` summed
    over positions (``p`` the positions :func:`capture` reads under ``read_token_index``). One
    backward pass per batch for all layers; no Jacobian is built and no
    parameter gradient is accumulated.

    Each hooked module's output ``h`` is held and the model continues with a copy of it, so the
    held tensor is exactly the module's output even where the model then updates it in place
    (Falcon adds the attention output into its MLP output with ``+=``); at the shallowest layer
    ``h`` is a fresh leaf, so nothing below it is differentiated. Runs with autograd on even
    inside ``torch.no_grad()`` or ``torch.inference_mode()``."""
    texts = _check_texts(texts)
    read_token_index = check_read_token_index(read_token_index, len(texts))
    batch_size = count(batch_size, "batch_size")
    ids = _tokenize(model, tokenizer, texts, text_names)
    last_n_tokens = _check_reads(ids, last_n_tokens, text_names)
    spans = read_spans(ids, texts, read_token_index, last_n_tokens, text_names)
    if any(p.is_inference() for p in model.parameters()):
        raise ValueError("method='grad' differentiates through the model, but its weights are "
                         "inference tensors (created under torch.inference_mode()): load the model "
                         "outside inference_mode")
    runner = _Runner(model, tokenizer, ids, batch_size, progress, "grad")
    shallowest = min(layers)
    stream = residual_stream_index(model)
    grads = {layer: [None] * len(texts) for layer in layers}
    held = {}

    def make_hook(layer):
        def hook(module, args, kwargs, output):
            out = _main_tensor(output)
            if layer == shallowest:
                out = out.detach().requires_grad_(True)
            held[layer] = out
            copy = out.clone()  # in-place updates downstream act on the copy, not on ``held``
            if isinstance(output, tuple):
                return (copy,) + tuple(output[1:])
            if isinstance(output, list):
                return [copy] + list(output[1:])
            return copy
        return hook

    def readout_hook(module, args, kwargs, output):
        held["readout"] = _main_tensor(output)
        raise _StopForward

    modules = [resolve_module(model, layer, target) for layer in layers]  # may raise: hook nothing yet
    readout = resolve_module(model, readout_layer, RESIDUAL)
    handles = []
    try:
        for layer, module in zip(layers, modules):
            handles.append(module.register_forward_hook(make_hook(layer), with_kwargs=True))
        handles.append(readout.register_forward_hook(readout_hook, with_kwargs=True))
        with torch.inference_mode(False), torch.enable_grad(), eval_mode(model), whole_prompt_passes(model):
            d = d.detach().clone()  # an inference tensor cannot be saved for backward
            for batch, ids, mask, positions in runner:
                held.clear()
                runner.forward(ids, mask, positions)
                _check_ran(target, [layer for layer in layers if layer not in held])
                top = _as_btd(held["readout"], len(batch), ids.shape[1], stream)
                pos = torch.tensor([spans[i] for i in batch], device=top.device)  # right-padded
                rows = torch.arange(len(batch), device=top.device)[:, None]
                read = top[rows, pos]
                read = read.to(work_dtype(read))
                objective = (read @ d.to(top.device, read.dtype)).sum()
                tensors = [held[layer] for layer in layers]
                found = torch.autograd.grad(objective, tensors, allow_unused=True)
                for layer, grad in zip(layers, found):
                    if grad is None:
                        raise ValueError(
                            f"target {target!r} at layer {layer}: the read-out at layer {readout_layer} does "
                            "not depend on its output (the model discards it), so it has no gradient: "
                            "read a module whose output the model uses, or the residual stream")
                    grad = _as_btd(grad, len(batch), ids.shape[1], stream)
                    summed = (grad.to(work_dtype(grad)) * mask.to(grad.device)[..., None]).sum(1).cpu()
                    for row, index in enumerate(batch):
                        grads[layer][index] = summed[row]
    finally:
        for handle in handles:
            handle.remove()
        held.clear()
    return {layer: torch.stack(rows) for layer, rows in grads.items()}



@contextlib.contextmanager
def record(model, layers, *, target=RESIDUAL, to_cpu=False):
    """Record the activations of every forward pass of ``model`` inside the ``with`` block.

    Yields ``{layer: [Tensor [B, T, D], ...]}`` (keyed by the layers as given: an int or a list,
    negative indices counting from the last layer), one tensor per forward pass in call order:
    the whole ``[batch, tokens]`` pass of module ``target`` (``"residual"``: the decoder
    layer's output; or a sub-module name, as :func:`capture` takes). Inside ``generate`` the
    first entry is the prompt's pass and each later one a decode step's new tokens. Tensors are
    detached copies in the model's dtype, on the module's device, or on the CPU with
    ``to_cpu=True``. Pad positions are recorded as the model computed them (mask them with the
    attention mask). Nothing is read until the block runs the model: unlike :func:`capture`,
    no pass is run and none is stopped early.

    Hooks run in the order they were registered, so inside a :func:`steerkern.steer` block
    entered before ``record`` the recorded states are the steered ones; a ``steer`` entered
    inside ``record`` steers after the recording. The hooks are removed on exit, errors
    included, and a bad ``layers`` or ``target`` raises before any hook is registered.

    Example:
        >>> with record(model, [8, 10]) as acts:                            # doctest: +SKIP
        ...     model(**tokenizer(["Hello there"], return_tensors="pt"))
        >>> acts[8][0].shape                                                 # doctest: +SKIP
        torch.Size([1, 3, 576])
    """
    causal_lm(model)
    to_cpu = flag(to_cpu, "to_cpu")
    given = _layer_indices(model, layers)
    modules = {index: resolve_module(model, index, target) for index in set(given.values())}
    stream = residual_stream_index(model)
    found = {index: [] for index in modules}
    shape = [None]  # (batch, tokens) of the pass under way

    def before(module, args, kwargs):
        tokens = kwargs.get("input_ids")
        if tokens is None:
            tokens = kwargs.get("inputs_embeds")
        if tokens is None and args and isinstance(args[0], torch.Tensor):
            tokens = args[0]
        shape[0] = tuple(tokens.shape[:2]) if isinstance(tokens, torch.Tensor) and tokens.dim() >= 2 else None

    def make_hook(index):
        def hook(module, args, output):
            tensor = _main_tensor(output)
            states = token_states(tensor, *shape[0], stream) if shape[0] else None
            if states is None:
                raise RuntimeError(f"record: layer {index}, target {target!r} returned an output of shape "
                                   f"{tuple(getattr(tensor, 'shape', ()))}, not one state per token of the "
                                   f"model's pass {shape[0]}: call the model itself, or record another module")
            found[index].append(states.detach().to("cpu" if to_cpu else states.device, copy=True))
        return hook

    handles = []
    try:
        handles.append(model.register_forward_pre_hook(before, with_kwargs=True))
        for index, module in modules.items():
            handles.append(module.register_forward_hook(make_hook(index)))
        yield {layer: found[index] for layer, index in given.items()}
    finally:
        for handle in handles:
            handle.remove()


_callable_module(__name__)  # steerkern.capture(...) calls capture() even once this module is bound there
