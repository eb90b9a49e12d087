"""report.html as a browser shows it: headless Chromium loads the page of a real tiny digits run and of a synthetic
folder with every contract output, every <img> must have decoded to its PNG's size, and a full-page screenshot
is saved (also to ``$RAYBENCH_SCREENSHOT_DIR`` when set, to look at). Skipped, with the reason, where no Chromium
binary is found (``apt-get install chromium``; ``.ci/run`` installs it)."""

from __future__ import annotations

import os
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest
from chromium import find_chromium, render
from report_folders import add_contract_outputs, synthetic_folder

from raybench import report
from raybench.config import build_config
from raybench.pipeline import execute, summarize

CHROMIUM = find_chromium()
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary on PATH (apt-get install chromium)")

DIGITS = {"n_models": 4, "block_size": 4, "forget_sets": "1", "methods": "do_nothing,finetune,retrain",
          "params": {"retrain": {"budget": [0.5, 1.0]}, "finetune": {"epochs": [1, 2]}}, "recipe": {"epochs": 2}}


class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.images: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs)["src"])


def _keep(shot: Path, name: str) -> None:
    where = os.environ.get("RAYBENCH_SCREENSHOT_DIR")
    if where:
        Path(where).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(where) / name)


def _check_in_browser(page: Path, shot: Path) -> list[dict]:
    """Render ``page``; every image the HTML names decoded to its file's pixel size; the screenshot is a drawn
    page. Returns the browser's image records."""
    import matplotlib.image

    tags = _Tags()
    tags.feed(page.read_text())
    assert tags.images, "the page shows no image"
    seen = render(page, shot, binary=CHROMIUM, width=1400)
    assert [i["src"] for i in seen.images] == tags.images
    for image in seen.images:
        size = report.png_size((page.parent / image["src"]).read_bytes())
        assert image["complete"] and (image["width"], image["height"]) == size, image
    assert seen.title.startswith("raybench run ")
    assert "P95 KLOM per method and split" in seen.text and "All rows" in seen.text
    assert seen.page_size[0] <= 1400  # the wide table scrolls inside the page instead of widening it
    pixels = matplotlib.image.imread(shot)
    assert pixels.shape[0] == min(seen.page_size[1], 16000) and pixels.shape[1] == seen.page_size[0]
    ink = (pixels[..., :3] < 0.9).any(axis=-1).mean()
    assert ink > 0.02, f"the screenshot is nearly blank ({ink:.1%} of pixels drawn)"
    return seen.images


def test_a_missing_image_is_seen_as_not_loaded(tmp_path):
    # the check above can fail: a page whose second image is absent
    plots = tmp_path / "plots"
    plots.mkdir()
    from matplotlib.figure import Figure

    fig = Figure(figsize=(2, 1))
    fig.add_subplot().plot([0, 1])
    data = report._png(fig)
    (plots / "ok.png").write_bytes(data)
    page = tmp_path / "page.html"
    page.write_text('<!doctype html><html><head><title>t</title></head><body>'
                    '<img src="plots/ok.png" alt="ok"><img src="plots/gone.png" alt="gone"></body></html>')
    seen = render(page, tmp_path / "shot.png", binary=CHROMIUM)
    assert [(i["src"], i["width"] > 0) for i in seen.images] == [("plots/ok.png", True), ("plots/gone.png", False)]
    assert (seen.images[0]["width"], seen.images[0]["height"]) == report.png_size(data)


def test_the_report_of_a_real_digits_run_renders(ray_session, tmp_path):
    out = tmp_path / "run"
    config = build_config(None, **DIGITS, out=str(out))
    _, store, _ = execute(config)
    summary, page = summarize(store)
    images = _check_in_browser(Path(page), tmp_path / "digits.png")
    names = {Path(i["src"]).name for i in images}
    assert {"p95_forget_set_1.png", "compute_forget_set_1.png"} <= names
    methods = {r["method"] for r in summary["rows"]}
    assert methods == {"do_nothing", "oracle_floor", "finetune", "retrain"}
    _keep(tmp_path / "digits.png", "report_digits.png")


def test_the_report_with_every_contract_output_renders(tmp_path):
    folder = synthetic_folder(str(tmp_path / "run"))
    page = Path(report.write_report(folder.store, add_contract_outputs(folder)))
    images = _check_in_browser(page, tmp_path / "full.png")
    assert [Path(i["src"]).name for i in images] == [f"{kind}_forget_set_a.png" for kind in (
        "p95", "compute", "cdf", "worst", "convergence")]
    _keep(tmp_path / "full.png", "report_full.png")
