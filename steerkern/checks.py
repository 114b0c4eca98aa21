"""Checks of arguments shared by the public API: counts (batch sizes, token counts, ranks,
steps), real numbers (budgets, weights, rates), the model and its tokenizer."""

import math
import numbers


def count(value, name: str, *, minimum: int = 1, optional: bool = False, meaning: str = "") -> int | None:
    """``value`` as a Python ``int >= minimum`` (any integral type: numpy and other integer
    scalars too, never a bool), or ``None`` when ``optional`` and ``value`` is ``None``.

    Raises:
        ValueError: naming ``name``, what it must be (``meaning`` adds what ``None`` or the
            minimum stands for, e.g. ``" (None: one batch)"``) and what it got.
    """
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        kind = "a positive int" if minimum == 1 else f"an int >= {minimum}"
        raise ValueError(f"{name} must be {kind}{' or None' if optional else ''}{meaning}, got {value!r}")
    return int(value)


def real(value, name: str, *, positive: bool = False, non_negative: bool = False,
         maximum: float | None = None, meaning: str = "") -> float:
    """``value`` as a finite Python ``float`` (any real type: ints, numpy scalars; never a bool),
    ``> 0`` when ``positive``, ``>= 0`` when ``non_negative``, ``<= maximum`` when given.

    Raises:
        ValueError: naming ``name``, what it must be (``meaning`` adds what it stands for, e.g.
            ``" (nats per token)"``) and what it got.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) \
            or (positive and value <= 0) or (non_negative and value < 0) \
            or (maximum is not None and value > maximum):
        bounds = " > 0" if positive else " >= 0" if non_negative else ""
        if maximum is not None:
            bounds += f"{',' if bounds else ''} <= {maximum:.3g}"
        raise ValueError(f"{name} must be a finite number{bounds}{meaning}, got {value!r}")
    return float(value)


def encodable(text: str, name: str) -> str:
    """``text`` unchanged when it can be written as UTF-8, what every tokenizer takes.

    Raises:
        ValueError: naming ``name`` and the first unpaired surrogate (``"\\ud800"``, which
            a file read with ``errors="surrogateescape"`` or a JSON ``\\u`` escape can hold).
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValueError(f"{name} holds {text[error.start:error.end]!r} at character {error.start}, a lone "
                         "surrogate that no tokenizer can encode: repair the text (e.g. read it "
                         "with errors='replace')") from None
    return text


def model_and_tokenizer(model, tokenizer, methods: tuple[str, ...] = ()) -> None:
    """Refuse what cannot be a causal LM and its tokenizer before any work starts.

    Args:
        methods: what the caller uses besides calling the tokenizer on a text (e.g.
            ``("encode", "decode")``).

    Raises:
        TypeError: ``model`` is not a ``torch.nn.Module``, or ``tokenizer`` is not callable or
            lacks one of ``methods``, naming the argument.
    """
    import torch

    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a causal LM (a torch.nn.Module, e.g. from steerkern.load_model()), "
                        f"got {type(model).__name__}")
    if isinstance(tokenizer, (str, bytes)) or not callable(tokenizer) \
            or not all(callable(getattr(tokenizer, m, None)) for m in methods):
        needs = f" with {' and '.join(methods)}" if methods else ""
        raise TypeError(f"tokenizer must be the model's tokenizer, a callable{needs} (steerkern.load_model() "
                        f"returns it; or transformers.AutoTokenizer.from_pretrained(...)), got "
                        f"{type(tokenizer).__name__}")
