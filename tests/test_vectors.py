"""SteeringVector: parts, validation, arithmetic, safetensors and GGUF formats, bad files."""

import json
import struct

import numpy as np
import pytest
import torch

from steerkern.vectors import SteeringPart, SteeringVector


def additive(seed=0, layers=(2, 3), dim=64, **metadata):
    g = torch.Generator().manual_seed(seed)
    return SteeringVector.from_directions(
        {layer: torch.randn(dim, generator=g) for layer in layers}, **metadata)


def lowrank(dim=64, rank=2, source="output", target="residual", d_src=None):
    g = torch.Generator().manual_seed(7)
    d_src = d_src or dim
    return SteeringVector.from_lowrank(
        {1: (torch.randn(dim, generator=g), torch.randn(d_src, rank, generator=g),
             torch.randn(dim, rank, generator=g))},
        target=target, source=source, method="lowrank")


# --- parts ------------------------------------------------------------------------------------


def test_part_validation():
    with pytest.raises(ValueError, match="A and B must be given together"):
        SteeringPart(A=torch.zeros(4, 1))
    with pytest.raises(ValueError, match="needs a bias"):
        SteeringPart()
    with pytest.raises(ValueError, match="share the rank"):
        SteeringPart(A=torch.zeros(4, 2), B=torch.zeros(4, 1))
    with pytest.raises(ValueError, match="source='output'"):
        SteeringPart(A=torch.zeros(6, 1), B=torch.zeros(4, 1))
    with pytest.raises(ValueError, match="NaN or Inf"):
        SteeringPart(bias=torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match="source must be"):
        SteeringPart(bias=torch.zeros(3), source="middle")
    part = SteeringPart(A=torch.zeros(6, 2), B=torch.zeros(4, 2), source="input")
    assert (part.out_features, part.src_features, part.rank, part.is_additive) == (4, 6, 2, False)


def test_views_and_metadata():
    v = additive(concept="happy", model="tiny")
    assert v.layers == [2, 3] and v.targets == ["residual"] and v.is_additive
    assert v.hidden_size == 64 and v.metadata["concept"] == "happy"
    assert "steerkern_version" in v.metadata
    assert not lowrank().is_additive
    with pytest.raises(ValueError, match="JSON"):
        SteeringVector.from_directions({1: torch.zeros(3)}, bad=object())
    with pytest.raises(ValueError, match="different widths"):
        SteeringVector.from_directions({1: torch.zeros(3), 2: torch.zeros(4)})


def test_to_device_dtype():
    v = additive().to(dtype=torch.float16)
    assert all(p.bias.dtype == torch.float16 for p in v.parts.values())


# --- arithmetic ---------------------------------------------------------------------------------


def test_arithmetic_on_additive_vectors():
    a, b = additive(0), additive(1, layers=(3, 4))
    c = 2 * a - b
    assert c.layers == [2, 3, 4]
    torch.testing.assert_close(c.parts[(2, "residual")].bias, 2 * a.parts[(2, "residual")].bias)
    torch.testing.assert_close(c.parts[(3, "residual")].bias,
                               2 * a.parts[(3, "residual")].bias - b.parts[(3, "residual")].bias)
    torch.testing.assert_close(c.parts[(4, "residual")].bias, -b.parts[(4, "residual")].bias)
    torch.testing.assert_close((-a).parts[(2, "residual")].bias, -a.parts[(2, "residual")].bias)
    torch.testing.assert_close((a / 2).parts[(2, "residual")].bias, 0.5 * a.parts[(2, "residual")].bias)


def test_arithmetic_with_numpy_and_tensor_scalars_and_sum():
    """Factors from numpy or a one-element tensor scale like floats; ``sum`` of vectors starts
    from 0."""
    import numpy as np

    a, b = additive(0), additive(1, layers=(3, 4))
    bias = a.parts[(2, "residual")].bias
    for factor in (np.float32(2.0), np.int64(2), torch.tensor(2.0), torch.tensor([2.0])):
        torch.testing.assert_close((a * factor).parts[(2, "residual")].bias, 2 * bias)
        torch.testing.assert_close((factor * a).parts[(2, "residual")].bias, 2 * bias)
    torch.testing.assert_close((a / torch.tensor(4.0)).parts[(2, "residual")].bias, bias / 4)
    total = sum([a, b])
    assert total.layers == (a + b).layers
    for key in total.parts:
        torch.testing.assert_close(total.parts[key].bias, (a + b).parts[key].bias)
    with pytest.raises(TypeError):
        a * torch.ones(2)  # not a scalar
    with pytest.raises(ValueError, match="additive vectors only"):
        sum([lowrank()])


def test_arithmetic_rejects_incompatible_vectors():
    with pytest.raises(ValueError, match="additive vectors only"):
        additive() + lowrank()
    with pytest.raises(ValueError, match="additive vectors only"):
        2 * lowrank()
    with pytest.raises(ValueError, match="different hidden_size"):
        additive(dim=64) + additive(dim=32)
    with pytest.raises(ValueError, match="different model"):
        additive(model="a") + additive(model="b")
    with pytest.raises(ValueError, match="finite"):
        additive() * float("inf")
    with pytest.raises(TypeError):
        additive() + 1


# --- validate -----------------------------------------------------------------------------------


def test_validate_against_a_model(tiny_model_factory):
    model = tiny_model_factory("llama")
    additive(dim=64).validate(model)
    with pytest.raises(ValueError, match="expects 64"):
        additive(dim=32).validate(model)
    with pytest.raises(ValueError, match="out of range"):
        additive(layers=(9,)).validate(model)
    with pytest.raises(ValueError, match="target='mlp.nope'"):
        SteeringVector.from_directions({1: torch.zeros(64)}, target="mlp.nope").validate(model)
    # a weight delta on mlp.down_proj (in 96 -> out 64) needs D_src = 96
    lowrank(dim=64, source="input", target="mlp.down_proj", d_src=96).validate(model)
    with pytest.raises(ValueError, match="takes 96"):
        lowrank(dim=64, source="input", target="mlp.down_proj", d_src=80).validate(model)
    with pytest.raises(ValueError, match="not a linear module"):
        lowrank(dim=64, source="input", target="mlp", d_src=64).validate(model)


# --- safetensors --------------------------------------------------------------------------------


def test_safetensors_round_trip(tmp_path):
    for vector in (additive(concept="x", model="m"), lowrank(source="input", target="mlp.down_proj", d_src=96)):
        path = vector.save(tmp_path / "v.safetensors")
        loaded = SteeringVector.load(path)
        assert loaded.metadata == vector.metadata
        assert loaded.parts.keys() == vector.parts.keys()
        for key, part in vector.parts.items():
            got = loaded.parts[key]
            assert got.source == part.source
            for name in ("bias", "A", "B"):
                a, b = getattr(part, name), getattr(got, name)
                assert (a is None) == (b is None)
                if a is not None:
                    assert torch.equal(a, b)
    half = additive().to(dtype=torch.bfloat16)
    assert SteeringVector.load(half.save(tmp_path / "h.safetensors")).parts[(2, "residual")].bias.dtype == torch.bfloat16


def test_corrupt_and_foreign_files_give_clear_errors(tmp_path):
    from safetensors.torch import save_file

    good = additive().save(tmp_path / "good.safetensors").read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match="truncated.safetensors"):
        SteeringVector.load(truncated)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00\x01not a vector at all" * 3)
    with pytest.raises(ValueError, match="garbage.safetensors"):
        SteeringVector.load(garbage)
    bad_json = tmp_path / "badjson.safetensors"
    header = b'{"x": not json}'
    bad_json.write_bytes(struct.pack("<Q", len(header)) + header)
    with pytest.raises(ValueError, match="badjson.safetensors"):
        SteeringVector.load(bad_json)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"weight": torch.zeros(3)}, str(foreign))
    with pytest.raises(ValueError, match="not a steerkern vector"):
        SteeringVector.load(foreign)
    damaged = tmp_path / "damaged.safetensors"
    save_file({"parts.0.bias": torch.zeros(3)}, str(damaged), metadata={"steerkern": '{"format": 1}'})
    with pytest.raises(ValueError, match="damaged steerkern header"):
        SteeringVector.load(damaged)
    gguf_path = additive().to_gguf(tmp_path / "v.gguf")
    with pytest.raises(ValueError, match="from_gguf"):
        SteeringVector.load(gguf_path)
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        SteeringVector.load(tmp_path / "missing.safetensors")


# --- GGUF -------------------------------------------------------------------------------------


def test_gguf_round_trip(tmp_path):
    import gguf

    vector = additive(layers=(1, 5, 6), concept="honesty", model_type="llama")
    path = vector.to_gguf(tmp_path / "v.gguf")
    reader = gguf.GGUFReader(str(path))
    assert reader.get_field("general.architecture").contents() == "controlvector"
    assert reader.get_field("controlvector.model_hint").contents() == "llama"
    assert reader.get_field("controlvector.layer_count").contents() == 3
    assert sorted(t.name for t in reader.tensors) == ["direction.1", "direction.5", "direction.6"]
    loaded = SteeringVector.from_gguf(path)
    assert loaded.layers == [1, 5, 6] and loaded.metadata["concept"] == "honesty"
    for key, part in vector.parts.items():
        assert torch.equal(loaded.parts[key].bias, part.bias)


def test_gguf_reads_llama_cpp_style_files(tmp_path):
    """A file as repeng / llama.cpp write it (no steerkern metadata): direction.N -> layer N."""
    import gguf

    path = tmp_path / "repeng.gguf"
    writer = gguf.GGUFWriter(str(path), "controlvector")
    writer.add_string("controlvector.model_hint", "mistral")
    writer.add_uint32("controlvector.layer_count", 2)
    for layer in (3, 4):
        writer.add_tensor(f"direction.{layer}", np.full(8, float(layer), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    vector = SteeringVector.from_gguf(path, concept="calm")
    assert vector.layers == [3, 4] and vector.metadata["model_hint"] == "mistral"
    assert vector.metadata["concept"] == "calm" and vector.hidden_size == 8
    assert torch.equal(vector.parts[(4, "residual")].bias, torch.full((8,), 4.0))


def test_gguf_errors(tmp_path):
    import gguf

    with pytest.raises(ValueError, match="low-rank"):
        lowrank().to_gguf(tmp_path / "l.gguf")
    with pytest.raises(ValueError, match="residual stream only"):
        SteeringVector.from_directions({2: torch.zeros(4)}, target="mlp").to_gguf(tmp_path / "m.gguf")
    with pytest.raises(ValueError, match="layer 0"):
        additive(layers=(0, 1)).to_gguf(tmp_path / "z.gguf")
    model_file = tmp_path / "model.gguf"
    writer = gguf.GGUFWriter(str(model_file), "llama")
    writer.add_tensor("token_embd.weight", np.zeros((2, 2), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="architecture 'llama'"):
        SteeringVector.from_gguf(model_file)
    good = additive(layers=(1,)).to_gguf(tmp_path / "good.gguf").read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(good[:100])
    with pytest.raises(ValueError, match="cut.gguf"):
        SteeringVector.from_gguf(cut)
    st = additive().save(tmp_path / "v.safetensors")
    with pytest.raises(ValueError, match="not a GGUF file"):
        SteeringVector.from_gguf(st)


def test_metadata_header_is_json(tmp_path):
    from safetensors import safe_open

    path = additive(concept="c").save(tmp_path / "v.safetensors")
    with safe_open(str(path), framework="pt") as handle:
        header = json.loads(handle.metadata()["steerkern"])
    assert header["format"] == 1 and header["metadata"]["concept"] == "c"
    assert [p["layer"] for p in header["parts"]] == [2, 3]


# --- regressions ------------------------------------------------------------------------------


def test_steerkern_header_that_is_not_json_names_the_file(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "notjson.safetensors"
    save_file({"parts.0.bias": torch.zeros(3)}, str(path), metadata={"steerkern": "not json"})
    with pytest.raises(ValueError, match="notjson.safetensors.*damaged steerkern header"):
        SteeringVector.load(path)


def _write_control_vector(path, tensors, hint="llama"):
    import gguf

    writer = gguf.GGUFWriter(str(path), "controlvector")
    writer.add_string("controlvector.model_hint", hint)
    writer.add_uint32("controlvector.layer_count", len(tensors))
    for name, value in tensors.items():
        writer.add_tensor(name, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_re_export_keeps_a_repeng_model_hint_and_rejects_non_1d_directions(tmp_path):
    """A repeng file read and written back keeps its model hint (it used to become 'unknown');
    llama.cpp rejects a direction that is not 1-D, so reading one is an error, not a silent
    flatten into a vector of the wrong width."""
    import gguf

    source = _write_control_vector(tmp_path / "repeng.gguf",
                                   {"direction.3": np.ones(8, dtype=np.float32)}, hint="mistral")
    again = SteeringVector.from_gguf(source).to_gguf(tmp_path / "again.gguf")
    assert gguf.GGUFReader(str(again)).get_field("controlvector.model_hint").contents() == "mistral"
    flat = _write_control_vector(tmp_path / "2d.gguf", {"direction.1": np.zeros((2, 4), dtype=np.float32)})
    with pytest.raises(ValueError, match="2d.gguf.*'direction.1' of shape"):
        SteeringVector.from_gguf(flat)


def test_validate_rejects_a_vector_from_another_architecture(tiny_model_factory):
    """Tiny Llama and Qwen2 share hidden size 64 and 4 layers: a vector extracted from one used
    to pass validation on the other."""
    llama, qwen = tiny_model_factory("llama"), tiny_model_factory("qwen2")
    vector = additive(dim=64, model="LlamaForCausalLM", model_type="llama")
    vector.validate(llama)
    with pytest.raises(ValueError, match="extracted from a 'llama' model.*'qwen2' model"):
        vector.validate(qwen)
    additive(dim=64).validate(qwen)  # no model_type recorded (from_directions, GGUF): widths only
