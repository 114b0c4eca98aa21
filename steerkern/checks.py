"""Checks of arguments shared by the public API: counts (batch sizes, token counts, ranks,
steps), real numbers (budgets, weights, rates), on/off flags, tensors that hold data (not on
the meta device), the model and its tokenizer."""

import math
import numbers
import os
from pathlib import Path


def _scalar(value, name: str):
    """A 0-d torch tensor or numpy array (``torch.tensor(3)``, ``np.array(0.5)``, what
    ``x.sum()`` gives) as the Python number it holds; any other value unchanged. Bool and
    complex scalars stay as they are, to be refused by the caller's type check; a tensor on
    the ``meta`` device (shape only, no value) raises ``ValueError``."""
    dtype = getattr(value, "dtype", None)
    if dtype is None or getattr(value, "ndim", None) != 0 or not hasattr(value, "item"):
        return value
    if getattr(getattr(value, "device", None), "type", None) == "meta":
        raise ValueError(f"{name} is a tensor on the 'meta' device, which holds no value: give a "
                         "number or a tensor with data")
    if str(dtype) in ("torch.bool", "bool") or getattr(dtype, "is_complex", False) \
            or getattr(dtype, "kind", None) in ("b", "c", "O", "U", "S", "V"):
        return value
    return value.item()


def count(value, name: str, *, minimum: int = 1, optional: bool = False, meaning: str = "") -> int | None:
    """``value`` as a Python ``int >= minimum`` (any integral type: numpy and other integer
    scalars, 0-d integer tensors and arrays too, never a bool), or ``None`` when ``optional``
    and ``value`` is ``None``. ``minimum=None``: any int (a seed, an ``ignore_index``).

    Raises:
        ValueError: naming ``name``, what it must be (``meaning`` adds what ``None`` or the
            minimum stands for, e.g. ``" (None: one batch)"``) and what it got.
    """
    if value is None and optional:
        return None
    value = _scalar(value, name)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) \
            or (minimum is not None and value < minimum):
        kind = "an int" if minimum is None else "a positive int" if minimum == 1 else f"an int >= {minimum}"
        raise ValueError(f"{name} must be {kind}{' or None' if optional else ''}{meaning}, got {value!r}")
    return int(value)


def real(value, name: str, *, positive: bool = False, non_negative: bool = False,
         maximum: float | None = None, meaning: str = "") -> float:
    """``value`` as a finite Python ``float`` (any real type: ints, numpy scalars, 0-d tensors
    and arrays; never a bool), ``> 0`` when ``positive``, ``>= 0`` when ``non_negative``,
    ``<= maximum`` when given.

    Raises:
        ValueError: naming ``name``, what it must be (``meaning`` adds what it stands for, e.g.
            ``" (nats per token)"``) and what it got.
    """
    value = _scalar(value, name)
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) \
            or (positive and value <= 0) or (non_negative and value < 0) \
            or (maximum is not None and value > maximum):
        bounds = " > 0" if positive else " >= 0" if non_negative else ""
        if maximum is not None:
            bounds += f"{',' if bounds else ''} <= {maximum:.3g}"
        raise ValueError(f"{name} must be a finite number{bounds}{meaning}, got {value!r}")
    return float(value)


def flag(value, name: str) -> bool:
    """``value`` as a bool: ``True`` / ``False`` (numpy bools too). A string such as ``"no"``
    or a number would otherwise switch the option on by being truthy.

    Raises:
        TypeError: naming ``name`` and what it got.
    """
    if type(value).__module__ == "numpy" and type(value).__name__ in ("bool_", "bool"):
        value = bool(value)  # np.bool_: named "bool_" in numpy 1.x, "bool" in numpy 2
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


def with_data(tensor, name: str):
    """``tensor`` unchanged unless it is a torch tensor on the ``meta`` device, which has a
    shape but no values to steer with, compare or check.

    Raises:
        ValueError: naming ``name``.
    """
    if getattr(getattr(tensor, "device", None), "type", None) == "meta":
        raise ValueError(f"{name} is a tensor on the 'meta' device, which holds no values: "
                         "materialise it (e.g. load the weights, or .to('cpu') a real tensor) first")
    return tensor


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


def path(value, name: str, *, what: str = "a file path") -> Path:
    """``value`` as a ``pathlib.Path``: a non-empty ``str`` or an ``os.PathLike`` (a
    ``pathlib.Path``) that gives one. ``os.fspath``'s own error for a number or ``None`` does
    not say which argument was wrong; an empty string would mean the working directory.

    Raises:
        TypeError: naming ``name``, what it must be (``what``) and what it got.
        ValueError: ``value`` is empty (or only spaces).
    """
    text = value
    if isinstance(value, os.PathLike):
        try:
            text = os.fspath(value)
        except TypeError:
            text = None
    if not isinstance(text, str):
        raise TypeError(f"{name} must be {what}, a str or os.PathLike (e.g. pathlib.Path), "
                        f"got {type(value).__name__}")
    if not text.strip():
        raise ValueError(f"{name} is empty: give {what}")
    return Path(text)


def causal_lm(model) -> None:
    """Refuse what cannot be a causal LM before any work starts.

    Raises:
        TypeError: ``model`` is not a ``torch.nn.Module``, naming the argument.
    """
    import torch

    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a causal LM (a torch.nn.Module, e.g. from steerkern.load_model()), "
                        f"got {type(model).__name__}")


def hf_tokenizer(tokenizer, methods: tuple[str, ...] = (), *, optional: bool = False,
                 meaning: str = "") -> None:
    """Refuse what cannot be a tokenizer before any work starts: it must be callable on a text
    and have each of ``methods`` (and ``apply_chat_template`` when it carries a
    ``chat_template``); ``None`` passes when ``optional``.

    Args:
        methods: what the caller uses besides calling the tokenizer on a text (e.g.
            ``("encode", "decode")``).
        meaning: what ``None`` stands for when ``optional`` (e.g. ``"words stand in for
            tokens"``).

    Raises:
        TypeError: naming ``tokenizer``, what it must be and what it got.
    """
    if tokenizer is None and optional:
        return
    needed = tuple(methods) + (("apply_chat_template",) if getattr(tokenizer, "chat_template", None)
                               and "apply_chat_template" not in methods else ())
    if isinstance(tokenizer, (str, bytes)) or not callable(tokenizer) \
            or not all(callable(getattr(tokenizer, m, None)) for m in needed):
        needs = f" with {' and '.join(needed)}" if needed else ""
        none = f"None ({meaning}) or " if optional and meaning else "None or " if optional else ""
        raise TypeError(f"tokenizer must be {none}the model's tokenizer, a callable{needs} (steerkern.load_model() "
                        f"returns it; or transformers.AutoTokenizer.from_pretrained(...)), got "
                        f"{type(tokenizer).__name__}")


def model_and_tokenizer(model, tokenizer, methods: tuple[str, ...] = ()) -> None:
    """Refuse what cannot be a causal LM and its tokenizer before any work starts.

    Args:
        methods: what the caller uses besides calling the tokenizer on a text (e.g.
            ``("encode", "decode")``).

    Raises:
        TypeError: ``model`` is not a ``torch.nn.Module``, or ``tokenizer`` is not callable or
            lacks one of ``methods`` (see :func:`hf_tokenizer`), naming the argument.
    """
    causal_lm(model)
    hf_tokenizer(tokenizer, methods)
