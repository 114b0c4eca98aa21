"""Contrast pairs for extraction and labelled binary-choice prompts for evaluation.

Every pair is a ``(chosen, rejected)`` pair of texts that differ minimally; extraction reads the
hidden state at the **last** token(s) of each text, so every text here is built to end where the
model's state matters:

- persona pairs (repeng style): a persona instruction ("Pretend you're {an honest / a dishonest}
  person ...") as the user turn, rendered through the tokenizer's chat template with the
  assistant turn opened, followed by the first few tokens of a neutral suffix. No end-of-turn
  token follows the suffix: the text ends inside the assistant's answer. Each suffix is cut at
  several token lengths.
- minimal pairs given directly (``"I love cheese; ..."`` / ``"I hate cheese; ..."``).
- CAA / model-written-evals items: the question (user turn) followed by the matching answer
  versus the question followed by the non-matching answer, cut so that the answer token (" Yes" /
  " No", or the letter of "(A)" / "(B)") is the last token.

The package ships small contrast sets written for this project (``steerkern/concepts/*.json``):
neutral suffixes, persona pairs and 24 labelled yes/no eval prompts for each concept
(:func:`list_concepts`, :func:`concept_pairs`, :func:`concept_eval_prompts`).
"""

from __future__ import annotations

import json
import numbers
import os
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path

from steerkern import checks
from steerkern.checks import count, encodable, flag, hf_tokenizer, real
from steerkern.tokens import short_repr

DEFAULT_TEMPLATE = "Pretend you're {persona} person making statements about the world."


@dataclass
class PairSet:
    """Contrast pairs plus what they are about.

    Attributes:
        pairs: ``[(chosen, rejected), ...]`` texts (each a non-empty string; a list or tuple
            of pairs, stored as a list of tuples); extraction reads their last tokens. May be
            empty here; ``extract`` / ``train_adapter`` refuse an empty set.
        concept: the concept's name (recorded in the vector's metadata), or None.
        source: where the pairs came from ("persona", "minimal", "mwe", ...).

    ``a + b`` concatenates with another PairSet or a list of ``(chosen, rejected)`` pairs.

    Raises:
        TypeError / ValueError: naming the argument, for pairs that are not a list of two
            non-empty strings each, or a concept / source that is not a string.
    """

    pairs: list[tuple[str, str]] = field(default_factory=list)
    concept: str | None = None
    source: str = "pairs"

    def __post_init__(self):
        self.pairs = _pair_list(self.pairs, "pairs")
        if self.concept is not None and not isinstance(self.concept, str):
            raise TypeError(f"concept must be a name (a str) or None, got {type(self.concept).__name__}")
        if not isinstance(self.source, str):
            raise TypeError(f"source must be a str (where the pairs came from, e.g. 'minimal'), "
                            f"got {type(self.source).__name__}")

    def __len__(self) -> int:
        return len(self.pairs)

    def __iter__(self):
        return iter(self.pairs)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return PairSet(self.pairs[index], self.concept, self.source)
        return self.pairs[index]

    def __add__(self, other) -> PairSet:
        if isinstance(other, PairSet):
            added = other.pairs
        elif isinstance(other, Iterable) and not isinstance(other, (str, bytes, dict)):
            added = _pair_list(list(other), "the pairs added")
        else:
            raise TypeError(f"a PairSet can be added only to another PairSet or a list (any "
                            f"iterable) of (chosen, rejected) string pairs, got {type(other).__name__}")
        concept = self.concept if self.concept == getattr(other, "concept", None) else None
        return PairSet(list(self.pairs) + list(added), concept, "mixed")

    @property
    def chosen(self) -> list[str]:
        return [c for c, _ in self.pairs]

    @property
    def rejected(self) -> list[str]:
        return [r for _, r in self.pairs]


def _pair_list(pairs, argument: str) -> list[tuple[str, str]]:
    """``pairs`` (a list or tuple of ``(chosen, rejected)`` pairs of non-empty strings) as a
    list of tuples, possibly empty. Raises ``TypeError`` / ``ValueError`` naming ``argument``
    (and the pair)."""
    if not isinstance(pairs, (list, tuple)):
        raise TypeError(f"{argument} must be a list of (chosen, rejected) string tuples, got "
                        f"{type(pairs).__name__}")
    for i, pair in enumerate(pairs):
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
            raise ValueError(f"{argument}[{i}] must be a (chosen, rejected) pair, got {short_repr(pair, 80)}")
        if not all(isinstance(text, str) and text for text in pair):
            raise TypeError(f"{argument}[{i}] must hold two non-empty strings, got {short_repr(pair, 80)}")
        for side, text in zip(("chosen", "rejected"), pair):
            encodable(text, f"{argument}[{i}]'s {side} text")
    return [tuple(pair) for pair in pairs]


def pair_text_name(index: int) -> str:
    """Text ``index`` of a pair list flattened as ``[chosen_0, rejected_0, chosen_1, ...]``,
    named as the caller gave it: ``pairs[i] (chosen)`` / ``pairs[i] (rejected)``."""
    return f"pairs[{index // 2}] ({'chosen' if index % 2 == 0 else 'rejected'})"


def as_pairs(pairs, argument: str = "pairs") -> PairSet:
    """Normalise ``pairs`` to a :class:`PairSet`.

    Accepts a PairSet, a list of ``(chosen, rejected)`` string tuples, or ``(chosen_list,
    rejected_list)``. Raises ``ValueError``/``TypeError`` naming ``argument`` for empty lists,
    unequal lengths, or non-string members.
    """
    if isinstance(pairs, PairSet):
        result = PairSet(list(pairs.pairs), pairs.concept, pairs.source)
    elif (isinstance(pairs, tuple) and len(pairs) == 2
          and all(isinstance(side, list) for side in pairs)):
        chosen, rejected = pairs
        if len(chosen) != len(rejected):
            raise ValueError(
                f"{argument}: {len(chosen)} chosen texts but {len(rejected)} rejected texts: every "
                "chosen text needs exactly one rejected counterpart"
            )
        result = PairSet(_pair_list(list(zip(chosen, rejected)), argument))
    elif isinstance(pairs, (list, tuple)):
        result = PairSet(_pair_list(pairs, argument))
    else:
        raise TypeError(
            f"{argument} must be a list of (chosen, rejected) string tuples or a PairSet, got "
            f"{type(pairs).__name__}"
        )
    if not result.pairs:
        raise ValueError(f"{argument} is empty: give at least one (chosen, rejected) pair")
    return result


# --- rendering -------------------------------------------------------------------------------


# What ``tokenizer=None`` means where a tokenizer is optional.
_NO_TOKENIZER = "no chat template; words stand in for tokens"

# What opens the answer after a question when the tokenizer has no chat template (a base model),
# in extraction (``mwe_pairs``) and in evaluation (``steerkern.items.render``) alike.
ANSWER_CUE = "Answer:"


def render_prompt(tokenizer, user: str, *, system: str | None = None, answer_cue: bool = False) -> str:
    """The text of a chat whose user turn is ``user`` with the assistant turn opened (nothing
    after it), through ``tokenizer.apply_chat_template``. Without a chat template (the tokenizer
    is None or has none): plain ``user + "\\n"``, or with ``answer_cue`` the base-model context
    that opens an answer, ``user + "\\nAnswer:"`` (:data:`ANSWER_CUE`; ``user`` alone, right
    spaces cut, when it already ends with the cue, as many model-written-evals questions do).
    ``system`` goes first, followed by a blank line.

    Raises:
        TypeError: ``tokenizer`` is neither None nor a tokenizer (a callable, with
            ``apply_chat_template`` when it has a chat template)."""
    hf_tokenizer(tokenizer, optional=True, meaning=_NO_TOKENIZER)
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        head = f"{system}\n\n" if system else ""
        if not answer_cue:
            return head + user + "\n"
        if user.rstrip().endswith(ANSWER_CUE):
            return head + user.rstrip()
        return head + f"{user}\n{ANSWER_CUE}"
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": user}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def truncations(text: str, tokenizer=None, cuts: int | None = 3, min_tokens: int = 1) -> list[str]:
    """``text`` cut after several token counts (repeng's truncated suffixes).

    ``cuts`` lengths spread evenly from ``min_tokens`` to the full length (``None``: every
    length). Without a tokenizer, words stand in for tokens.

    Raises:
        TypeError: ``tokenizer`` is neither None nor a tokenizer with ``decode``.
        ValueError: ``cuts`` is not an int >= 1 or None.
    """
    hf_tokenizer(tokenizer, ("decode",), optional=True, meaning=_NO_TOKENIZER)
    if cuts is not None and (isinstance(cuts, bool) or not isinstance(cuts, numbers.Integral) or cuts < 1):
        raise ValueError(f"cuts must be an int >= 1 or None (every length), got {cuts!r}")
    if tokenizer is not None:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        pieces = lambda n: tokenizer.decode(ids[:n])
    else:
        ids = text.split(" ")
        pieces = lambda n: " ".join(ids[:n])
    total = len(ids)
    if total == 0:
        return []
    start = min(min_tokens, total)
    if cuts is None or cuts >= total - start + 1:
        lengths = list(range(start, total + 1))
    else:
        step = (total - start) / max(cuts - 1, 1)
        lengths = sorted({round(start + i * step) for i in range(cuts)}) if cuts > 1 else [total]
    texts = []
    for n in lengths:
        piece = pieces(n)
        # a cut inside a character's bytes (byte-level BPE) decodes to U+FFFD: cut later instead
        while n < total and piece.endswith("\ufffd") and not text.startswith(piece):
            n += 1
            piece = pieces(n)
        if piece not in texts:
            texts.append(piece)
    return texts


def persona_pairs(tokenizer, positive: list[str], negative: list[str], suffixes: list[str], *,
                  template: str = DEFAULT_TEMPLATE, cuts: int | None = 3, system: str | None = None,
                  concept: str | None = None) -> PairSet:
    """Persona template x truncated suffixes, rendered through the chat template.

    For each aligned persona pair ``(positive[i], negative[i])`` and each truncation ``s`` of
    each suffix: chosen = ``render(template.format(persona=positive[i])) + s``, rejected the same
    with ``negative[i]``. ``len(result) = len(positive) * sum(len(truncations(suffix)))``.
    ``tokenizer``: the model's tokenizer (called on a text, with ``decode`` to cut the suffixes,
    and ``apply_chat_template`` when it has a chat template), or None (no chat template; words
    stand in for tokens).

    Raises:
        TypeError: ``tokenizer`` is neither None nor such a tokenizer.
        ValueError: the persona lists are empty or of different lengths, ``suffixes`` or
            ``template`` are unusable.
    """
    hf_tokenizer(tokenizer, ("decode",), optional=True, meaning=_NO_TOKENIZER)
    if len(positive) != len(negative) or not positive:
        raise ValueError(
            f"positive ({len(positive)}) and negative ({len(negative)}) personas must be non-empty "
            "lists of the same length (aligned pairwise)"
        )
    suffixes = _suffix_list(suffixes)
    if not isinstance(template, str) or "{persona}" not in template:
        raise ValueError(f"template must contain '{{persona}}', got {template!r}")
    try:
        template.format(persona="")
    except (KeyError, IndexError, ValueError) as error:
        raise ValueError(f"template={template!r} may hold only the {{persona}} placeholder ({error!r}); "
                         "write literal braces as {{ and }}") from None
    cut_suffixes = [piece for suffix in suffixes for piece in truncations(suffix, tokenizer, cuts)]
    pairs = []
    for pos, neg in zip(positive, negative):
        head_pos = render_prompt(tokenizer, template.format(persona=pos), system=system)
        head_neg = render_prompt(tokenizer, template.format(persona=neg), system=system)
        pairs.extend((head_pos + s, head_neg + s) for s in cut_suffixes)
    return PairSet(pairs, concept, "persona")


# --- model-written evals (CAA format) --------------------------------------------------------

_LETTER = re.compile(r"^\s*\(([A-Za-z])\)\s*$")
_YES_NO = ("yes", "no")
_OPPOSITE = {"yes": "no", "no": "yes", "a": "b", "b": "a"}


def opposite_answer(answer) -> str:
    """The other answer of a two-way question, for an item that gives only
    ``answer_matching_behavior``: ``" Yes"`` <-> ``" No"``, ``" (A)"`` <-> ``" (B)"`` (spacing,
    brackets and case kept; a one-answer list counts as its answer). Raises ``ValueError`` where
    the other side is not determined: a letter beyond A/B, several answers, anything else."""
    if isinstance(answer, (list, tuple)) and len(answer) == 1:
        answer = answer[0]
    word = answer.strip().strip("()").strip() if isinstance(answer, str) else ""
    other = _OPPOSITE.get(word.lower())
    if other is None:
        raise ValueError(f"'answer_not_matching_behavior' is needed: it follows from "
                         f"'answer_matching_behavior' only for Yes/No and (A)/(B), got {answer!r}")
    other = other.upper() if word.isupper() else other.capitalize() if word[0].isupper() else other
    return answer.replace(word, other, 1)


def _answer_form(answer) -> tuple[str, str]:
    """``" (C)"`` -> ``("ab", "C")`` (a letter keeps its case: ``" (c)"`` -> ``("ab", "c")``),
    ``" Yes"`` -> ``("yes_no", "yes")``; anything else raises."""
    if isinstance(answer, str):
        letter = _LETTER.match(answer)
        if letter:
            return "ab", letter.group(1)
        if answer.strip().lower() in _YES_NO:
            return "yes_no", answer.strip().lower()
    raise ValueError(f"answer {answer!r} is neither ' Yes' / ' No' nor a choice letter like ' (A)'")


@dataclass
class MWEItem:
    """One model-written-evals item: ``question``, ``matching`` / ``not_matching`` answers as in
    the file (" Yes", " (A)", ...). Where the file lists several answers for a side (``[" (B)",
    " (C)"]``), ``matching`` / ``not_matching`` is the first and ``all_matching`` /
    ``all_not_matching`` holds them all (empty: the one answer): contrast pairs read the first,
    scores pool them all."""

    question: str
    matching: str
    not_matching: str
    all_matching: tuple[str, ...] = ()
    all_not_matching: tuple[str, ...] = ()

    @property
    def kind(self) -> str:
        return "ab" if _LETTER.match(self.matching) else "yes_no"

    def answers(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """Every matching answer and every non-matching one."""
        return tuple(self.all_matching) or (self.matching,), tuple(self.all_not_matching) or (self.not_matching,)

    def check(self) -> MWEItem:
        """Raise ``ValueError`` unless the question is text and the answers are Yes/No opposites
        or different choice letters (``" (C)"`` vs ``" (A)"`` included; every listed one)."""
        if not isinstance(self.question, str) or not self.question.strip():
            raise ValueError(f"question must be a non-empty string, got {short_repr(self.question, 60)}")
        matching, not_matching = self.answers()
        forms = [[_answer_form(a) for a in side] for side in (matching, not_matching)]
        kinds = {kind for side in forms for kind, _ in side}
        matching_forms = {form.upper() for _, form in forms[0]}
        if (len(kinds) != 1 or matching_forms & {form.upper() for _, form in forms[1]}
                or (kinds == {"yes_no"} and len(matching) + len(not_matching) > 2)
                or self.matching != matching[0] or self.not_matching != not_matching[0]):
            raise ValueError(
                f"answers {self.matching!r} / {self.not_matching!r} must be ' Yes' / ' No' or "
                "different choice letters"
                + (f" (all listed: {list(matching)!r} / {list(not_matching)!r})"
                   if len(matching) + len(not_matching) > 2 else "")
            )
        return self

    @classmethod
    def from_record(cls, row: dict) -> MWEItem:
        """The item of a model-written-evals record (a dict as in the JSONL files), checked."""
        matching = _answer_list(row["answer_matching_behavior"])
        other = row.get("answer_not_matching_behavior")
        not_matching = _answer_list(opposite_answer(matching) if other is None else other)
        return cls(row["question"], matching[0], not_matching[0],
                   matching if len(matching) > 1 else (),
                   not_matching if len(not_matching) > 1 else ()).check()


def load_mwe(path, *, limit: int | None = None) -> list[MWEItem]:
    """Read model-written-evals items (persona Yes/No statements or A/B questions).

    The file is JSONL, one item per line, as in Anthropic's evals repository, or one JSON array
    of items, as in CAA's ``datasets/*/*.json`` (UTF-8, a byte-order mark allowed). Each item
    needs ``question``, ``answer_matching_behavior`` and ``answer_not_matching_behavior``
    (``" Yes"`` / ``" No"``, ``" (A)"`` / ``"(B)"`` / ``" (C)"`` ..., or lists of those: see
    :class:`MWEItem`); the last may be left out where it follows from the first (Yes/No,
    (A)/(B): :func:`opposite_answer`), as ``evaluate`` takes such items too. Raises ``FileNotFoundError`` / ``ValueError`` naming the path and the line (JSONL)
    or item (array), ``TypeError`` naming ``path`` when it is not a str or ``pathlib.Path``.
    """
    path = checks.path(path, "path", what="the path of a model-written-evals file (JSONL or JSON)")
    if not path.is_file():
        raise FileNotFoundError(f"load_mwe: no such file {str(path)!r}")
    limit = count(limit, "limit", optional=True)
    items = []
    for where, row in json_records(path):
        try:
            item = MWEItem.from_record(row)
        except (ValueError, KeyError, TypeError, IndexError) as error:
            raise ValueError(
                f"{str(path)!r} {where} is not a model-written-evals item (needs "
                f"question, answer_matching_behavior, answer_not_matching_behavior): {error}"
            ) from None
        items.append(item)
        if limit is not None and len(items) >= limit:
            break
    if not items:
        raise ValueError(f"{str(path)!r} holds no items")
    return items


def json_records(path) -> list[tuple[str, object]]:
    """The records of a JSON file (a list of records, or one record over several lines) or of a
    JSONL file (one record per line, blank lines skipped), whatever its extension: ``(where,
    record)`` pairs, ``where`` being ``"item N"`` or ``"line N"`` for error messages. UTF-8, a
    byte-order mark allowed; lines are split on ``"\\n"`` only (a JSON string may hold U+2028 raw). Raises
    ``ValueError`` naming ``path`` (and the line) for text that is not UTF-8 or not JSON,
    ``TypeError`` when ``path`` is not a str or ``pathlib.Path``."""
    path = checks.path(path, "path", what="the path of a JSON or JSONL file")
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: drop a byte-order mark
    except UnicodeDecodeError as error:
        raise ValueError(f"{str(path)!r} is not UTF-8 text ({error}): save it as UTF-8") from None
    try:
        return _json_records(path, text)
    except RecursionError:  # JSON nested deeper than Python's parser goes: '[[[[...' of a damaged file
        raise ValueError(f"{str(path)!r} nests JSON deeper than it can be read: a damaged file, or not "
                         "model-written-evals items / pairs") from None


def _json_records(path: Path, text: str) -> list[tuple[str, object]]:
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except ValueError as error:
            records, _ = _json_lines(text)  # JSONL whose records are arrays: [chosen, rejected]
            if records is None:
                raise ValueError(f"{str(path)!r} starts a JSON array but is not valid JSON (nor JSONL): "
                                 f"{error}") from None
            return records
        return [(f"item {number}", row) for number, row in enumerate(rows, 1)]
    records, failure = _json_lines(text)
    if records is not None:
        return records
    try:  # one record written over several lines
        return [("item 1", json.loads(text))]
    except ValueError:
        raise ValueError(f"{str(path)!r} is not valid JSON or JSONL ({failure}): "
                         "give one JSON list or one JSON object per line") from None


def _json_lines(text: str) -> tuple[list[tuple[str, object]] | None, str | None]:
    """``(records, None)`` when every non-blank line of ``text`` is one JSON value, else
    ``(None, "line N: error")`` for the first line that is not."""
    records = []
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            records.append((f"line {number}", json.loads(line)))
        except ValueError as error:
            return None, f"line {number}: {error}"
    return records, None


def _as_item(entry, index: int) -> MWEItem:
    """An :class:`MWEItem`, or a raw model-written-evals row (a dict as in the JSONL files),
    checked; raises ``ValueError`` naming ``items[index]``."""
    try:
        if isinstance(entry, MWEItem):
            return entry.check()
        if isinstance(entry, dict):
            return MWEItem.from_record(entry)
        raise TypeError(f"expected an MWEItem or a dict row, got {type(entry).__name__}")
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(
            f"items[{index}] is not a model-written-evals item (needs question, "
            f"answer_matching_behavior, answer_not_matching_behavior): {error}"
        ) from None


def _answer_list(answer) -> tuple:
    """A record's answer as a tuple: some model-written-evals files list several answers."""
    if isinstance(answer, list):
        if not answer:
            raise ValueError("an answer list is empty")
        return tuple(answer)
    return (answer,)


def split_items(items: list, held_out: float = 0.2, seed: int = 0) -> tuple[list, list]:
    """Deterministic shuffled split into ``(train, held)``; ``held_out`` is a fraction in (0, 1)
    or a count."""
    if isinstance(items, (str, bytes, dict)) or not isinstance(items, Sequence):
        raise TypeError(f"items must be a list of items, got {type(items).__name__}")
    if not items:
        raise ValueError("items is empty")
    try:  # a count (any integral type: numpy, a 0-d tensor; never a bool), or a fraction
        n_held = count(held_out, "held_out")
    except ValueError:
        try:
            fraction = real(held_out, "held_out", positive=True)
        except ValueError:
            fraction = 1.0
        if fraction >= 1.0:
            raise ValueError(f"held_out must be a fraction in (0, 1) or a positive int count, got "
                             f"{held_out!r}") from None
        n_held = max(1, round(len(items) * fraction))
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    if not 0 < n_held < len(items):
        raise ValueError(f"held_out={held_out} leaves no training or no held-out items of {len(items)}")
    held = sorted(order[:n_held])
    train = sorted(order[n_held:])
    return [items[i] for i in train], [items[i] for i in held]


def answer_text(answer: str) -> str:
    """The answer as it ends a contrast text, cut so that its answer token is the last token:
    " Yes" -> "Yes", " (A)" -> "(A" (the letter, as CAA reads it)."""
    letter = _LETTER.match(answer)
    return f"({letter.group(1)}" if letter else answer.strip()


def _item_list(items) -> list:
    """``items`` (a list, tuple or other iterable of model-written-evals items) as a non-empty
    list; the items themselves are checked where they are read (``_as_item``)."""
    if isinstance(items, (str, bytes, dict)) or not hasattr(items, "__iter__"):
        raise TypeError(f"items must be a list of model-written-evals items (MWEItem or dicts; "
                        f"steerkern.load_mwe reads a file), got {type(items).__name__}")
    items = list(items)
    if not items:
        raise ValueError("items is empty: give at least one model-written-evals item")
    return items


def mwe_pairs(items: list[MWEItem], tokenizer=None, *, system: str | None = None,
              concept: str | None = None) -> PairSet:
    """CAA contrast pairs: ``render(question) + matching answer`` vs ``render(question) +
    non-matching answer``, each ending at its answer token.

    With a chat template the answer opens the assistant turn; without one (a base model, or no
    tokenizer) it follows ``"question\\nAnswer: "`` (``render_prompt(..., answer_cue=True)``), the
    context ``steerkern.eval`` scores the same items in, so that a vector is read where it will
    be evaluated.

    Raises:
        TypeError: ``tokenizer`` is neither None nor a tokenizer.
        ValueError: ``items`` is empty or an item is unusable."""
    hf_tokenizer(tokenizer, optional=True, meaning=_NO_TOKENIZER)
    items = _item_list(items)
    pairs = []
    for index, item in enumerate(items):
        item = _as_item(item, index)
        head = render_prompt(tokenizer, item.question, system=system, answer_cue=True)
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            head += " "
        pairs.append((head + answer_text(item.matching), head + answer_text(item.not_matching)))
    return PairSet(pairs, concept, "mwe")


def mwe_eval_prompts(items: list[MWEItem]) -> list[dict]:
    """Labelled binary-choice prompts from MWE items: ``{"prompt", "label", "choices"}``.

    ``choices`` is ``("Yes", "No")`` or the item's two letters in alphabetical order (``("A",
    "B")``, or ``("A", "C")`` for an item whose answers are " (C)" / " (A)"); ``label`` is +1
    when the first choice matches the behaviour, -1 otherwise (so ``label * (log p(first) -
    log p(second))`` rises when the model moves toward the behaviour). An item listing several
    answers for a side (``[" (B)", " (C)"]``) stays a model-written-evals record
    ``{"question", "answer_matching_behavior", "answer_not_matching_behavior"}`` with its
    lists, which ``evaluate`` scores pooling each side's letters. Raises ``ValueError`` naming
    the item when its answers are not Yes/No or different letters, and when ``items`` is empty
    (as :func:`mwe_pairs` does); ``TypeError`` when it is not a list of items."""
    items = _item_list(items)
    prompts = []
    for index, item in enumerate(items):
        item = _as_item(item, index)
        matching_all, not_matching_all = item.answers()
        if len(matching_all) + len(not_matching_all) > 2:
            prompts.append({"question": item.question, "answer_matching_behavior": list(matching_all),
                            "answer_not_matching_behavior": list(not_matching_all)})
            continue
        kind, matching = _answer_form(item.matching)
        if kind == "ab":
            choices = tuple(sorted((matching, _answer_form(item.not_matching)[1]), key=str.upper))
        else:
            choices = ("Yes", "No")
        first = matching == choices[0].lower() if kind == "yes_no" else matching == choices[0]
        prompts.append({"prompt": item.question, "label": 1 if first else -1, "choices": choices})
    return prompts


# --- shipped concepts ------------------------------------------------------------------------


@cache
def _concept_file(name: str) -> dict:
    folder = resources.files("steerkern") / "concepts"
    return json.loads((folder / f"{name}.json").read_text(encoding="utf-8"))


def list_concepts() -> list[str]:
    """Names of the concepts shipped with steerkern (e.g. ``["formality", "honesty", "sentiment"]``)."""
    folder = resources.files("steerkern") / "concepts"
    names = [entry.name[:-5] for entry in folder.iterdir() if entry.name.endswith(".json")]
    return sorted(name for name in names if name != "suffixes")


def _concept(concept: str) -> dict:
    known = list_concepts()
    if concept not in known:
        raise ValueError(f"concept={concept!r} is not shipped with steerkern: use one of {known}")
    return _concept_file(concept)


def _suffix_list(suffixes) -> list[str]:
    """``suffixes`` checked: a non-empty list of non-empty strings."""
    if isinstance(suffixes, (str, bytes)) or not hasattr(suffixes, "__iter__"):
        raise TypeError(f"suffixes must be a list of strings, got {type(suffixes).__name__}")
    suffixes = list(suffixes)
    if not suffixes:
        raise ValueError("suffixes is empty: give at least one neutral continuation")
    for i, suffix in enumerate(suffixes):
        if not isinstance(suffix, str) or not suffix.strip():
            raise ValueError(f"suffixes[{i}] must be a non-empty string, got {suffix!r}")
    return suffixes


def _first_suffixes(suffixes, max_suffixes):
    """The default neutral suffixes or the given ones, the first ``max_suffixes`` of them."""
    if max_suffixes is not None and (isinstance(max_suffixes, bool) or not isinstance(max_suffixes, numbers.Integral)
                                     or max_suffixes < 1):
        raise ValueError(f"max_suffixes must be None (all) or an int >= 1, got {max_suffixes!r}")
    suffixes = _suffix_list(suffixes) if suffixes is not None else neutral_suffixes()
    return suffixes if max_suffixes is None else suffixes[:max_suffixes]


def neutral_suffixes() -> list[str]:
    """The ~60 short neutral sentence openings shipped with steerkern."""
    return list(_concept_file("suffixes")["suffixes"])


def concept_pairs(concept: str, tokenizer=None, *, suffixes: list[str] | None = None,
                  cuts: int | None = 3, max_suffixes: int | None = None, minimal: bool = False,
                  system: str | None = None) -> PairSet:
    """Persona contrast pairs for a shipped concept (its personas x the neutral suffixes, cut at
    ``cuts`` token lengths each), plus its hand-written minimal pairs when ``minimal=True``.
    ``tokenizer`` as in :func:`persona_pairs` (None, or a tokenizer with ``decode``).

    Raises:
        TypeError: ``tokenizer`` is neither None nor a tokenizer with ``decode``.
        ValueError: ``concept`` is not shipped, or ``suffixes`` / ``max_suffixes`` / ``cuts``
            are unusable."""
    hf_tokenizer(tokenizer, ("decode",), optional=True, meaning=_NO_TOKENIZER)
    spec = _concept(concept)
    minimal = flag(minimal, "minimal")
    suffixes = _first_suffixes(suffixes, max_suffixes)
    result = persona_pairs(tokenizer, spec["positive"], spec["negative"], suffixes,
                           template=spec.get("template", DEFAULT_TEMPLATE), cuts=cuts,
                           system=system, concept=concept)
    if minimal:
        result = result + PairSet([tuple(p) for p in spec["minimal_pairs"]], concept)
        result.concept = concept
    return result


def concept_minimal_pairs(concept: str) -> PairSet:
    """The hand-written minimal pairs of a shipped concept (plain texts, no chat template)."""
    return PairSet([tuple(p) for p in _concept(concept)["minimal_pairs"]], concept, "minimal")


def concept_eval_prompts(concept: str) -> list[dict]:
    """The shipped labelled yes/no prompts of a concept: ``[{"prompt": str, "label": +1 | -1}]``;
    label +1 means answering "Yes" agrees with the concept's positive side."""
    return [dict(entry) for entry in _concept(concept)["eval"]]


def make_pairs(tokenizer=None, *, concept: str | None = None, positive: list[str] | None = None,
               negative: list[str] | None = None, template: str = DEFAULT_TEMPLATE,
               suffixes: list[str] | None = None, cuts: int | None = 3,
               max_suffixes: int | None = None, pairs=None, mwe=None,
               system: str | None = None) -> PairSet:
    """Build contrast pairs from any mix of sources (concatenated in this order):

    - ``concept``: a shipped concept's persona pairs (:func:`concept_pairs`);
    - ``positive`` / ``negative``: your own aligned persona lists over ``template`` and
      ``suffixes`` (default: the shipped neutral suffixes), each suffix cut at ``cuts`` lengths;
    - ``pairs``: minimal pairs given directly, ``[(chosen, rejected), ...]``;
    - ``mwe``: model-written-evals items (a path to a JSONL file or a list of :class:`MWEItem`),
      question + matching answer vs question + non-matching answer, read at the answer token.

    Example:
        >>> make_pairs(pairs=[("I love cheese; let me tell you about the andes mountains",
        ...                    "I hate cheese; let me tell you about the andes mountains")]).source
        'minimal'

    ``tokenizer``: None (no chat template; words stand in for tokens) or the model's tokenizer
    (with ``decode`` when ``concept`` or ``positive`` / ``negative`` are given); a
    ``TypeError`` names it otherwise.
    """
    hf_tokenizer(tokenizer, ("decode",) if concept is not None or positive is not None
                 or negative is not None else (), optional=True, meaning=_NO_TOKENIZER)
    parts: list[PairSet] = []
    if concept is not None:
        parts.append(concept_pairs(concept, tokenizer, suffixes=suffixes, cuts=cuts,
                                   max_suffixes=max_suffixes, system=system))
    if positive is not None or negative is not None:
        parts.append(persona_pairs(tokenizer, list(positive or []), list(negative or []),
                                   _first_suffixes(suffixes, max_suffixes), template=template,
                                   cuts=cuts, system=system))
    if pairs is not None:
        given = as_pairs(pairs, "pairs")
        parts.append(PairSet(given.pairs, given.concept, "minimal"))
    if mwe is not None:
        if isinstance(mwe, (str, os.PathLike)):
            items, name = load_mwe(mwe), checks.path(mwe, "mwe").stem
        elif isinstance(mwe, (bytes, dict)) or not hasattr(mwe, "__iter__"):
            raise TypeError(f"mwe must be the path of a model-written-evals file (a str or "
                            f"pathlib.Path) or a list of items (MWEItem or dicts), got {type(mwe).__name__}")
        else:
            items, name = list(mwe), None
        parts.append(mwe_pairs(items, tokenizer, system=system, concept=name))
    if not parts:
        raise ValueError("make_pairs needs at least one of concept=, positive=/negative=, pairs=, mwe=")
    result = parts[0]
    for extra in parts[1:]:
        result = result + extra
    if concept is not None:
        result.concept = concept
    return result
