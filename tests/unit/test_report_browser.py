"""The report in a real browser: headless Chromium (Debian's `chromium`, which .ci/run installs) loads the file,
takes a screenshot, and dumps the DOM after load, where the plots, the threshold and the captions must be, and the
captions that are markup must be text that ran nothing."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from synthetic_audit import MEMORIZED, SCRIPT_CAPTION, TOP_CAPTION, write_audit_output

from auditor.report.html import write_report

CHROMIUM = next(
    (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None
)
pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="no chromium on PATH: install Debian's package (apt-get install -y chromium; .ci/run does it)",
)
# Captions from the web that would change the page if they ran: the title must stay as the report sets it.
HOSTILE = (
    SCRIPT_CAPTION,
    "<script>document.title='pwned'</script>",
    "<img src=x onerror=\"document.title='pwned'\">",
)


def chromium(profile, *args: str) -> subprocess.CompletedProcess:
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run"]
    command += [f"--user-data-dir={profile}", "--virtual-time-budget=3000", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)


@pytest.fixture(scope="module")
def report_url(tmp_path_factory):
    root = tmp_path_factory.mktemp("browser")
    memorized = (*MEMORIZED, (HOSTILE[1], 2.5, 1), (HOSTILE[2], 2.25, 1))
    audit = write_audit_output(root / "audit", memorized=memorized, failed_units=[])
    return (root, write_report(str(audit)))


def test_screenshot(report_url, tmp_path):
    from PIL import Image

    root, path = report_url
    shot = tmp_path / "report.png"
    done = chromium(
        root / "profile-shot", f"--screenshot={shot}", "--window-size=1280,2200", f"file://{path}"
    )
    assert shot.is_file(), f"chromium wrote no screenshot (exit {done.returncode}): {done.stderr[-2000:]}"
    image = Image.open(shot).convert("RGB")
    assert image.size == (1280, 2200)
    # A rendered page, not a blank or error page: many colours (plots, shading, text).
    assert len(image.getcolors(maxcolors=1 << 20) or []) > 200


def test_dom_has_plots_threshold_and_captions_as_text(report_url):
    root, path = report_url
    done = chromium(root / "profile-dom", "--dump-dom", f"file://{path}")
    dom = done.stdout
    assert "</html>" in dom, f"chromium dumped no DOM (exit {done.returncode}): {done.stderr[-2000:]}"
    # The histogram is an inline <svg> in its section, with the threshold drawn; the threshold value is shown.
    histogram = dom[dom.index('id="score-histogram"') : dom.index('id="where"')]
    assert "<svg" in histogram and "threshold 1.0000" in histogram
    assert 'id="threshold-value">1.0000<' in dom
    # The top flagged caption is the first caption of the flagged table.
    table = dom[dom.index('id="flagged-table"') :]
    assert table.index(TOP_CAPTION) < table.index("&lt;script&gt;alert(1)&lt;/script&gt;")
    # Markup in captions stayed text: no script or img element came from it, and nothing ran.
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in dom
    assert "&lt;script&gt;document.title='pwned'&lt;/script&gt;" in dom
    assert "&lt;img src=x onerror=" in dom
    assert "<script" not in dom.lower()
    assert "<img" not in dom.lower()
    assert "pwned" not in dom[dom.index("<title>") : dom.index("</title>")]
