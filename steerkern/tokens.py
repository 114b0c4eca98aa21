"""Texts to token ids, the one way extraction, training and evaluation all read them, and the
check that they fit the model's positions.

**Special tokens.** A text gets the tokenizer's special tokens (a BOS) unless it already starts
with the BOS string, as a chat template rendered with its ``bos_token`` does; tokens a tokenizer
appends *after* the text (``add_eos_token=True``) are dropped, since steerkern reads the state
at a text's last token and scores the token that follows it. So a vector is read in the same
token context it is evaluated in.
"""

from __future__ import annotations

import reprlib
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn


def text_token_ids(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each text: leading special tokens as the tokenizer adds them (none when the
    text starts with the BOS string), no trailing ones."""
    bos = getattr(tokenizer, "bos_token", None)
    special = [not (bos and text.startswith(bos)) for text in texts]
    plain = _encode(tokenizer, texts, False)
    full = _encode(tokenizer, [t for t, s in zip(texts, special) if s], True)
    out, taken = [], iter(full)
    for ids, add in zip(plain, special):
        out.append(_without_trailing_specials(next(taken), ids, tokenizer) if add else ids)
    return out


def _encode(tokenizer, texts: list[str], special: bool) -> list[list[int]]:
    # one call per text: any callable tokenizer works, not only those that take a batch
    return [list(map(int, tokenizer(text, add_special_tokens=special)["input_ids"])) for text in texts]


def _without_trailing_specials(full: list[int], plain: list[int], tokenizer) -> list[int]:
    """``full`` (the text with the tokenizer's special tokens) cut after the text's own tokens
    ``plain``: what a tokenizer adds before the text stays, what it adds after goes. For an
    empty text, as many leading tokens as the tokenizer puts before a one-letter text."""
    if not plain:
        probe_full, probe = (_encode(tokenizer, ["a"], special)[0] for special in (True, False))
        lead = _start_of(probe, probe_full)
        return full[:lead] if lead is not None else full
    start = _start_of(plain, full)
    # specials that change how the text itself is split: left as the tokenizer gives them
    return full if start is None else full[:start + len(plain)]


def _start_of(part: list[int], whole: list[int]) -> int | None:
    """Where ``part`` first occurs in ``whole`` (``None``: nowhere)."""
    for start in range(len(whole) - len(part) + 1):
        if whole[start:start + len(part)] == part:
            return start
    return None


def position_limit(model: nn.Module) -> tuple[int | None, bool]:
    """``(max positions, learned)``: the config's ``max_position_embeddings`` (or ``n_positions``)
    and whether the model has a learned absolute position table (GPT-2's ``wpe``, OPT's
    ``embed_positions``), which cannot index past it; rotary and ALiBi models run past it with
    degraded quality."""
    from torch import nn  # here: steerkern.data's messages use this module without torch

    config = getattr(model, "config", None)
    limit = None
    for part in (getattr(config, "text_config", None), config):
        for key in ("max_position_embeddings", "n_positions"):
            value = getattr(part, key, None) if part is not None else None
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                limit = value
                break
        if limit is not None:
            break
    learned = any(isinstance(module, nn.Embedding) and _names_positions(name.rsplit(".", 1)[-1])
                  for name, module in model.named_modules())
    return limit, learned


def _names_positions(name: str) -> bool:
    """A module name of a position table: ``wpe`` (GPT-2, GPT-Neo, MPT without ALiBi),
    ``embed_positions`` (OPT, BioGPT), ``position_embeddings``."""
    return name == "wpe" or "position" in name or name.startswith("pos_")


def check_fits_positions(model: nn.Module, lengths: list[int], name: Callable[[int], str],
                         extra: int = 0, fix: str = "shorten it") -> None:
    """Refuse (learned positions) or warn about (other models) the longest sequence when its
    ``lengths[i] + extra`` tokens (``extra``: tokens generated after it) exceed the model's
    positions. ``name(i)`` names sequence ``i`` as the caller's argument."""
    limit, learned = position_limit(model)
    if limit is None or not lengths:
        return
    longest = max(range(len(lengths)), key=lengths.__getitem__)
    total = lengths[longest] + extra
    if total <= limit:
        return
    what = f"{name(longest)} has {lengths[longest]} tokens" + (f" (+{extra} generated)" if extra else "")
    if learned:
        raise ValueError(f"{what} but the model has {limit} learned positions: {fix}")
    warnings.warn(f"{what}, beyond the model's max_position_embeddings={limit}: its states there "
                  "may be degraded", stacklevel=3)


def short_repr(value, width: int = 40) -> str:
    """``repr(value)`` for an error message, strings longer than ``width`` cut in the middle
    (``'I like ... do'``), quotes and brackets kept."""
    shortener = reprlib.Repr()
    shortener.maxstring = shortener.maxother = width
    return shortener.repr(value)
