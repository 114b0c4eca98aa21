"""Model loading, the default-model cache, and architecture discovery."""

import json
import time

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
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="load_model\\(name='no-such-org/no-such-model'\\)"):
        load_model("no-such-org/no-such-model")
