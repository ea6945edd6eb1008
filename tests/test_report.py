"""report.md, results.csv and the plots, built from the fixture results.json; the Pareto and "best" logic."""

from __future__ import annotations

import copy
import csv
import json
import shutil
from pathlib import Path

import pytest

from compress import report, results as schema
from compress.report import summary as summaries, tables
from compress.errors import CompressError

FIXTURE = Path(__file__).parent / "fixtures" / "results.json"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def results() -> dict:
    return json.loads(FIXTURE.read_text())


@pytest.fixture
def written(results, tmp_path):
    paths = report.write_report(results, tmp_path)
    return tmp_path, paths


def _table(markdown: str) -> dict[str, dict[str, str]]:
    """The variant table of report.md as {variant: {column: cell}}."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| variant |"))
    header = [cell.strip() for cell in lines[start].strip("|").split("|")]
    rows = {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        row = dict(zip(header, cells))
        rows[row["variant"].replace("**", "").removesuffix(" (baseline)")] = row
    return rows


def test_write_report_makes_all_files(written):
    out, paths = written
    assert [p.name for p in paths] == list(report.REPORT_FILES)
    for path in paths:
        assert path.is_file() and path.stat().st_size > 0
    for name in ("accuracy_vs_size.png", "accuracy_vs_latency.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
    assert not list(out.glob(".*partial*")), "atomic writes left partial files behind"


def test_table_holds_every_variant_with_ratios_from_the_figures(results, written):
    out, _ = written
    table = _table((out / "report.md").read_text())
    assert list(table) == [v["name"] for v in results["variants"]]
    assert list(next(iter(table.values()))) == list(tables.table_columns(results))
    base = next(v for v in results["variants"] if v["name"] == results["baseline"])
    for v in results["variants"]:
        row = table[v["name"]]
        assert row["× smaller (gzip)"] == f"{base['gzip_bytes'] / v['gzip_bytes']:.2f}×"
        if v["latency_ms_b1"] is not None:
            assert row["× faster (b1)"] == f"{base['latency_ms_b1'] / v['latency_ms_b1']:.2f}×"
        if v["accuracy"] is None:
            assert row["accuracy"] == "not measured"
        else:
            assert row["accuracy"] == f"{v['accuracy'] * 100:.2f} %"
            if v["name"] != base["name"]:
                delta = (v["accuracy"] - base["accuracy"]) * 100
                assert float(row["Δ vs baseline (points)"].replace("−", "-")) == pytest.approx(delta, abs=0.006)
        assert row["parity"] == {True: "ok", False: "FAILED", None: "not checked"}[v["parity_ok"]]
        for key, column in (("latency_ms_b1", "latency b1 (ms)"), ("latency_ms_b32", "latency b32 (ms)")):
            if v[key] is None:
                assert row[column] == "not measured"
            else:
                assert float(row[column]) == pytest.approx(v[key], rel=1e-3)


def test_not_measured_reasons_are_shown(results, written):
    out, _ = written
    text = (out / "report.md").read_text()
    reasons = [(v["name"], r) for v in results["variants"] for r in (v.get("not_measured") or {}).values()]
    assert reasons, "the fixture should hold variants with unmeasured figures"
    for name, reason in reasons:
        assert any(name in line and reason in line for line in text.splitlines())


def test_csv_has_one_row_per_variant_with_the_same_figures(results, written):
    out, _ = written
    with open(out / "results.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["variant"] for row in rows] == [v["name"] for v in results["variants"]]
    assert list(rows[0]) == list(tables.csv_columns(results))
    base = next(v for v in results["variants"] if v["name"] == results["baseline"])
    for row, v in zip(rows, results["variants"]):
        for key in ("accuracy", "gzip_bytes", "file_bytes", "latency_ms_b1", "latency_ms_b32", "params"):
            assert row[key] == ("" if v[key] is None else str(v[key]))
        assert float(row["x_smaller_gzip"]) == pytest.approx(base["gzip_bytes"] / v["gzip_bytes"], abs=1e-4)
        assert row["parity_ok"] == {True: "true", False: "false", None: ""}[v["parity_ok"]]


def test_report_sections_machine_stages_summary_and_cuda(results, written):
    out, _ = written
    text = (out / "report.md").read_text()
    machine = results["machine"]
    for heading in ("## Machine", "## Stage wall times", "## Summary"):
        assert heading in text
    assert machine["cpu"] in text
    for flag in machine["instruction_sets"]:
        assert flag in text
    for name, version in machine["libraries"].items():
        assert f"{name} {version}" in text
    for stage in results["stages"]:
        assert f"| {stage['name']} | {stage['seconds']:.1f} |" in text
    assert "CUDA latency not measured: " + results["cuda"]["reason"] in text


def test_cuda_latency_listed_when_measured(results, tmp_path):
    results["variants"][0]["latency_cuda_ms_b1"] = 0.052
    results["cuda"] = {"measured": True, "reason": "CUDAExecutionProvider session created"}
    report.write_report(results, tmp_path)
    text = (tmp_path / "report.md").read_text()
    assert f"CUDA latency measured for: {results['variants'][0]['name']}" in text
    assert f"- {results['variants'][0]['name']}: b1 0.052" in text


def test_summary_names_the_best_parity_ok_variants_within_one_point(results):
    summary = summaries.summarize(results)
    base = next(v for v in results["variants"] if v["name"] == results["baseline"])
    eligible = [
        v for v in results["variants"]
        if v["parity_ok"] is True and v["accuracy"] is not None and v["accuracy"] >= base["accuracy"] - 0.01
    ]
    assert summary["best_size"]["name"] == min(eligible, key=lambda v: v["gzip_bytes"])["name"]
    assert summary["best_latency"]["name"] == min(eligible, key=lambda v: v["latency_ms_b1"])["name"]
    assert summary["best_size"]["x_smaller_gzip"] == pytest.approx(
        base["gzip_bytes"] / summary["best_size"]["gzip_bytes"]
    )
    # The fixture's failed-parity variant is both smaller and faster than any other within one point.
    failed = [v for v in results["variants"] if v["parity_ok"] is False]
    assert failed and failed[0]["gzip_bytes"] < summary["best_size"]["gzip_bytes"]
    assert failed[0]["latency_ms_b1"] < summary["best_latency"]["latency_ms_b1"]
    assert summary["parity_failed"] == [v["name"] for v in failed]
    lines = summaries.format_summary(summary)
    assert any(summary["best_size"]["name"] in line and line.startswith("smallest") for line in lines)


def test_int8_slower_than_its_float_source_is_not_fastest_and_is_named(results):
    variants = {v["name"]: v for v in results["variants"]}
    for v in results["variants"]:
        v.update(stage=v["name"], precision="int8" if "int8" in v["name"] else "float32")
    base = variants[results["baseline"]]
    # prune50 is out of tolerance; the int8 file made from it would be the fastest pick, but it is slower than prune50.
    variants["prune50"].update(accuracy=base["accuracy"] - 0.05, latency_ms_b1=0.010)
    variants["prune50-ptq-int8"].update(input_stage="prune50", latency_ms_b1=0.020, accuracy=base["accuracy"])
    variants["ptq-int8"]["input_stage"] = results["baseline"]  # faster than the baseline: not named
    summary = summaries.summarize(results)
    assert summary["best_latency"]["name"] != "prune50-ptq-int8"
    assert [item["name"] for item in summary["int8_slower"]] == ["prune50-ptq-int8"]
    assert "int8 slower than its float file: prune50-ptq-int8 (0.020 ms vs 0.010 ms)" in summaries.format_summary(summary)
    del variants["prune50-ptq-int8"]["input_stage"]  # results written before input_stage: nothing to compare with
    assert summaries.summarize(results)["best_latency"]["name"] == "prune50-ptq-int8"


def test_failed_parity_is_never_best_nor_on_the_front(results):
    # Make the failed variant better than everything on every axis: it must still be left out.
    failed = next(v for v in results["variants"] if v["parity_ok"] is False)
    failed.update(accuracy=0.99, gzip_bytes=1, latency_ms_b1=0.0001)
    summary = summaries.summarize(results)
    assert summary["best_size"]["name"] != failed["name"]
    assert summary["best_latency"]["name"] != failed["name"]
    assert failed["name"] not in summary["pareto_size"] + summary["pareto_latency"]


def test_a_parity_passed_with_a_note_is_listed_in_the_report(results, tmp_path):
    passed = next(v for v in results["variants"] if v["parity_ok"] is True and v["name"] != results["baseline"])
    passed["parity"] = {**(passed.get("parity") or {}), "note": "its kernels round otherwise"}
    report.write_report(results, tmp_path)
    markdown = (tmp_path / "report.md").read_text()
    assert f"Parity passed, with a note:\n\n- {passed['name']}: its kernels round otherwise" in markdown


def test_unchecked_parity_is_not_best(results):
    for v in results["variants"]:
        if v["name"] != results["baseline"]:
            v["parity_ok"] = None
    summary = summaries.summarize(results)
    assert summary["best_size"]["name"] == results["baseline"]
    assert summary["best_latency"]["name"] == results["baseline"]


def test_baseline_accuracy_not_measured_names_no_best(results, tmp_path):
    base = next(v for v in results["variants"] if v["name"] == results["baseline"])
    base["accuracy"] = None
    summary = summaries.summarize(results)
    assert summary["best_size"] is None and summary["best_latency"] is None
    assert "not measured" in summary["reason"]
    report.write_report(results, tmp_path)  # still writes, with "n/a" deltas
    assert "no best variant named" in (tmp_path / "report.md").read_text()


def test_pareto_front_on_a_hand_made_set():
    points = [
        ("big-best", 100.0, 0.90),
        ("mid", 50.0, 0.88),
        ("mid-worse", 60.0, 0.87),  # dominated by mid (cheaper and more accurate)
        ("small", 10.0, 0.80),
        ("tiny-bad", 5.0, 0.50),
        ("same-cost-worse", 50.0, 0.85),  # same cost as mid, less accurate
        ("bigger-same", 200.0, 0.90),  # costs more for the same accuracy
        ("unmeasured", None, 0.99),
        ("no-accuracy", 1.0, None),
    ]
    assert summaries.pareto_front(points) == ["tiny-bad", "small", "mid", "big-best"]
    assert summaries.pareto_front([]) == []
    assert summaries.pareto_front([("a", 1.0, 0.5), ("b", 1.0, 0.5)]) == ["a"]


@pytest.mark.parametrize(
    "mutate, missing",
    [
        (lambda r: r.pop("variants"), "'variants'"),
        (lambda r: r.pop("machine"), "'machine'"),
        (lambda r: r["variants"][2].pop("gzip_bytes"), "'gzip_bytes'"),
        (lambda r: r["variants"][0].pop("parity_ok"), "'parity_ok'"),
        (lambda r: r["stages"][0].pop("seconds"), "'seconds'"),
    ],
)
def test_missing_key_is_a_compress_error_naming_it(results, tmp_path, mutate, missing):
    mutate(results)
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results))
    with pytest.raises(CompressError, match=missing):
        schema.load_results(path)


def test_bad_values_are_rejected(results, tmp_path):
    bad = copy.deepcopy(results)
    bad["variants"][1]["accuracy"] = 69.9  # a percentage where a fraction belongs
    with pytest.raises(CompressError, match="fraction"):
        schema.validate_results(bad)
    bad = copy.deepcopy(results)
    bad["baseline"] = "nope"
    with pytest.raises(CompressError, match="baseline 'nope'"):
        schema.validate_results(bad)
    path = tmp_path / "results.json"
    path.write_text("{not json")
    with pytest.raises(CompressError, match="not valid JSON"):
        schema.load_results(path)


def test_cli_report_regenerates_from_results_json(tmp_path, capsys):
    from compress.cli import main

    shutil.copy(FIXTURE, tmp_path / "results.json")
    (tmp_path / "report.md").write_text("stale")
    assert main(["report", str(tmp_path)]) == 0
    assert (tmp_path / "report.md").read_text().startswith("# Compression report")
    for name in report.REPORT_FILES:
        assert (tmp_path / name).is_file()
    out = capsys.readouterr().out
    assert "smallest within 1 point" in out


def test_cli_report_without_results_json_exits_2(tmp_path, capsys):
    from compress.cli import main

    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "results.json" in err


def test_cli_report_with_missing_key_exits_2(tmp_path, capsys):
    from compress.cli import main

    broken = json.loads(FIXTURE.read_text())
    del broken["variants"][0]["latency_ms_b1"]
    (tmp_path / "results.json").write_text(json.dumps(broken))
    assert main(["report", str(tmp_path)]) == 2
    assert "'latency_ms_b1'" in capsys.readouterr().err


def test_importing_report_stays_light():
    import subprocess
    import sys

    code = (
        "import sys, compress.report, compress.results, compress.measure.latency, compress.measure.sizes; "
        "print('tensorflow' in sys.modules, 'matplotlib' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]
