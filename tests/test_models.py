"""Model loading, the default-model cache, and architecture discovery."""

import json
import re
import time
from pathlib import Path

import pytest
import torch

from steerkern import models
from steerkern.models import (
    ModelLoadError,
    check_layer,
    decoder_layers,
    default_layers,
    hidden_size,
    load_model,
    module_weight,
    resolve_module,
)
from tests.tiny_models import ARCHITECTURES

CANONICAL = ["residual", "self_attn", "self_attn.o_proj", "mlp"]
DENSE_MLP = ["mlp.down_proj", "mlp.up_proj"]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_layer_discovery_on_every_architecture(arch, tiny_model_factory):
    model = tiny_model_factory(arch)
    layers = decoder_layers(model)
    assert len(layers) == 4
    assert hidden_size(model) == 64
    for target in CANONICAL:
        module = resolve_module(model, 2, target)
        assert any(module is m for m in layers[2].modules()), target
    if arch not in ("mixtral", "qwen2_moe"):
        for target in DENSE_MLP:
            weight = module_weight(resolve_module(model, 1, target))
            assert weight.dim() == 2 and 64 in weight.shape
        # down_proj maps the MLP width back to the residual stream: [out=64, in=wide]
        assert module_weight(resolve_module(model, 1, "mlp.down_proj")).shape[0] == 64


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_residual_target_output_is_the_residual_stream(arch, tiny_model_factory):
    model = tiny_model_factory(arch)
    seen = []
    layer = resolve_module(model, 1, "residual")
    handle = layer.register_forward_hook(
        lambda m, a, out: seen.append(out[0] if isinstance(out, tuple) else out))
    try:
        out = model(torch.randint(3, 100, (2, 5)), output_hidden_states=True)
    finally:
        handle.remove()
    torch.testing.assert_close(seen[0], out.hidden_states[2])


def test_bad_layer_and_target_are_named(tiny_model_factory):
    model = tiny_model_factory("llama")
    with pytest.raises(ValueError, match="layer=7 is out of range"):
        resolve_module(model, 7)
    with pytest.raises(ValueError, match="target='mlp.nope'"):
        resolve_module(model, 1, "mlp.nope")
    with pytest.raises(TypeError, match="layer must be an int"):
        resolve_module(model, "1")
    import numpy as np

    assert resolve_module(model, np.int64(1)) is resolve_module(model, 1)  # numpy indices
    assert check_layer(model, np.int32(-1)) == 3


def test_unknown_architecture_gets_an_override():
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.mix = torch.nn.Linear(8, 8)

    class Odd(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.stack = torch.nn.ModuleList([Block(), Block()])

    model = Odd()
    with pytest.raises(ValueError, match="layers_path="):
        decoder_layers(model)
    with pytest.raises(ValueError, match="does not name an nn.ModuleList"):
        decoder_layers(model, layers_path="stack.0")
    for bad in (3, ["stack"], b"stack"):
        with pytest.raises(TypeError, match="layers_path must be the dotted attribute path"):
            decoder_layers(model, layers_path=bad)
    assert not hasattr(model, "_steerkern_layers_path")
    assert len(decoder_layers(model, layers_path="stack")) == 2
    assert resolve_module(model, 1, "mix") is model.stack[1].mix  # remembered override


def test_unknown_layout_found_by_the_configs_layer_count():
    """An unknown layout: the one outermost ModuleList as long as the config's layer count is
    the decoder stack (lists nested inside it, or of other lengths, are not); two such lists
    are ambiguous and the error names both."""
    from types import SimpleNamespace

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.heads = torch.nn.ModuleList([torch.nn.Linear(8, 8) for _ in range(3)])

    class Odd(torch.nn.Module):
        def __init__(self, towers=1):
            super().__init__()
            self.config = SimpleNamespace(n_layers=3)
            self.embed = torch.nn.ModuleList([torch.nn.Linear(8, 8)])
            for index in range(towers):
                setattr(self, f"tower{index}", torch.nn.Sequential(
                    torch.nn.ModuleList([Block() for _ in range(3)])))

    model = Odd()
    assert decoder_layers(model) is model.tower0[0]
    assert "_steerkern_layers_path" not in vars(model)  # discovery leaves the model as it was
    assert resolve_module(model, 2, "heads.1") is model.tower0[0][2].heads[1]
    with pytest.raises(ValueError, match="candidates: tower0.0, tower1.0.*layers_path="):
        decoder_layers(Odd(towers=2))


def test_default_layers_is_a_middle_band(default_model):
    model, _ = default_model
    band = default_layers(model)
    assert band and band[0] > 0 and band[-1] < 29 and band == list(range(band[0], band[-1] + 1))


def test_default_model_is_smollm2_ready_for_batched_generation(default_model):
    model, tokenizer = default_model
    assert type(model).__name__ == "LlamaForCausalLM"
    assert len(decoder_layers(model)) == 30 and hidden_size(model) == 576
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    assert tokenizer.pad_token is not None and tokenizer.padding_side == "left"
    assert models.model_id(model) == "SmolLM2-135M-Instruct"
    batch = tokenizer(["Hello there", "A much longer prompt than the first"], return_tensors="pt",
                      padding=True)
    out = model.generate(**batch, max_new_tokens=4, do_sample=False)
    assert out.shape == (2, batch["input_ids"].shape[1] + 4)


def test_default_tokenizer_has_the_gguf_special_tokens(default_model):
    """The GGUF records BOS <|im_start|>, EOS = pad <|im_end|> and no BOS added to texts (as
    the Hugging Face checkpoint's tokenizer); the tokenizer agrees, and with the model's
    generation config."""
    model, tokenizer = default_model
    recorded = models.gguf_special_tokens(models.default_model_file())
    assert recorded["eos"] == model.generation_config.eos_token_id == tokenizer.eos_token_id
    assert tokenizer.convert_ids_to_tokens(recorded["eos"]) == "<|im_end|>"
    assert (tokenizer.bos_token_id, tokenizer.pad_token_id) == (recorded["bos"], recorded["pad"])
    assert recorded["add_bos_token"] is False
    assert tokenizer("Hi!")["input_ids"] == tokenizer("Hi!", add_special_tokens=False)["input_ids"]


def test_gguf_special_tokens_mend_a_misread_tokenizer(default_model):
    """transformers 4.x converts the GGUF's tokenizer with EOS = pad = BOS and a BOS before every
    text; the conversion puts the GGUF's settings back."""
    import copy

    tokenizer = copy.deepcopy(default_model[1])
    tokenizer.eos_token = tokenizer.pad_token = "<|im_start|>"
    tokenizer.add_bos_token = True
    assert tokenizer("Hi!")["input_ids"][0] == tokenizer.bos_token_id  # misread as 4.x does
    models._apply_gguf_special_tokens(tokenizer, models.gguf_special_tokens(models.default_model_file()))
    assert tokenizer("Hi!")["input_ids"] == default_model[1]("Hi!")["input_ids"]
    assert (tokenizer.eos_token, tokenizer.pad_token) == ("<|im_end|>", "<|im_end|>")


def test_cached_load_is_fast_and_a_corrupt_cache_is_rebuilt(default_model, tmp_path, monkeypatch):
    # Build a private cache from the shared one (copy) so that the test does not pay a conversion.
    import shutil

    shared = models.default_model_path()
    monkeypatch.setenv("STEERKERN_CACHE", str(tmp_path))
    private = tmp_path / shared.name
    shutil.copytree(shared, private)
    start = time.perf_counter()
    model, _ = load_model()
    assert time.perf_counter() - start < 5.0
    reference = model.model.embed_tokens.weight.clone()

    # Truncate the weights: the manifest check catches it and the model is converted again.
    weights = private / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    assert not models._cache_is_complete(private)
    calls = []
    real_convert = models._convert_default_model
    monkeypatch.setattr(models, "_convert_default_model",
                        lambda src, dst: (calls.append(dst), shutil.copytree(shared, dst, dirs_exist_ok=True)))
    model, _ = load_model()
    assert calls == [private]
    torch.testing.assert_close(model.model.embed_tokens.weight, reference)
    # A manifest of another format is stale too.
    manifest = private / "steerkern_manifest.json"
    data = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**data, "format": -1}))
    assert not models._cache_is_complete(private)
    assert real_convert is not None


def test_bad_names_get_one_clear_message(tmp_path):
    with pytest.raises(ModelLoadError, match="no such file or directory"):
        load_model(str(tmp_path / "missing"))
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match="no weights"):
        load_model(str(tmp_path))
    weights = tmp_path / "w.safetensors"
    weights.write_text("x")
    with pytest.raises(ModelLoadError, match="is a file"):
        load_model(str(weights))
    with pytest.raises(ValueError, match="dtype='float33'"):
        load_model(str(tmp_path), dtype="float33")


def test_unknown_hub_name_offline(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads the variable once, at import: without this the lookup goes to the
    # network and, on a machine without one, waits out its timeouts (~45 s).
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelLoadError, match="load_model\\(name='no-such-org/no-such-model'\\)"):
        load_model("no-such-org/no-such-model")


def test_a_hub_id_without_a_network_is_looked_up_in_the_cache_at_once(monkeypatch):
    """Where the Hub's name does not resolve (no network) a Hub id is searched in the local
    cache only: the Hub client's five retries (about a minute) are skipped, and the error says
    why only the cache was searched."""
    import socket

    import huggingface_hub.constants

    import steerkern.hub

    def no_resolver(*args, **kwargs):
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    for variable in steerkern.hub.PROXY_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setattr(steerkern.hub.socket, "getaddrinfo", no_resolver)
    host = re.escape(steerkern.hub.hub_host())
    with pytest.raises(ModelLoadError, match=host + " cannot be reached from here, so only the local "
                                               "cache was searched: pass a local directory"):
        load_model("no-such-org/no-such-model")


def test_when_the_hub_counts_as_unreachable(monkeypatch):
    """Only a resolver that answers "no such name" in time, with no proxy configured and offline
    mode off: a proxy, a slow resolver or an answer leave the Hub client to try as usual."""
    import socket
    import time

    import huggingface_hub.constants

    from steerkern.hub import PROXY_VARIABLES, hub_host, hub_unreachable

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    for variable in PROXY_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    asked = []

    def answer(result):
        def getaddrinfo(host, port, *args, **kwargs):
            asked.append(host)
            if isinstance(result, float):
                time.sleep(result)
                return []
            if result is None:
                raise socket.gaierror(-2, "Name or service not known")
            return result
        return getaddrinfo

    monkeypatch.setattr(socket, "getaddrinfo", answer(None))
    assert hub_unreachable() and asked == [hub_host()]
    monkeypatch.setattr(socket, "getaddrinfo", answer([(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("1.2.3.4", 443))]))
    assert not hub_unreachable()
    monkeypatch.setattr(socket, "getaddrinfo", answer(1.0))
    assert not hub_unreachable(timeout=0.05)
    monkeypatch.setattr(socket, "getaddrinfo", answer(None))
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    asked.clear()
    assert not hub_unreachable() and asked == []
    monkeypatch.delenv("HTTPS_PROXY")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert not hub_unreachable() and asked == []


# --- a user's own checkpoint directory ---------------------------------------------------------


def save_checkpoint(directory, arch="gpt2", dtype=torch.float32, tokenizer=True):
    """Save a tiny random model of ``arch`` in ``dtype`` (and, with ``tokenizer``, a raw
    GPT-2-style word tokenizer: no chat template, no pad token) as a user's checkpoint."""
    from tests.test_eval import word_tokenizer
    from tests.tiny_models import build_tiny_model

    build_tiny_model(arch).to(dtype).save_pretrained(directory)
    if tokenizer:
        word_tokenizer().save_pretrained(directory)
    return directory


def test_corrupt_weights_are_a_load_error(tmp_path):
    """Damaged safetensors weights (a header of garbage, a truncated file) fail as
    ModelLoadError naming the model, not as safetensors' own exception."""
    directory = save_checkpoint(tmp_path / "damaged")
    weights = directory / "model.safetensors"
    original = weights.read_bytes()
    for damaged in (b"\xff" * len(original), original[: len(original) // 2]):
        weights.write_bytes(damaged)
        with pytest.raises(ModelLoadError, match="cannot load the model"):
            load_model(str(directory))


@pytest.fixture(scope="module")
def own_checkpoint(tmp_path_factory):
    """A tiny GPT-2 saved in float16 with its tokenizer."""
    return save_checkpoint(tmp_path_factory.mktemp("own") / "gpt2-fp16", dtype=torch.float16)


def test_own_checkpoint_loads_in_the_dtype_asked(own_checkpoint):
    """dtype names as users write them ("bf16", "torch.float32", "auto") work; no dtype or
    "auto" keep the checkpoint's dtype (on every transformers version, not float32 on 4.x)."""
    for dtype, expected in [(None, torch.float16), ("auto", torch.float16), ("bf16", torch.bfloat16),
                            ("torch.float32", torch.float32), (torch.bfloat16, torch.bfloat16)]:
        model, tokenizer = load_model(own_checkpoint, dtype=dtype, device_map="cpu")
        assert next(model.parameters()).dtype == expected, dtype
        assert tokenizer.pad_token is not None and tokenizer.padding_side == "left"
    model, _ = load_model(own_checkpoint, torch_dtype=torch.float32)  # from_pretrained's old spelling
    assert next(model.parameters()).dtype == torch.float32


def test_checkpoint_options_reach_the_tokenizer_too(own_checkpoint, monkeypatch):
    """Options that choose the checkpoint (revision, remote code, cache, ...) apply to the
    tokenizer as to the weights: a tokenizer from another revision would not match them."""
    from transformers import AutoTokenizer

    seen = []
    real = AutoTokenizer.from_pretrained
    monkeypatch.setattr(AutoTokenizer, "from_pretrained",
                        lambda source, **kw: (seen.append(kw), real(source, **kw))[1])
    load_model(own_checkpoint, revision="main", local_files_only=True, low_cpu_mem_usage=True)
    assert seen == [{"revision": "main", "local_files_only": True}]


def test_own_checkpoint_bad_arguments_are_named(own_checkpoint, tmp_path):
    """A dtype, device_map or keyword that from_pretrained rejects is named as the fix, not
    blamed on the directory; a checkpoint without a tokenizer says how to add one."""
    for dtype in ("int8", "float33", torch.int64, 3):
        with pytest.raises(ModelLoadError, match=f"dtype={dtype!r} is not a dtype"):
            load_model(own_checkpoint, dtype=dtype)
    with pytest.raises(ModelLoadError, match="device_map='nowhere'") as caught:
        load_model(own_checkpoint, device_map="nowhere")
    assert "config.json" not in str(caught.value)
    with pytest.raises(ModelLoadError, match="no_such_option=1"):
        load_model(own_checkpoint, no_such_option=1)
    # Without tokenizer files transformers 5 builds an empty GPT-2 tokenizer (every text -> no
    # tokens) and 4.x fails; a Llama directory fails to build one: each gets the same fix.
    for arch in ("gpt2", "llama"):
        bare = save_checkpoint(tmp_path / f"{arch}-no-tokenizer", arch=arch, tokenizer=False)
        with pytest.raises(ModelLoadError, match="tokenizer.*tokenizer.save_pretrained"):
            load_model(bare)
    # Another model's tokenizer, whose ids run past the embedding table (128 rows).
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers import models as tokenizer_models
    from transformers import PreTrainedTokenizerFast

    vocab = {word: 500 + i for i, word in enumerate(["<unk>", "</s>", "Hello", ",", "world", "."])}
    backend = Tokenizer(tokenizer_models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    foreign = save_checkpoint(tmp_path / "foreign", tokenizer=False)
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="</s>").save_pretrained(foreign)
    with pytest.raises(ModelLoadError, match="token id 50[0-9] but the model has 128 embeddings"):
        load_model(foreign)


@pytest.fixture
def fake_default_model(tmp_path, monkeypatch):
    """The default model's cache replaced by a tiny checkpoint: returns (directory, rebuilds),
    where every rebuild (a call to default_model_path after the first) writes it afresh."""
    directory = tmp_path / "cache" / "tiny"
    save_checkpoint(directory, arch="llama")
    pristine = {p.name: p.read_bytes() for p in directory.iterdir()}
    rebuilds = []

    def default_model_path(rebuild=False):
        if calls:
            rebuilds.append(rebuild)
            if len(rebuilds) > 3:
                raise RuntimeError("the default model was converted again and again")
            directory.mkdir(parents=True, exist_ok=True)
            for name, data in pristine.items():
                (directory / name).write_bytes(data)
        calls.append(rebuild)
        return directory

    calls = []
    monkeypatch.setattr(models, "default_model_path", default_model_path)
    return directory, rebuilds, calls


def test_default_model_bad_options_keep_the_cache(fake_default_model):
    """A device_map or keyword the default model cannot load with is the caller's error: the
    cache is neither deleted nor converted again (it used to be, in an endless loop)."""
    directory, rebuilds, calls = fake_default_model
    with pytest.raises(ModelLoadError, match="device_map='nowhere'"):
        load_model(device_map="nowhere")
    with pytest.raises(ModelLoadError, match="dtype='int4'"):
        load_model(dtype="int4")
    assert rebuilds == [] and (directory / "config.json").is_file()
    model, _ = load_model(dtype="bf16")
    assert next(model.parameters()).dtype == torch.bfloat16
    assert models.model_id(model) == models.DEFAULT_MODEL_NAME


def test_default_model_corrupt_cache_is_rebuilt_once(fake_default_model):
    """A cache that passes the manifest check but does not load is converted again once; one
    that still does not load then fails with a ModelLoadError instead of looping."""
    directory, rebuilds, calls = fake_default_model
    (directory / "config.json").write_text("{" + " " * 40)
    model, _ = load_model()
    assert rebuilds == [True] and type(model).__name__ == "LlamaForCausalLM"

    rebuilds.clear()
    calls.clear()
    real = models.default_model_path

    def stays_corrupt(rebuild=False):
        path = real(rebuild)
        (path / "config.json").write_text("{")
        return path

    models.default_model_path = stays_corrupt  # undone with the fixture's monkeypatch
    with pytest.raises(ModelLoadError, match="cannot load"):
        load_model()
    assert rebuilds == [True]


@pytest.fixture
def small_gguf(tmp_path, monkeypatch):
    """The default model's GGUF replaced by a small file (conversion is faked by the tests)."""
    source = tmp_path / "model.gguf"
    source.write_bytes(b"GGUF" + bytes(60))
    monkeypatch.setattr(models, "default_model_file", lambda: source)
    monkeypatch.setenv("STEERKERN_CACHE", str(tmp_path / "cache"))
    return source


def _fake_conversion(calls, delay=0.0):
    def convert(source, target):
        calls.append(target)
        time.sleep(delay)
        staging = target.parent / (target.name + ".partial-mine")
        staging.mkdir()
        (staging / "model.safetensors").write_bytes(b"weights")
        (staging / "steerkern_manifest.json").write_text(json.dumps(
            {"format": models._CACHE_FORMAT, "files": {"model.safetensors": 7}}))
        models.shutil.rmtree(target, ignore_errors=True)
        models.os.replace(staging, target)
    return convert


def test_concurrent_conversions_convert_once(small_gguf, monkeypatch):
    """Two loads that find no cache at the same time: one converts, the other waits for it and
    uses its checkpoint (no second conversion, no removal of a finished cache, no race on the
    rename); staging directories of an interrupted conversion are removed."""
    import threading

    calls = []
    monkeypatch.setattr(models, "_convert_default_model", _fake_conversion(calls, delay=0.3))
    cache = models.cache_dir()
    cache.mkdir(parents=True)
    name = models.cache_entry_name(small_gguf)
    stale = cache / (name + ".partial-killed")
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")

    results, errors = [], []

    def load():
        try:
            results.append(models.default_model_path())
        except Exception as error:  # noqa: BLE001  (reported below)
            errors.append(error)

    threads = [threading.Thread(target=load) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and len(calls) == 1
    assert results == [cache / name] * 2 and models._cache_is_complete(cache / name)
    assert not stale.exists()


def test_unwritable_cache_directory_is_named(small_gguf, monkeypatch, tmp_path):
    """$STEERKERN_CACHE under a file (or anywhere it cannot be created) fails with a
    ModelLoadError that names $STEERKERN_CACHE and the fix; "~" in it is the home directory."""
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    monkeypatch.setenv("STEERKERN_CACHE", str(blocker / "cache"))
    monkeypatch.setattr(models, "_convert_default_model", _fake_conversion([]))
    with pytest.raises(ModelLoadError, match=r"\$STEERKERN_CACHE .*Set STEERKERN_CACHE to a writable"):
        load_model()
    monkeypatch.setenv("STEERKERN_CACHE", "~/steerkern-cache")
    assert models.cache_dir() == Path.home() / "steerkern-cache"


def test_a_missing_library_is_named_as_the_fix(own_checkpoint, monkeypatch):
    """transformers 4.5x builds a Llama tokenizer through protobuf when it has no fast one, and
    remote code may import packages that are not installed: an ImportError used to escape
    load_model instead of a ModelLoadError saying what to install."""
    import transformers

    def missing(*args, **kwargs):
        raise ImportError("\nLlamaConverter requires the protobuf library but it was not found")

    with monkeypatch.context() as patch:
        patch.setattr(transformers.AutoTokenizer, "from_pretrained", missing)
        with pytest.raises(ModelLoadError, match="tokenizer .*protobuf.*install the library"):
            load_model(own_checkpoint)
    with monkeypatch.context() as patch:
        patch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", missing)
        with pytest.raises(ModelLoadError, match="model .*protobuf.*install the library"):
            load_model(own_checkpoint)


def test_sources_in_a_subfolder_or_a_gguf_file_and_names_that_are_no_names(tmp_path):
    """``subfolder=`` and ``gguf_file=`` are from_pretrained's: the checks look where they point;
    a name that is not a string or path (or is empty) is refused by name; 'AUTO' is 'auto'."""
    from steerkern.models import _check_source, _resolve_dtype

    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "config.json").write_text("{}")
    (sub / "model.safetensors").write_text("x")
    assert _check_source(str(tmp_path), subfolder="sub") == str(tmp_path)
    with pytest.raises(ModelLoadError, match="has no config.json"):
        _check_source(str(tmp_path), subfolder="other")
    (tmp_path / "m.gguf").write_text("x")
    assert _check_source(str(tmp_path), gguf_file="m.gguf") == str(tmp_path)
    with pytest.raises(ModelLoadError, match="no gguf_file 'n.gguf'"):
        _check_source(str(tmp_path), gguf_file="n.gguf")
    for name in (5, "", "  "):
        with pytest.raises(ModelLoadError, match="give a Hugging Face model id or a local directory"):
            load_model(name)
    assert _resolve_dtype("AUTO") == "auto" and _resolve_dtype(" Auto ") == "auto"


def test_a_tokenizer_without_pad_eos_or_unk_pads_with_an_id_the_model_embeds():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    from steerkern.models import prepare_tokenizer

    raw = Tokenizer(WordLevel({word: i for i, word in enumerate(["a", "b", "c", "d"])}))
    raw.pre_tokenizer = Whitespace()
    tokenizer = prepare_tokenizer(PreTrainedTokenizerFast(tokenizer_object=raw))
    assert tokenizer.pad_token_id == 0 and len(tokenizer) == 4 and tokenizer.padding_side == "left"
    batch = tokenizer(["a b c", "d"], padding=True, return_tensors="pt")
    assert batch["input_ids"].max() < 4 and batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]


def test_eval_mode_sets_flags_without_calling_train():
    """``eval_mode`` (extraction, capture, evaluation) sets and restores the training flags
    without calling ``eval()`` / ``train()``, which a module may override to do more (loralib's
    LoRA layers merge their update into the weight on ``eval()``)."""
    from steerkern.models import eval_mode
    from tests.tiny_models import MergesOnEval

    model = torch.nn.Sequential(MergesOnEval(4, 4), torch.nn.Dropout(0.5)).train()
    model[1].eval()
    weight = model[0].weight.detach().clone()
    with eval_mode(model):
        assert not any(m.training for m in model.modules())
        assert torch.equal(model[0].weight, weight)
    assert [m.training for m in model.modules()] == [True, True, False]
    assert torch.equal(model[0].weight, weight)
