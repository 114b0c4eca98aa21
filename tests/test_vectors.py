"""SteeringVector: parts, validation, arithmetic, safetensors and GGUF formats, bad files."""

import json
import struct
import warnings
from pathlib import Path

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
    for bias in (None, torch.ones(4)):  # rank 0 does nothing, as ops.steer_ refuses it
        with pytest.raises(ValueError, match=r"A \(4, 0\) and B \(4, 0\) have rank R = 0.*bias only.*R >= 1"):
            SteeringPart(bias=bias, A=torch.zeros(4, 0), B=torch.zeros(4, 0))
    with pytest.raises(ValueError, match="rank R = 0"):
        SteeringVector.from_lowrank({1: (torch.ones(4), torch.zeros(4, 0), torch.zeros(4, 0))})
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
    with pytest.raises(ValueError, match="'-' is defined for additive vectors only"):
        -lowrank()
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
    with pytest.raises(ValueError, match=r"this vector steers layer 9 but .* has 4 layers \(0..3\)"):
        additive(layers=(9,)).validate(model)
    with pytest.raises(ValueError, match="target='mlp.nope'"):
        SteeringVector.from_directions({1: torch.zeros(64)}, target="mlp.nope").validate(model)
    # a weight delta on mlp.down_proj (in 96 -> out 64) needs D_src = 96
    lowrank(dim=64, source="input", target="mlp.down_proj", d_src=96).validate(model)
    with pytest.raises(ValueError, match="takes 96"):
        lowrank(dim=64, source="input", target="mlp.down_proj", d_src=80).validate(model)
    with pytest.raises(ValueError, match="not a linear module"):
        lowrank(dim=64, source="input", target="mlp", d_src=64).validate(model)
    # a module without weights cannot be steered, whatever the vector's width (its own output,
    # 96 wide here, was once refused as "expects 64")
    for width in (96, 64):
        with pytest.raises(ValueError, match=r"layer 1, target 'mlp.act_fn': \w+ holds no parameters"):
            SteeringVector.from_directions({1: torch.ones(width)}, target="mlp.act_fn").validate(model)


def test_validate_warns_when_a_vector_was_made_for_another_checkpoint(tiny_model_factory, monkeypatch):
    """Same architecture and widths but another checkpoint's name: a warning, not an error (a
    fine-tune may share the direction). A Hub id and a local directory of the same name agree;
    models without a name (the class name stands in) are not compared."""
    model = tiny_model_factory("llama")
    vector = additive(dim=64, model="HuggingFaceTB/SmolLM-135M", model_type="llama")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        vector.validate(model)  # the tiny model has no name
        monkeypatch.setattr(model.config, "_name_or_path", "smollm-135m")
        vector.validate(model)
    monkeypatch.setattr(model.config, "_name_or_path", "HuggingFaceTB/SmolLM2-135M-Instruct")
    with pytest.warns(UserWarning, match="made for 'HuggingFaceTB/SmolLM-135M' and is applied to "
                                         "'HuggingFaceTB/SmolLM2-135M-Instruct'"):
        vector.validate(model)


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


def test_validate_warns_when_a_control_vector_hints_another_architecture(tmp_path, tiny_model_factory):
    """repeng writes the model's model_type as a GGUF's model_hint: a 'qwen2' file on a Llama is
    flagged; a hint that names no architecture ('unknown') or the model's own is not."""
    llama = tiny_model_factory("llama")
    direction = {"direction.1": np.ones(64, dtype=np.float32)}
    other = SteeringVector.from_gguf(_write_control_vector(tmp_path / "q.gguf", direction, hint="qwen2"))
    with pytest.warns(UserWarning, match="model_hint is 'qwen2'.*'llama' model"):
        other.validate(llama)
    for hint in ("llama", "unknown"):
        vector = SteeringVector.from_gguf(_write_control_vector(tmp_path / f"{hint}.gguf", direction, hint=hint))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            vector.validate(llama)
    # llama.cpp hints "llama" for the Mistral models it converts
    mistral = SteeringVector.from_gguf(_write_control_vector(tmp_path / "m.gguf", direction, hint="llama"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mistral.validate(tiny_model_factory("mistral"))


# --- interop with repeng / EasySteer / llama.cpp ------------------------------------------------
#
# What each tool does with a ``controlvector`` GGUF (read from their public sources):
# - repeng ``ControlVector.export_gguf``: ``GGUFWriter(path, "controlvector")``, string
#   ``controlvector.model_hint`` (the HF model_type), uint32 ``controlvector.layer_count`` (number of
#   directions), one tensor ``direction.{layer}`` per entry of ``directions``, where ``layer`` indexes
#   ``model.layers`` (its ``ControlModule`` adds the direction to that decoder layer's output; its
#   extraction reads ``hidden_states[layer + 1]``, the same output). Nothing stops layer 0.
# - EasySteer ``StatisticalControlVector.export_gguf``: the same plus ``controlvector.method`` and
#   float metadata, with directions for every captured decoder layer from 0 on; its engine adds
#   ``direction.{layer}`` to decoder layer ``layer``'s output (a forward hook).
# - llama.cpp ``common_control_vector_load_one``: every tensor must be ``direction.N`` with N >= 1,
#   F32, one dimension (trailing size-1 dimensions allowed); ``direction.N`` is added to the output
#   of layer N (``build_cvec(cur, il)`` at the end of layer ``il``).


def _write_tool_gguf(path, directions, *, hint="llama", extra=None, raw_dtype=None):
    """A control vector as repeng / EasySteer write it, with the ``gguf`` package."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "controlvector")
    writer.add_string("controlvector.model_hint", hint)
    for key, value in (extra or {}).items():
        if isinstance(value, str):
            writer.add_string(f"controlvector.{key}", value)
        else:
            writer.add_float32(f"controlvector.{key}", float(value))
    writer.add_uint32("controlvector.layer_count", len(directions))
    for layer, value in directions.items():
        if raw_dtype is None:
            writer.add_tensor(f"direction.{layer}", value)
        else:
            writer.add_tensor(f"direction.{layer}", gguf.quants.quantize(value, raw_dtype), raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_reads_easysteer_files_that_steer_layer_0(tmp_path):
    """EasySteer exports a direction for every decoder layer from 0 (repeng does too when asked
    for layer 0), and both apply ``direction.0`` to the output of ``model.layers[0]``. Reading
    such a file used to fail ("corrupt control vector"); now ``direction.0`` is layer 0, with a
    warning that llama.cpp itself would refuse the file."""
    rng = np.random.default_rng(0)
    directions = {layer: rng.standard_normal(16).astype(np.float32) for layer in range(4)}
    path = _write_tool_gguf(tmp_path / "easysteer.gguf", directions, hint="qwen2",
                            extra={"method": "diffmean", "explained_variance": 0.5})
    with pytest.warns(UserWarning, match="llama.cpp"):
        vector = SteeringVector.from_gguf(path)
    assert vector.layers == [0, 1, 2, 3] and vector.metadata["model_hint"] == "qwen2"
    assert vector.metadata["method"] == "diffmean"
    for layer, value in directions.items():
        assert torch.equal(vector.parts[(layer, "residual")].bias, torch.from_numpy(value))


def test_gguf_reads_directions_stored_in_other_dtypes_and_shapes(tmp_path):
    """A BF16 or quantized direction used to be read as its raw bytes (a vector of the wrong
    width and garbage values); F16/F64 directions and a ``[1, hidden]`` array (which llama.cpp
    counts as one dimension) are read as the same values in float32."""
    import gguf

    x = np.linspace(-2.0, 2.0, 64).astype(np.float32)
    for raw, atol in ((gguf.GGMLQuantizationType.BF16, 2e-2), (gguf.GGMLQuantizationType.Q8_0, 2e-2)):
        path = _write_tool_gguf(tmp_path / f"{raw.name}.gguf", {3: x}, raw_dtype=raw)
        got = SteeringVector.from_gguf(path).parts[(3, "residual")].bias
        assert got.dtype == torch.float32 and got.shape == (64,)
        torch.testing.assert_close(got, torch.from_numpy(x), atol=atol, rtol=0)
    mixed = _write_tool_gguf(tmp_path / "mixed.gguf", {1: x.astype(np.float16), 2: x.astype(np.float64),
                                                       3: x.reshape(1, 64)})
    vector = SteeringVector.from_gguf(mixed)
    for layer in (1, 2, 3):
        torch.testing.assert_close(vector.parts[(layer, "residual")].bias, torch.from_numpy(x), atol=1e-3, rtol=0)
    column = _write_tool_gguf(tmp_path / "column.gguf", {1: x.reshape(64, 1)})
    with pytest.raises(ValueError, match="column.gguf.*'direction.1'"):
        SteeringVector.from_gguf(column)


def _llama_cpp_layers(path) -> dict[int, np.ndarray]:
    """What llama.cpp's loader makes of a control vector file: ``{layer il: vector added to the
    output of layer il}``, or an AssertionError where it would refuse the file."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    width, layers = None, {}
    for tensor in reader.tensors:
        head, _, index = tensor.name.partition(".")
        assert head == "direction" and index.isdigit(), f"llama.cpp rejects tensor {tensor.name!r}"
        assert int(index) >= 1, "llama.cpp rejects direction.0"
        assert tensor.tensor_type == gguf.GGMLQuantizationType.F32, "llama.cpp needs F32 directions"
        assert all(int(n) == 1 for n in tensor.shape[1:]), "llama.cpp needs 1-D directions"
        assert width in (None, tensor.n_elements), "llama.cpp needs one width"
        width = tensor.n_elements
        layers[int(index)] = layers.get(int(index), 0) + np.asarray(tensor.data, dtype=np.float32).reshape(-1)
    return layers


def test_files_written_here_put_each_direction_on_the_same_decoder_layer_in_every_tool(tmp_path, tiny_model_factory):
    """A repeng file read here steers the same decoder layer repeng would (the output of
    ``model.layers[N]`` for ``direction.N``), and a file written here passes llama.cpp's loader
    rules with ``direction.N`` holding steerkern's layer-N part."""
    from steerkern.control import steer

    model = tiny_model_factory("llama")
    g = torch.Generator().manual_seed(3)
    directions = {1: torch.randn(64, generator=g), 3: torch.randn(64, generator=g)}
    source = _write_tool_gguf(tmp_path / "repeng.gguf", {k: v.numpy() for k, v in directions.items()})
    vector = SteeringVector.from_gguf(source)

    ids = torch.tensor([[1, 5, 9, 17, 33]])
    layers = model.model.layers

    def add(direction):
        def hook(module, args, output):
            if isinstance(output, tuple):
                return (output[0] + direction,) + tuple(output[1:])
            return output + direction
        return hook

    handles = [layers[layer].register_forward_hook(add(d)) for layer, d in directions.items()]
    try:
        with torch.no_grad():
            expected = model(ids).logits
    finally:
        for handle in handles:
            handle.remove()
    with torch.no_grad(), steer(model, vector, coeff=1.0):
        got = model(ids).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)

    written = _llama_cpp_layers(vector.to(dtype=torch.bfloat16).to_gguf(tmp_path / "out.gguf"))
    assert sorted(written) == [1, 3]
    for layer in (1, 3):
        assert np.array_equal(written[layer], vector.parts[(layer, "residual")].bias.to(torch.bfloat16).float().numpy())


def test_save_a_vector_whose_layers_share_one_tensor(tmp_path):
    """One direction applied to several layers (``{layer: d for layer in 10..14}``) used to fail in
    safetensors ("Some tensors share memory")."""
    direction = torch.randn(16)
    vector = SteeringVector.from_directions({layer: direction for layer in (2, 3, 4)})
    loaded = SteeringVector.load(vector.save(tmp_path / "shared.safetensors"))
    assert loaded.layers == [2, 3, 4]
    for layer in (2, 3, 4):
        assert torch.equal(loaded.parts[(layer, "residual")].bias, direction)


def test_load_device_argument(tmp_path):
    """A bad ``device`` used to be reported as a truncated or corrupt file."""
    path = additive().save(tmp_path / "v.safetensors")
    loaded = SteeringVector.load(path, device=torch.device("cpu"))
    assert all(p.bias.device.type == "cpu" for p in loaded.parts.values())
    for bad in ("nonsense", 3.5):
        with pytest.raises(ValueError, match="device") as error:
            SteeringVector.load(path, device=bad)
        assert "corrupt" not in str(error.value)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device='cuda'") as error:
            SteeringVector.load(path, device="cuda")
        assert "corrupt" not in str(error.value)


def test_metadata_with_numpy_and_torch_values_round_trips(tmp_path):
    """numpy / torch scalars and arrays in metadata (an explained variance from numpy, a count
    from a tensor) used to be refused as not JSON-serialisable; they are stored as plain numbers
    and lists, nested dicts, lists and None included."""
    meta = {"explained_variance": np.float32(0.25), "n": np.int64(7), "flag": np.bool_(True),
            "scores": np.array([1.5, 2.5]), "norm": torch.tensor(3.0),
            "nested": {"a": [np.int32(1), None, {"b": np.float16(0.5)}]}, "none": None}
    vector = additive(**meta)
    expected = {"explained_variance": 0.25, "n": 7, "flag": True, "scores": [1.5, 2.5], "norm": 3.0,
                "nested": {"a": [1, None, {"b": 0.5}]}, "none": None}
    for key, value in expected.items():
        assert vector.metadata[key] == value and type(vector.metadata[key]) is type(value)
    assert SteeringVector.load(vector.save(tmp_path / "m.safetensors")).metadata == vector.metadata
    with pytest.raises(ValueError, match="JSON"):
        additive(bad=torch.zeros(2, 2, dtype=torch.complex64))


def test_arithmetic_refuses_vectors_of_different_architectures():
    """Adding a Llama vector to a Qwen2 one used to drop ``model_type`` from the result, so
    ``validate`` no longer caught a model of the wrong architecture."""
    with pytest.raises(ValueError, match="different model_type"):
        additive(model_type="llama") + additive(model_type="qwen2")
    mixed = additive(model_type="llama") + additive(1)
    assert mixed.metadata["model_type"] == "llama"


def test_arithmetic_mixes_dtypes_targets_and_layer_sets():
    a = additive(0, layers=(1, 2)).to(dtype=torch.bfloat16)
    b = SteeringVector.from_directions({2: torch.ones(64), 3: torch.ones(64)}, concept="x")
    c = SteeringVector.from_directions({2: torch.ones(64)}, target="mlp.down_proj")
    total = a - 2 * b + c / 4
    assert total.targets == ["mlp.down_proj", "residual"] and total.layers == [1, 2, 3]
    assert total.parts[(2, "residual")].bias.dtype == torch.float32
    torch.testing.assert_close(total.parts[(2, "residual")].bias,
                               a.parts[(2, "residual")].bias.float() - 2)
    torch.testing.assert_close(total.parts[(2, "mlp.down_proj")].bias, torch.full((64,), 0.25))
    assert total.metadata["method"] == "arithmetic" and total.metadata["concept"] == "x"
    assert total.metadata["layers"] == [1, 2, 3]


def test_from_directions_takes_repeng_style_numpy_directions_and_numpy_layers():
    """repeng's ``ControlVector.directions`` is ``{int: np.ndarray}`` and layer lists often come
    from ``np.arange``: both used to be refused (``bias must be a torch.Tensor``, ``layer ...
    must be a non-negative int``)."""
    rng = np.random.default_rng(1)
    directions = {np.int64(layer): rng.standard_normal(8).astype(np.float32) for layer in np.arange(2, 5)}
    vector = SteeringVector.from_directions(directions)
    assert vector.layers == [2, 3, 4] and all(type(layer) is int for layer, _ in vector.parts)
    for layer, value in directions.items():
        assert torch.equal(vector.parts[(int(layer), "residual")].bias, torch.from_numpy(value))
    with pytest.raises(ValueError, match="non-negative int"):
        SteeringVector.from_directions({np.float32(2.0): torch.zeros(8)})
    with pytest.raises(TypeError, match="floating-point"):
        SteeringVector.from_directions({1: np.arange(8)})


def test_gguf_with_unusable_directions_names_the_file(tmp_path):
    ragged = _write_tool_gguf(tmp_path / "ragged.gguf", {1: np.ones(8, np.float32), 2: np.ones(16, np.float32)})
    with pytest.raises(ValueError, match="ragged.gguf.*different widths"):
        SteeringVector.from_gguf(ragged)
    nan = _write_tool_gguf(tmp_path / "nan.gguf", {1: np.full(8, np.nan, np.float32)})
    with pytest.raises(ValueError, match="nan.gguf.*NaN"):
        SteeringVector.from_gguf(nan)
    import gguf

    directions = {1: np.ones(8, np.float32)}
    path = _write_tool_gguf(tmp_path / "mm.gguf", directions)
    memmapped = {int(t.name.split(".")[1]): t.data for t in gguf.GGUFReader(str(path)).tensors}
    with warnings.catch_warnings():  # repeng's import_gguf hands over read-only memory maps
        warnings.simplefilter("error")
        assert SteeringVector.from_directions(memmapped).layers == [1]


def test_arithmetic_results_share_no_tensor_with_their_operands():
    a, b = additive(0, layers=(1, 2)), additive(1, layers=(2, 3))
    before = {k: p.bias.clone() for k, p in {**a.parts, **b.parts}.items() if k[0] != 2}
    for result in (a + b, sum([b]), a - b, 2 * a):
        for part in result.parts.values():
            part.bias.mul_(7.0)
    for key, bias in before.items():
        owner = a if key in a.parts and key[0] == 1 else b
        assert torch.equal(owner.parts[key].bias, bias), key


def test_gguf_round_trip_keeps_the_metadata_and_tolerates_damaged_metadata(tmp_path):
    import gguf

    vector = additive(layers=(1, 5), concept="honesty", model_type="llama", model="m")
    assert SteeringVector.from_gguf(vector.to_gguf(tmp_path / "v.gguf")).metadata == vector.metadata
    for stored in ("[1, 2]", "5", "not json"):
        path = tmp_path / "damaged.gguf"
        writer = gguf.GGUFWriter(str(path), "controlvector")
        writer.add_string("controlvector.model_hint", "llama")
        writer.add_string("controlvector.steerkern_metadata", stored)
        writer.add_tensor("direction.1", np.ones(8, np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        with pytest.warns(UserWarning, match="not a JSON object"):
            loaded = SteeringVector.from_gguf(path)
        assert loaded.layers == [1] and loaded.metadata["model_hint"] == "llama"  # as for a foreign file


def test_safetensors_header_with_repeated_or_fractional_layers_is_damaged(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    path = additive(layers=(1, 2)).save(tmp_path / "v.safetensors")
    tensors = load_file(path)
    with safe_open(str(path), "pt") as handle:
        meta = handle.metadata()
    key = next(k for k, v in meta.items() if '"parts"' in v)
    for change, message in ((lambda parts: parts[1].update(layer=1), "repeats"),
                            (lambda parts: parts[0].update(layer=1.7), "not an integer")):
        body = json.loads(meta[key])
        change(body["parts"])
        save_file(tensors, tmp_path / "bad.safetensors", metadata={**meta, key: json.dumps(body)})
        with pytest.raises(ValueError, match=f"damaged steerkern header: .*{message}"):
            SteeringVector.load(tmp_path / "bad.safetensors")


def test_direction_errors_name_the_layer():
    with pytest.raises(TypeError, match=r"directions\[3\]: bias must be"):
        SteeringVector.from_directions({3: [1.0, 2.0]})
    with pytest.raises(ValueError, match=r"directions\[3\]: bias must be 1-D"):
        SteeringVector.from_directions({3: torch.ones(1, 4)})
    with pytest.raises(ValueError, match="absolute layer indices"):
        SteeringVector.from_directions({-1: torch.ones(4)})


def test_a_cast_that_overflows_names_the_dtype():
    """A float32 vector cast to float16 past 65504 was refused as 'contains NaN or Inf'."""
    vector = SteeringVector.from_directions({1: torch.full((8,), 1e6)})
    with pytest.raises(ValueError, match=r"bias does not fit in torch.float16 \(\|values\| up to 1e\+06"):
        vector.to(dtype=torch.float16)
    assert vector.to(dtype=torch.bfloat16).parts[(1, "residual")].bias.dtype == torch.bfloat16


def test_scaling_is_recorded_and_a_sum_drops_the_operands_scale(tmp_path):
    """``2 * a`` kept ``a``'s metadata unchanged, so its scale note described a vector half its
    size; the factor is recorded (and multiplies up), and a sum, which no operand's scale note
    describes, drops both."""
    a = SteeringVector.from_directions({1: torch.ones(4)}, method="mean_diff", scale="note")
    before = dict(a.metadata)
    assert "scaled_by" not in a.metadata
    assert (2 * a).metadata["scaled_by"] == 2.0 and (2 * a).metadata["scale"] == "note"
    assert (-(a / 4)).metadata["scaled_by"] == -0.25
    assert SteeringVector.load((3 * a).save(tmp_path / "v.safetensors")).metadata["scaled_by"] == 3.0
    total = 2 * a - a
    assert total.metadata["method"] == "arithmetic"
    assert "scale" not in total.metadata and "scaled_by" not in total.metadata
    assert a.metadata == before


def test_writing_to_a_directory_or_under_a_file_is_refused_and_a_failed_write_leaves_the_old_file(
        tmp_path, monkeypatch):
    """save / to_gguf to a directory raised SafetensorError / IsADirectoryError, under a file
    FileExistsError; a write that failed half-way left a truncated file in place of the vector."""
    import gguf
    import safetensors.torch

    vector = SteeringVector.from_directions({1: torch.ones(8), 2: torch.ones(8)})
    (tmp_path / "a_file").write_text("x")
    for write in (vector.save, vector.to_gguf):
        with pytest.raises(ValueError, match="is a directory"):
            write(tmp_path)
        with pytest.raises(ValueError, match="cannot write .* a part of its directory is a file"):
            write(tmp_path / "a_file" / "v.bin")
    old = {suffix: vector.save(tmp_path / "v.safetensors") if suffix == ".safetensors"
           else vector.to_gguf(tmp_path / "v.gguf") for suffix in (".safetensors", ".gguf")}
    before = {suffix: path.read_bytes() for suffix, path in old.items()}

    def half(*args, **kwargs):
        raise OSError("No space left on device")

    def half_safetensors(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\x10\x00\x00")
        half()

    monkeypatch.setattr(safetensors.torch, "save_file", half_safetensors)
    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", half)
    bigger = 2 * vector
    for write, suffix in ((bigger.save, ".safetensors"), (bigger.to_gguf, ".gguf")):
        with pytest.raises(OSError, match="No space"):
            write(old[suffix])
        assert old[suffix].read_bytes() == before[suffix]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "v.gguf", "v.safetensors"]


def test_saving_through_a_symbolic_link_replaces_its_target_and_keeps_the_link(tmp_path):
    """The write-beside-and-rename of save / to_gguf renamed the new file over the link itself:
    the link became a plain file and its target kept the old vector."""
    vector = SteeringVector.from_directions({1: torch.ones(8)})
    for write, suffix in ((SteeringVector.save, ".safetensors"), (SteeringVector.to_gguf, ".gguf")):
        target = write(vector, tmp_path / f"target{suffix}")
        link = tmp_path / f"link{suffix}"
        link.symlink_to(target)
        write(2 * vector, link)
        assert link.is_symlink() and link.resolve() == target.resolve()
        read = SteeringVector.load if suffix == ".safetensors" else SteeringVector.from_gguf
        torch.testing.assert_close(read(target).parts[(1, "residual")].bias, 2 * torch.ones(8))


def test_a_path_that_is_not_a_path_is_refused_by_name(tmp_path):
    """save / load / to_gguf / from_gguf given a number or None raised os.fspath's TypeError,
    which names no argument; an empty string would have meant the working directory."""
    vector = SteeringVector.from_directions({1: torch.ones(8)})
    for call in (vector.save, SteeringVector.load, vector.to_gguf, SteeringVector.from_gguf):
        for bad in (3, None, b"v.safetensors", ["v"]):
            with pytest.raises(TypeError, match=r"path must be .*a str or os.PathLike .*got "):
                call(bad)
        with pytest.raises(ValueError, match="path is empty"):
            call("  ")
    assert list(tmp_path.iterdir()) == []
    assert SteeringVector.load(str(vector.save(tmp_path / "v.safetensors"))).layers == [1]
