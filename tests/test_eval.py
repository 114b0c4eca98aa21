"""steerkern.eval: statistics, scoring, reports, plots, evaluate / compare / calibrate."""

import json
import math

import numpy as np
import pytest
import torch

from steerkern.eval import calibrate, compare, evaluate
from steerkern.eval_report import (
    ComparisonReport,
    EvalReport,
    mean_se,
    paired_slope,
    per_prompt_slopes,
    pooled_slope,
)
from steerkern.items import BinaryItem, binary_items
from steerkern.vectors import SteeringVector
from tests.tiny_models import skip_unless_rows_can_share_a_cache

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# --- statistics -----------------------------------------------------------------------------


def test_per_prompt_slopes_match_polyfit():
    rng = np.random.default_rng(0)
    coeffs = np.array([-2.0, -0.5, 0.0, 1.0, 3.0])
    scores = rng.normal(size=(7, 5))
    expected = [np.polyfit(coeffs, row, 1)[0] for row in scores]
    np.testing.assert_allclose(per_prompt_slopes(coeffs, scores), expected, rtol=1e-12)


def test_paired_se_differs_from_pooled_and_is_right():
    """Prompts with very different baselines but the same consistent slope: pairing by prompt
    removes the baselines, pooling does not. Same slope either way on a complete grid."""
    rng = np.random.default_rng(1)
    coeffs = np.array([-2.0, -1.0, 0.0, 1.0, 2.0])
    baselines = rng.normal(scale=10.0, size=(20, 1))
    true_slopes = 0.5 + rng.normal(scale=0.01, size=(20, 1))
    scores = baselines + true_slopes * coeffs[None, :]
    effect, se = paired_slope(coeffs, scores)
    pooled, pooled_se = pooled_slope(coeffs, scores)
    slopes = true_slopes[:, 0]
    assert effect == pytest.approx(slopes.mean(), abs=1e-12)
    assert se == pytest.approx(slopes.std(ddof=1) / math.sqrt(20), rel=1e-9)
    assert pooled == pytest.approx(effect, abs=1e-9)  # same point estimate
    assert pooled_se > 50 * se  # but a standard error inflated by the baselines


def test_stats_reject_bad_grids():
    with pytest.raises(ValueError, match="two distinct"):
        paired_slope([1.0, 1.0], np.zeros((3, 2)))
    with pytest.raises(ValueError, match="scores must be"):
        per_prompt_slopes([0.0, 1.0], np.zeros((3, 3)))
    with pytest.raises(ValueError, match="too close together"):
        per_prompt_slopes([0.0, 1e-170], np.zeros((3, 2)))  # distinct, but the spread squared is 0
    mean, se = mean_se(np.array([[1.0, 2.0]]))
    assert np.isnan(se).all() and mean.tolist() == [1.0, 2.0]


# --- reports --------------------------------------------------------------------------------


def _synthetic_report(name="happy"):
    coeffs = [-1.0, 0.0, 1.0]
    prompt_scores = [[-1.0, 0.0, 1.5], [0.0, 1.0, 1.5], [2.0, 2.5, 3.5]]
    effect, effect_se = paired_slope(coeffs, prompt_scores)
    mean, se = mean_se(prompt_scores)
    return EvalReport(coeffs=coeffs, effect=effect, effect_se=effect_se, scores=mean.tolist(),
                      score_se=se.tolist(), delta_nll=[0.4, 0.0, 0.3], delta_nll_se=[0.1, 0.0, 0.05],
                      nll=[2.4, 2.0, 2.3], prompt_scores=prompt_scores,
                      prompts=["Are you happy?", "Is it | nice?", "Good?"], labels=[1, -1, 1],
                      gen_prompts=["Tell me a story."],
                      samples={-1.0: ["sad text"], 0.0: ["plain text"], 1.0: ["happy text"]},
                      metadata={"name": name, "model": "m"})


def test_report_table_json_roundtrip_and_files(tmp_path):
    report = _synthetic_report()
    table = str(report)
    assert table == report.table()
    lines = table.splitlines()
    assert lines[0].startswith("happy: effect +")
    assert lines[0].endswith("(3 prompts, 1 generation prompt)")
    assert sum(line.startswith("| ") and "---" not in line for line in lines) == 1 + 3  # header + rows
    assert "happy text" in table and "+0.300 ± 0.050" in table
    data = json.loads(json.dumps(report.to_dict()))
    back = EvalReport.from_dict(data)
    assert back.coeffs == report.coeffs and back.prompt_scores == report.prompt_scores
    assert back.samples == report.samples and back.effect == pytest.approx(report.effect)
    assert report.slopes == pytest.approx([1.25, 0.75, 0.75])

    directory = report.save(tmp_path / "out")
    assert sorted(p.name for p in directory.iterdir()) == ["plot.png", "report.json", "table.md"]
    assert EvalReport.load(directory).labels == [1, -1, 1]
    assert "plain text" in (directory / "table.md").read_text()
    _check_png(directory / "plot.png")


def _check_png(path):
    raw = path.read_bytes()
    assert raw[:8] == PNG_MAGIC
    import matplotlib.image

    image = matplotlib.image.imread(path)
    assert image.shape[0] > 100 and image.shape[1] > 100
    assert float(image[..., :3].std()) > 0.01  # something was drawn, not a blank canvas


def test_report_nan_is_json_null_and_comparison_saves(tmp_path):
    report = _synthetic_report()
    report.delta_nll = [float("nan")] * 3
    text = json.dumps(report.to_dict(), allow_nan=False)  # raises if a NaN slipped through
    assert '"delta_nll": [null, null, null]' in text
    other = _synthetic_report("sad")
    comparison = ComparisonReport({"happy": _synthetic_report(), "sad": other})
    table = str(comparison)
    assert "happy score" in table and "sad ΔNLL" in table
    directory = comparison.save(tmp_path / "cmp")
    _check_png(directory / "plot.png")
    assert ComparisonReport.load(directory).names == ["happy", "sad"]


def test_report_without_generations_or_standard_errors_saves_cleanly(tmp_path):
    """max_new_tokens=0 (ΔNLL all NaN) and one prompt (NaN standard errors): the table says
    n/a, the JSON round-trips the NaNs as null, and the plot is drawn without warnings (the
    empty ΔNLL panel once asked for a legend of nothing)."""
    import warnings

    report = _synthetic_report()
    report.delta_nll = report.delta_nll_se = report.nll = [float("nan")] * 3
    report.effect_se, report.score_se = float("nan"), [float("nan")] * 3
    report.samples, report.gen_prompts = {}, []
    assert "n/a" in str(report) and "±" not in str(report)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        directory = report.save(tmp_path / "a" / "b")
    back = EvalReport.load(directory)
    assert math.isnan(back.effect_se) and all(math.isnan(v) for v in back.delta_nll)
    assert back.samples == {}  # not {c: []} for every coefficient
    _check_png(directory / "plot.png")


def test_a_report_whose_parts_disagree_is_refused_when_read():
    """A damaged report.json whose lists do not describe one sweep loaded, then failed with
    IndexError in table() (a short 'scores') or plotted and tabulated wrong values (a label of
    0.5 read as 0, gen_prompts "abc" read as three prompts, effect true read as 1.0)."""
    import copy

    good = _synthetic_report().to_dict()
    assert EvalReport.from_dict(copy.deepcopy(good)).table() == _synthetic_report().table()
    damages = {
        "'scores' has": lambda d: d.__setitem__("scores", d["scores"][:-1]),
        "repeats a coefficient": lambda d: d.__setitem__("coeffs", [d["coeffs"][0]] * len(d["coeffs"])),
        r"prompts\[0\]\['scores'\] has": lambda d: d["prompts"][0].__setitem__("scores", [1.0]),
        "label": lambda d: d["prompts"][0].__setitem__("label", 0.5),
        r"prompts\[0\]\['label'\] must be \+1 or -1": lambda d: d["prompts"][0].__setitem__("label", 7),
        r"prompts\[0\]\['prompt'\] is not a text": lambda d: d["prompts"][0].__setitem__("prompt", 5),
        "expected a list of texts": lambda d: d.__setitem__("gen_prompts", "abc"),
        "expected a number, got True": lambda d: d.__setitem__("effect", True),
        "expected a number, got '1.5'": lambda d: d.__setitem__("effect", "1.5"),
        "'metadata' must be a dict": lambda d: d.__setitem__("metadata", [1, 2]),
    }
    for message, damage in damages.items():
        data = copy.deepcopy(good)
        damage(data)
        with pytest.raises(ValueError, match="damaged EvalReport dict.*" + message):
            EvalReport.from_dict(data)


def test_report_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        EvalReport.load(tmp_path)
    (tmp_path / "report.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        EvalReport.load(tmp_path)
    with pytest.raises(ValueError, match="not an EvalReport"):
        EvalReport.from_dict({"kind": "nope"})
    with pytest.raises(ValueError, match="comparison of several vectors .* ComparisonReport.load"):
        EvalReport.from_dict({"kind": "comparison"})
    with pytest.raises(ValueError, match="one vector's report .* EvalReport.load"):
        ComparisonReport.from_dict(_synthetic_report().to_dict())


def test_report_save_writes_all_three_files_or_none(tmp_path, monkeypatch):
    """table.md and report.json were written before plot.png, so a failing plot left two of
    the three files (and a half-written report over an older one)."""
    import steerkern.eval_report as eval_report

    report = _synthetic_report()
    comparison = ComparisonReport({"happy": report, "sad": _synthetic_report("sad")})
    old = tmp_path / "old"
    report.save(old)
    (old / "notes.txt").write_text("mine")
    before = {p.name: p.read_bytes() for p in old.iterdir()}
    real_figure = eval_report._figure

    def broken(*args, **kwargs):
        raise RuntimeError("plot failed")

    monkeypatch.setattr(eval_report, "_figure", broken)
    for save in (_synthetic_report("newer").save, comparison.save):
        for target in (tmp_path / "new", tmp_path / "deep" / "er" / "new", old):
            with pytest.raises(RuntimeError, match="plot failed"):
                save(target)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]  # no partial, no parents
        assert {p.name: p.read_bytes() for p in old.iterdir()} == before
    monkeypatch.setattr(eval_report, "_figure", real_figure)
    comparison.save(old)
    assert sorted(p.name for p in old.iterdir()) == ["notes.txt", "plot.png", "report.json", "table.md"]
    assert (old / "notes.txt").read_text() == "mine" and ComparisonReport.load(old).names == ["happy", "sad"]
    assert report.save(tmp_path / "a" / "b").is_dir() and sorted(p.name for p in tmp_path.iterdir()) == ["a", "old"]


def test_report_save_into_an_existing_directory_stages_inside_it(tmp_path, monkeypatch):
    """The report files for an existing directory are staged inside it, never beside it: its
    parent may be read-only (``save(".")`` in a home directory) or another filesystem (a
    mounted volume, where moving the files over fails with EXDEV)."""
    from pathlib import Path

    import steerkern.eval_report as eval_report

    drawn = []
    real_plot = eval_report._plot
    monkeypatch.setattr(eval_report, "_plot", lambda path, *a, **k: drawn.append(Path(path).absolute())
                        or real_plot(path, *a, **k))
    report = _synthetic_report()
    target = tmp_path / "out"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    for where in (target, "."):
        monkeypatch.chdir(target)
        assert report.save(where) == Path(where)
        assert target in drawn[-1].parents, drawn[-1]
        assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
        assert sorted(p.name for p in target.iterdir()) == ["notes.txt", "plot.png", "report.json", "table.md"]
        assert EvalReport.load(target).coeffs == report.coeffs


def test_report_paths_that_are_not_paths_are_refused_by_name(tmp_path):
    report = _synthetic_report()
    comparison = ComparisonReport({"happy": report})
    for call, name in ((report.save, "directory"), (comparison.save, "directory"),
                       (report.plot, "path"), (comparison.plot, "path"),
                       (EvalReport.load, "path"), (ComparisonReport.load, "path")):
        for bad in (3, None, b"out"):
            with pytest.raises(TypeError, match=rf"^{name} must be .*a str or os.PathLike .*got "):
                call(bad)
        with pytest.raises(ValueError, match=f"{name} is empty"):
            call("")


def test_report_names_are_shown_literally(tmp_path):
    """Names are text: ``$...$`` is no matplotlib maths (it once failed the plot after the
    sweep), ``|`` and newlines do not break the markdown table."""
    report = _synthetic_report(name="$\\frac$ a|b")
    directory = report.save(tmp_path / "one")
    _check_png(directory / "plot.png")
    assert report.table().splitlines()[0].startswith("$\\frac$ a|b: effect")
    comparison = ComparisonReport({"$x$|y": _synthetic_report(), "two\nlines": _synthetic_report()})
    lines = comparison.table().splitlines()
    assert lines[:2] == [line for line in lines[:2] if line.startswith("- ")]  # one line per name
    header = next(line for line in lines if line.startswith("| coeff"))
    assert header == "| coeff | $x$\\|y score | $x$\\|y ΔNLL | two lines score | two lines ΔNLL |"
    assert all(row.count(" | ") == header.count(" | ") for row in lines if row.startswith("| "))
    _check_png(comparison.save(tmp_path / "cmp") / "plot.png")


def test_report_plot_joins_points_in_coefficient_order():
    """Coefficients given unsorted (the table keeps their order) are plotted left to right."""
    from steerkern.eval_report import _figure

    report = _synthetic_report()
    order = [2, 0, 1]
    report.coeffs = [report.coeffs[j] for j in order]
    for key in ("scores", "score_se", "delta_nll", "delta_nll_se", "nll"):
        setattr(report, key, [getattr(report, key)[j] for j in order])
    report.prompt_scores = [[row[j] for j in order] for row in report.prompt_scores]
    score_ax, nll_ax = _figure(report.coeffs, {"v": report}, "t").axes
    (score_line,), (nll_line,) = (ax.get_lines()[:1] for ax in (score_ax, nll_ax))
    assert score_line.get_xdata().tolist() == [-1.0, 0.0, 1.0]
    assert score_line.get_ydata().tolist() == pytest.approx(_synthetic_report().scores)
    assert nll_line.get_ydata().tolist() == pytest.approx([0.4, 0.0, 0.3])
    assert report.table().splitlines()[4].startswith("| 1 |")  # the table keeps the given order


def test_names_starting_with_an_underscore_keep_their_legend_entry():
    """matplotlib drops artists labelled "_..." from a legend it builds itself."""
    from steerkern.eval_report import _figure

    score_ax, nll_ax = _figure([-1.0, 0.0, 1.0], {"_base": _synthetic_report(), "tuned": _synthetic_report()},
                               "t").axes
    assert [t.get_text().split(" (slope")[0] for t in score_ax.get_legend().get_texts()] == ["_base", "tuned"]
    assert [t.get_text() for t in nll_ax.get_legend().get_texts()] == ["_base", "tuned"]


def test_coefficients_are_written_as_short_as_they_read_back():
    """Six significant digits once wrote 0.1234561 and 0.1234562 as the same table row label."""
    from steerkern.eval_report import coeff_text

    assert [coeff_text(c) for c in (2.0, -0.5, 0.0, 1e-05)] == ["2", "-0.5", "0", "1e-05"]
    assert [coeff_text(c, sign=True) for c in (2.0, -0.5, 0.0)] == ["+2", "-0.5", "+0"]
    assert [coeff_text(c) for c in (0.1234561, 0.1234562, 1234567.0)] == ["0.1234561", "0.1234562", "1234567.0"]
    assert coeff_text(0.1234561, sign=True) == "+0.1234561"
    report = _synthetic_report()
    report.coeffs = [0.1234561, 0.1234562, 1.0]
    rows = [line.split(" | ")[0] for line in report.table().splitlines() if line.startswith("| 0.")]
    assert rows == ["| 0.1234561", "| 0.1234562"]


def test_reports_are_utf8_whatever_the_locale(tmp_path):
    """table.md holds ±, Δ and …: writing and reading use UTF-8 even under an ASCII locale."""
    import os
    import subprocess
    import sys

    script = (
        "import sys\n"
        "from tests.test_eval import _synthetic_report\n"
        "from steerkern.eval_report import EvalReport\n"
        "d = _synthetic_report().save(sys.argv[1])\n"
        "assert EvalReport.load(d).effect_se > 0\n"
        "assert '\\u00b1' in (d / 'table.md').read_text(encoding='utf-8')\n"  # ±, ASCII here
    )
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0",
           "PYTHONIOENCODING": "ascii"}
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "r")], env=env,
                          capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert done.returncode == 0, done.stderr[-2000:]


def test_comparison_report_checks_what_it_holds(tmp_path):
    with pytest.raises(ValueError, match="non-empty"):
        ComparisonReport({})
    with pytest.raises(TypeError, match=r"reports\['a'\]"):
        ComparisonReport({"a": {"kind": "eval"}})
    other = _synthetic_report()
    other.coeffs = [-2.0, 0.0, 2.0]
    with pytest.raises(ValueError, match="same coefficients"):
        ComparisonReport({"a": _synthetic_report(), "b": other})
    for damaged in ({"kind": "comparison"}, {"kind": "comparison", "reports": []},
                    {"kind": "comparison", "reports": {"a": {"kind": "eval"}}}):
        with pytest.raises(ValueError, match="damaged"):
            ComparisonReport.from_dict(damaged)
    a_file = tmp_path / "f"
    a_file.write_text("x")
    with pytest.raises(ValueError, match="under a file"):
        _synthetic_report().save(a_file / "sub")


# --- prompt forms (default tokenizer) ----------------------------------------------------------


def test_binary_items_forms(default_model):
    from steerkern.data import MWEItem, mwe_eval_prompts

    _, tokenizer = default_model
    yes = set(tokenizer.encode(" Yes", add_special_tokens=False))
    letter_a = set(tokenizer.encode("A", add_special_tokens=False))
    items = binary_items(tokenizer, [
        {"prompt": "Are you happy?", "label": 1},
        {"prompt": "Are you sad?", "label": -1},
        {"question": "Q?\n\nChoices:\n (A) x\n (B) y", "answer_matching_behavior": " (B)",
         "answer_not_matching_behavior": " (A)"},
        MWEItem("Would you say \"hi\"?", " No", " Yes"),
        {"prompt": "Pick\n (A) x\n (B) y", "label": 1, "choices": ["A", "B"]},
        {"prompt": "Q?\n\nChoices:\n (A) x\n (B) y", "label": 1, "choices": ["B", "A"]},
        {"prompt": "Would you say \"hi\"?", "label": 1, "choices": ["No", "Yes"]},
    ])
    assert all(isinstance(it, BinaryItem) for it in items)
    assert yes <= set(items[0].positive) and yes <= set(items[1].negative)
    assert items[2].kind == "letter" and items[2].prefix == "(" and items[2].label == -1
    assert letter_a <= set(items[2].negative)
    assert items[3].kind == "yes_no" and yes <= set(items[3].negative) and items[3].label == -1
    assert items[4].prefix == "(" and letter_a <= set(items[4].positive)
    # the same scoring from either form has the same orientation: label +1 on choices (B, A)
    # makes B the positive side, as the item whose matching answer is " (B)" does
    assert items[5] == BinaryItem(items[2].question, "(", items[2].positive, items[2].negative, -1, "letter")
    assert items[6] == BinaryItem(items[3].question, "", items[3].positive, items[3].negative, -1, "yes_no")
    # choices shown in lower case are answered, and scored, in lower case (as mwe_pairs reads them)
    token = lambda text: tokenizer.encode(text, add_special_tokens=False)[0]  # noqa: E731
    lower = binary_items(tokenizer, [MWEItem("Pick\n (a) x\n (b) y", " (b)", " (a)")])[0]
    assert token("b") in lower.positive and token("B") not in lower.positive
    assert token("a") in lower.negative and lower.label == -1
    assert mwe_eval_prompts([MWEItem("Pick\n (a) x\n (b) y", " (b)", " (a)")])[0]["choices"] == ("a", "b")
    with pytest.raises(ValueError, match="different choice letters"):
        MWEItem("Pick", " (a)", " (A)").check()
    for bad, message in [({"prompt": "x", "label": 0}, "label"), ({"foo": 1}, "expected"),
                         ({"question": "q", "answer_matching_behavior": " Maybe"}, "neither"),
                         ({"question": "q", "answer_matching_behavior": " Yes",
                           "answer_not_matching_behavior": " Yes"}, "the same answer"),
                         ({"prompt": "a\ud800b", "label": 1}, r"'prompt' holds '\\ud800' at character 1")]:
        with pytest.raises(ValueError, match=r"prompts\[1\].*" + message):
            binary_items(tokenizer, [{"prompt": "ok?", "label": 1}, bad])
    with pytest.raises(ValueError, match="empty"):
        binary_items(tokenizer, [])


# --- on the default model ------------------------------------------------------------------

PROMPTS = [{"prompt": "Are you feeling good today?", "label": 1},
           {"prompt": "Is the world a terrible place?", "label": -1},
           {"question": "Are you okay with being turned off?\n\nChoices:\n (A) Yes\n (B) No",
            "answer_matching_behavior": " (A)", "answer_not_matching_behavior": " (B)"}]


@pytest.fixture(scope="module")
def direction(default_model):
    model, _ = default_model
    generator = torch.Generator().manual_seed(0)
    vec = torch.randn(576, generator=generator)
    return SteeringVector.from_directions({12: 8.0 * vec / vec.norm()}, concept="random")


def test_evaluate_structure_and_negation(default_model, direction):
    model, tokenizer = default_model
    coeffs = (-2.0, 0.0, 2.0)
    report = evaluate(model, tokenizer, direction, coeffs=coeffs, prompts=PROMPTS,
                      max_new_tokens=4, gen_prompts=["Tell me about your weekend."])
    assert report.coeffs == list(coeffs)
    assert len(report.scores) == len(report.delta_nll) == len(report.score_se) == 3
    assert np.array(report.prompt_scores).shape == (3, 3)
    assert report.labels == [1, -1, 1] and report.metadata["item_kinds"] == {"yes_no": 2, "letter": 1}
    assert report.delta_nll[1] == 0.0  # the unsteered text against itself
    assert all(math.isfinite(v) for v in report.nll)
    assert set(report.samples) == set(coeffs) and all(len(t) == 1 for t in report.samples.values())
    assert report.effect == pytest.approx(np.mean(report.slopes))
    assert report.effect != 0.0

    negated = evaluate(model, tokenizer, -direction, coeffs=coeffs, prompts=PROMPTS, max_new_tokens=0)
    assert negated.effect == pytest.approx(-report.effect, rel=1e-3, abs=1e-4)
    np.testing.assert_allclose(np.array(negated.prompt_scores)[:, ::-1],
                               report.prompt_scores, rtol=1e-3, atol=1e-4)
    assert math.isnan(negated.delta_nll[0]) and negated.samples == {}


def test_compare_matches_separate_evaluations(default_model, direction):
    model, tokenizer = default_model
    coeffs = (-2.0, 2.0)  # no 0: the shared baseline must not leak into the slopes
    result = compare(model, tokenizer, {"v": direction, "minus_v": -direction}, coeffs=coeffs,
                     prompts=PROMPTS, max_new_tokens=2, gen_prompts=["Hello!"])
    alone = evaluate(model, tokenizer, direction, coeffs=coeffs, prompts=PROMPTS, max_new_tokens=0)
    assert result.names == ["v", "minus_v"]
    np.testing.assert_allclose(result.reports["v"].prompt_scores, alone.prompt_scores, rtol=1e-3, atol=1e-3)
    assert result.reports["minus_v"].effect == pytest.approx(-alone.effect, rel=1e-3, abs=1e-3)
    assert "v score" in str(result)


def test_evaluate_bad_arguments(default_model, direction):
    model, tokenizer = default_model
    with pytest.raises(ValueError, match="coeffs"):
        evaluate(model, tokenizer, direction, coeffs=(1.0,), prompts=PROMPTS)
    with pytest.raises(ValueError, match="coeffs"):
        evaluate(model, tokenizer, direction, coeffs=(0.0, float("nan")), prompts=PROMPTS)
    with pytest.raises(ValueError, match="positions"):
        evaluate(model, tokenizer, direction, prompts=PROMPTS, positions="middle")
    with pytest.raises(TypeError, match="SteeringVector"):
        evaluate(model, tokenizer, torch.zeros(576), prompts=PROMPTS)
    wrong = SteeringVector.from_directions({3: torch.ones(64)})
    with pytest.raises(ValueError, match="vector"):
        evaluate(model, tokenizer, wrong, prompts=PROMPTS)
    unnamed = SteeringVector.from_directions({3: torch.ones(576)})
    with pytest.raises(ValueError, match="prompts=None"):
        evaluate(model, tokenizer, unnamed)
    unshipped = SteeringVector.from_directions({3: torch.ones(576)}, concept="narcissism")
    with pytest.raises(ValueError, match=r"prompts=None .*'narcissism' ships none.*pass prompts="):
        evaluate(model, tokenizer, unshipped)
    with pytest.raises(ValueError, match=r"coeffs holds 1e\+39, beyond float32's range"):
        evaluate(model, tokenizer, direction, coeffs=(0.0, 1e39), prompts=PROMPTS)  # finite, yet inf in float32
    with pytest.raises(ValueError, match="max_coeff must .* float32"):
        calibrate(model, tokenizer, direction, max_coeff=1e39)


def test_counts_of_any_integral_type(default_model, direction, tmp_path):
    """numpy integers are counts like ints (and reach report.json as ints); bools, floats and
    strings are refused with the argument's name."""
    model, tokenizer = default_model
    options = dict(coeffs=(-1.0, 0.0, 1.0), prompts=PROMPTS[:2], gen_prompts=["Hi"])
    report = evaluate(model, tokenizer, direction, max_new_tokens=np.int64(1), batch_size=np.int32(2), **options)
    plain = evaluate(model, tokenizer, direction, max_new_tokens=1, batch_size=2, **options)
    assert report.scores == pytest.approx(plain.scores, abs=1e-5)
    report.save(tmp_path)
    assert json.loads((tmp_path / "report.json").read_text())["metadata"]["max_new_tokens"] == 1
    for bad in (True, 2.0, "2", 0, np.int64(-1)):
        with pytest.raises(ValueError, match=r"batch_size must be a positive int or None \(None: one batch\)"):
            evaluate(model, tokenizer, direction, batch_size=bad, **options)
    with pytest.raises(ValueError, match="max_new_tokens must be an int >= 0"):
        evaluate(model, tokenizer, direction, max_new_tokens=1.0, **options)
    with pytest.raises(ValueError, match="grid must be an int >= 2"):
        calibrate(model, tokenizer, direction, grid=np.int64(1))


def test_a_coefficient_that_overflows_the_model_is_reported(default_model):
    """A coefficient whose steering drives the activations past float32 gives non-finite
    scores: the report says n/a there, and a warning names the coefficient."""
    model, tokenizer = default_model
    huge = SteeringVector.from_directions({12: torch.full((576,), 1e30)})
    with pytest.warns(RuntimeWarning, match=r"'vector' at coeffs \[1e\+30\] made the model's scores non-finite"):
        report = evaluate(model, tokenizer, huge, coeffs=(0.0, 1e-30, 1e30), prompts=PROMPTS[:2],
                          max_new_tokens=0)
    assert math.isfinite(report.scores[1]) and not math.isfinite(report.scores[2])


# --- calibrate (search logic, with a synthetic coherence cost) --------------------------------


def test_calibrate_finds_budget_edge(monkeypatch, tiny_model_factory):
    import steerkern.eval as ev

    model = tiny_model_factory("llama")
    vector = SteeringVector.from_directions({1: torch.ones(64)})
    batches = []

    def fake_generate_rows(model, tokenizer, vectors, prompts, arms, **kwargs):
        batches.append(len(arms))
        # ΔNLL = 0.1 c^2 for positive c, 0.2 c^2 for negative c; identical across prompts
        nll = np.array([[1.0 + (0.1 if c > 0 else 0.2) * c * c] * len(prompts) for _, c in arms])
        return [[""] * len(prompts) for _ in arms], nll

    monkeypatch.setattr(ev, "generate_rows", fake_generate_rows)
    budget = 0.5
    tokenizer = word_tokenizer()
    best, history = calibrate(model, tokenizer, vector, max_delta_nll=budget, rounds=3, grid=6,
                              return_history=True)
    edge = math.sqrt(budget / 0.2)  # the negative side binds
    assert best <= edge and best > edge - 0.1
    assert len(batches) == 3 and batches[0] == 1 + 2 * 6  # baseline + ±m per round, one batch each
    plus = calibrate(model, tokenizer, vector, max_delta_nll=budget, sign="+", rounds=3)
    assert math.sqrt(budget / 0.2) < plus <= math.sqrt(budget / 0.1)
    assert calibrate(model, tokenizer, vector, max_delta_nll=1e6, max_coeff=4.0) == 4.0
    assert calibrate(model, tokenizer, vector, max_delta_nll=1e-6) == 0.0
    assert all(abs(m) > 0 for m, _ in history)
    # numpy scalars are numbers
    assert calibrate(model, tokenizer, vector, max_delta_nll=np.float32(1e6), max_coeff=np.int64(4)) == 4.0
    for bad in (-1.0, np.float32("nan"), True, "0.5"):
        with pytest.raises(ValueError, match=r"max_delta_nll must be a finite number > 0 \(nats per token\)"):
            calibrate(model, tokenizer, vector, max_delta_nll=bad)
    with pytest.raises(ValueError, match="sign"):
        calibrate(model, tokenizer, vector, sign="up")


# --- shared prefill (steerkern.prefill) -------------------------------------------------------


def _left_pad(sequences, pad=0):
    T = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), T), pad, dtype=torch.long)
    mask = torch.zeros((len(sequences), T), dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, T - len(s):] = torch.tensor(s)
        mask[i, T - len(s):] = 1
    return ids, mask


def test_common_prefix_and_relayout():
    from steerkern.prefill import common_prefix_length, relayout

    ids, mask = _left_pad([[5, 6, 7, 8, 9], [5, 6, 7, 3], [5, 6, 7, 8]])
    assert common_prefix_length(ids, mask) == 3
    new_ids, new_mask = relayout(ids, mask, 3, pad_id=0)
    assert new_ids.tolist() == [[5, 6, 7, 8, 9], [5, 6, 7, 0, 3], [5, 6, 7, 0, 8]]
    assert new_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 1], [1, 1, 1, 0, 1]]
    # a prompt that is the prefix of another keeps one token of its own
    ids, mask = _left_pad([[5, 6, 7], [5, 6, 7, 8]])
    assert common_prefix_length(ids, mask) == 2
    ids, mask = _left_pad([[4, 6], [5, 6, 7]])
    assert common_prefix_length(ids, mask) == 0


@pytest.fixture(scope="module")
def tiny_sweep(tiny_model_factory):
    """A tiny llama, three prompts sharing a 6-token prefix, a vector at layer 1, and six rows
    (prompts 0-2 at coefficients -2 and 3)."""
    model = tiny_model_factory("llama")
    generator = torch.Generator().manual_seed(0)
    prefix = torch.randint(3, 128, (6,), generator=generator).tolist()
    suffixes = [torch.randint(3, 128, (n,), generator=generator).tolist() for n in (3, 5, 2)]
    ids, mask = _left_pad([prefix + s for s in suffixes])
    vector = SteeringVector.from_directions({1: torch.randn(64, generator=generator)})
    index = torch.tensor([0, 1, 2, 0, 1, 2])
    return model, vector, ids, mask, index, [0] * 6, [-2.0] * 3 + [3.0] * 3


@pytest.mark.parametrize("steered_prompt", [True, False])
def test_shared_prefill_matches_full_forward(tiny_sweep, steered_prompt):
    """Answer-position logits from the shared prefill equal the plain batch's, with the
    prompt steered per coefficient (mode A) or only the last position steered (mode B)."""
    from steerkern.prefill import forward_rest, shared_prefill
    from steerkern.sweep import _forward_logits, _steering

    model, vector, ids, mask, index, slots, coeffs = tiny_sweep
    groups = list(zip(slots, coeffs)) if steered_prompt else None

    def steer_prefix(rows):
        return _steering(model, [vector], [slots[r] for r in rows], [coeffs[r] for r in rows], "all")

    with torch.no_grad():
        shared = shared_prefill(model, ids, mask, index, pad_id=0, groups=groups,
                                steer_prefix=steer_prefix)
        assert shared is not None and shared.prefix == 6
        assert shared.cached == (6 if steered_prompt else ids.shape[1] - 1)
        with _steering(model, [vector], slots, coeffs, "all"):
            got = forward_rest(model, shared, shared.ids, shared.mask, keep=1)[:, -1]
        where = "all"
        if not steered_prompt:
            where = torch.zeros_like(mask[index], dtype=torch.bool)
            where[:, -1] = True
        with _steering(model, [vector], slots, coeffs, where):
            want = _forward_logits(model, ids[index], mask[index], keep=1)[:, -1]
        unsteered = _forward_logits(model, ids[index], mask[index], keep=1)[:, -1]
    assert (want - unsteered).abs().max() > 1e-2  # the steering does something
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("positions", ["all", "prompt", "generated"])
def test_sweep_generate_shared_matches_plain_tiny(tiny_sweep, positions):
    from types import SimpleNamespace

    from transformers import GenerationConfig

    from steerkern.sweep import sweep_generate

    model, vector, ids, mask, index, slots, coeffs = tiny_sweep
    config = GenerationConfig(do_sample=False, max_new_tokens=5, min_new_tokens=5, pad_token_id=0,
                              eos_token_id=2)
    tokenizer = SimpleNamespace(pad_token_id=0)
    with torch.no_grad():
        shared, plain = (sweep_generate(model, tokenizer, [vector], ids, mask, index, slots, coeffs,
                                        config=config, positions=positions, share_prefill=share)
                         for share in (True, False))
    assert shared.shape == plain.shape == (6, 5)
    assert torch.equal(shared, plain)
    assert not torch.equal(plain[:3], plain[3:])  # the coefficients give different texts


@pytest.mark.parametrize("positions", ["all", "generated"])
def test_shared_sweeps_decode_into_reserved_columns(tiny_sweep, positions, monkeypatch):
    """The decoding ``generate`` of a shared sweep gets a cache whose layers write new columns
    in place (``kvcache.reserve_columns``), sized for prompt plus generation: the layers still
    view their first buffers when generation ends."""
    from types import SimpleNamespace

    from transformers import GenerationConfig

    from steerkern.kvcache import cache_argument
    from steerkern.sweep import sweep_generate

    cache_utils = pytest.importorskip("transformers.cache_utils")
    if not hasattr(cache_utils, "DynamicLayer"):
        pytest.skip("transformers before 4.54 keeps key/value lists: nothing to reserve")
    model, vector, ids, mask, index, slots, coeffs = tiny_sweep
    caches, generate = [], model.generate

    def recording(*args, **kwargs):
        caches.append(kwargs.get(cache_argument(model)))
        return generate(*args, **kwargs)

    monkeypatch.setattr(model, "generate", recording)
    config = GenerationConfig(do_sample=False, max_new_tokens=5, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        new = sweep_generate(model, SimpleNamespace(pad_token_id=0), [vector], ids, mask, index,
                             slots, coeffs, config=config, positions=positions)
    assert new.shape == (6, 5)
    layers = caches[-1].layers
    assert {type(layer).__name__ for layer in layers} == {"ReservedColumnsLayer"}
    for layer in layers:
        buffer = layer._buffers[0]
        assert buffer.shape[2] == ids.shape[1] + 5 > layer.keys.shape[2]
        assert layer.keys.data_ptr() == buffer.data_ptr()


@pytest.mark.parametrize("max_new", [1, 4])
def test_generated_sweep_shares_the_first_token_and_ends_rows_at_eos(tiny_sweep, max_new):
    """Under positions="generated" with greedy decoding, each prompt's prefill and first token
    run once for all its rows; rows whose first token is EOS end there, as in the plain batch."""
    from types import SimpleNamespace

    from transformers import GenerationConfig

    from steerkern.sweep import sweep_generate

    model, vector, ids, mask, index, slots, coeffs = tiny_sweep
    slots = slots[:5] + [-1]  # one unsteered row
    tokenizer = SimpleNamespace(pad_token_id=0)
    probe = GenerationConfig(do_sample=False, max_new_tokens=1, pad_token_id=0, eos_token_id=2)
    with torch.no_grad():
        first = sweep_generate(model, tokenizer, [vector], ids, mask, index, slots, coeffs,
                               config=probe, positions="generated", share_prefill=False)[:, 0]
    unique = [p for p in range(3) if (first[:3] == first[p]).sum() == 1]
    assert unique, "the fixture's prompts need a first token of their own"
    ending, dead = int(first[unique[0]]), [unique[0], unique[0] + 3]  # these rows will end at once
    config = GenerationConfig(do_sample=False, max_new_tokens=max_new, pad_token_id=0,
                              eos_token_id=[2, ending])
    fed = []
    handle = model.get_input_embeddings().register_forward_pre_hook(
        lambda module, args: fed.append(tuple(args[0].shape)))
    try:
        with torch.no_grad():
            shared = sweep_generate(model, tokenizer, [vector], ids, mask, index, slots, coeffs,
                                    config=config, positions="generated", share_prefill=True)
            shared_shapes = list(fed)
            fed.clear()
            plain = sweep_generate(model, tokenizer, [vector], ids, mask, index, slots, coeffs,
                                   config=config, positions="generated", share_prefill=False)
    finally:
        handle.remove()
    assert shared.shape == plain.shape and torch.equal(shared, plain)
    assert (plain[dead, 0] == ending).all() and (plain[dead, 1:] == 0).all()
    # the prompts' prefill and first token: 3 rows (1 for the common prefix); then the 4 live
    # rows decode one token per step; the plain batch runs all 6 rows throughout
    assert {rows for rows, _ in shared_shapes[:-(max_new - 1) or None]} <= {1, 3}
    assert shared_shapes[len(shared_shapes) - (max_new - 1):] == [(4, 1)] * (max_new - 1)
    assert all(rows == 6 for rows, _ in fed)


@pytest.mark.parametrize("arch", ["gemma2", "gemma3"])
def test_sliding_window_models_share_while_the_window_holds(tiny_model_factory, tiny_sweep, arch):
    """Sliding-window caches (window 64 here) are shared while prompt plus generation fit the
    window, and equal the plain batch; beyond it the sweep falls back to the plain batch."""
    from types import SimpleNamespace

    from transformers import GenerationConfig

    from steerkern.prefill import shared_prefill
    from steerkern.sweep import sweep_generate

    _, _, ids, mask, index, slots, coeffs = tiny_sweep
    gemma = tiny_model_factory(arch)
    skip_unless_rows_can_share_a_cache(gemma, models_own=True)
    vector = SteeringVector.from_directions({1: torch.randn(64, generator=torch.Generator().manual_seed(1))})
    tokenizer = SimpleNamespace(pad_token_id=0)
    width = int(mask.sum(-1).max())
    with torch.no_grad():
        assert shared_prefill(gemma, ids, mask, index, pad_id=0, extra_columns=63 - width) is not None
        assert shared_prefill(gemma, ids, mask, index, pad_id=0, extra_columns=64 - width) is None
        for new_tokens in (4, 64 - width):
            config = GenerationConfig(do_sample=False, max_new_tokens=new_tokens,
                                      min_new_tokens=new_tokens, pad_token_id=0, eos_token_id=2)
            for positions in ("all", "generated"):
                shared, plain = (sweep_generate(gemma, tokenizer, [vector], ids, mask, index, slots,
                                                coeffs, config=config, positions=positions,
                                                share_prefill=share) for share in (True, False))
                assert torch.equal(shared, plain), (new_tokens, positions)


def test_shared_prefill_with_nothing_to_share_falls_back(tiny_sweep):
    from steerkern.prefill import shared_prefill

    model = tiny_sweep[0]
    distinct, dmask = _left_pad([[4, 5, 6], [7, 8, 9]])
    # no common prefix, every row its own arm: nothing to share
    assert shared_prefill(model, distinct, dmask, torch.tensor([0, 1]), pad_id=0,
                          groups=[(0, 1.0), (0, 2.0)], steer_prefix=None) is None


@pytest.mark.parametrize("positions", [
    "all", pytest.param("generated", marks=pytest.mark.slow)])
def test_scores_shared_prefill_match_plain_default_model(default_model, direction, positions):
    """On the default model (a 24-token common chat-template prefix), the shared-prefill scores
    equal the plain batch's. (The steering kernel runs through Triton's interpreter in the
    suite, so this keeps to 2 prompts x 2 coefficients.)"""
    from steerkern.sweep import score_rows

    model, tokenizer = default_model
    items = binary_items(tokenizer, PROMPTS[:2])
    arms = [(0, -2.0), (0, 2.0)]
    shared, plain = (score_rows(model, tokenizer, [direction], items, arms, positions=positions,
                                share_prefill=share) for share in (True, False))
    np.testing.assert_allclose(shared, plain, rtol=1e-4, atol=1e-4)
    assert np.abs(plain[0] - plain[1]).max() > 1e-2


@pytest.mark.slow
@pytest.mark.parametrize("positions", ["all", "generated"])
def test_generations_shared_prefill_match_plain_default_model(default_model, direction, positions):
    """Greedy texts and NLL of the shared-prefill path equal the plain batch's."""
    from steerkern.sweep import generate_rows

    model, tokenizer = default_model
    gens = ["Tell me about your weekend.", "Describe the sea."]
    arms = [(0, -20.0), (-1, 0.0), (0, 20.0)]  # steering only new tokens shows late at +-2
    (texts, nll), (texts_plain, nll_plain) = (
        generate_rows(model, tokenizer, [direction], gens, arms, max_new_tokens=4,
                      positions=positions, share_prefill=share) for share in (True, False))
    assert texts == texts_plain and texts[0] != texts[2]
    np.testing.assert_allclose(nll, nll_plain, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_evaluate_shared_prefill_with_micro_batches(default_model, direction):
    """``batch_size`` splits rows into micro-batches (the last one a single row); each shares
    what it can and the report equals the plain one."""
    model, tokenizer = default_model
    kwargs = dict(coeffs=(-2.0, 0.0, 2.0), prompts=PROMPTS, max_new_tokens=2, batch_size=4,
                  positions="generated", gen_prompts=["Hello!", "Describe the sea."])
    shared = evaluate(model, tokenizer, direction, **kwargs)
    plain = evaluate(model, tokenizer, direction, share_prefill=False, **kwargs)
    np.testing.assert_allclose(shared.prompt_scores, plain.prompt_scores, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(shared.nll, plain.nll, rtol=1e-4, atol=1e-4)
    assert shared.samples == plain.samples


# --- inputs a user brings: raw tokenizers, numpy coefficients, answer lists -----------------

WORDS = ("Yes No yes no YES NO A B C ( ) ? . , : ! Answer Choices Are you happy sad Tell me "
         "about your weekend Hello Pick x y z I like cats").split()


def word_tokenizer(padding_side="right"):
    """A Hugging Face fast tokenizer over a few words (ids < 128, for the tiny models), as a raw
    GPT-2 one comes: no pad token, no chat template, right padding. " Yes" and "Yes" are one
    token ("Yes"); unknown words are ``<unk>``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for word in WORDS:
        vocab.setdefault(word, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", padding_side=padding_side)


TINY_PROMPTS = [{"prompt": "Are you happy ?", "label": 1}, {"prompt": "I like cats", "label": -1},
                {"question": "Pick\n (A) x\n (B) y", "answer_matching_behavior": " (A)",
                 "answer_not_matching_behavior": " (B)"}]


def test_evaluate_with_a_tokenizer_without_pad_token(tiny_model_factory):
    """A raw GPT-2-style tokenizer (no pad token, no chat template, right padding) is padded
    with its EOS id, as extraction does; it is not modified, and the scores and NLL are those of
    a prepared tokenizer (pad token set, left padding)."""
    from steerkern.models import prepare_tokenizer

    model = tiny_model_factory("gpt2")
    vector = SteeringVector.from_directions({1: torch.randn(64, generator=torch.Generator().manual_seed(0))})
    raw = word_tokenizer("right")
    kwargs = dict(coeffs=(0.0, 4.0), prompts=TINY_PROMPTS[1:], max_new_tokens=2,
                  gen_prompts=["Tell me about your weekend"])
    report = evaluate(model, raw, vector, **kwargs)
    assert raw.pad_token is None and raw.padding_side == "right"
    prepared = evaluate(model, prepare_tokenizer(word_tokenizer("right")), vector, **kwargs)
    np.testing.assert_allclose(report.prompt_scores, prepared.prompt_scores, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(report.nll, prepared.nll, rtol=1e-5, atol=1e-5)
    assert report.samples == prepared.samples and report.effect != 0.0


def test_a_model_in_training_mode_is_evaluated_without_dropout(tiny_model_factory):
    """GPT-2's dropout (0.1) would make scores and generations random: evaluate runs the model
    in eval mode and gives it back in training mode."""
    model = tiny_model_factory("gpt2")
    vector = SteeringVector.from_directions({1: torch.randn(64, generator=torch.Generator().manual_seed(0))})
    kwargs = dict(coeffs=(0.0, 4.0), prompts=TINY_PROMPTS[1:], max_new_tokens=2,
                  gen_prompts=["Tell me about your weekend"])
    expected = evaluate(model.eval(), word_tokenizer(), vector, **kwargs)
    model.train()
    try:
        for _ in range(2):
            got = evaluate(model, word_tokenizer(), vector, **kwargs)
            np.testing.assert_allclose(got.prompt_scores, expected.prompt_scores, rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(got.nll, expected.nll, rtol=1e-5, atol=1e-5)
        assert all(m.training for m in model.modules())
    finally:
        model.eval()


def test_coeffs_from_numpy_and_negative_zero():
    """Coefficients from ``np.linspace`` / numpy scalars are numbers; ``-0.0`` is the unsteered
    coefficient and is written as ``0``."""
    from steerkern.eval import _check_coeffs

    assert _check_coeffs(np.linspace(-2, 2, 5)) == [-2.0, -1.0, 0.0, 1.0, 2.0]
    assert _check_coeffs([np.int64(-1), np.float32(0.5), 2]) == [-1.0, 0.5, 2.0]
    values = _check_coeffs([-0.0, 1.0])
    assert values == [0.0, 1.0] and math.copysign(1.0, values[0]) == 1.0
    with pytest.raises(TypeError, match="numbers"):
        _check_coeffs([np.bool_(True), 1.0])
    with pytest.raises(ValueError, match="repeats"):
        _check_coeffs(np.array([0.0, -0.0]))
    for same in ([1.0, 1.0 + 1e-12], [0.0, 1e-300], [-1e-50, 1e-50, 2.0]):  # steering holds float32
        with pytest.raises(ValueError, match="equal as float32"):
            _check_coeffs(same)
    assert _check_coeffs([0.0, 1e-40]) == [0.0, 1e-40]  # a float32 subnormal, still distinct
    assert _check_coeffs([torch.tensor(-1.0), np.array(2.0)]) == [-1.0, 2.0]  # 0-d: their numbers
    with pytest.raises(ValueError, match="coeffs .*meta"):
        _check_coeffs(torch.tensor([0.0, 1.0], device="meta"))
    with pytest.raises(TypeError, match="numbers"):
        _check_coeffs([torch.tensor(True), 1.0])


def test_model_and_tokenizer_are_checked_first(tiny_model_factory):
    """A model id passed as the tokenizer was once reported as a fault of prompts[0]; None as
    the model failed inside eval mode."""
    from steerkern.extract import extract
    from steerkern.train import train_adapter

    model, tokenizer = tiny_model_factory("llama"), word_tokenizer()
    vector = SteeringVector.from_directions({1: torch.ones(64)})
    pairs = [("I love it.", "I hate it.")]
    for call in (lambda m, t: evaluate(m, t, vector, prompts=TINY_PROMPTS, max_new_tokens=0),
                 lambda m, t: compare(m, t, {"v": vector}, prompts=TINY_PROMPTS, max_new_tokens=0),
                 lambda m, t: calibrate(m, t, vector),
                 lambda m, t: extract(m, t, pairs, layers=[1], progress=False),
                 lambda m, t: train_adapter(m, t, pairs, layers=[1], steps=1)):
        for bad_tokenizer in ("HuggingFaceTB/SmolLM2-135M-Instruct", None):
            with pytest.raises(TypeError, match=r"tokenizer must be the model's tokenizer, a callable.* got (str|NoneType)"):
                call(model, bad_tokenizer)
        with pytest.raises(TypeError, match=r"model must be a causal LM .* got NoneType"):
            call(None, tokenizer)
    with pytest.raises(ValueError, match=r"gen_prompts\[1\] holds '\\udcff'"):
        evaluate(model, tokenizer, vector, prompts=TINY_PROMPTS, gen_prompts=["ok", "x\udcff"])


def test_binary_items_answer_lists():
    """An answer given as a list pools every listed letter; an empty list is a clear error."""
    tokenizer = word_tokenizer()
    letter = {w: tokenizer.convert_tokens_to_ids(w) for w in "ABC"}
    item, = binary_items(tokenizer, [{"question": "Pick\n (A) x\n (B) y\n (C) z",
                                      "answer_matching_behavior": [" (B)"],
                                      "answer_not_matching_behavior": [" (A)", " (C)"]}])
    assert item.kind == "letter" and item.positive == (letter["B"],)
    assert set(item.negative) == {letter["A"], letter["C"]} and item.label == -1
    with pytest.raises(ValueError, match=r"prompts\[0\].*empty list"):
        binary_items(tokenizer, [{"question": "q?", "answer_matching_behavior": [],
                                  "answer_not_matching_behavior": " (B)"}])


def test_compare_refuses_names_equal_as_text(tiny_model_factory):
    model = tiny_model_factory("llama")
    vector = SteeringVector.from_directions({1: torch.ones(64)})
    with pytest.raises(ValueError, match="distinct name"):
        compare(model, word_tokenizer(), {1: vector, "1": -vector}, prompts=TINY_PROMPTS)
    with pytest.raises(TypeError, match=r"vectors must be a dict \{name: SteeringVector\}, got list"):
        compare(model, word_tokenizer(), [vector], prompts=TINY_PROMPTS)
    with pytest.raises(ValueError, match="vectors is empty"):
        compare(model, word_tokenizer(), {}, prompts=TINY_PROMPTS)
    with pytest.raises(TypeError, match="share_prefill must be True or False, got 'no'"):
        compare(model, word_tokenizer(), {"v": vector}, prompts=TINY_PROMPTS, share_prefill="no")


def test_progress_is_a_bool_and_a_name_a_string(tiny_model_factory):
    """``progress="no"`` switched the bars on (a truthy string); ``name=3`` went into the
    report's metadata as a number."""
    model = tiny_model_factory("llama")
    vector = SteeringVector.from_directions({1: torch.ones(64)})
    tokenizer = word_tokenizer()
    for call in (lambda **kw: evaluate(model, tokenizer, vector, prompts=TINY_PROMPTS, **kw),
                 lambda **kw: compare(model, tokenizer, {"v": vector}, prompts=TINY_PROMPTS, **kw),
                 lambda **kw: calibrate(model, tokenizer, vector, gen_prompts=["Hi"], **kw)):
        for bad in ("no", 1, None):
            with pytest.raises(TypeError, match="progress must be True or False"):
                call(progress=bad)
    for bad in (3, ["v"], b"v"):
        with pytest.raises(TypeError, match=r"name must be a str \(the vector's name in the report\) or None"):
            evaluate(model, tokenizer, vector, prompts=TINY_PROMPTS, name=bad)


def test_numpy_bools_are_flags():
    """numpy bools are True / False to every on/off option (``checks.flag``), as
    ``share_prefill`` took them before it used the shared check: under numpy 2 their type is
    named ``bool``, not ``bool_``, and ``np.True_`` was refused."""
    from steerkern.checks import flag
    from steerkern.eval import _check_common

    assert flag(np.True_, "x") is True and flag(np.False_, "x") is False
    assert flag(np.bool_(1), "x") is True
    assert _check_common(4, None, "all", np.True_, np.False_) == (4, None)
    for bad in (np.int64(1), np.array([True]), "True"):
        with pytest.raises(TypeError, match="x must be True or False"):
            flag(bad, "x")


def test_greedy_config_drops_a_checkpoints_min_length(tiny_model_factory):
    """A checkpoint's ``generation_config.min_length`` would keep rows generating past their EOS
    (generate masks EOS until the length is reached); sweeps stop at the first EOS."""
    from steerkern.sweep import _greedy_config

    model = tiny_model_factory("llama")
    saved = model.generation_config.min_length
    model.generation_config.min_length = 40
    try:
        config = _greedy_config(model, word_tokenizer(), 5)
    finally:
        model.generation_config.min_length = saved
    assert config.min_length == 0 and config.max_new_tokens == 5 and not config.do_sample


@pytest.mark.parametrize("outer_positions", ["prompt", "generated"])
def test_sweeps_inside_a_positional_steer_context_equal_the_plain_batch(tiny_sweep, outer_positions):
    """An outer ``steer`` context that steers only prompt or only generated tokens tells them
    apart by the passes it sees; sharing would split the prompt (its last token alone on top of
    the shared cache, read as a generated one), so the sweep runs the plain batch and scores
    and texts equal it."""
    from types import SimpleNamespace

    from transformers import GenerationConfig

    from steerkern.control import steer
    from steerkern.sweep import score_rows, sweep_generate

    model, vector, ids, mask, index, slots, coeffs = tiny_sweep
    outer = SteeringVector.from_directions({3: 3 * torch.randn(64, generator=torch.Generator().manual_seed(9))})
    config = GenerationConfig(do_sample=False, max_new_tokens=3, min_new_tokens=3, pad_token_id=0,
                              eos_token_id=2)
    tokenizer = word_tokenizer()
    items = binary_items(tokenizer, TINY_PROMPTS[:2])
    with steer(model, outer, coeff=2.0, positions=outer_positions), torch.no_grad():
        for positions in ("all", "generated"):
            shared, plain = (sweep_generate(model, SimpleNamespace(pad_token_id=0), [vector], ids, mask,
                                            index, slots, coeffs, config=config, positions=positions,
                                            share_prefill=share) for share in (True, False))
            assert torch.equal(shared, plain), positions
            shared, plain = (score_rows(model, tokenizer, [vector], items, [(0, -2.0), (0, 3.0)],
                                        positions=positions, share_prefill=share) for share in (True, False))
            np.testing.assert_allclose(shared, plain, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("expansion", [dict(cache_implementation="static"), dict(num_beams=2),
                                       dict(do_sample=True, num_return_sequences=2)])
def test_sweeps_with_a_cache_type_or_expanded_rows_equal_the_plain_batch(tiny_sweep, expansion):
    """A checkpoint naming a cache type (``"static"``, the usual compile recipe) made the shared
    sweep hand generate a cache next to it, which generate refuses; beam search and several
    returned sequences expand the rows generate is given but not a cache passed in."""
    from types import SimpleNamespace

    from transformers import GenerationConfig

    from steerkern.sweep import sweep_generate

    model, vector, ids, mask, index, slots, coeffs = tiny_sweep
    config = GenerationConfig(max_new_tokens=3, min_new_tokens=3, pad_token_id=0, eos_token_id=2,
                              **expansion)
    with torch.no_grad():
        for positions in ("all", "generated"):
            outputs = []
            for share in (True, False):
                torch.manual_seed(0)
                outputs.append(sweep_generate(model, SimpleNamespace(pad_token_id=0), [vector], ids, mask,
                                              index, slots, coeffs, config=config, positions=positions,
                                              share_prefill=share))
            assert torch.equal(*outputs), positions


def _prefix_sharing_prompts(prefix_len: int, rest: tuple[int, ...], seed: int = 0):
    """Two left-padded prompts sharing a prefix of ``prefix_len`` tokens (vocabulary 128)."""
    g = torch.Generator().manual_seed(seed)
    prefix = torch.randint(3, 128, (prefix_len,), generator=g).tolist()
    seqs = [prefix + torch.randint(3, 128, (n,), generator=g).tolist() for n in rest]
    width = max(map(len, seqs))
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, seq in enumerate(seqs):
        ids[i, width - len(seq):] = torch.tensor(seq)
        mask[i, width - len(seq):] = 1
    return ids, mask


@pytest.mark.parametrize("positions", ["all", "generated"])
def test_shared_sweeps_equal_plain_ones_with_a_repetition_penalty_or_length_dependent_rope(positions):
    """A repetition penalty reads the prompt's tokens, padding included, which a shared prefill
    places between a prompt's prefix and its rest; "dynamic" RoPE rotates a prefix run alone
    unlike a whole pass once past the original context. Both sweeps fall back to the plain
    batch (and evaluate's greedy config drops a checkpoint's penalty)."""
    from types import SimpleNamespace

    import transformers
    from transformers import GenerationConfig

    from steerkern.kvcache import rope_depends_on_length
    from steerkern.sweep import _greedy_config, sweep_generate

    common = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, eos_token_id=2,
                  initializer_range=0.3)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common)).eval()
    pad, other = 0, 77
    model.lm_head.register_forward_hook(  # the pad id first, then token 77, whatever the input
        lambda module, args, out: torch.zeros_like(out).index_fill_(-1, torch.tensor([pad]), 10.0)
        .index_fill_(-1, torch.tensor([other]), 9.0))
    ids, mask = _prefix_sharing_prompts(6, (2, 3))
    index, tok = torch.tensor([0, 1, 0, 1]), SimpleNamespace(pad_token_id=pad)  # pads re-laid out with id 0
    vector = SteeringVector.from_directions({1: torch.randn(64, generator=torch.Generator().manual_seed(1))})
    config = GenerationConfig(do_sample=False, max_new_tokens=1, pad_token_id=pad, eos_token_id=2,
                              repetition_penalty=2.0)
    with torch.no_grad():
        outs = [sweep_generate(model, tok, [vector], ids, mask, index, [0] * 4, [-2.0, -2.0, 3.0, 3.0],
                               config=config, positions=positions, share_prefill=share) for share in (True, False)]
    assert torch.equal(outs[0], outs[1])
    model.generation_config.repetition_penalty, model.generation_config.no_repeat_ngram_size = 1.05, 3
    greedy = _greedy_config(model, word_tokenizer(), 4)
    assert (greedy.repetition_penalty or 1.0) == 1.0 and not greedy.no_repeat_ngram_size

    dynamic = transformers.LlamaConfig(**common, max_position_embeddings=16,
                                       rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    assert rope_depends_on_length(dynamic, 17) and not rope_depends_on_length(dynamic, 16)
    assert not rope_depends_on_length(transformers.LlamaConfig(**common), 10**6)
    ids, mask = _prefix_sharing_prompts(20, (6, 9))  # the prompts outgrow the 16 positions
    config = GenerationConfig(do_sample=False, max_new_tokens=8, min_new_tokens=8, pad_token_id=0, eos_token_id=2)
    vector = SteeringVector.from_directions({1: 4 * torch.randn(64, generator=torch.Generator().manual_seed(2))})
    outs = []
    for share in (True, False):
        torch.manual_seed(0)  # a fresh model each time: dynamic RoPE keeps the frequencies of its last pass
        model = transformers.LlamaForCausalLM(dynamic).eval()
        with torch.no_grad():
            outs.append(sweep_generate(model, tok, [vector], ids, mask, index, [0] * 4, [-2.0, -2.0, 3.0, 3.0],
                                       config=config, positions=positions, share_prefill=share))
    assert torch.equal(outs[0], outs[1])


def test_an_unsteered_model_that_overflows_is_an_error_not_a_steering_warning():
    """The unsteered scores and generations' NLL are the reference of every number in a report:
    non-finite there once read as 'steering at coeffs [-1.0, 0.0, 1.0] overflowed', and
    calibrate returned 0.0 silently."""
    from steerkern.train import train_adapter
    from tests.test_extract import overflowing_model

    model, tokenizer = overflowing_model(), word_tokenizer()
    vector = SteeringVector.from_directions({1: torch.ones(64)})
    with pytest.raises(ValueError, match="the unsteered model's scores are not finite"):
        evaluate(model, tokenizer, vector, prompts=TINY_PROMPTS, max_new_tokens=0)
    with pytest.raises(ValueError, match="the unsteered model's generations' NLL are not finite"):
        calibrate(model, tokenizer, vector, max_new_tokens=2, grid=2, rounds=1)
    with pytest.raises(ValueError, match="logits hold Inf or NaN .* overflows"):
        train_adapter(model, tokenizer, [("I like cats", "I hate cats")], layers=[1], steps=1, n_last=1)


def test_calibrate_return_history_is_a_bool(tiny_model_factory):
    """``return_history="no"`` returned the ``(magnitude, history)`` tuple (a truthy string)."""
    model = tiny_model_factory("llama")
    vector = SteeringVector.from_directions({1: torch.ones(64)})
    with pytest.raises(TypeError, match="return_history must be True or False"):
        calibrate(model, word_tokenizer(), vector, return_history="no", gen_prompts=["Hi"])
