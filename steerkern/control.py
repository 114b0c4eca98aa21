"""Steering a model while it runs: ``SteeringBank`` and the ``steer()`` context manager.

A :class:`SteeringBank` holds K steering vectors as device tensors, grouped by the module they
act on (a *site*: one decoder layer's output, or a named sub-module's output). One forward hook
per site applies ``steerkern.ops.steer_`` to that module's output, every token row with its own
bank slot and coefficient:

    out[b, t] += coeff[b] * (bias[k] + B[k] @ (A[k]^T @ src[b, t]))      k = slot of row b

Per-row slots and coefficients are set per batch with :meth:`SteeringBank.set_batch`, in place
when the batch size is unchanged. A pre-forward hook on the model turns them into per-token
slots once per forward pass: pad tokens (``attention_mask == 0``) and tokens outside the chosen
``positions`` get slot -1 and are left bitwise untouched. Nothing is copied from the host and
nothing synchronises with it inside the hooks.

Positions: a token at absolute position ``p`` is *prompt* when ``p < P`` and *generated*
otherwise. Inside ``model.generate`` (wrapped while a bank with positions "prompt"/"generated"
is attached) ``P`` is the length of the ``input_ids`` (or ``inputs_embeds``) it was given, so
chunked prefill (``prefill_chunk_size``), a conversation continued from an earlier call's cache
(``past_key_values=``, the whole conversation as ``input_ids``) and assisted decoding's drafts
are told apart exactly. Outside ``generate`` (direct forward calls) ``P`` is read from the
passes: a pass with an empty cache is the prompt; a pass of several tokens on top of a
non-empty cache is more prompt (``P`` grows to its end) unless it asks for the logits of every
token (``logits_to_keep`` equal to its length: a draft check); a pass without a cache that
repeats the last one plus one token is a decode step (models that re-run the whole sequence).
Generation that expands rows (``num_return_sequences``, beams) repeats each row's slot and
coefficient for its copies, as ``generate`` orders them.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from steerkern import ops
from steerkern.bank_attach import (
    claim_for_this_thread,
    release_claim,
    track_generate,
    untrack_generate,
    whole_prompt_passes,
)
from steerkern.checks import causal_lm, flag
from steerkern.models import execution_device, residual_stream_index, resolve_module, token_states
from steerkern.pass_state import (
    cache_of,
    checks_drafts,
    in_backward,
    padded_mask_past,
    past_length,
    positional_names,
    tracing,
)
from steerkern.steer_args import (
    FLOAT32_MAX,
    POSITIONS,
    as_coeff,
    as_slots,
    check_positions,
    copy_into,
)
from steerkern.vectors import SteeringVector

__all__ = ["FLOAT32_MAX", "POSITIONS", "SteeringBank", "first_tensor", "steer", "whole_prompt_passes"]


def first_tensor(module: nn.Module, where: str = "") -> torch.Tensor:
    """A parameter (else a buffer) of ``module``, whose device and dtype its steering takes;
    ``where`` (e.g. ``"layer 3, target 'mlp.act_fn'"``) names it in the error for a module
    that holds neither."""
    for tensor in module.parameters():
        return tensor
    for tensor in module.buffers():
        return tensor
    raise ValueError(
        f"{where + ': ' if where else ''}{type(module).__name__} holds no parameters to take a device and "
        "dtype from, so it cannot be steered: target a module with weights (e.g. 'mlp.down_proj', "
        "'self_attn.o_proj') or the residual stream"
    )


@dataclass
class _Site:
    """The steering bank of one module: every vector with a part there has an entry."""

    module: nn.Module
    source: str  # "output" or "input"
    bias: torch.Tensor | None  # [K_site, D]
    A: torch.Tensor | None  # [K_site, D_src, R]
    B: torch.Tensor | None  # [K_site, D, R]
    slot_map: torch.Tensor  # [K + 1] int32: vector index -> site entry; entry K (for -1) is -1
    device: torch.device = field(init=False)
    identity: bool = field(init=False)  # every vector has an entry here, in order: no gather

    def __post_init__(self):
        self.device = self.slot_map.device
        count = self.slot_map.numel() - 1
        self.identity = bool(torch.equal(self.slot_map[:count].cpu(),
                                         torch.arange(count, dtype=torch.int32)))


def _placed(index: int, part, device, dtype, key):
    """``vectors[index]``'s part at ``key = (layer, target)`` on the module's device and dtype;
    a value past that dtype's range is refused there, naming the vector, layer and target."""
    try:
        return part.to(device, dtype)
    except ValueError as error:
        raise ValueError(f"vectors[{index}] at layer {key[0]}, target {key[1]!r} (a {dtype} module): "
                         f"{error}") from None


class SteeringBank:
    """Many steering vectors loaded once onto the model, applied per row.

    Args:
        model: a causal LM (see ``steerkern.models``).
        vectors: a ``SteeringVector`` or a sequence of them; row slot ``k`` selects
            ``vectors[k]``.
        positions: "all", "prompt", "generated", a boolean mask ``[batch, seq]`` (True =
            steer; positions past the mask's length are not steered), or an int ``k >= 0``:
            every token whose index among its row's real (non-pad) tokens is ``>= k``, prompt
            and generated tokens alike (steering-vectors' ``min_token_index``, counted per row
            so left padding shifts nothing; the BOS, when the tokenizer adds one, is token 0). "prompt" / "generated"
            tell the prompt from the tokens added after it by the KV cache's length (or a
            recurrent state's token count); a pass without a cache (``use_cache=False``, models
            that generate by re-running the whole sequence, e.g. MPT) whose tokens extend the
            last prompt by the one token added since the last pass keeps that prompt's length.
        normalize: rescale each steered hidden state to its norm before steering.

    Example:
        >>> bank = SteeringBank(model, [happy, sad])                     # doctest: +SKIP
        >>> with bank.attached():                                         # doctest: +SKIP
        ...     bank.set_batch(slots=[0, 1, -1], coeff=[4.0, 4.0, 0.0])
        ...     model.generate(**batch)
    """

    def __init__(self, model: nn.Module, vectors, *, positions="all", normalize: bool = False):
        causal_lm(model)
        if isinstance(vectors, SteeringVector):
            vectors = [vectors]
        if isinstance(vectors, (str, bytes, dict)) or not isinstance(vectors, Iterable):
            raise TypeError(f"vectors must be a SteeringVector or a list of them (pick one per row "
                            f"with slots), got {type(vectors).__name__}")
        vectors = list(vectors)
        if not vectors:
            raise ValueError("vectors is empty: give at least one SteeringVector")
        for index, vector in enumerate(vectors):
            if not isinstance(vector, SteeringVector):
                raise TypeError(f"vectors[{index}] is a {type(vector).__name__}, not a SteeringVector")
            try:
                vector.validate(model)
            except (ValueError, TypeError) as error:
                raise type(error)(f"vectors[{index}]: {error}") from None
        self.model = model
        self.vectors = vectors
        self.normalize = flag(normalize, "normalize")
        self.positions, self._position_mask = check_positions(positions)
        self._from_token = int(positions) if self.positions == "from" else None
        self.sites = self._build_sites()
        try:
            self.input_device = execution_device(model, model)
        except ValueError:  # offloaded root without a hook of its own: rows move per call
            self.input_device = torch.device("cpu")
        self._row_slot = torch.zeros(1, dtype=torch.int64, device=self.input_device)
        self._row_coeff = torch.ones(1, dtype=torch.float32, device=self.input_device)
        self._rows: int | None = None  # None: one slot and coefficient broadcast to every row
        self._prompt_len = 0
        self._prompt_tokens: torch.Tensor | None = None  # the last prompt, for passes without a cache
        self._last_length = 0  # tokens of the last pass: a pass without a cache re-runs them + 1
        self._recurrent_seen = weakref.WeakKeyDictionary()  # recurrent cache -> tokens it consumed
        self._pads_seen = weakref.WeakKeyDictionary()  # cache -> pads per row its masked passes fed it
        self._token_state: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self._token_shape: tuple[int, int] | None = None
        self._pass_open = False  # inside a forward pass of the model itself
        self._kept = None  # the pass's logits_to_keep when it keeps fewer positions than it runs
        self._handles: list = []
        self._positional = positional_names(model)
        self._stream = residual_stream_index(model)  # Gemma 3n: the active residual copy
        self._generate_prompt: int | None = None  # P of the generate call under way
        self._in_generate = 0  # depth of generate calls under way (their rows may be expanded)
        self._whole_prompts = 0  # depth of whole_prompt_passes contexts: every pass is a prompt
        self._generate_rows: int | None = None  # rows of the generate call's input, before expansion
        self._generate_mask: torch.Tensor | None = None  # the generate call's 2-D attention mask
        self._generate_index: dict[torch.device, torch.Tensor] = {}  # its real-token index, per device
        self._mask_on: dict[torch.device, torch.Tensor] = {}  # the positions mask, per device

    # --- building ------------------------------------------------------------------------------

    def _build_sites(self) -> list[_Site]:
        keys: dict[tuple[int, str, str], list[tuple[int, object]]] = {}
        for index, vector in enumerate(self.vectors):
            for (layer, target), part in vector.parts.items():
                keys.setdefault((layer, target, part.source), []).append((index, part))
        sites = []
        for (layer, target, source), entries in sorted(keys.items()):
            module = resolve_module(self.model, layer, target)
            reference = first_tensor(module, f"layer {layer}, target {target!r}")
            device = execution_device(self.model, module)
            dtype = reference.dtype if reference.is_floating_point() else torch.float32
            sites.append(self._build_site(module, source, entries, device, dtype, (layer, target)))
        return sites

    def _build_site(self, module, source, entries, device, dtype, key) -> _Site:
        count = len(self.vectors)
        slot_map = torch.full((count + 1,), -1, dtype=torch.int32)
        for entry, (index, _) in enumerate(entries):
            slot_map[index] = entry
        parts = [_placed(index, part, device, dtype, key) for index, part in entries]
        dims = {p.bias.shape[-1] for p in parts if p.bias is not None}
        dims |= {p.B.shape[0] for p in parts if p.B is not None}
        if len(dims) != 1:
            raise ValueError(f"vectors disagree on the width of {type(module).__name__}: {sorted(dims)}")
        (width,) = dims
        bias = None
        if any(p.bias is not None for p in parts):
            bias = torch.zeros(len(parts), width, dtype=dtype, device=device)
            for entry, part in enumerate(parts):
                if part.bias is not None:
                    bias[entry] = part.bias
        A = B = None
        low_rank = [p for p in parts if p.A is not None]
        for index, part in entries:
            if part.A is not None and part.rank > ops.MAX_RANK:
                raise ValueError(
                    f"vectors[{index}]: the low-rank part (layer {key[0]}, target {key[1]!r}) has "
                    f"rank R = {part.rank}, but steering supports R <= {ops.MAX_RANK}: truncate A and B "
                    f"to their top {ops.MAX_RANK} components"
                )
        if low_rank:
            rank = max(p.A.shape[1] for p in low_rank)
            source_width = {p.A.shape[0] for p in low_rank}
            if len(source_width) != 1:
                raise ValueError(f"vectors disagree on the source width of {type(module).__name__}")
            A = torch.zeros(len(parts), source_width.pop(), rank, dtype=dtype, device=device)
            B = torch.zeros(len(parts), width, rank, dtype=dtype, device=device)
            for entry, part in enumerate(parts):
                if part.A is not None:
                    r = part.A.shape[1]
                    A[entry, :, :r] = part.A
                    B[entry, :, :r] = part.B
        return _Site(module, source, bias, A, B, slot_map.to(device))

    # --- per batch -----------------------------------------------------------------------------

    def set_batch(self, slots=None, coeff=1.0) -> None:
        """Choose each row's vector and coefficient for the next forward passes.

        Args:
            slots: ``None`` (every row uses vector 0), one index for every row, or per-row
                indices into ``vectors`` (``-1``: the row is not steered): a sequence, numpy
                array or integer tensor ``[batch]``.
            coeff: a number for every row, or per-row numbers ``[batch]`` (a sequence, numpy
                array or tensor).

        Values are checked here (once, on the host), never inside the hooks.
        """
        coeff_t = as_coeff(coeff)
        slot_t = as_slots(slots, len(self.vectors))
        if slot_t.dim() == 0:  # one vector for every row
            if coeff_t.dim() == 0:
                rows, slot_t, coeff_t = None, slot_t.reshape(1), coeff_t.reshape(1)
            else:
                rows, slot_t = coeff_t.numel(), slot_t.expand(coeff_t.numel()).clone()
        else:
            rows = slot_t.numel()
            if coeff_t.dim() == 0:
                coeff_t = coeff_t.expand(rows)
            elif coeff_t.numel() != rows:
                raise ValueError(
                    f"coeff has {coeff_t.numel()} rows but slots has {rows}: give one coefficient "
                    "per row, or a single number"
                )
        if self._position_mask is not None and rows is not None and self._position_mask.shape[0] != rows:
            raise ValueError(
                f"positions mask has {self._position_mask.shape[0]} rows but slots/coeff have "
                f"{rows}: they must describe the same batch"
            )
        self._rows = rows
        self._row_slot = copy_into(self._row_slot, slot_t)
        self._row_coeff = copy_into(self._row_coeff, coeff_t)

    # --- hooks ---------------------------------------------------------------------------------

    @contextlib.contextmanager
    def attached(self):
        """Register the hooks for the ``with`` block; they are removed on exit, errors included."""
        self.attach()
        try:
            yield self
        finally:
            self.detach()

    def attach(self) -> None:
        if self._handles:
            raise RuntimeError("this SteeringBank is already attached")
        claim_for_this_thread(self.model, self)
        try:
            self._handles.append(
                self.model.register_forward_pre_hook(self._before_forward, with_kwargs=True)
            )
            for site in self.sites:
                self._handles.append(
                    site.module.register_forward_hook(self._site_hook(site), with_kwargs=True)
                )
            self._handles.append(self.model.register_forward_hook(self._after_forward, always_call=True))
            track_generate(self.model, self)
        except BaseException:
            self.detach()
            raise

    def detach(self) -> None:
        release_claim(self.model, self)
        untrack_generate(self.model, self)
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._token_state.clear()
        self._token_shape = None

    def _after_forward(self, module, args, output):
        """The pass is over: its per-token state steers no later call of a sub-module (which
        fails with a clear error instead), except the recomputation of this pass's layers that
        gradient checkpointing runs during the backward pass."""
        self._pass_open = False

    def _before_forward(self, module, args, kwargs):
        """Per forward pass: per-token slots and coefficients, on each site's device."""
        kwargs = self._arguments(args, kwargs)
        tokens = kwargs.get("input_ids")
        if tokens is None:
            tokens = kwargs.get("inputs_embeds")
        if tokens is None:
            raise ValueError("steer: the model was called without input_ids or inputs_embeds")
        batch, length = tokens.shape[0], tokens.shape[1]
        mask = kwargs.get("attention_mask")
        mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        # a 2-D mask padded to a static cache's capacity (BLOOM): its columns from the cache's count
        mask_past = padded_mask_past(cache_of(kwargs), mask, length, kwargs.get("cache_position"))
        if mask_past is not None and not isinstance(mask_past, torch.Tensor):
            mask, mask_past = mask[:, :mask_past + length], None  # the usual form [B, past + T]
        steer_here = None
        if self.positions != "all":
            past = past_length(kwargs, mask, length, self._recurrent_seen)
            if mask_past is not None:
                past = mask_past
            if isinstance(past, torch.Tensor) and self._generate_prompt is None and not tracing(tokens):
                past = int(past)  # a host sync, outside generate only: it tracks the prompt below
            cache = cache_of(kwargs)
            if isinstance(past, int) and past == 0 and (self._whole_prompts or not (
                    cache is None and length == self._last_length + 1 and self._extends_prompt(tokens))):
                self._prompt_len = length
                self._prompt_tokens = tokens.detach().clone()
            elif (isinstance(past, int) and past > 0 and length > 1 and cache is not None
                  and not checks_drafts(kwargs, length)):
                # more prompt on top of the cache: a prefill chunk, or a continued conversation
                self._prompt_len = past + length
            self._last_length = length
            if self._generate_prompt is not None:  # inside generate: its input is the prompt
                self._prompt_len = self._generate_prompt
            steer_here = (self._from_token_on(mask, past, batch, length, tokens.device, cache, mask_past)
                          if self.positions == "from" else
                          self._positions_steered(batch, past, length, tokens.device))
        if mask is not None:
            valid = _pass_columns(mask, mask_past, length).to(torch.bool)
            steer_here = valid if steer_here is None else steer_here & valid
        row_slot, row_coeff = self._rows_for(batch)
        slot = row_slot.to(tokens.device)[:, None].expand(batch, length)
        if steer_here is not None:
            slot = torch.where(steer_here, slot, torch.full_like(slot, -1))
        slot = slot.reshape(-1).contiguous()
        coeff = row_coeff.to(tokens.device)[:, None].expand(batch, length).reshape(-1).contiguous()
        self._token_shape = (batch, length)
        keep = kwargs.get("logits_to_keep")
        # some models run their top layers on the kept positions only (Gemma 4's KV-shared layers)
        self._kept = keep if isinstance(keep, int) and not isinstance(keep, bool) and 0 < keep < length else None
        self._pass_open = True
        self._token_state = {}
        for site in self.sites:
            if site.device not in self._token_state:
                self._token_state[site.device] = (
                    slot.to(site.device, non_blocking=True),
                    coeff.to(site.device, non_blocking=True),
                )

    def _arguments(self, args, kwargs) -> dict:
        """The forward call's arguments by name: positional ones (``model(ids, mask)``) are
        named after ``model.forward``'s parameters, whose order differs between architectures
        (GPT-2 takes the cache second, Llama the attention mask)."""
        if not args:
            return kwargs
        named = dict(zip(self._positional, args))
        named.update(kwargs)
        return named

    def _rows_for(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._rows is None:
            return self._row_slot.expand(batch), self._row_coeff.expand(batch)
        if batch == self._rows:
            return self._row_slot, self._row_coeff
        copies = self._copies(batch, self._rows, "slots/coeff were given for")
        # num_return_sequences / beams: row i -> rows i*c .. i*c+c-1
        return self._row_slot.repeat_interleave(copies), self._row_coeff.repeat_interleave(copies)

    def _copies(self, batch: int, rows: int, given: str) -> int:
        """How many copies of each of ``rows`` rows make the batch: only ``generate`` expands a
        batch (``num_return_sequences``, beams), only by a whole number of copies, and only a
        batch given to it with ``rows`` rows (6 prompts are not 3 rows' copies)."""
        if self._in_generate and batch % rows == 0 and self._generate_rows in (rows, None):
            return batch // rows
        raise ValueError(
            f"the batch has {batch} rows but {given} {rows}: give one per row of the batch "
            "(inside generate, num_return_sequences / beam copies of a row share its values)"
        )

    def _positions_steered(self, batch, past, length, device) -> torch.Tensor | None:
        if self.positions == "all":
            return None
        if self.positions == "mask":
            mask = self._mask_on.get(device)
            if mask is None:  # placed once per device
                mask = self._mask_on[device] = self._position_mask.to(device)
            rows, width = mask.shape
            if batch != rows:
                mask = mask.repeat_interleave(self._copies(batch, rows, "the positions mask has"), dim=0)
            # columns past..past+length-1 of the mask; those beyond it are not steered
            columns = torch.arange(length, device=device) + (past.to(device) if isinstance(past, torch.Tensor) else past)
            inside = columns < width
            return mask[:, columns.clamp(max=width - 1)] & inside[None, :]
        if isinstance(past, torch.Tensor):
            past = past.to(device)
        absolute = torch.arange(length, device=device) + past
        prompt = absolute < self._prompt_len
        chosen = prompt if self.positions == "prompt" else ~prompt
        return chosen[None, :].expand(batch, length)

    def _from_token_on(self, mask, past, batch, length, device, cache, mask_past=None) -> torch.Tensor:
        """``positions=k``: the pass's tokens whose index among their row's real tokens is
        ``>= k``. With an attention mask over the whole sequence (``[B, past + T]``, as
        ``generate`` and cached calls pass it) the index is ``cumsum(mask) - 1`` at this pass's
        columns, so left padding shifts nothing. Without a mask it is ``past + t`` less the pads
        that earlier masked passes fed the same cache: Mamba and Mamba 2 get the mask for the
        prompt pass only, and their recurrent state's token count includes its left pads."""
        if mask is None and self._generate_mask is not None:
            return self._generate_mask_index(past, batch, length, device) >= self._from_token
        if mask is None:
            if isinstance(past, torch.Tensor):
                past = past.to(device)
            index = torch.arange(length, device=device)[None, :] + past
            pads = self._pads_of(cache)
            if pads is not None and pads.shape[0] == batch and not (isinstance(past, int) and past == 0):
                index = index - pads.to(device)[:, None]
            index = index.expand(batch, length)
        else:
            counts = _pass_columns(mask.long().cumsum(-1), mask_past, length)
            index = counts - 1
            if cache is not None:  # the pads among the columns up to this pass's last
                end = mask.shape[1] if mask_past is None else mask_past.to(mask.device) + length
                self._remember_pads(cache, end - counts[:, -1])
        return index >= self._from_token

    def _generate_mask_index(self, past, batch, length, device) -> torch.Tensor:
        """``positions=k`` inside a ``generate`` call whose passes come without a 2-D mask (a
        static cache gets a 4-D one, which does not say which keys are pads): each token's index
        among its row's real tokens from the call's own 2-D mask ``[R, P]``; a prompt pad's is
        -1, and every token after the prompt is real (generate extends the mask with ones)."""
        index = self._generate_index.get(device)
        if index is None:  # placed once per device and call
            given = self._generate_mask.to(device).bool()
            index = self._generate_index[device] = torch.where(given, given.long().cumsum(1) - 1, -1)
        rows, width = index.shape
        columns = torch.arange(length, device=device) + (past.to(device) if isinstance(past, torch.Tensor) else past)
        real = index.max(1, keepdim=True).values  # the last real prompt token's index (-1: none)
        got = torch.where(columns < width, index[:, columns.clamp(max=width - 1)], real + columns - width + 1)
        if batch != rows:
            got = got.repeat_interleave(self._copies(batch, rows, "the generate call's attention mask has"), dim=0)
        return got

    def _pads_of(self, cache):
        try:
            return self._pads_seen.get(cache) if cache is not None else None
        except TypeError:  # not weakly referenceable (legacy tuple caches)
            return None

    def _remember_pads(self, cache, pads: torch.Tensor) -> None:
        try:
            self._pads_seen[cache] = pads
        except TypeError:  # legacy tuple caches: their passes come with masks anyway
            pass

    def _extends_prompt(self, tokens: torch.Tensor) -> bool:
        """Whether ``tokens`` are the last prompt followed by more tokens (a model re-running
        the whole sequence at each generation step; the caller also checks that the pass is one
        token longer than the last, else it is a new prompt continuing a conversation)."""
        prompt = self._prompt_tokens
        return (prompt is not None and tokens.shape[0] == prompt.shape[0]
                and tokens.shape[1] > prompt.shape[1] and tokens.shape[2:] == prompt.shape[2:]
                and torch.equal(tokens[:, :prompt.shape[1]], prompt.to(tokens.device)))

    def _states(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """This pass's per-token states ``[B, T, D]`` in ``hidden`` (a view when ``hidden`` is
        contiguous): ``hidden`` itself, or its flattened ``[B*T, D]`` form (OPT's feed-forward,
        MoE internals), or the active copy of a residual stream kept as ``[S, B, T, D]`` (Gemma
        3n); ``None`` when ``hidden`` is not per token of this pass."""
        if self._token_shape is None:
            return None
        return token_states(hidden, *self._token_shape, self._stream)

    def _site_hook(self, site: _Site):
        def hook(module, args, kwargs, output):
            if not (self._pass_open or in_backward()):
                raise RuntimeError(
                    f"steer: {type(module).__name__} ran outside a forward pass of the steered "
                    f"model ({type(self.model).__name__}): call the model itself (or its "
                    "generate), not one of its sub-modules"
                )
            hidden = output[0] if isinstance(output, tuple) else output
            states = self._states(hidden)
            token_slot, token_coeff = self._token_state[site.device]
            if states is None and self._kept is not None:  # the last `kept` positions only
                batch, length = self._token_shape
                states = token_states(hidden, batch, self._kept, self._stream)
                token_slot = token_slot.view(batch, length)[:, -self._kept:].reshape(-1)
                token_coeff = token_coeff.view(batch, length)[:, -self._kept:].reshape(-1)
            if states is None:
                raise RuntimeError(
                    f"steer: {type(module).__name__} returned hidden states of shape "
                    f"{tuple(getattr(hidden, 'shape', ()))}, not one state per token of the model's "
                    f"forward pass (batch x length {self._token_shape}): call the model itself, not "
                    "one of its sub-modules; a model whose layers return other shapes cannot be "
                    "steered there"
                )
            # token_slot is -1 for unsteered tokens; index K of slot_map holds -1.
            slot = token_slot if site.identity else site.slot_map[token_slot]
            src = None
            if site.source == "input":
                source = args[0] if args else next(iter(kwargs.values()))
                src = source.reshape(-1, source.shape[-1])
            width = states.shape[-1]
            differentiable = torch.is_grad_enabled() and (
                hidden.requires_grad or any(t is not None and t.requires_grad
                                            for t in (site.bias, site.A, site.B))
            )
            if differentiable or not hidden.is_contiguous():
                steered = ops.steer(states.reshape(-1, width), slot, token_coeff, site.bias,
                                    site.A, site.B, src, self.normalize,
                                    validate=False).view_as(states)
                steered = _put_states(hidden, steered, self._stream)
                if isinstance(output, tuple):
                    return (steered,) + tuple(output[1:])
                return steered
            # hidden is contiguous, so ``states`` is a view of it: steer in place
            ops.steer_(states.view(-1, width), slot, token_coeff, site.bias, site.A, site.B, src,
                       self.normalize, validate=False)
            return output

        return hook


def _pass_columns(values: torch.Tensor, mask_past, length: int) -> torch.Tensor:
    """The columns of a per-column tensor over the attention mask (``[B, W]``) that this pass's
    ``length`` tokens occupy: the last ``length`` ones, or for a mask padded to a static cache's
    capacity (``mask_past``: the tokens cached before the pass, a 0-dim tensor) the ``length``
    from ``mask_past`` on, gathered without a host sync."""
    if mask_past is None:
        return values[:, -length:]
    columns = torch.arange(length, device=values.device) + mask_past.to(values.device)
    return values.index_select(1, columns)


def _put_states(hidden: torch.Tensor, steered: torch.Tensor, stream: int) -> torch.Tensor:
    """``hidden`` with its per-token states (``steerkern.models.token_states``) replaced by
    ``steered [B, T, D]``, out of place: ``steered`` in ``hidden``'s shape, or for parallel
    residual streams ``[S, B, T, D]`` the other copies unchanged around copy ``stream``."""
    if hidden.dim() == 4:
        return torch.cat([hidden[:stream], steered[None], hidden[stream + 1:]], dim=0)
    return steered.reshape(hidden.shape)


@contextlib.contextmanager
def steer(model: nn.Module, vectors, coeff=1.0, *, slots=None, positions="all", normalize=False):
    """Steer ``model`` inside the ``with`` block.

    Args:
        model: a causal LM.
        vectors: a ``SteeringVector`` (every row) or a list of them (pick per row with ``slots``).
        coeff: one number for every row, or per-row numbers ``[batch]``.
        slots: per-row index into ``vectors``; -1 leaves a row unsteered. Default: vector 0.
        positions: "all" tokens, "prompt" only, "generated" only, a bool mask ``[batch, seq]``,
            or an int ``k``: each row's tokens from its ``k``-th real token on (see ``SteeringBank``).
        normalize: keep each steered hidden state's L2 norm.

    Nested ``steer`` blocks add up. Hooks are removed on exit, exceptions included, and a bad
    argument raises before anything is attached, leaving the model as it was. The hooks steer
    every pass of the model whichever thread runs it, so entering ``steer`` while a block
    entered in another thread steers the model raises ``RuntimeError`` (one batch with per-row
    slots serves concurrent requests).

    Example:
        >>> with steer(model, happy, coeff=4.0):                           # doctest: +SKIP
        ...     out = model.generate(**tokenizer(prompts, return_tensors="pt", padding=True))
        >>> with steer(model, [happy, formal], slots=[0, 1, -1], coeff=[4, 2, 0]):  # doctest: +SKIP
        ...     out = model.generate(**batch)
    """
    bank = SteeringBank(model, vectors, positions=positions, normalize=normalize)
    bank.set_batch(slots=slots, coeff=coeff)
    with bank.attached():
        yield bank
