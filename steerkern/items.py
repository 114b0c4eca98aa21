"""Binary-choice items (SPEC section 6): the prompt forms ``evaluate`` accepts, turned into
questions with the token ids whose probabilities a score compares, and how a question is
rendered for the model.

**Scoring (binary choice).** The question is rendered with the tokenizer's chat template as the
user turn, followed by the start of the assistant's reply, so the next token is the answer. At
that position, with ``log p`` the model's next-token log-probabilities,

    score = log sum_{t in positive} p(t)  -  log sum_{t in negative} p(t)          (nats)

where the sets hold every single-token spelling of an answer ("Yes", " Yes", "yes", " yes",
"YES", ... as the vocabulary has them). Accepted prompt forms:

- ``{"prompt": str, "label": +1 | -1}``: positive = yes-variants, negative = no-variants when
  ``label = +1`` (answering yes agrees with the vector's positive side), swapped when ``-1``;
  i.e. ``score = label * (log p(yes) - log p(no))``. An optional ``"choices": ("A", "B")``
  (as ``steerkern.data.mwe_eval_prompts`` writes) makes it a letter item: then ``label = +1``
  means the first choice agrees.
- model-written-evals / CAA items ``{"question", "answer_matching_behavior",
  "answer_not_matching_behavior"}`` (the last may be left out for Yes/No and (A)/(B) answers:
  ``steerkern.data.opposite_answer``) or ``steerkern.data.MWEItem`` s (``load_mwe``): positive =
  the matching answer, so ``score = log p(matching) - log p(not matching)``. Yes/No answers (" Yes"/" No")
  compare the yes/no variant sets. Letter answers (" (A)"/" (B)") are scored with the reply
  prefix ``"("`` rendered after the chat template, so the answer position predicts the letter,
  and compare the letters' variants ("A", " A" vs "B", " B"). Where an item lists several
  answers (``[" (B)", " (C)"]``), each side pools every listed letter's variants.

(The score itself is computed by :func:`steerkern.sweep.score_rows`.)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from steerkern.checks import encodable
from steerkern.data import MWEItem, opposite_answer, render_prompt

YES_NO = ("yes", "no")
LETTER_PREFIX = "("  # the reply opened before a letter answer, so the next token is the letter


@dataclass(frozen=True)
class BinaryItem:
    """A binary-choice question ready for scoring.

    Attributes:
        question: the user turn shown to the model.
        prefix: the start of the assistant's reply rendered before the answer token ("" or "(").
        positive, negative: token ids whose total probability the score compares.
        label: +1 / -1, the orientation: +1 when the positive side is "yes" (Yes/No items) or
            "A" (letter items).
        kind: "yes_no" or "letter".
    """

    question: str
    prefix: str
    positive: tuple[int, ...]
    negative: tuple[int, ...]
    label: int
    kind: str


def answer_token_ids(tokenizer, word: str, *, letter: bool = False, context: str = "") -> tuple[int, ...]:
    """Token ids of every single-token spelling of ``word``: with and without a leading space,
    and (unless ``letter``) in capitalised, lower and upper case. A spelling counts when it is
    one token by itself or one token right after ``context`` (the rendered text the answer
    follows): SentencePiece tokenizers with a dummy prefix encode ``"A"`` alone as ``"▁A"`` but
    predict the bare ``"A"`` after ``"("`` or a newline. Spellings split into several tokens
    are skipped."""
    if letter:
        forms = (word, " " + word)
    else:
        forms = tuple(f for w in (word.capitalize(), word.lower(), word.upper()) for f in (w, " " + w))
    encode = lambda text: tokenizer.encode(text, add_special_tokens=False)
    before = encode(context) if context else []
    ids = set()
    for form in forms:
        alone = encode(form)
        if len(alone) == 1:
            ids.add(int(alone[0]))
        if context:
            after = encode(context + form)
            if len(after) == len(before) + 1 and after[:len(before)] == before:
                ids.add(int(after[-1]))
    if not ids:
        raise ValueError(f"the tokenizer has no single token for the answer {word!r} in any spelling "
                         f"{list(forms)}: this model cannot be scored on it")
    return tuple(sorted(ids))


def _answer_word(text) -> str:
    """' (A)' -> 'A', ' (a)' -> 'a' (a letter keeps its case: the model answers in the case
    the choices are shown in, as the contrast texts of ``data.mwe_pairs`` do), ' Yes' -> 'yes'."""
    if not isinstance(text, str):
        raise TypeError(f"answer must be a string like ' Yes' or ' (A)', got {type(text).__name__}")
    word = text.strip().strip("()").strip()
    if word.lower() in YES_NO:
        return word.lower()
    if len(word) == 1 and word.isalpha():
        return word
    raise ValueError(f"answer {text!r} is neither Yes/No nor a choice letter like ' (A)'")


def _answers(value, key: str) -> list[str]:
    """An answer or a list of answers (some model-written-evals files list several) -> their
    words in order without repeats: ``[" (B)", " (C)"]`` -> ``["B", "C"]``."""
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    if not values:
        raise ValueError(f"{key!r} is an empty list: give the answer, e.g. ' (A)' or ' Yes'")
    words = []
    for v in values:
        word = _answer_word(v)
        if word not in words:
            words.append(word)
    return words


def binary_items(tokenizer, prompts) -> list[BinaryItem]:
    """Turn ``prompts`` (``{"prompt", "label"}`` dicts or model-written-evals items) into
    :class:`BinaryItem` s. Raises ``ValueError`` naming the first bad entry."""
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
        raise TypeError("prompts must be a list of {'prompt': str, 'label': +1|-1} dicts or "
                        "model-written-evals items {'question', 'answer_matching_behavior', ...}")
    if len(prompts) == 0:
        raise ValueError("prompts is empty: give at least one binary-choice prompt")
    ids: dict[tuple[str, bool], tuple[int, ...]] = {}
    # what every question's rendering ends with, before a Yes/No answer and before a letter
    contexts = {False: render(tokenizer, "Question?"), True: render(tokenizer, "Question?", LETTER_PREFIX)}

    def variants(word: str) -> tuple[int, ...]:
        letter = word not in YES_NO
        if (word, letter) not in ids:
            ids[(word, letter)] = answer_token_ids(tokenizer, word, letter=letter, context=contexts[letter])
        return ids[(word, letter)]

    items = []
    for index, entry in enumerate(prompts):
        try:
            items.append(_item(entry, variants))
        except (TypeError, ValueError, KeyError) as error:
            raise ValueError(f"prompts[{index}]: {error}") from None
    for item in items:
        if set(item.positive) & set(item.negative):
            raise ValueError("the tokenizer spells both answers with a shared token; cannot score")
    return items


def _orientation(agreeing: str, other: str) -> int:
    """:attr:`BinaryItem.label` of an item whose positive side is the answer ``agreeing``
    ("yes" or a letter) and negative side ``other``: +1 for "yes" or the earlier letter."""
    if agreeing in YES_NO:
        return 1 if agreeing == "yes" else -1
    return 1 if agreeing.upper() < other.upper() else -1


def _item(entry, variants) -> BinaryItem:
    if isinstance(entry, MWEItem):
        matching, not_matching = entry.answers()
        entry = {"question": entry.question, "answer_matching_behavior": list(matching),
                 "answer_not_matching_behavior": list(not_matching)}
    elif all(hasattr(entry, a) for a in ("question", "matching", "not_matching")):  # an item-like object
        entry = {"question": entry.question, "answer_matching_behavior": entry.matching,
                 "answer_not_matching_behavior": entry.not_matching}
    if not isinstance(entry, Mapping):
        raise TypeError(f"expected a dict, got {type(entry).__name__}")
    if "prompt" in entry:
        question, label = entry["prompt"], entry.get("label")
        if not isinstance(question, str) or not question.strip():
            raise ValueError("'prompt' must be a non-empty string")
        encodable(question, "'prompt'")
        if isinstance(label, bool) or label not in (1, -1):
            raise ValueError(f"'label' must be +1 or -1 (+1: answering yes agrees with the "
                             f"vector's positive side), got {label!r}")
        choices = entry.get("choices", ("Yes", "No"))
        if not (isinstance(choices, (list, tuple)) and len(choices) == 2):
            raise ValueError(f"'choices' must be two answers like ('Yes', 'No') or ('A', 'B'), got {choices!r}")
        first, second = (_answer_word(c) for c in choices)
        if (first in YES_NO) != (second in YES_NO) or first.upper() == second.upper():
            raise ValueError(f"'choices' {choices!r} must be Yes/No or two different letters")
        kind, prefix = ("yes_no", "") if first in YES_NO else ("letter", LETTER_PREFIX)
        agreeing, other = (first, second) if label == 1 else (second, first)
        return BinaryItem(question, prefix, variants(agreeing), variants(other),
                          _orientation(agreeing, other), kind)
    if "question" in entry and "answer_matching_behavior" in entry:
        question = entry["question"]
        if not isinstance(question, str) or not question.strip():
            raise ValueError("'question' must be a non-empty string")
        encodable(question, "'question'")
        match = _answers(entry["answer_matching_behavior"], "answer_matching_behavior")
        other = entry.get("answer_not_matching_behavior")
        if other is None:
            other = opposite_answer(entry["answer_matching_behavior"])
        not_match = _answers(other, "answer_not_matching_behavior")
        shown = f"{entry['answer_matching_behavior']!r} / {other!r}"
        if match[0] in YES_NO:
            flip = "no" if match[0] == "yes" else "yes"
            if not_match == match:
                raise ValueError(f"answers {shown} are the same answer: give the two opposite ones")
            if len(match) > 1 or not_match != [flip]:
                raise ValueError(f"answers {shown} mix Yes/No with another form")
            return BinaryItem(question, "", variants(match[0]), variants(flip),
                              _orientation(match[0], flip), "yes_no")
        if any(w in YES_NO for w in match + not_match) or {w.upper() for w in match} & {w.upper() for w in not_match}:
            raise ValueError(f"answers {shown} are not different letters")
        positive = tuple(sorted({t for w in match for t in variants(w)}))
        negative = tuple(sorted({t for w in not_match for t in variants(w)}))
        return BinaryItem(question, LETTER_PREFIX, positive, negative,
                          _orientation(min(match, key=str.upper), min(not_match, key=str.upper)), "letter")
    raise ValueError("expected {'prompt': str, 'label': +1|-1} or a model-written-evals item "
                     "with 'question' and 'answer_matching_behavior'")


def render(tokenizer, text: str, prefix: str = "", *, answer: bool = True) -> str:
    """The model input for ``text``: the chat template's user turn and the assistant's turn
    opened (plus ``prefix``). Without a chat template: ``"{text}\\nAnswer:"`` (+ ``" " + prefix``)
    when ``answer`` (``steerkern.data.render_prompt(..., answer_cue=True)``, the context
    ``mwe_pairs`` extracts in), else ``"{text}\\n"``."""
    if getattr(tokenizer, "chat_template", None):
        return render_prompt(tokenizer, text) + prefix
    if not answer:
        return render_prompt(tokenizer, text)
    return render_prompt(tokenizer, text, answer_cue=True) + (f" {prefix}" if prefix else "")
