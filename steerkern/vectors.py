"""Steering vectors: per-module steering parts, their metadata, and their file formats.

A :class:`SteeringVector` maps ``(layer, target)`` keys (as in :func:`steerkern.models.resolve_module`)
to :class:`SteeringPart` s. Each part is one entry of the steering operator (SPEC section 1)::

    out[n] <- out[n] + c * ( bias + B @ (A^T @ src[n]) )        bias [D_out], A [D_src, R], B [D_out, R]

with ``src`` the module's output before the update (``source="output"``, so ``D_src == D_out``)
or the module's first positional input (``source="input"``: the low-rank term is then the weight
delta ``B A^T`` of a Linear module, ``D_src = in_features``).

Formats:

- native: safetensors (never pickle). Tensors ``parts.<i>.bias|A|B``; the header's
  ``__metadata__`` holds one key ``"steerkern"`` whose value is JSON
  ``{"format": 1, "parts": [{"layer", "target", "source"}, ...], "metadata": {...}}``.
- interop: the GGUF ``controlvector`` format read and written by llama.cpp, repeng and EasySteer:
  ``general.architecture = "controlvector"``, ``controlvector.model_hint`` (the model type, e.g.
  ``"llama"``), ``controlvector.layer_count`` (the number of direction tensors, as repeng writes
  it), and one F32 tensor ``direction.<N>`` of shape ``[hidden]`` per layer. Every tool puts
  ``direction.N`` on the output of decoder layer ``N`` (0-based), which is steerkern's residual
  part at layer ``N``:

  - llama.cpp adds it at the end of layer ``il = N`` (``build_cvec(cur, il)`` reads
    ``tensors[il]``, loaded from ``direction.il``). Its loader refuses a file holding
    ``direction.0``, any tensor not named ``direction.N``, a non-F32 tensor or one of more than
    one dimension (trailing size-1 dimensions allowed), and sums files given together.
  - repeng writes ``direction.<i>`` for the output of ``model.layers[i]`` (read from
    ``hidden_states[i + 1]``; its ``ControlModule`` wraps ``model.layers[i]``).
  - EasySteer writes the same (plus keys such as ``controlvector.method``), with directions for
    every decoder layer from 0 on, and adds ``direction.N`` to layer ``N``'s output.

  So :meth:`SteeringVector.from_gguf` reads ``direction.0`` as layer 0 (with a warning that
  llama.cpp would refuse the file), and :meth:`SteeringVector.to_gguf` writes only what
  llama.cpp loads: layer 0 cannot be exported. Directions stored in another dtype (F16, BF16,
  F64, quantized) are read as float32 values. Only additive residual parts fit this format.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from steerkern import checks
from steerkern.checks import causal_lm, with_data

RESIDUAL = "residual"
SOURCES = ("output", "input")
FORMAT_VERSION = 1
_HEADER_KEY = "steerkern"
_GGUF_ARCH = "controlvector"
_GGUF_META_KEY = "controlvector.steerkern_metadata"


def package_version() -> str:
    """The installed steerkern version (recorded in every vector's metadata)."""
    try:
        from importlib.metadata import version

        return version("steerkern")
    except Exception:  # not installed as a distribution (e.g. a bare checkout on sys.path)
        return "unknown"


def _check_tensor(value, name: str, ndim: int) -> torch.Tensor | None:
    """``value`` as a finite floating-point tensor of ``ndim`` dimensions (a numpy array, as
    repeng keeps its directions, becomes a tensor of the same dtype), or None."""
    if value is None:
        return None
    if type(value).__module__ == "numpy" and hasattr(value, "__array__"):
        value = torch.tensor(value)  # a copy: repeng's GGUF directions are read-only memory maps
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, a numpy array or None, got {type(value).__name__}")
    with_data(value, name)
    if value.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(value.shape)}")
    if not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {value.dtype}")
    if not bool(torch.isfinite(value).all()):
        raise ValueError(f"{name} contains NaN or Inf: steering parts must be finite")
    return value


@dataclass
class SteeringPart:
    """One steered module's entry: ``delta = bias + B @ (A^T @ src)``.

    Attributes:
        bias: ``[D_out]`` additive vector, or None.
        A: ``[D_src, R]`` read-in basis with ``R >= 1``, or None (then ``B`` is None too).
        B: ``[D_out, R]`` write-out basis, or None.

    Raises:
        ValueError: the parts disagree in shape, hold NaN/Inf, or ``A`` / ``B`` have rank 0
            (use bias only, or rank ``R >= 1``).
        source: ``"output"`` (``src`` = the module's output before the update; ``D_src == D_out``)
            or ``"input"`` (``src`` = the module's first positional input: a weight delta).
    """

    bias: torch.Tensor | None = None
    A: torch.Tensor | None = None
    B: torch.Tensor | None = None
    source: str = "output"

    def __post_init__(self):
        self.bias = _check_tensor(self.bias, "bias", 1)
        self.A = _check_tensor(self.A, "A", 2)
        self.B = _check_tensor(self.B, "B", 2)
        if self.source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}, got {self.source!r}")
        if (self.A is None) != (self.B is None):
            raise ValueError("A and B must be given together (the low-rank term is B @ A^T @ src)")
        if self.bias is None and self.A is None:
            raise ValueError("a SteeringPart needs a bias, or A and B, or all three")
        if self.A is not None:
            if self.A.shape[1] != self.B.shape[1]:
                raise ValueError(
                    f"A {tuple(self.A.shape)} and B {tuple(self.B.shape)} must share the rank R "
                    "(A is [D_src, R], B is [D_out, R])"
                )
            if self.A.shape[1] == 0:
                raise ValueError(
                    f"A {tuple(self.A.shape)} and B {tuple(self.B.shape)} have rank R = 0: a rank-0 "
                    "low-rank term does nothing; pass bias only (A=None, B=None) or A and B of rank R >= 1"
                )
            if self.bias is not None and self.bias.shape[0] != self.B.shape[0]:
                raise ValueError(
                    f"bias has {self.bias.shape[0]} features but B has {self.B.shape[0]} rows: "
                    "both are [D_out, ...]"
                )
            if self.source == "output" and self.A.shape[0] != self.B.shape[0]:
                raise ValueError(
                    f"source='output' reads the module's own output, so A {tuple(self.A.shape)} "
                    f"needs D_src == D_out = {self.B.shape[0]}; use source='input' for a weight delta"
                )

    @property
    def is_additive(self) -> bool:
        return self.A is None

    @property
    def out_features(self) -> int:
        return self.bias.shape[0] if self.bias is not None else self.B.shape[0]

    @property
    def src_features(self) -> int | None:
        return None if self.A is None else self.A.shape[0]

    @property
    def rank(self) -> int:
        return 0 if self.A is None else self.A.shape[1]

    def to(self, device=None, dtype=None) -> SteeringPart:
        def move(name, t):
            if t is None:
                return None
            moved = t.to(device=device, dtype=dtype)
            if not bool(torch.isfinite(moved).all()):  # ``t`` is finite: the dtype's range is too small
                raise ValueError(f"{name} does not fit in {moved.dtype} (|values| up to "
                                 f"{float(t.abs().max()):.4g}, beyond {torch.finfo(moved.dtype).max:.4g}): "
                                 "scale the vector down and the coefficient up, or keep a wider dtype")
            return moved
        return SteeringPart(move("bias", self.bias), move("A", self.A), move("B", self.B), self.source)


def _check_key(key) -> tuple[int, str]:
    if not (isinstance(key, tuple) and len(key) == 2):
        raise TypeError(f"parts keys must be (layer, target) tuples, got {key!r}")
    layer, target = key
    if isinstance(layer, bool) or not isinstance(layer, numbers.Integral) or layer < 0:
        raise ValueError(f"layer in parts key {key!r} must be a non-negative int: a vector stores "
                         "absolute layer indices (count from 0; for the last layers of a model, "
                         "use len(steerkern.decoder_layers(model)) - k)")
    if not isinstance(target, str) or not target:
        raise ValueError(f"target in parts key {key!r} must be a non-empty module name")
    return int(layer), target


def _plain(value):
    """``json.dumps`` hook: numpy / torch scalars and arrays as Python numbers and lists."""
    if isinstance(value, torch.Tensor) and not value.is_complex():
        return value.detach().cpu().tolist()
    if type(value).__module__ == "numpy" and hasattr(value, "tolist"):
        plain = value.tolist()
        if not isinstance(plain, complex):
            return plain
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def _jsonable(metadata: dict) -> dict:
    """``metadata`` as plain JSON types (numpy / torch numbers become Python numbers and lists)."""
    try:
        return json.loads(json.dumps(metadata, default=_plain))
    except (TypeError, ValueError) as error:
        raise ValueError(f"metadata must be JSON-serialisable (str, int, float, list, dict): {error}") from None


class SteeringVector:
    """Steering parts keyed by ``(layer, target)`` plus metadata.

    Args:
        parts: ``{(layer, target): SteeringPart}``; target as in ``resolve_module`` ("residual",
            "mlp.down_proj", ...).
        metadata: JSON-serialisable facts (model, hidden_size, method, concept, layers, target,
            steerkern_version, ...). ``steerkern_version`` and ``hidden_size`` are filled in.

    Example:
        >>> v = SteeringVector.from_directions({10: torch.randn(576)}, concept="happy")
        >>> w = 2 * v - v
        >>> w.layers, w.is_additive
        ([10], True)
    """

    def __init__(self, parts: dict, metadata: dict | None = None):
        if not isinstance(parts, dict) or not parts:
            raise ValueError("parts must be a non-empty dict {(layer, target): SteeringPart}")
        checked = {}
        for key, part in parts.items():
            if not isinstance(part, SteeringPart):
                raise TypeError(f"parts[{key!r}] must be a SteeringPart, got {type(part).__name__}")
            checked[_check_key(key)] = part
        self.parts: dict[tuple[int, str], SteeringPart] = dict(sorted(checked.items()))
        meta = _jsonable(dict(metadata or {}))
        meta.setdefault("steerkern_version", package_version())
        residual = {p.out_features for (_, t), p in self.parts.items() if t == RESIDUAL}
        if len(residual) > 1:
            raise ValueError(f"residual parts have different widths {sorted(residual)}: one model has one hidden size")
        if residual:
            width = residual.pop()
            if meta.get("hidden_size") not in (None, width):
                raise ValueError(
                    f"metadata hidden_size={meta['hidden_size']} but the residual parts have {width} features"
                )
            meta["hidden_size"] = width
        meta["layers"] = self.layers
        meta["targets"] = self.targets
        self.metadata: dict = meta

    # --- construction ---------------------------------------------------------------------

    @classmethod
    def from_directions(cls, directions: dict, target: str = RESIDUAL, **metadata) -> SteeringVector:
        """Additive vector from ``{layer: Tensor[D]}`` (the bias of each part)."""
        if not isinstance(directions, dict) or not directions:
            raise ValueError("directions must be a non-empty dict {layer: Tensor[D]}")
        parts = {}
        for layer, vec in directions.items():
            try:
                parts[(layer, target)] = SteeringPart(bias=vec)
            except (TypeError, ValueError) as error:
                raise type(error)(f"directions[{layer!r}]: {error}") from None
        return cls(parts, metadata)

    @classmethod
    def from_lowrank(cls, entries: dict, target: str = RESIDUAL, source: str = "output", **metadata) -> SteeringVector:
        """Vector from ``{layer: (bias | None, A | None, B | None)}`` with ``A [D_src, R]``, ``B [D_out, R]``."""
        if not isinstance(entries, dict) or not entries:
            raise ValueError("entries must be a non-empty dict {layer: (bias, A, B)}")
        parts = {}
        for layer, entry in entries.items():
            if not (isinstance(entry, (tuple, list)) and len(entry) == 3):
                raise ValueError(f"entries[{layer!r}] must be a (bias, A, B) triple, got {type(entry).__name__}")
            parts[(layer, target)] = SteeringPart(*entry, source=source)
        return cls(parts, metadata)

    # --- views ----------------------------------------------------------------------------

    @property
    def layers(self) -> list[int]:
        return sorted({layer for layer, _ in self.parts})

    @property
    def targets(self) -> list[str]:
        return sorted({target for _, target in self.parts})

    @property
    def is_additive(self) -> bool:
        return all(p.is_additive for p in self.parts.values())

    @property
    def hidden_size(self) -> int | None:
        return self.metadata.get("hidden_size")

    def __repr__(self) -> str:
        kinds = "additive" if self.is_additive else "low-rank"
        concept = self.metadata.get("concept")
        return (f"SteeringVector({kinds}, layers={self.layers}, targets={self.targets}"
                + (f", concept={concept!r}" if concept else "") + ")")

    def to(self, device=None, dtype=None) -> SteeringVector:
        """A copy with every tensor on ``device`` and/or in ``dtype`` (a floating-point
        ``torch.dtype``); ``ValueError`` / ``TypeError`` naming a device or dtype that is not one."""
        if device is not None:
            device = _check_device(device)
            if device.type == "meta":
                raise ValueError("device='meta' holds no values, and a steering vector needs them: "
                                 "give 'cpu', 'cuda' or the model's device")
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"dtype must be a floating-point torch.dtype (e.g. torch.float16) or None, got {dtype!r}")
        return SteeringVector({k: p.to(device, dtype) for k, p in self.parts.items()}, self.metadata)

    # --- validation -----------------------------------------------------------------------

    def validate(self, model) -> SteeringVector:
        """Check that every part fits ``model``: layer in range, target module present, widths
        equal to the module's output (and input for ``source="input"``). Returns ``self``."""
        from steerkern.control import first_tensor
        from steerkern.models import (
            hidden_size,
            model_id,
            model_type,
            module_weight,
            num_layers,
            resolve_module,
        )

        causal_lm(model)
        width = hidden_size(model)
        made_for = self.metadata.get("model")
        hint = f" (the vector was made for {made_for!r})" if made_for else ""
        kind = model_type(model)
        made_kind = self.metadata.get("model_type")
        if made_kind and kind and made_kind != kind:
            raise ValueError(
                f"this vector was extracted from a {made_kind!r} model{hint} but {model_id(model)} "
                f"is a {kind!r} model: a direction does not transfer between architectures even "
                "when the hidden sizes agree; extract a vector from this model"
            )
        here = model_id(model)
        if (isinstance(made_for, str) and made_for and made_for != type(model).__name__
                and here != type(model).__name__ and _checkpoint_name(made_for) != _checkpoint_name(here)):
            warnings.warn(
                f"this vector was made for {made_for!r} and is applied to {here!r}: the architecture "
                "and widths agree, but a direction found in one checkpoint may not carry over to "
                "another; extract one from this model unless they share their weights' origin",
                stacklevel=2)
        hinted = self.metadata.get("model_hint")
        if (not made_kind and kind and isinstance(hinted, str) and hinted != kind and _is_model_type(hinted)
                and kind not in _LLAMA_CPP_ALIASES.get(hinted, ())):
            warnings.warn(
                f"this control vector's model_hint is {hinted!r} but {model_id(model)} is a {kind!r} "
                "model: a direction does not transfer between models; extract one from this model "
                "unless the file's hint is wrong", stacklevel=2)
        depth = num_layers(model)
        for (layer, target), part in self.parts.items():
            if not -depth <= layer < depth:
                raise ValueError(f"this vector steers layer {layer}{hint} but {model_id(model)} has {depth} "
                                 f"layers (0..{depth - 1}): use a vector extracted from this model")
            module = resolve_module(model, layer, target)
            first_tensor(module, f"layer {layer}, target {target!r}")  # steering needs its device and dtype
            expected_out, expected_in = width, width
            try:
                weight = module_weight(module)
                expected_out, expected_in = weight.shape
            except ValueError:
                if part.source == "input":
                    raise ValueError(
                        f"vector part (layer {layer}, target {target!r}) has source='input' (a weight "
                        f"delta) but {type(module).__name__} is not a linear module: target a Linear "
                        "such as 'mlp.down_proj'"
                    ) from None
            if part.out_features != expected_out:
                raise ValueError(
                    f"vector part (layer {layer}, target {target!r}) has {part.out_features} output "
                    f"features but {model_id(model)} expects {expected_out}{hint}: use a vector "
                    "extracted from this model"
                )
            if part.source == "input" and part.src_features != expected_in:
                raise ValueError(
                    f"vector part (layer {layer}, target {target!r}) reads {part.src_features} input "
                    f"features but the module takes {expected_in}{hint}"
                )
        return self

    # --- arithmetic (additive vectors) ------------------------------------------------------
    # ``c * v`` keeps v's metadata and records the factor in ``scaled_by`` (products multiply);
    # ``a + b`` is ``method="arithmetic"`` and keeps what both agree on, but no ``scale`` /
    # ``scaled_by``, which describe an operand, not the sum.

    def _require_additive(self, op: str):
        if not self.is_additive:
            raise ValueError(
                f"'{op}' is defined for additive vectors only; this vector has low-rank parts "
                "(A, B): combine low-rank steering by passing several vectors to steer() instead"
            )

    def __add__(self, other):
        if not isinstance(other, SteeringVector):
            return NotImplemented
        self._require_additive("+")
        other._require_additive("+")
        for key in ("model", "model_type", "hidden_size"):
            a, b = self.metadata.get(key), other.metadata.get(key)
            if a is not None and b is not None and a != b:
                raise ValueError(f"cannot combine vectors with different {key}: {a!r} and {b!r}")
        parts = {}
        for key in sorted(set(self.parts) | set(other.parts)):
            a, b = self.parts.get(key), other.parts.get(key)
            if a is None or b is None:  # a new tensor: the result shares nothing with its operands
                parts[key] = SteeringPart(bias=(a or b).bias.clone())
                continue
            if a.out_features != b.out_features:
                raise ValueError(f"parts at {key} have different widths {a.out_features} and {b.out_features}")
            dtype = torch.promote_types(a.bias.dtype, b.bias.dtype)
            parts[key] = SteeringPart(bias=a.bias.to(dtype) + b.bias.to(a.bias.device, dtype))
        shared = {k: v for k, v in self.metadata.items() if other.metadata.get(k, v) == v}
        shared.update({k: v for k, v in other.metadata.items() if k not in self.metadata})
        shared.pop("method", None)
        shared["method"] = "arithmetic"
        for key in ("scale", "scaled_by"):  # an operand's scale does not describe the sum
            shared.pop(key, None)
        return SteeringVector(parts, shared)

    def __radd__(self, other):
        """``0 + v`` is ``v``, so that ``sum([a, b, c])`` works."""
        if isinstance(other, (int, float)) and not isinstance(other, bool) and other == 0:
            self._require_additive("+")
            return SteeringVector({k: SteeringPart(bias=p.bias.clone()) for k, p in self.parts.items()},
                                  dict(self.metadata))
        return NotImplemented

    def __mul__(self, scalar):
        scalar = _scalar(scalar)
        if scalar is None:
            return NotImplemented
        if not math.isfinite(scalar):
            raise ValueError(f"cannot scale a steering vector by {scalar}: the factor must be finite")
        self._require_additive("*")
        parts = {k: SteeringPart(bias=p.bias * scalar) for k, p in self.parts.items()}
        metadata = dict(self.metadata)  # ``scale`` still describes the vector before this factor
        metadata["scaled_by"] = float(metadata.get("scaled_by", 1.0)) * scalar
        return SteeringVector(parts, metadata)

    __rmul__ = __mul__

    def __truediv__(self, scalar):
        scalar = _scalar(scalar)
        if scalar is None:
            return NotImplemented
        if scalar == 0:
            raise ValueError("cannot divide a steering vector by 0")
        return self * (1.0 / scalar)

    def __neg__(self):
        self._require_additive("-")
        return self * -1.0

    def __sub__(self, other):
        if not isinstance(other, SteeringVector):
            return NotImplemented
        return self + (-other)

    # --- safetensors ----------------------------------------------------------------------

    def save(self, path) -> Path:
        """Write the vector as safetensors (tensors ``parts.<i>.bias|A|B``; metadata JSON in the
        header). Returns the path. ``path`` (a str or ``pathlib.Path``) that is not a file path
        raises ``TypeError`` naming it; the file is written whole or not at all."""
        from safetensors.torch import save_file

        path = checks.path(path, "path", what="the file path to write the vector to")
        tensors, index = {}, []
        for i, ((layer, target), part) in enumerate(self.parts.items()):
            index.append({"layer": layer, "target": target, "source": part.source})
            for name in ("bias", "A", "B"):
                value = getattr(part, name)
                if value is not None:  # a copy: parts may share one tensor, which safetensors refuses
                    tensors[f"parts.{i}.{name}"] = value.detach().to("cpu").clone(
                        memory_format=torch.contiguous_format)
        header = {"format": FORMAT_VERSION, "parts": index, "metadata": self.metadata}
        _write_whole(path, "save", lambda into: save_file(tensors, into, metadata={_HEADER_KEY: json.dumps(header)}))
        return path

    @classmethod
    def load(cls, path, device="cpu") -> SteeringVector:
        """Read a vector written by :meth:`save`, its tensors in their saved dtypes on ``device``
        (a ``torch.device``, ``"cuda:1"``, or a CUDA index). A missing, truncated, corrupt or
        foreign file raises ``ValueError`` (``FileNotFoundError`` when absent, ``TypeError`` for a
        ``path`` that is not a str or ``pathlib.Path``) naming ``path``; a
        device that does not exist here raises ``ValueError`` naming ``device``."""
        from safetensors import safe_open

        path = checks.path(path, "path", what="the path of a vector file (SteeringVector.save)")
        device = _check_device(device)
        if not path.is_file():
            raise FileNotFoundError(f"SteeringVector.load: no such file {str(path)!r}")
        with open(path, "rb") as handle:
            magic = handle.read(8)
        if magic[:4] == b"GGUF":
            raise ValueError(f"{str(path)!r} is a GGUF file: read it with SteeringVector.from_gguf")
        if len(magic) < 8 or struct.unpack("<Q", magic)[0] > path.stat().st_size:
            raise ValueError(f"{str(path)!r} is not a safetensors file (truncated or corrupt header)")
        try:
            with safe_open(str(path), framework="pt", device="cpu") as handle:
                raw = (handle.metadata() or {}).get(_HEADER_KEY)
                if raw is None:
                    raise ValueError(
                        f"{str(path)!r} is a safetensors file but not a steerkern vector (no "
                        f"'{_HEADER_KEY}' header entry): write vectors with SteeringVector.save"
                    )
                try:
                    header = json.loads(raw)
                except ValueError as error:
                    raise ValueError(f"{str(path)!r} has a damaged steerkern header (not JSON: {error})") from None
                tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        except ValueError:
            raise
        except Exception as error:  # safetensors raises SafetensorError / OSError on damage
            raise ValueError(f"{str(path)!r} is truncated or corrupt: {error}") from None
        try:
            if header.get("format") != FORMAT_VERSION:
                raise ValueError(f"unsupported format {header.get('format')!r} (this steerkern reads {FORMAT_VERSION})")
            parts = {}
            for i, entry in enumerate(header["parts"]):
                layer = entry["layer"]
                if isinstance(layer, bool) or not isinstance(layer, int):
                    raise ValueError(f"parts[{i}] has layer {layer!r}, not an integer")
                key = (layer, str(entry["target"]))
                if key in parts:
                    raise ValueError(f"parts[{i}] repeats (layer, target) {key}")
                parts[key] = SteeringPart(
                    bias=tensors.get(f"parts.{i}.bias"),
                    A=tensors.get(f"parts.{i}.A"),
                    B=tensors.get(f"parts.{i}.B"),
                    source=entry.get("source", "output"),
                )
            vector = cls(parts, header.get("metadata", {}))
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise ValueError(f"{str(path)!r} has a damaged steerkern header: {error}") from None
        if device.type == "cpu":
            return vector
        try:
            return vector.to(device)
        except (RuntimeError, AssertionError, NotImplementedError) as error:  # e.g. no CUDA here
            raise ValueError(f"SteeringVector.load: device={str(device)!r} is not usable here: "
                             f"{' '.join(str(error).split())}") from None

    # --- GGUF controlvector ---------------------------------------------------------------

    def to_gguf(self, path, model_hint: str | None = None) -> Path:
        """Write the llama.cpp ``controlvector`` GGUF (additive residual parts only).

        ``direction.<layer>`` (F32 ``[hidden]``) per layer; ``controlvector.model_hint`` is
        ``model_hint`` or the metadata's ``model_type`` / ``model_hint`` (a GGUF read back) /
        ``model``. steerkern's metadata is kept
        as a JSON string under ``controlvector.steerkern_metadata`` for a faithful round trip.
        ``path`` (a str or ``pathlib.Path``) that is not a file path raises ``TypeError`` naming
        it; the file is written whole or not at all.
        """
        import gguf

        path = checks.path(path, "path", what="the file path to write the GGUF to")

        if not self.is_additive:
            raise ValueError(
                "to_gguf: the GGUF controlvector format holds additive vectors only, and this "
                "vector has low-rank parts (A, B): save it with SteeringVector.save (safetensors)"
            )
        if self.targets != [RESIDUAL]:
            raise ValueError(
                f"to_gguf: the controlvector format steers the residual stream only, this vector "
                f"targets {self.targets}: save it with SteeringVector.save"
            )
        if 0 in self.layers:
            raise ValueError(
                "to_gguf: llama.cpp cannot steer layer 0 (it rejects 'direction.0'): drop layer 0 "
                "or save with SteeringVector.save"
            )
        hint = (model_hint or self.metadata.get("model_type") or self.metadata.get("model_hint")
                or self.metadata.get("model") or "unknown")

        def write(into: str) -> None:
            writer = gguf.GGUFWriter(into, _GGUF_ARCH)
            writer.add_string(f"{_GGUF_ARCH}.model_hint", str(hint))
            writer.add_uint32(f"{_GGUF_ARCH}.layer_count", len(self.parts))
            writer.add_string(_GGUF_META_KEY, json.dumps(self.metadata))
            for (layer, _), part in self.parts.items():
                data = part.bias.detach().to("cpu", torch.float32).contiguous().numpy()
                writer.add_tensor(f"direction.{layer}", data)
            try:
                writer.write_header_to_file()
                writer.write_kv_data_to_file()
                writer.write_tensors_to_file()
            finally:
                writer.close()

        _write_whole(path, "to_gguf", write)
        return path

    @classmethod
    def from_gguf(cls, path, **metadata) -> SteeringVector:
        """Read a llama.cpp / repeng / EasySteer ``controlvector`` GGUF: ``direction.N`` becomes
        the residual part at layer ``N``. Extra keyword arguments update the metadata. ``path``
        that is not a str or ``pathlib.Path`` raises ``TypeError`` naming it."""
        import gguf

        path = checks.path(path, "path", what="the path of a controlvector GGUF file")
        if not path.is_file():
            raise FileNotFoundError(f"SteeringVector.from_gguf: no such file {str(path)!r}")
        with open(path, "rb") as handle:
            if handle.read(4) != b"GGUF":
                raise ValueError(f"{str(path)!r} is not a GGUF file (bad magic): for safetensors use SteeringVector.load")
        try:
            reader = gguf.GGUFReader(str(path))
        except Exception as error:
            raise ValueError(f"{str(path)!r} is a truncated or corrupt GGUF file: {error}") from None

        def field(name):
            found = reader.get_field(name)
            return None if found is None else found.contents()

        arch = field("general.architecture")
        if arch != _GGUF_ARCH:
            raise ValueError(
                f"{str(path)!r} is a GGUF file of architecture {arch!r}, not a control vector "
                f"('{_GGUF_ARCH}')"
            )
        meta = {}
        stored = field(_GGUF_META_KEY)
        if stored:
            try:
                meta = json.loads(stored)
            except ValueError:
                meta = None
            if not isinstance(meta, dict):
                warnings.warn(f"{str(path)!r}: its {_GGUF_META_KEY} is not a JSON object; the "
                              "directions are read without it", stacklevel=2)
                meta = {}
        hint = field(f"{_GGUF_ARCH}.model_hint")
        if hint is not None and not meta:  # steerkern's own metadata already says what it fits
            meta["model_hint"] = hint
        method = field(f"{_GGUF_ARCH}.method")  # EasySteer records its extraction method
        if isinstance(method, str) and "method" not in meta:
            meta["method"] = method
        directions = {}
        for tensor in reader.tensors:
            prefix, _, index = tensor.name.partition(".")
            if prefix != "direction" or not index.isdigit():
                continue
            layer = int(index)
            if layer in directions:
                raise ValueError(f"{str(path)!r} holds two directions for layer {layer}: corrupt control vector")
            directions[layer] = _gguf_direction(tensor, path)
        if not directions:
            raise ValueError(f"{str(path)!r} is a controlvector GGUF without any 'direction.N' tensor")
        if 0 in directions:
            warnings.warn(
                f"{str(path)!r} steers layer 0 ('direction.0', as repeng and EasySteer write it): "
                "steerkern and those tools apply it to decoder layer 0's output, but llama.cpp "
                "refuses such a file", stacklevel=2)
        meta.pop("layers", None)
        meta.pop("targets", None)
        meta.update(metadata)
        try:
            parts = {(layer, RESIDUAL): SteeringPart(bias=v) for layer, v in directions.items()}
            return cls(parts, meta)
        except ValueError as error:  # NaN / Inf values, directions of different widths
            raise ValueError(f"{str(path)!r} is not a usable control vector: {error}") from None


def _gguf_direction(tensor, path) -> torch.Tensor:
    """One ``direction.N`` tensor of a GGUF reader as float32 ``[hidden]``.

    GGUF dimensions are listed innermost first; like llama.cpp, a direction must have one
    dimension apart from trailing dimensions of size 1 (``ne = [hidden, 1]``, a numpy
    ``[1, hidden]``). F16 / F64 data are cast; BF16 and quantized blocks, which the reader hands
    over as raw bytes, are dequantised."""
    import gguf

    shape = [int(n) for n in tensor.shape]
    if not shape or any(n != 1 for n in shape[1:]):
        raise ValueError(
            f"{str(path)!r}: tensor {tensor.name!r} of shape {shape} is not the one 1-D [hidden] "
            "direction of its layer that llama.cpp expects: corrupt control vector"
        )
    data = tensor.data
    try:
        if data.dtype.kind != "f":
            data = gguf.quants.dequantize(data, tensor.tensor_type)
    except (NotImplementedError, ValueError, KeyError) as error:
        raise ValueError(
            f"{str(path)!r}: tensor {tensor.name!r} is stored as {tensor.tensor_type.name}, which "
            f"cannot be read as numbers ({error}): write control vectors in F32"
        ) from None
    values = torch.from_numpy(data.astype("float32").reshape(-1).copy())
    if values.numel() != shape[0]:
        raise ValueError(f"{str(path)!r}: tensor {tensor.name!r} holds {values.numel()} values for "
                         f"{shape[0]} features: corrupt control vector")
    return values


def _write_whole(path: Path, method: str, write) -> None:
    """Run ``write(name)`` into a new file beside ``path``, then rename it to ``path``: a write
    that fails half-way (a full disk, an interrupt) leaves ``path`` as it was, never a
    truncated vector. Parent directories are created. A symbolic link is written through: its
    target is replaced, the link kept.

    Raises:
        ValueError: ``path`` is a directory, or lies under a file, naming it (``method``:
            the method it was given to).
    """
    if path.is_dir():
        raise ValueError(f"{method}: {str(path)!r} is a directory; give a file name "
                         f"({'.gguf' if method == 'to_gguf' else '.safetensors'})")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise ValueError(f"{method}: cannot write {str(path)!r}: a part of its directory is a file") from None
    if path.is_symlink():
        path = path.resolve()
    temporary = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        write(str(temporary))
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def _check_device(device) -> torch.device:
    """``device`` as a ``torch.device`` (an int is a CUDA index); ``ValueError`` naming it."""
    try:
        if isinstance(device, bool):
            raise TypeError
        return torch.device(device)
    except (TypeError, RuntimeError, ValueError):
        raise ValueError(
            f"device={device!r} is not a device: give a torch.device, 'cpu', 'cuda', 'cuda:1' or a "
            "CUDA index"
        ) from None


def _scalar(value) -> float | None:
    """A real number (python, numpy, or a one-element tensor) as a float; ``None`` otherwise."""
    if isinstance(value, bool):
        return None
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.dtype.is_complex or value.dtype == torch.bool:
            return None
        return float(with_data(value, "the factor"))
    if isinstance(value, numbers.Real):
        return float(value)
    return None


# llama.cpp writes its GGUF architecture name as the hint; it converts these model types to "llama"
_LLAMA_CPP_ALIASES = {"llama": ("mistral", "mixtral", "mistral3", "llava")}


def _checkpoint_name(name: str) -> str:
    """``"HuggingFaceTB/SmolLM2-135M-Instruct"``, ``"/models/smollm2-135m-instruct/"`` ->
    ``"smollm2-135m-instruct"``: the same checkpoint named by Hub id or local path."""
    return name.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1].lower()


def _is_model_type(name: str) -> bool:
    """Whether ``name`` is a transformers ``model_type`` (what repeng and steerkern write as a
    GGUF's ``controlvector.model_hint``), not free text such as ``"unknown"``."""
    from transformers import CONFIG_MAPPING

    return name in CONFIG_MAPPING
