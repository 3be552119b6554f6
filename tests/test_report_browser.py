"""The HTML report in a real browser: headless Chromium (Debian's ``chromium`` package).

Checks that the report renders its plotly graphs (``.js-plotly-plot`` with ``svg.main-svg``
in the DOM after the scripts ran), logs nothing to the console (no errors, no uncaught
exceptions), gives a non-blank screenshot, and makes no network request: the net log must
hold no http(s) request started by the page. A control page with one remote image proves
the net-log check can see such a request. Skipped, saying so, where no Chromium exists.
"""

from __future__ import annotations

import json
import re
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import pytest

from ctlens import viz

pytestmark = pytest.mark.slow

FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-quic", "--hide-scrollbars",
]


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip(
        "chromium not installed: `apt-get install -y chromium` (Debian) to run the browser "
        "test of the HTML report"
    )


def run_browser(page: Path, work: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """One headless Chromium run on a file URL, with a fresh profile directory."""
    profile = work / f"profile-{len(list(work.glob('profile-*')))}"
    cmd = [chromium(), *FLAGS, f"--user-data-dir={profile}", "--window-size=1400,1000",
           "--virtual-time-budget=15000", *extra, page.resolve().as_uri()]
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    except subprocess.TimeoutExpired:
        pytest.fail(f"chromium did not finish within 300 s on {page.name} (an overloaded machine?)")


def page_requests(net_log: Path) -> list[str]:
    """URLs the *page* asked for (the browser's own background requests are excluded).

    Chromium logs every URL request; those a document started carry its network isolation
    key (``file://`` for a local page), the browser's own carry none ("not an origin").
    """
    log = json.loads(net_log.read_text())
    names = {v: k for k, v in log["constants"]["logEventTypes"].items()}
    urls = []
    for event in log["events"]:
        params = event.get("params") or {}
        if names.get(event["type"]) == "URL_REQUEST_START_JOB" and "url" in params:
            key = str(params.get("network_isolation_key", ""))
            if params.get("initiator") != "not an origin" or key.startswith("file://"):
                urls.append(params["url"])
    return urls


def console_lines(stderr: str) -> list[str]:
    """Console messages and uncaught errors, as Chromium logs them with --enable-logging."""
    return [line for line in stderr.splitlines() if ":CONSOLE" in line]


def png_pixels(path: Path) -> tuple[int, int, bytes]:
    """Decode an 8-bit RGB/RGBA PNG (what Chromium writes) into raw pixel bytes."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat = 8, b""
    width = height = channels = 0
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            width, height, depth, colour = struct.unpack(">IIBB", body[:10])
            assert depth == 8 and colour in (2, 6), f"unexpected PNG type {depth}/{colour}"
            channels = 3 if colour == 2 else 4
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    raw = zlib.decompress(idat)
    stride = width * channels
    out = bytearray(height * stride)
    prev = bytearray(stride)
    for y in range(height):
        kind = raw[y * (stride + 1)]
        row = bytearray(raw[y * (stride + 1) + 1 : (y + 1) * (stride + 1)])
        if kind == 1:
            for i in range(channels, stride):
                row[i] = (row[i] + row[i - channels]) & 255
        elif kind == 2:
            row = bytearray((a + b) & 255 for a, b in zip(row, prev, strict=True))
        elif kind == 3:
            for i in range(stride):
                left = row[i - channels] if i >= channels else 0
                row[i] = (row[i] + ((left + prev[i]) >> 1)) & 255
        elif kind == 4:
            for i in range(stride):
                a = row[i - channels] if i >= channels else 0
                b, c = prev[i], prev[i - channels] if i >= channels else 0
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                pred = a if pa <= pb and pa <= pc else (b if pb <= pc else c)
                row[i] = (row[i] + pred) & 255
        out[y * stride : (y + 1) * stride] = row
        prev = row
    return width, height, bytes(out)


@pytest.fixture(autouse=True)
def _needs_chromium() -> None:
    """Skip, saying why, before building anything when there is no browser."""
    chromium()


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from test_viz import make_run

    run_dir = make_run(tmp_path_factory.mktemp("browser") / "run", top_n=60)
    return viz.write_report(run_dir)


def test_net_log_check_sees_a_remote_request(tmp_path: Path) -> None:
    """Control: a page with a remote image must show up in `page_requests`."""
    page = tmp_path / "control.html"
    page.write_text('<html><body><img src="https://example.invalid/x.png"></body></html>')
    net = tmp_path / "control-net.json"
    run_browser(page, tmp_path, f"--log-net-log={net}", "--dump-dom")
    assert "https://example.invalid/x.png" in page_requests(net)


def test_report_renders_offline_without_console_errors(report: Path, tmp_path: Path) -> None:
    net = tmp_path / "net.json"
    result = run_browser(report, tmp_path, "--dump-dom", "--enable-logging=stderr", "--v=0",
                         f"--log-net-log={net}")
    assert result.returncode == 0, result.stderr[-2000:]
    dom = result.stdout
    assert console_lines(result.stderr) == []
    graphs = re.findall(r'<div id="(ctlens-[a-z]+)" class="[^"]*js-plotly-plot', dom)
    assert sorted(graphs) == ["ctlens-circuit", "ctlens-diff", "ctlens-evolution",
                              "ctlens-nodes"]
    assert dom.count('class="main-svg"') >= 8  # each plot draws two main svg layers
    assert dom.count('class="slider-container"') == 1 or "slider" in dom
    remote = [u for u in page_requests(net) if u.startswith(("http:", "https:", "ws:", "wss:"))]
    assert remote == []


def test_evolution_slider_frames_render(report: Path, tmp_path: Path) -> None:
    """Jump the evolution figure to its last snapshot, as the slider does, in a copy."""
    probe = (
        '<script>window.addEventListener("load", function () {'
        ' var g = document.getElementById("ctlens-evolution");'
        ' Plotly.animate(g, ["30"], {mode: "immediate", frame: {duration: 0, redraw: true},'
        ' transition: {duration: 0}}).then(function () {'
        ' console.log("ANIMATED|" + g.layout.title.text + "|" + g.layout.shapes[0].x0); });'
        "});</script></body>"
    )
    page = tmp_path / "animated.html"
    page.write_text(report.read_text(encoding="utf-8").replace("</body>", probe), "utf-8")
    result = run_browser(page, tmp_path, "--dump-dom", "--enable-logging=stderr", "--v=0")
    lines = console_lines(result.stderr)
    assert len(lines) == 1 and "ANIMATED|" in lines[0], lines
    assert "step 30: " in lines[0] and lines[0].split("|")[2].startswith("30")


def test_report_screenshot_is_not_blank(report: Path, tmp_path: Path) -> None:
    shot = tmp_path / "report.png"
    result = run_browser(report, tmp_path, f"--screenshot={shot}")
    assert shot.is_file(), result.stderr[-2000:]
    width, height, pixels = png_pixels(shot)
    assert (width, height) == (1400, 1000)
    channels = len(pixels) // (width * height)
    colours = {pixels[i : i + 3] for i in range(0, len(pixels), channels * 7)}
    non_white = sum(
        1 for i in range(0, len(pixels), channels * 7) if pixels[i : i + 3] != b"\xff\xff\xff"
    )
    assert len(colours) > 50, f"only {len(colours)} colours: the page looks blank"
    assert non_white > 0.02 * width * height / 7


def test_figures_export_to_png_and_svg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``fig.write_image`` through kaleido 1.x (the ``export`` extra), driving this
    machine's Chromium: a PNG of the right size and an SVG that carries the figure's text."""
    pytest.importorskip(
        "kaleido", reason="kaleido not installed: `pip install ctlens[export]` to test PNG/SVG"
    )
    from test_viz import circuit_of

    from ctlens import Graph, GraphSpec

    monkeypatch.setenv("BROWSER_PATH", chromium())  # kaleido's browser, found by choreographer
    fig = viz.plot_circuit(circuit_of(Graph(GraphSpec(3, 4, 4)), 0, 60), title="export check")
    png, svg = tmp_path / "circuit.png", tmp_path / "circuit.svg"
    fig.write_image(png, width=900, height=600)
    fig.write_image(svg, width=900, height=600)
    width, height, pixels = png_pixels(png)
    assert (width, height) == (900, 600)
    channels = len(pixels) // (width * height)
    colours = {pixels[i : i + 3] for i in range(0, len(pixels), channels * 5)}
    assert len(colours) > 20, "the exported PNG looks blank"
    text = svg.read_text(encoding="utf-8")
    assert text.lstrip().startswith("<svg") and "export check" in text
    assert "raises metric" in text  # the legend, with the sign convention, is in the file


def test_show_all_edges_button_reveals_the_hidden_edges(report: Path, tmp_path: Path) -> None:
    """Click the circuit's "all 60 edges" button, as a user would, in a copy of the report."""
    probe = (
        '<script>window.addEventListener("load", function () {'
        ' var g = document.getElementById("ctlens-circuit");'
        ' function hidden() { return g.data.filter(function (t) {'
        '   return t.visible === "legendonly"; }).length; }'
        ' function faded() { var item = Array.from(g.querySelectorAll(".legend .traces"))'
        '   .filter(function (t) { return /weaker edges/.test(t.textContent); })[0];'
        '   return item.style.opacity; }'
        ' var before = hidden(), fadedBefore = faded();'
        ' var buttons = Array.from(g.querySelectorAll(".updatemenu-button"));'
        ' var all = buttons.filter(function (b) { return b.textContent === "all 60 edges"; })[0];'
        ' g.on("plotly_restyle", function () { setTimeout(function () {'
        '   console.log("RESTYLED|" + before + "|" + hidden() + "|" + fadedBefore + "|"'
        '               + faded()); }, 0); });'
        ' all.dispatchEvent(new MouseEvent("click", {bubbles: true}));'
        "});</script></body>"
    )
    page = tmp_path / "clicked.html"
    page.write_text(report.read_text(encoding="utf-8").replace("</body>", probe), "utf-8")
    result = run_browser(page, tmp_path, "--dump-dom", "--enable-logging=stderr", "--v=0")
    lines = console_lines(result.stderr)
    found = re.search(r"RESTYLED\|(\d+)\|(\d+)\|([\d.]*)\|([\d.]*)", lines[0]) \
        if len(lines) == 1 else None
    assert found, lines
    before, after = int(found.group(1)), int(found.group(2))
    assert before >= 2 and after == 0  # hidden edge traces (and their legend entry) shown
    # the legend follows: its "weaker edges" entry was faded (hidden) and is now full
    assert float(found.group(3)) < 1 and float(found.group(4) or 1) == 1


def test_diff_filter_shows_every_edge_that_entered(report: Path, tmp_path: Path) -> None:
    """The diff's "all entered" button, clicked in a copy of the report: the entered edges
    beyond the first strongest appear, the left ones go."""
    probe = (
        '<script>window.addEventListener("load", function () {'
        ' var g = document.getElementById("ctlens-diff");'
        ' function drawn(word) { return g._fullData.filter(function (t) {'
        '   return t.visible === true && t.mode === "lines" && t.name.indexOf(word) === 0; })'
        '   .reduce(function (n, t) { return n + Math.floor(t.x.length / 3); }, 0); }'
        ' var before = [drawn("entered"), drawn("left")];'
        ' var button = Array.from(g.querySelectorAll(".updatemenu-button")).filter(function (b)'
        '   { return b.textContent === "all entered"; })[0];'
        ' g.on("plotly_restyle", function () {'
        '   console.log("FILTERED|" + before.join(",") + "|" + drawn("entered") + ","'
        '               + drawn("left")); });'
        ' button.dispatchEvent(new MouseEvent("click", {bubbles: true}));'
        "});</script></body>"
    )
    page = tmp_path / "filtered.html"
    page.write_text(report.read_text(encoding="utf-8").replace("</body>", probe), "utf-8")
    result = run_browser(page, tmp_path, "--dump-dom", "--enable-logging=stderr", "--v=0")
    lines = console_lines(result.stderr)
    found = re.search(r"FILTERED\|(\d+),(\d+)\|(\d+),(\d+)", lines[0]) \
        if len(lines) == 1 else None
    assert found, lines
    entered_before, left_before, entered_after, left_after = map(int, found.groups())
    assert entered_before == left_before == 20  # the 20 strongest of each, at first
    assert entered_after > 20 and left_after == 0


@pytest.mark.parametrize("click", [True, False])
def test_show_all_choice_survives_the_slider(report: Path, tmp_path: Path, click: bool) -> None:
    """In the evolution figure, "all edges" (or not) still holds after jumping to a frame."""
    press = (' Array.from(g.querySelectorAll(".updatemenu-button")).filter(function (b) {'
             '  return b.textContent === "all edges"; })[0]'
             '  .dispatchEvent(new MouseEvent("click", {bubbles: true}));') if click else ""
    probe = (
        '<script>window.addEventListener("load", function () {'
        ' var g = document.getElementById("ctlens-evolution");'
        ' function hidden() { return g.data.filter(function (t) {'
        '   return t.visible === "legendonly"; }).length; }'
        ' var before = hidden();' + press +
        ' setTimeout(function () { Plotly.animate(g, ["30"], {mode: "immediate",'
        '  frame: {duration: 0, redraw: true}, transition: {duration: 0}}).then(function () {'
        '  console.log("SLID|" + before + "|" + hidden()); }); }, 500);'
        "});</script></body>"
    )
    page = tmp_path / "slid.html"
    page.write_text(report.read_text(encoding="utf-8").replace("</body>", probe), "utf-8")
    result = run_browser(page, tmp_path, "--dump-dom", "--enable-logging=stderr", "--v=0")
    lines = console_lines(result.stderr)
    found = re.search(r"SLID\|(\d+)\|(\d+)", lines[0]) if len(lines) == 1 else None
    assert found, lines
    before, after = int(found.group(1)), int(found.group(2))
    assert before >= 2 and after == (0 if click else before)
