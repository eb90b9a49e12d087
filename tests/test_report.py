"""report.html and its plots, on synthetic run folders (no Ray): what each plot draws is compared with the summary
rows and the margins written, what the folder lacks is said in the page, and the worst samples' margins are the
ones the folder holds for those samples (tests/report_folders.py; the browser test is test_report_browser.py)."""

from __future__ import annotations

import html
import json
import multiprocessing
import os
import time
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from report_folders import (
    BUDGETS,
    FINETUNE,
    FORGET,
    N_TRAIN,
    N,
    add_contract_outputs,
    per_sample_table,
    synthetic_folder,
)

from raybench import report
from raybench.cli import main
from raybench.metrics import klom

SPLITS = ("retain", "forget", "val")


class _Images(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.images: list[dict] = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs))


def page_images(page: str) -> list[dict]:
    parser = _Images()
    parser.feed(page)
    return parser.images


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    folder = synthetic_folder(str(tmp_path_factory.mktemp("plain")))
    page = Path(report.write_report(folder.store, folder.summary)).read_text()
    return folder, page


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    folder = synthetic_folder(str(tmp_path_factory.mktemp("full")), seed=1)
    summary = add_contract_outputs(folder)
    page = Path(report.write_report(folder.store, summary)).read_text()
    return folder, summary, page


def _row(rows, method, split, params=None, epoch=None):
    found = [r for r in rows if r["method"] == method and r["split"] == split
             and (params is None or r["params"] == params) and (epoch is None or r["epoch"] == epoch)]
    assert len(found) == 1, (method, split, params, epoch, found)
    return found[0]


def _check_images(root: Path, page: str) -> list[str]:
    """Every <img> names a PNG in plots/ whose pixel size is the one the tag declares; returns the names."""
    names = []
    for img in page_images(page):
        path = root / img["src"]
        assert path.parent.name == "plots" and path.is_file(), img
        assert report.png_size(path.read_bytes()) == (int(img["width"]), int(img["height"]))
        assert img["alt"]
        names.append(path.name)
    return names


def test_a_folder_with_the_summary_alone_shows_it_and_says_what_is_not_computed(plain):
    folder, page = plain
    root = Path(folder.store.root)
    assert _check_images(root, page) == ["p95_forget_set_a.png", "compute_forget_set_a.png"]
    assert "<b>intervals: not computed</b>" in page
    assert "<b>per-sample distribution and worst samples: not computed</b>" in page
    assert "no per_sample/forget_set=a/" in page
    assert "<b>convergence: not computed</b>" in page and "no convergence.csv" in page
    assert "<b>" + ", ".join(report.METRIC_COLUMNS) + ": not computed</b>" in page
    assert 'class="ci"' not in page  # no interval drawn from anything else
    # every summary row is in the full table, the P95 of each split in the headline table
    for r in folder.summary["rows"]:
        assert f"<td>{r['klom_p95']:.3f}" in page


def test_a_folder_with_every_contract_output_shows_all_of_it(full):
    folder, summary, page = full
    root = Path(folder.store.root)
    assert _check_images(root, page) == [f"{kind}_forget_set_a.png" for kind in ("p95", "compute", "cdf", "worst",
                                                                                  "convergence")]
    assert "not computed</b>" not in page.replace("challenge_score, svc_mia, iam_mean: not computed</b>", "")
    for r in summary["rows"]:
        assert f"{r['klom_p95']:.3f} <span class=\"ci\">[{r['klom_p95_ci_low']:.3f}, {r['klom_p95_ci_high']:.3f}]" \
            in page
    assert "n_boot = 200, seed = 0, method = percentile over models" in page
    # a metric the rows give once per entry is shown once; one given on the forget row only, as that value
    finetune = [r for r in summary["rows"] if r["method"] == "finetune" and r["epoch"] == 3]
    tow = {r["tow"] for r in finetune}
    assert len(tow) == 1
    forget = next(r for r in finetune if r["split"] == "forget")
    assert (f"<td class='l'>finetune</td><td>3</td><td>{report._fmt(tow.pop(), 4)}</td>"
            f"<td>{report._fmt(forget['epsilon_score'], 4)}</td><td>0.6</td></tr>") in page
    assert "metric settings" in page and "by model id" in page


def test_the_compute_plot_is_easydubs_figure_with_readable_axes(full):
    _, summary, _ = full
    rows = summary["rows"]
    plot = report.compute_figure(rows, "a")
    assert plot.unplaced == []
    axes = [ax for ax in plot.figure.axes if ax.get_title() in SPLITS]
    assert [ax.get_title() for ax in axes] == list(SPLITS)
    plot.figure.canvas.draw()  # tick labels exist once drawn
    for ax, split in zip(axes, SPLITS, strict=True):
        assert ax.get_xscale() == "log" and ax.get_yscale() == "linear"
        assert ax.get_ylim()[0] == 0  # KLOM from 0: a change of 2.45 -> 2.25 does not fill the frame
        lo, hi = ax.get_xlim()
        assert np.log10(lo) == int(np.log10(lo)) and np.log10(hi) == int(np.log10(hi))  # whole decades
        labelled = [t for t in ax.get_xticklabels() if t.get_text() and lo <= t.get_position()[0] <= hi]
        assert len(labelled) >= 2
        lines = {line.get_label(): line for line in ax.get_lines()}
        retrain = sorted((float(r["grad_samples"]), r["klom_p95"]) for r in rows
                         if r["method"] == "retrain" and r["split"] == split)
        assert len(retrain) == len(BUDGETS)
        xy = lines["retrain (budgets)"].get_xydata()
        assert [tuple(p) for p in xy] == retrain and lines["retrain (budgets)"].get_linestyle() == "-"
        finetune = lines["finetune"]
        assert finetune.get_linestyle() == "None"  # points, not a line
        assert sorted(map(tuple, finetune.get_xydata())) == sorted((float(r["grad_samples"]), r["klom_p95"])
                                                                   for r in rows
                                                                   if (r["method"], r["split"]) == ("finetune", split))
        nothing = lines["do_nothing (the originals)"].get_ydata()
        assert list(nothing) == [_row(rows, "do_nothing", split)["klom_p95"]] * 2
        floor = next(v for k, v in lines.items() if k.startswith("floor: oracle_floor"))
        assert list(floor.get_ydata()) == [_row(rows, "oracle_floor", split)["klom_p95"]] * 2
    legend = {t.get_text() for t in plot.figure.legends[0].get_texts()}
    assert {"retrain (budgets)", "finetune", "do_nothing (the originals)", "floor's interval"} <= legend


def test_compute_within_one_decade_labels_ticks_inside_it(full):
    _, summary, _ = full
    rows = [{**r, "grad_samples": r["grad_samples"] + 1400 if r["grad_samples"] else r["grad_samples"]}
            for r in summary["rows"]]
    fig = report.compute_figure(rows, "a").figure
    fig.canvas.draw()
    ax = next(ax for ax in fig.axes if ax.get_title() == "forget")
    assert ax.get_xlim() == (1e3, 1e4)
    inside = [t.get_text() for t in ax.get_xticklabels(minor=True) if t.get_text() and 1e3 < t.get_position()[0] < 1e4]
    assert inside == ["$2\\times10^{3}$", "$5\\times10^{3}$"]


def test_the_p95_plot_draws_each_row_with_its_interval_and_the_floor(full):
    _, summary, _ = full
    rows = summary["rows"]
    fig = report.p95_figure(rows, "a")
    entries = list(dict.fromkeys((r["method"], r["params"], r["epoch"]) for r in rows))
    axes = [ax for ax in fig.axes if ax.get_title().split()[0] in SPLITS]
    for ax, split in zip(axes, SPLITS, strict=True):
        widths = [patch.get_width() for patch in ax.patches if patch.get_height() == 0.7]
        assert widths == [_row(rows, m, split, p, e)["klom_p95"] for m, p, e in entries]
        assert ax.get_xlim()[0] == 0 and ax.get_xscale() == "linear"
        floor = [line for line in ax.get_lines() if line.get_label().startswith("floor:")]
        assert list(floor[0].get_xdata()) == [_row(rows, "oracle_floor", split)["klom_p95"]] * 2
        whiskers = ax.containers[-1]  # the errorbar container: one segment per row, from CI low to high
        segments = whiskers.lines[2][0].get_segments()
        assert [(s[0][0], s[1][0]) for s in segments] == [
            (_row(rows, m, split, p, e)["klom_p95_ci_low"], _row(rows, m, split, p, e)["klom_p95_ci_high"])
            for m, p, e in entries]


def test_klom_axes_start_at_0_unless_the_values_span_decades():
    from matplotlib.figure import Figure

    ax = Figure().add_subplot()
    report._klom_axis(ax, [2.45, 2.25, None], "y", "P95")
    assert ax.get_ylim() == (0, pytest.approx(2.45 * 1.1)) and ax.get_ylabel() == "P95"
    ax = Figure().add_subplot()
    report._klom_axis(ax, [0.01, 0.3, 9.0], "x", "P95")
    assert ax.get_xscale() == "log" and "log scale" in ax.get_xlabel()


def test_the_worst_samples_are_the_highest_klom_and_their_margins_the_stored_ones(full):
    folder, _, _ = full
    table = per_sample_table(folder)  # the literal reference's KLOM of what was written
    views = {"retain": np.flatnonzero(~np.isin(np.arange(N_TRAIN), FORGET)), "forget": np.asarray(FORGET),
             "val": np.arange(40)}
    for method, params, epoch, stored in (("finetune", FINETUNE, 3, 3), ("do_nothing", "{}", 0, None),
                                          ("retrain", json.dumps({"budget": 0.5}), 1, 1)):
        pooled = []
        for split in SPLITS:
            from klom_reference import reference_klom

            values = reference_klom(folder.split_matrix(method, params, stored, split).astype(float),
                                    folder.split_matrix("oracle", "{}", None, split).astype(float))
            pooled += [(-v, SPLITS.index(split), int(i), split) for v, i in zip(values, views[split], strict=True)]
        expected = [(split, i, -v) for v, _, i, split in sorted(pooled)[:3]]
        chosen = report.worst_samples(report.read_per_sample(folder.store, "a"), method, params, epoch)
        assert [(s, i) for s, i, _ in chosen] == [(s, i) for s, i, _ in expected]
        assert [v for _, _, v in chosen] == pytest.approx([v for _, _, v in expected], rel=1e-12)
        samples = report.worst_sample_margins(folder.store, "a", method, params, epoch, chosen)
        for s in samples:
            stored_split = "val" if s.split == "val" else "train"
            written = folder.margins[(method, params, stored)][stored_split][:, s.sample_id]
            assert np.array_equal(s.unlearned, written)  # the newest unit, not the stale one of 50s
            assert np.array_equal(s.oracle, folder.margins[("oracle", "{}", None)][stored_split][:, s.sample_id])
            assert float(klom(s.unlearned[:, None], s.oracle[:, None])[0]) == pytest.approx(s.klom, rel=1e-9)
    assert len(table) > 0


def test_the_worst_sample_histograms_flag_a_klom_their_margins_do_not_give(full):
    folder, _, _ = full
    chosen = report.worst_samples(report.read_per_sample(folder.store, "a"), "finetune", FINETUNE, 3)
    samples = report.worst_sample_margins(folder.store, "a", "finetune", FINETUNE, 3, chosen)
    good = report.worst_figure([("finetune", samples)], "a")
    titles = [ax.get_title() for ax in good.axes]
    assert len(titles) == 3 and not any("margins read give" in t for t in titles)
    wrong = [report.WorstSample(s.split, s.sample_id, s.klom + 1.0, s.unlearned, s.oracle) for s in samples]
    flagged = report.worst_figure([("finetune", wrong)], "a")
    assert all("margins read give" in ax.get_title() for ax in flagged.axes)
    # both histograms on KLOM's 20 bins, as shares of each ensemble
    unlearned, oracles = flagged.axes[0].collections  # one polygon per bar: (left, 0), (left, h), (right, h), …
    heights = [[path.vertices[1, 1] for path in c.get_paths()] for c in (unlearned, oracles)]
    assert [len(h) for h in heights] == [20, 20] and all(sum(h) == pytest.approx(1.0) for h in heights)
    assert unlearned.get_label().startswith("unlearned") and oracles.get_label().startswith("oracles")


def test_the_cdf_is_each_methods_per_sample_klom_at_its_last_epoch(full):
    folder, summary, _ = full
    table = report.read_per_sample(folder.store, "a")
    fig = report.cdf_figure(summary["rows"], "a", table)
    forget = next(ax for ax in fig.axes if ax.get_title() == "forget")
    lines = {line.get_label(): line for line in forget.get_lines()}
    assert set(lines) == {"do_nothing · ep 0", "oracle_floor · ep 20 (the floor)", "finetune · ep 3",
                          "retrain (budget=0.25) · ep 1", "retrain (budget=0.5) · ep 1",
                          "retrain (budget=1.0) · ep 1", "0.95 (P95)"}
    assert lines["oracle_floor · ep 20 (the floor)"].get_linestyle() == ":"
    values = np.sort([v for m, p, e, s, v in zip(*(table.column(c).to_pylist() for c in (
        "method", "params", "epoch", "split", "klom")), strict=True) if (m, e, s) == ("finetune", 3, "forget")])
    xy = lines["finetune · ep 3"].get_xydata()
    assert np.array_equal(xy[1:, 0], values) and np.allclose(xy[1:, 1], np.arange(1, len(values) + 1) / len(values))
    assert forget.get_xlim()[0] == 0 and forget.get_ylim() == (0, 1)


def test_the_convergence_plot_reads_convergence_csv(full):
    folder, summary, _ = full
    convergence = report.read_convergence(folder.store)
    fig = report.convergence_figure(summary["rows"], "a", convergence)
    val = next(ax for ax in fig.axes if ax.get_title() == "val")
    assert [t.get_text() for t in val.get_xticklabels()] == [str(n) for n in (N // 4, N // 2, N)]
    assert val.get_ylim()[0] == 0
    expected = sorted((r["n_models"], r["klom_p95"]) for r in convergence
                      if (r["method"], r["split"]) == ("finetune", "val"))
    curves = {c.get_label(): c.lines[0] for c in val.containers}  # errorbar: the label is its container's
    assert [tuple(p) for p in curves["finetune · ep 3"].get_xydata()] == expected
    assert curves["oracle_floor · ep 20 (the floor)"].get_linestyle() == ":"


def test_a_broken_convergence_csv_is_said_in_the_page_not_drawn(tmp_path):
    folder = synthetic_folder(str(tmp_path / "run"))
    folder.store.write_bytes(folder.store.path("convergence.csv"), b"forget_set,method\na,retrain\n")
    page = Path(report.write_report(folder.store, folder.summary)).read_text()
    assert "convergence.csv could not be read: convergence.csv has no column 'params'" in html.unescape(page)
    assert "convergence_forget_set" not in page


def test_stale_images_of_this_report_are_removed_and_others_kept(tmp_path):
    folder = synthetic_folder(str(tmp_path / "run"))
    plots = Path(folder.store.root) / "plots"
    plots.mkdir()
    for name in ("work_forget_set_a.png", "cdf_forget_set_a.png", "convergence.png"):
        (plots / name).write_bytes(b"old")
    report.write_report(folder.store, folder.summary)
    assert sorted(p.name for p in plots.iterdir()) == ["compute_forget_set_a.png", "convergence.png",
                                                       "p95_forget_set_a.png"]


def test_the_floor_reference_is_measured_else_simulated_else_absent():
    def rows(n, methods):
        return {(m, "{}", 0): {"val": {"method": m, "klom_p95": 0.7, "n_models": n, "n_oracles": n}} for m in methods}

    measured = report.floor_reference(rows(100, ["do_nothing", "oracle_floor"]), "val")
    assert measured.value == 0.7 and measured.label.startswith("floor: oracle_floor")
    simulated = report.floor_reference(rows(100, ["do_nothing"]), "val")
    assert simulated.value == pytest.approx(0.65) and "simulated" in simulated.label
    assert report.simulated_floor(141) == pytest.approx(np.exp(np.interp(np.log(141), np.log([100, 200]),
                                                                          np.log([0.65, 0.28]))))
    assert report.floor_reference(rows(6, ["do_nothing"]), "val").value is None
    assert report.simulated_floor(5000) is None


def test_raybench_report_rewrites_the_page_from_summary_json(full, tmp_path):
    folder, summary, _ = full
    folder.store.write_bytes(folder.store.path("summary.json"), json.dumps(summary).encode())
    (Path(folder.store.root) / "report.html").unlink()
    result = CliRunner().invoke(main, ["report", folder.store.root])
    assert result.exit_code == 0, result.output
    page = (Path(folder.store.root) / "report.html").read_text()
    assert len(page_images(page)) == 5 and "[" in page


def _written(folder) -> dict[str, bytes]:
    root = Path(folder.store.uri)
    return {p.name: p.read_bytes() for p in [root / "report.html", *sorted((root / "plots").glob("*.png"))]}


def _helper_dies(blob: bytes) -> bytes:  # module-level: the pool pickles it by name
    os._exit(3)


def _helper_hangs(blob: bytes) -> bytes:
    time.sleep(600)
    return b""


def test_plots_drawn_by_helper_processes_are_byte_identical_to_plots_drawn_here(tmp_path, monkeypatch):
    folder = synthetic_folder(str(tmp_path / "run"), seed=1)
    summary = add_contract_outputs(folder)
    here = []
    draw = report._png
    monkeypatch.setattr(report, "_png", lambda fig: here.append(fig) or draw(fig))  # counts this process' draws
    monkeypatch.setattr(report, "_render_processes", lambda: 2)
    report.write_report(folder.store, summary)
    pooled = _written(folder)
    assert len(pooled) >= 5 and not here  # every plot, none drawn by this process
    monkeypatch.setattr(report, "_render_processes", lambda: 0)
    report.write_report(folder.store, summary)
    assert len(here) == len(pooled) - 1 and _written(folder) == pooled


def test_a_plot_whose_helper_died_or_that_cannot_be_pickled_is_drawn_here(tmp_path, monkeypatch, caplog):
    folder = synthetic_folder(str(tmp_path / "run"))  # the summary alone: three plots
    summary = folder.summary
    monkeypatch.setattr(report, "_render_processes", lambda: 0)
    report.write_report(folder.store, summary)
    expected = _written(folder)
    monkeypatch.setattr(report, "_render_processes", lambda: 2)
    monkeypatch.setattr(report, "_png_of_pickled", _helper_dies)
    with caplog.at_level("WARNING", logger="raybench.report"):
        report.write_report(folder.store, summary)
    assert _written(folder) == expected
    assert "helper process" in caplog.text and "drawing" in caplog.text

    caplog.clear()  # a helper that hangs is killed, and the plots drawn here
    monkeypatch.setattr(report, "_png_of_pickled", _helper_hangs)
    monkeypatch.setattr(report, "PLOT_TIMEOUT_S", 1)
    children = set(multiprocessing.active_children())
    t0 = time.monotonic()
    with caplog.at_level("WARNING", logger="raybench.report"):
        report.write_report(folder.store, summary)
    assert _written(folder) == expected and time.monotonic() - t0 < 60
    assert "in 1 s: drawing it and the rest here" in caplog.text
    assert not set(multiprocessing.active_children()) - children  # no helper left behind

    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    fig = Figure(figsize=(2, 1))
    fig.subplots().xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"<{v:g}>"))  # a lambda: not picklable
    page = report._Page(folder.store)
    try:
        snippet = page.image("lambda.png", fig, "alt", "caption")
        assert page.pending["lambda.png"][1] is None  # drawn here, not queued to a helper
        done = page.finish(f"<body>{snippet}</body>")
    finally:
        page.close()
    data = (Path(folder.store.uri) / "plots" / "lambda.png").read_bytes()
    assert data == report._png(fig) and 'width="200" height="100"' in done
