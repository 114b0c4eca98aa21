"""The ``steerkern`` command, run in-process through ``main([...])``."""

import json
import re
from pathlib import Path

import pytest
import torch

from steerkern.cli import main
from steerkern.vectors import SteeringVector


@pytest.fixture
def use_default_model(monkeypatch, default_model):
    """Every subcommand's model load returns the session's default model (already loaded)."""
    import steerkern.models

    calls = []

    def load_model(name=None, **kwargs):
        calls.append(name)
        assert name is None
        return default_model

    monkeypatch.setattr(steerkern.models, "load_model", load_model)
    return calls


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err, "no message on stderr"
    assert "Traceback" not in "\n".join(err)
    return err[-1]


def test_help_lists_commands(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("extract", "generate", "eval", "demo"):
        assert command in out
    for command in ("extract", "generate", "eval", "demo"):
        assert main([command, "--help"]) == 0
    assert "--coeffs" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    ([], "required"),
    (["frobnicate"], "invalid choice"),
    (["eval"], "--vector"),
    (["extract", "--concept", "sentiment"], "--output"),
    (["extract", "--concept", "sentiment", "--pairs", "p.jsonl", "-o", "v.safetensors"], "not allowed"),
    (["eval", "--vector", "v.safetensors", "--max-new-tokens", "lots"], "invalid int"),
])
def test_argparse_errors_exit_2(capsys, argv, message):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_bad_values_and_files_exit_2(tmp_path, capsys):
    missing = str(tmp_path / "none.safetensors")
    assert main(["eval", "--vector", missing]) == 2
    assert "no such file" in _error_line(capsys)

    corrupt = tmp_path / "bad.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    assert main(["eval", "--vector", str(corrupt)]) == 2
    assert "cannot read" in _error_line(capsys)

    bad_gguf = tmp_path / "bad.gguf"
    bad_gguf.write_bytes(b"not a gguf at all")
    assert main(["generate", "--vector", str(bad_gguf), "hi"]) == 2
    assert "cannot read" in _error_line(capsys)

    vector = SteeringVector.from_directions({12: torch.ones(576)}, concept="sentiment")
    good = vector.save(tmp_path / "v.safetensors")
    assert main(["eval", "--vector", str(good), "--coeffs", "-1", "x"]) == 2
    assert "'x' is not a number" in _error_line(capsys)
    assert main(["eval", "--vector", str(good), "--limit", "0"]) == 2
    assert "--limit must be >= 1" in _error_line(capsys)

    prompts = tmp_path / "prompts.json"
    prompts.write_text("[{\"prompt\": \"ok?\", ")
    assert main(["eval", "--vector", str(good), "--prompts", str(prompts)]) == 2
    assert "not valid JSON" in _error_line(capsys)

    assert main(["extract", "--concept", "nope", "-o", str(tmp_path / "v.safetensors")]) == 2
    assert "not shipped" in _error_line(capsys)
    assert main(["extract", "--concept", "sentiment", "-o", str(tmp_path / "v.pt")]) == 2
    assert ".safetensors or .gguf" in _error_line(capsys)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"chosen": "a"}\n')
    assert main(["extract", "--pairs", str(pairs), "-o", str(tmp_path / "v.safetensors")]) == 2
    assert "record 1" in _error_line(capsys)
    assert main(["extract", "--concept", "sentiment", "--layers", "ten", "-o", str(good)]) == 2
    assert "--layers" in _error_line(capsys)


def test_records_files_are_read_by_content_not_extension(tmp_path):
    """JSON lines in a .json file, a list in a .jsonl file, one object in a .txt file and a
    byte-order mark used to be refused; a bad line is named by its number."""
    from steerkern.cli import CLIError, _read_pairs, _read_records

    rows = [{"chosen": "I love it", "rejected": "I hate it"}, {"chosen": "yes\u2028", "rejected": "no"}]
    expected = [(r["chosen"], r["rejected"]) for r in rows]
    lines = tmp_path / "lines.json"
    lines.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n\n", encoding="utf-8")
    array = tmp_path / "array.jsonl"
    array.write_text(json.dumps(rows, indent=2), encoding="utf-8")
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + lines.read_bytes())
    one = tmp_path / "one.txt"
    one.write_text(json.dumps(rows[0], indent=2))
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"pairs": rows}))
    for path in (lines, array, bom, wrapped):
        assert _read_pairs(path) == expected, path.name
    assert _read_pairs(one) == expected[:1]
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps(rows[0]) + "\n" + '{"chosen": "a", \n')
    with pytest.raises(CLIError, match=r"--prompts: .*broken.jsonl.*\(line 2"):
        _read_records(broken, "--prompts")
    arrays = tmp_path / "arrays.jsonl"  # JSONL whose records are [chosen, rejected] arrays
    arrays.write_text("".join(json.dumps([c, r]) + "\n" for c, r in expected))
    assert _read_pairs(arrays) == expected
    blank = tmp_path / "blank.jsonl"
    blank.write_text(json.dumps(["I love it", " "]) + "\n" + json.dumps(["a", "b"]) + "\n")
    with pytest.raises(CLIError, match="record 1 .* not a pair of non-empty texts"):
        _read_pairs(blank)
    neither = tmp_path / "neither.jsonl"
    neither.write_text('["a", "b"]\n["c", \n')
    with pytest.raises(CLIError, match=r"not valid JSON \(nor JSONL\)"):
        _read_records(neither, "--pairs")
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    with pytest.raises(CLIError, match="holds no records"):
        _read_records(empty, "--pairs")


def test_cli_end_to_end(tmp_path, capsys, use_default_model):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("\n".join(json.dumps({"chosen": c, "rejected": r}) for c, r in [
        ("I love this wonderful day", "I hate this awful day"),
        ("What a delightful surprise", "What a dreadful surprise"),
        ("Everything is going great", "Everything is going badly"),
    ]) + "\n")
    vector_path = tmp_path / "v.safetensors"
    assert main(["extract", "--pairs", str(pairs), "--layers", "10-12", "--method", "mean_diff",
                 "--name", "joy", "-o", str(vector_path)]) == 0
    assert "wrote" in (out := capsys.readouterr().out) and "3 pairs, method mean_diff" in out
    vector = SteeringVector.load(vector_path)
    assert vector.layers == [10, 11, 12] and vector.metadata["method"] == "mean_diff"
    gguf = tmp_path / "v.gguf"
    vector.to_gguf(gguf)

    assert main(["generate", "--vector", str(gguf), "--coeff", "0", "4", "--max-new-tokens", "3",
                 "Tell me about your day."]) == 0
    out = capsys.readouterr().out
    assert "== Tell me about your day." in out and "coeff +0:" in out and "coeff +4:" in out

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "Are you happy?", "label": 1}\n{"prompt": "Are you sad?", "label": -1}\n')
    out_dir = tmp_path / "report"
    assert main(["eval", "--vector", str(vector_path), "--prompts", str(prompts), "--coeffs",
                 "-2", "0", "2", "--max-new-tokens", "3", "--out", str(out_dir)]) == 0
    out = capsys.readouterr().out
    assert "| coeff |" in out and "joy: effect" in out
    report = json.loads((out_dir / "report.json").read_text())
    assert report["coeffs"] == [-2.0, 0.0, 2.0] and len(report["prompts"]) == 2
    assert (out_dir / "plot.png").read_bytes()[:4] == b"\x89PNG"
    assert len(use_default_model) == 3


def test_cli_demo(tmp_path, capsys, use_default_model):
    out_dir = tmp_path / "demo"
    assert main(["demo", "--out", str(out_dir), "--coeffs", "-2", "0", "2", "--max-new-tokens",
                 "4", "--samples", "1", "--max-suffixes", "2"]) == 0
    out = capsys.readouterr().out
    assert "sentiment: effect" in out and "coeff -2:" in out
    assert {p.name for p in out_dir.iterdir()} == {"plot.png", "table.md", "report.json",
                                                   "sentiment.safetensors"}
    assert SteeringVector.load(out_dir / "sentiment.safetensors").metadata["concept"] == "sentiment"


def test_demo_without_generations_prints_the_table(tiny_cli, tmp_path, capsys):
    """``--max-new-tokens 0`` (no ΔNLL, no samples) once failed after writing the report."""
    out_dir = tmp_path / "demo"
    assert main(["demo", "--out", str(out_dir), "--coeffs", "-2", "0", "2", "--max-new-tokens", "0",
                 "--max-suffixes", "2"]) == 0
    out = capsys.readouterr().out
    assert "sentiment: effect" in out and "coeff -2:" not in out and "(no ΔNLL" not in out
    assert (out_dir / "plot.png").is_file() and (out_dir / "sentiment.safetensors").is_file()


# --- argument forms and early checks (tiny model: no default model needed) -------------------


@pytest.fixture
def tiny_cli(monkeypatch, tmp_path, tiny_model_factory):
    """Model loads return a tiny llama and a raw word tokenizer; returns the path of a vector
    for it and the list of load calls."""
    import steerkern.models
    from tests.test_eval import word_tokenizer

    calls = []

    def load_model(name=None, **kwargs):
        calls.append(name)
        return tiny_model_factory("llama"), word_tokenizer()

    monkeypatch.setattr(steerkern.models, "load_model", load_model)
    generator = torch.Generator().manual_seed(0)
    vector = SteeringVector.from_directions({1: 4 * torch.randn(64, generator=generator)}, concept="x")
    return vector.save(tmp_path / "tiny.safetensors"), calls


def test_vector_files_are_read_by_their_content_not_their_name(tiny_cli, tmp_path, capsys):
    """A GGUF control vector named .safetensors, or a safetensors vector named .gguf, is read as
    what it holds."""
    import shutil

    vector, _ = tiny_cli
    gguf = SteeringVector.load(vector).to_gguf(tmp_path / "v.gguf")
    for source, misnamed in ((gguf, "gguf_as.safetensors"), (vector, "safetensors_as.gguf")):
        shutil.copy(source, tmp_path / misnamed)
        assert main(["generate", "--vector", str(tmp_path / misnamed), "--coeff", "2",
                     "--max-new-tokens", "1", "Hello"]) == 0, misnamed
        assert "coeff +2:" in capsys.readouterr().out


def test_generate_takes_prompts_after_the_coefficients(tiny_cli, capsys):
    """The README's form: ``--coeff -2 0 2 "prompt"`` (argparse gives --coeff every following
    word; the numbers are coefficients, the rest prompts)."""
    vector, _ = tiny_cli
    assert main(["generate", "Hello", "--vector", str(vector), "--max-new-tokens", "1",
                 "--coeff", "-2", "0,2", "Tell me about your weekend"]) == 0
    out = capsys.readouterr().out
    assert "== Hello" in out and "== Tell me about your weekend" in out
    assert all(f"coeff {c}:" in out for c in ("-2", "+0", "+2"))
    assert main(["generate", "--vector", str(vector), "--coeff", "1"]) == 2
    assert "at least one PROMPT" in _error_line(capsys)


def test_negative_coefficient_lists_are_values_not_flags(tiny_cli, tmp_path, capsys):
    """``--coeffs -1,1`` and ``-1e0`` are numbers; argparse's own test reads them as flags."""
    vector, _ = tiny_cli
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "Are you happy ?", "label": 1}\n')
    out_dir = tmp_path / "r"
    assert main(["eval", "--vector", str(vector), "--prompts", str(prompts), "--coeffs", "-1e0,1",
                 "-2", "--max-new-tokens", "0", "--out", str(out_dir)]) == 0
    assert json.loads((out_dir / "report.json").read_text())["coeffs"] == [-1.0, 1.0, -2.0]
    assert main(["eval", "--vector", str(vector), "--coeffs", "-h"]) == 2  # still a flag error
    capsys.readouterr()


def test_sweep_arguments_are_checked_before_the_model_loads(tiny_cli, tmp_path, capsys):
    """A sweep with one coefficient or an --out that is a file fails at once, not after loading
    the model (and, for demo, extracting a vector and sweeping it)."""
    vector, calls = tiny_cli
    a_file = tmp_path / "taken"
    a_file.write_text("x")
    for argv, message in [
        (["eval", "--vector", str(vector), "--coeffs", "1"], "--coeffs"),
        (["eval", "--vector", str(vector), "--coeffs", "1", "1.0"], "repeats"),
        (["eval", "--vector", str(vector), "--out", str(a_file)], "is a file"),
        (["demo", "--coeffs", "2"], "--coeffs"),
        (["demo", "--out", str(a_file)], "is a file"),
        (["generate", "--vector", str(vector), "--coeff", "1e39", "Hi"], "--coeff: '1e39' is not a finite float32"),
        (["generate", "--vector", str(vector), "--coeff", "nan", "Hi"], "--coeff: 'nan'"),
        (["eval", "--vector", str(vector), "--coeffs", "0", "1e400"], "--coeffs: '1e400' is not a finite float32"),
        (["generate", "--vector", str(vector), "--max-new-tokens", "0", "Hi"], "--max-new-tokens must be >= 1, got 0"),
        (["generate", "--vector", str(vector), "--max-new-tokens", "-1", "Hi"], "--max-new-tokens must be >= 1"),
        (["eval", "--vector", str(vector), "--max-new-tokens", "-1"], "--max-new-tokens must be >= 0"),
    ]:
        assert main(argv) == 2, argv
        assert message in _error_line(capsys)
    bad_mwe = tmp_path / "bad.jsonl"
    bad_mwe.write_text('{"question": "q"}\n')
    assert main(["eval", "--vector", str(vector), "--mwe", str(bad_mwe)]) == 2
    assert _error_line(capsys).startswith("steerkern eval: error: --mwe: ")
    assert calls == []


def test_a_negative_layer_that_is_layer_0_is_refused_for_gguf_before_extracting(tiny_cli, tmp_path, capsys,
                                                                                  monkeypatch):
    """``--layers=-4`` on a 4-layer model is layer 0, which a .gguf control vector cannot hold:
    refused once the model's depth is known, before any extraction, naming --layers."""
    import steerkern.extract

    _, calls = tiny_cli
    monkeypatch.setattr(steerkern.extract, "extract", lambda *a, **k: pytest.fail("extraction ran"))
    pairs = tmp_path / "pairs.json"
    pairs.write_text('[["I like cats", "I hate cats"], ["Are you happy ?", "Are you sad ?"]]')
    assert main(["extract", "--pairs", str(pairs), "--layers=-4", "-o", str(tmp_path / "v.gguf")]) == 2
    assert "--layers: llama.cpp's .gguf control vectors cannot steer layer 0" in _error_line(capsys)
    assert len(calls) == 1


def test_output_locations_are_checked_before_the_model_loads(tiny_cli, tmp_path, capsys):
    """An -o/--out under a file, in a place that takes no files, or a reversed --layers range
    fails at once with one line naming the flag, not after the model is loaded and the vector
    extracted (and a reversed range inside a list is not silently dropped)."""
    vector, calls = tiny_cli
    a_file = tmp_path / "taken"
    a_file.write_text("x")
    (tmp_path / "dir.safetensors").mkdir()
    cases = [
        (["extract", "--concept", "sentiment", "-o", str(a_file / "v.safetensors")], "-o/--output: cannot write"),
        (["extract", "--concept", "sentiment", "-o", str(tmp_path / "dir.safetensors")], "is a directory"),
        (["extract", "--concept", "sentiment", "--layers", "0,3-1", "-o", str(tmp_path / "v.gguf")],
         "'3-1' is an empty range"),
        (["eval", "--vector", str(vector), "--out", str(a_file / "report")], "--out: cannot write"),
        (["demo", "--out", str(a_file / "demo")], "--out: cannot write"),
    ]
    for method in ("lowrank", "weight_svd"):  # a .gguf control vector holds additive vectors only
        cases.append((["extract", "--concept", "sentiment", "--method", method, "-o", str(tmp_path / "v.gguf")],
                       f"--method {method} gives low-rank parts"))
    cases.append((["extract", "--concept", "sentiment", "--layers", "0-2", "-o", str(tmp_path / "v.gguf")],
                   "cannot steer layer 0"))
    unshipped = SteeringVector.load(vector)
    unshipped.metadata["concept"] = "narcissism"
    cases.append((["eval", "--vector", str(unshipped.save(tmp_path / "narcissism.safetensors"))],
                  "concept 'narcissism' ships no eval prompts"))
    bad_mwe = tmp_path / "bad.jsonl"
    bad_mwe.write_text('{"question": "q"}\n')
    cases.append((["extract", "--mwe", str(bad_mwe), "-o", str(tmp_path / "v.safetensors")], "--mwe: "))
    if Path("/proc/self").is_dir():  # Linux: a directory that takes no new files
        cases.append((["extract", "--concept", "sentiment", "-o", "/proc/v.safetensors"], "does not take new files"))
    for argv, message in cases:
        assert main(argv) == 2, argv
        assert message in _error_line(capsys), argv
    assert calls == []


def test_target_flag_steers_a_sub_module_and_weight_svd_needs_one(tiny_cli, tmp_path, capsys):
    """``--target`` chooses where the vector steers; ``--method weight_svd`` without a linear
    target, or a sub-module target written as .gguf, fails before the model loads."""
    from steerkern.cli import EXTRACT_METHODS, RESIDUAL
    from steerkern.directions import METHODS
    from steerkern.models import RESIDUAL as MODELS_RESIDUAL

    assert RESIDUAL == MODELS_RESIDUAL and set(EXTRACT_METHODS) == set(METHODS)
    from steerkern.cli import FLOAT32_MAX, RANK_METHODS
    from steerkern.control import FLOAT32_MAX as CONTROL_FLOAT32_MAX
    from steerkern.directions import ADDITIVE_METHODS

    assert FLOAT32_MAX == CONTROL_FLOAT32_MAX and set(RANK_METHODS) == set(METHODS) - set(ADDITIVE_METHODS)
    _, calls = tiny_cli
    pairs = tmp_path / "pairs.json"
    pairs.write_text('[["I like cats", "I hate cats"], ["Are you happy ?", "Are you sad ?"]]')
    for argv, message in [
        (["extract", "--pairs", str(pairs), "--method", "weight_svd", "-o", str(tmp_path / "v.safetensors")],
         "--method weight_svd needs --target"),
        (["demo", "--method", "weight_svd"], "--method weight_svd needs --target"),
        (["extract", "--pairs", str(pairs), "--target", "mlp.down_proj", "-o", str(tmp_path / "v.gguf")],
         "steers the residual stream only"),
    ]:
        assert main(argv) == 2, argv
        assert message in _error_line(capsys), argv
    assert calls == []
    for method in ("weight_svd", "mean_diff"):
        out = tmp_path / f"{method}.safetensors"
        assert main(["extract", "--pairs", str(pairs), "--method", method, "--target", "mlp.down_proj",
                     "--layers", "1", "-o", str(out)]) == 0, method
        assert SteeringVector.load(out).targets == ["mlp.down_proj"]


def test_extract_logistic_writes_a_gguf(tiny_cli, tmp_path, capsys):
    """``--method logistic`` is additive, so it can be written as a .gguf control vector."""
    pairs = tmp_path / "pairs.json"
    pairs.write_text('[["I like cats", "I hate cats"], ["Are you happy ?", "Are you sad ?"]]')
    out = tmp_path / "v.gguf"
    assert main(["extract", "--pairs", str(pairs), "--method", "logistic", "--layers", "1", "-o", str(out)]) == 0
    assert "method logistic" in capsys.readouterr().out
    vector = SteeringVector.from_gguf(out)
    assert vector.layers == [1] and bool(torch.isfinite(vector.parts[(1, "residual")].bias).all())


def test_a_failed_vector_write_is_one_line(tiny_cli, tmp_path, capsys, monkeypatch):
    """A write that fails after extraction (disk full, a file system that refuses it) ends with
    exit status 2 and a line naming -o, not a safetensors traceback."""
    from safetensors import SafetensorError

    def refuse(self, path):
        raise SafetensorError("Error while serializing: I/O error: No space left on device")

    monkeypatch.setattr(SteeringVector, "save", refuse)
    pairs = tmp_path / "pairs.json"
    pairs.write_text('[["I like cats", "I hate cats"]]')
    assert main(["extract", "--pairs", str(pairs), "--layers", "1", "-o", str(tmp_path / "v.safetensors")]) == 2
    assert "-o/--output: cannot write" in _error_line(capsys)


def test_cli_on_own_checkpoint_directory(tmp_path, capsys):
    """--model DIR, loaded for real: a tiny GPT-2 with a raw word tokenizer (no chat template)
    extracts into a directory that does not exist yet (.gguf), generates and evaluates from it;
    a directory without tokenizer files is refused at load with the fix, not as "has no
    tokens" from inside extraction."""
    from tests.test_models import save_checkpoint

    model_dir = save_checkpoint(tmp_path / "my-gpt2")
    pairs = tmp_path / "pairs.json"
    pairs.write_text(json.dumps({"pairs": [{"positive": "I like cats", "negative": "I hate cats"},
                                           ["Are you happy ?", "Are you sad ?"]]}))
    gguf = tmp_path / "new" / "dir" / "v.gguf"
    assert main(["extract", "--model", str(model_dir), "--pairs", str(pairs), "--layers", "1-2",
                 "-o", str(gguf)]) == 0
    assert SteeringVector.from_gguf(gguf).layers == [1, 2]
    assert main(["generate", "--model", str(model_dir), "--vector", str(gguf), "--coeff", "0", "2",
                 "--max-new-tokens", "2", "I like cats"]) == 0
    assert "coeff +2:" in capsys.readouterr().out
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "Are you happy ?", "label": 1}\n')
    assert main(["eval", "--model", str(model_dir), "--vector", str(gguf), "--prompts", str(prompts),
                 "--coeffs", "-1", "1", "--max-new-tokens", "0", "--dtype", "bfloat16"]) == 0
    assert "| coeff |" in capsys.readouterr().out

    bare = save_checkpoint(tmp_path / "no-tokenizer", tokenizer=False)
    assert main(["extract", "--model", str(bare), "--pairs", str(pairs), "-o", str(tmp_path / "w.safetensors")]) == 2
    assert "tokenizer.save_pretrained" in _error_line(capsys)


def test_help_states_each_default_once(capsys):
    """Options' help shows a real default once: never "(default: None)", never a second
    "(default: ...)" after one the help already gives; options with a default show it."""
    for command in ("extract", "generate", "eval", "demo"):
        assert main([command, "--help"]) == 0
        text = " ".join(capsys.readouterr().out.split())
        assert "(default: None)" not in text, command
        assert not re.search(r"\(default: [^)]*\) \(default:", text), command
    assert main(["demo", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "coefficients to sweep (default: -2 -1 0 1 2)" in text
    assert "tokens per generated sample (default: 32)" in text


def test_a_bad_prompts_record_names_the_flag_and_file(tiny_cli, tmp_path, capsys):
    vector, _ = tiny_cli
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "Are you happy ?", "label": 1}\n{"prompt": "Sad ?", "label": "+1"}\n')
    assert main(["eval", "--vector", str(vector), "--prompts", str(prompts), "--max-new-tokens", "0"]) == 2
    line = _error_line(capsys)
    assert line.startswith("steerkern eval: error: --prompts ") and "p.jsonl" in line and "prompts[1]" in line


def test_flags_the_chosen_method_or_source_ignores_are_refused_before_the_model_loads(tiny_cli, tmp_path,
                                                                                      capsys):
    """``--rank`` with a method that gives one direction, ``--max-suffixes`` without
    ``--concept``, an output named only by its extension and a --layers range from both ends were
    accepted silently or refused in confusing words."""
    _, calls = tiny_cli
    pairs = tmp_path / "pairs.json"
    pairs.write_text('[["I like cats", "I hate cats"], ["Are you happy ?", "Are you sad ?"]]')
    out = str(tmp_path / "v.safetensors")
    for argv, message in [
        (["extract", "--pairs", str(pairs), "--rank", "2", "-o", out], "--rank applies to --method lowrank"),
        (["extract", "--pairs", str(pairs), "--method", "grad", "--rank", "1", "-o", out], "drop --rank"),
        (["extract", "--pairs", str(pairs), "--max-suffixes", "2", "-o", out], "--max-suffixes applies to --concept"),
        (["extract", "--pairs", str(pairs), "-o", str(tmp_path / ".safetensors")], "has no name before its extension"),
        (["extract", "--pairs", str(pairs), "--layers=1--1", "-o", out], "'1--1' mixes an index"),
        (["extract", "--pairs", str(pairs), "--layers=-1--3", "-o", out], "'-1--3' is an empty range"),
    ]:
        assert main(argv) == 2, argv
        assert message in _error_line(capsys), argv
    assert calls == []


def test_layer_lists_and_ranges_counted_from_the_last():
    from steerkern.cli import CLIError, _layers

    assert _layers("-3--1") == [-3, -2, -1]
    assert _layers(" 8 - 10, -1") == [8, 9, 10, -1]
    assert _layers("-2") == [-2] and _layers("4") == [4]
    for bad in ("1-", "--1", "a-b", "1.5", ""):
        with pytest.raises(CLIError, match="--layers"):
            _layers(bad)


def test_layer_ranges_from_the_last_parse_as_a_separate_word():
    """``--layers -3--1`` (the form the help shows) reaches ``--layers`` as its value, as
    ``--layers=-3--1`` does, rather than being taken for a flag ("expected one argument")."""
    from steerkern.cli import build_parser

    for layers in ("-3--1", "-5--3,-1", "-2", "8-10,-1"):
        args = build_parser().parse_args(["extract", "--pairs", "p.jsonl", "--layers", layers,
                                          "-o", "v.safetensors"])
        assert args.layers == layers
    args = build_parser().parse_args(["eval", "--vector", "v.safetensors", "--coeffs", "-1,1", "-2"])
    assert args.coeffs == ["-1,1", "-2"]


def test_errors_found_after_the_model_loads_name_the_flags(tiny_cli, tmp_path, capsys):
    """extract's and the vector's checks against the loaded model speak of --rank, --target,
    --layers and --vector, not of the Python arguments behind them; negative --layers ranges
    count from the last layer."""
    vector, _ = tiny_cli
    pairs = tmp_path / "pairs.json"
    pairs.write_text('[["I like cats", "I hate cats"], ["Are you happy ?", "Are you sad ?"]]')
    out = str(tmp_path / "v.safetensors")
    deep = SteeringVector.from_directions({9: torch.ones(64)}, concept="x").save(tmp_path / "deep.safetensors")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "Are you happy ?", "label": 1}\n')
    for argv, message in [
        (["extract", "--pairs", str(pairs), "--method", "lowrank", "--rank", "5", "--layers", "1", "-o", out],
         "--method lowrank: --rank 5 exceeds the 2 difference rows (one per pair and token read)"),
        (["extract", "--pairs", str(pairs), "--target", "nope", "--layers", "1", "-o", out],
         "--target nope is not a sub-module of layer 1"),
        (["extract", "--pairs", str(pairs), "--layers", "7", "-o", out], "--layers 7 is out of range"),
        (["eval", "--vector", str(deep), "--prompts", str(prompts), "--max-new-tokens", "0"], "--vector: "),
    ]:
        assert main(argv) == 2, argv
        line = _error_line(capsys)
        assert message in line, (argv, line)
        assert "=" not in line.split("error: ", 1)[1].split("(")[0], line
    assert main(["extract", "--pairs", str(pairs), "--layers=-2--1", "-o", out]) == 0
    assert SteeringVector.load(out).layers == [2, 3]
    assert "2 pairs" in capsys.readouterr().out


def test_one_pair_pca_diff_advice_names_only_what_the_command_can_change(tiny_cli, tmp_path, capsys):
    """extract's advice for one pair under pca_diff mentions last_n_tokens, which the command
    has no flag for: the command's message offers more pairs or --method mean_diff only."""
    pairs = tmp_path / "one.json"
    pairs.write_text('[["I like cats", "I hate cats"]]')
    argv = ["extract", "--pairs", str(pairs), "--method", "pca_diff", "--layers", "1",
            "-o", str(tmp_path / "v.safetensors")]
    assert main(argv) == 2
    line = _error_line(capsys)
    assert "give more pairs or use --method mean_diff" in line, line
    assert "last_n_tokens" not in line, line
