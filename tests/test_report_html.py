"""The HTML report: one self-contained, well-formed page with the DAG, the wide table, bar
charts only where they say something, a curve or heat map per sweep family with the best
member marked -- and it renders in headless Chromium (skipped where Chromium is absent)."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import tempfile
import xml.etree.ElementTree as ET
import zlib
from pathlib import Path

import pytest
from test_report_table import cli, col, doc_of, ran  # noqa: F401 (ran: the fixture)

from weightflow.dsl.present import html

NS = {"h": "http://www.w3.org/1999/xhtml", "s": "http://www.w3.org/2000/svg"}
CHROMIUM = Path("/usr/bin/chromium")


def parse(page: str) -> ET.Element:
    return ET.fromstring(page.split("\n", 1)[1])  # well-formed XML once the doctype is off


def svgs(root: ET.Element, cls: str) -> list[ET.Element]:
    return [s for s in root.iter(f"{{{NS['s']}}}svg") if cls in (s.get("class") or "").split()]


def test_page_of_a_real_run_is_self_contained_with_dag_table_and_selected_charts(ran, tmp_path):  # noqa: F811
    path, store, _ = ran
    rc, _, err = cli("report", path, "--cache-dir", store, "--out", tmp_path)
    assert rc == 0, err
    page = (tmp_path / "pipeline.report.html").read_text()
    root = parse(page)
    # offline: nothing to fetch, nothing to run
    assert "<script" not in page and "<link" not in page and "@import" not in page
    assert not [a for el in root.iter() for k, a in el.attrib.items() if k in ("src", "href") and "://" in a]
    (dag,) = svgs(root, "dag")
    nodes = [t.text for g in dag.iter(f"{{{NS['s']}}}g") for t in g.findall("s:text", NS)][::2]
    assert nodes == ["base", "ft", "d", "half", "full", "pruned", "scores"]
    edges = dag.findall("s:path", NS)
    assert len(edges) == 2 + 2 * 2 + 1 + 5  # d <- ft, base; half/full <- base, d; pruned <- full; scores <- 5
    # nodes are laid out left to right by depth
    x = {t.text: float(t.get("x")) for g in dag.iter(f"{{{NS['s']}}}g") for t in g.findall("s:text", NS)[:1]}
    assert x["base"] == x["ft"] < x["d"] < x["half"] == x["full"] < x["pruned"] < x["scores"]

    (wide,) = [t for t in root.iter(f"{{{NS['h']}}}table") if t.get("class") == "wide"]
    head = [th.text for th in wide.iter(f"{{{NS['h']}}}th")]
    assert head[:2] == ["step", "op"] and "job: acc ↑" in head and head[-1] == "time"
    classes = [tr.get("class") for tr in wide.find("h:tbody", NS)]
    assert classes == ["baseline", "baseline", None, None, None, "chance"]
    # bars: one chart per charted column, one bar per model; baselines grey; chance drawn
    bars = svgs(root, "bar")
    titles = [s.get("aria-label") for s in bars]
    assert "job: acc ↑" in titles and "sparsity" in titles and "delta_norm: l2" in titles
    job = bars[titles.index("job: acc ↑")]
    rects = job.findall("s:rect", NS)
    assert len(rects) == 5 and [r.get("fill") for r in rects[:2]] == ["#a0a0a0", "#a0a0a0"]
    assert any((t.text or "") == "chance 0.5000" for t in job.findall("s:text", NS))
    assert len(svgs(root, "bar")) < len(head) - 2  # not every column: counts and flat ones are not charted


def _family_doc():
    names = ["base"] + [f"ta@lambda={x}" for x in (0.2, 0.5, 0.8)] + \
        [f"m@lambda={a},density={d}" for a in (0.3, 0.6) for d in (0.2, 0.5, 0.9)]

    def acc(n: str) -> float:
        if n == "base":
            return 0.5
        lam = float(n.split("lambda=")[1].split(",")[0])
        dens = float(n.split("density=")[1]) if "density" in n else 0.5
        return round(0.9 - abs(lam - 0.5) - abs(dens - 0.5) / 4, 4)

    metrics = [{"label": "job", "metric": "accuracy", "params": {"labels": ["neg", "pos"]},
                "columns": [col("acc", "higher")]},
               {"label": "ppl", "metric": "perplexity", "params": {}, "columns": [col("token_perplexity", "lower")]}]
    values = [[{"acc": acc(n)}, {"token_perplexity": 20 - 10 * acc(n)}] for n in names]
    return names, doc_of(names, metrics, values, {"base": "load"})


def test_families_draw_a_curve_or_a_heat_map_per_column_with_the_best_marked():
    names, doc = _family_doc()
    root = parse(html.page("sweep", [doc], {"nodes": [("base", "load", "Model")], "edges": [], "seconds": 1.0}))
    curves = svgs(root, "curve")
    assert [c.get("aria-label") for c in curves] == ["job: acc ↑ against lambda",
                                                     "ppl: token_perplexity ↓ against lambda"]
    acc_curve = curves[0]
    points = acc_curve.findall("s:circle", NS)
    assert len([p for p in points if p.get("class") != "best"]) == 3
    (ring,) = [p for p in points if p.get("class") == "best"]
    best_point = next(p for p in points if p.get("cx") == ring.get("cx") and p.get("class") != "best")
    assert "lambda=0.5" in best_point.find("s:title", NS).text
    # the baseline and chance are reference lines on the curve
    labels = [t.text for t in acc_curve.findall("s:text", NS)]
    assert "base" in labels and "chance" in labels
    heats = svgs(root, "heat")
    assert len(heats) == 2
    cells = [r for r in heats[0].findall("s:rect", NS) if r.find("s:title", NS) is not None]
    assert len(cells) == 6
    (best,) = [r for r in heats[0].findall("s:rect", NS) if r.get("class") == "best"]
    best_cell = next(c for c in cells if c.get("x") == f"{float(best.get('x')) - 1.5:.1f}"
                     and float(c.get("y")) == float(best.get("y")) - 1.5)
    assert best_cell.find("s:title", NS).text.startswith("lambda=0.6, density=0.5")
    # darker is better: the best accuracy cell is the darkest
    fills = {c.get("fill"): c for c in cells}
    darkest = min(fills, key=lambda f: sum(int(f[k:k + 2], 16) for k in (1, 3, 5)))
    assert fills[darkest] is best_cell
    heads = ["".join(h.itertext()) for h in root.iter(f"{{{NS['h']}}}h3")]
    assert "Sweep ta@*: 3 members over lambda" in heads and "Sweep m@*: 6 members over lambda × density" in heads


# -- headless Chromium -------------------------------------------------------------------------

def png_pixels(data: bytes) -> tuple[int, int, list[bytes]]:
    """Decode an 8-bit RGB/RGBA PNG (what Chromium writes) into rows of raw pixels."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, width = 8, b"", 0
    while pos < len(data):
        (length,), kind = struct.unpack(">I", data[pos:pos + 4]), data[pos + 4:pos + 8]
        body = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            width, height, depth, colour = struct.unpack(">IIBB", body[:10])
            assert depth == 8 and colour in (2, 6), (depth, colour)
            bpp = 3 if colour == 2 else 4
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    raw = zlib.decompress(idat)
    stride = width * bpp
    rows, prev = [], bytearray(stride)
    for y in range(height):
        f, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - bpp] if i >= bpp else 0
            b, c = prev[i], prev[i - bpp] if i >= bpp else 0
            if f == 1:
                line[i] = (line[i] + a) & 255
            elif f == 2:
                line[i] = (line[i] + b) & 255
            elif f == 3:
                line[i] = (line[i] + (a + b) // 2) & 255
            elif f == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        rows.append(bytes(line))
        prev = line
    return width, height, [bytes(r[k:k + 3]) for r in rows for k in range(0, stride, bpp)]


def chromium(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    profile = tempfile.mkdtemp(prefix="wf-chromium-")
    try:
        return subprocess.run([str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                               "--no-first-run", "--disable-background-networking", "--disable-component-update",
                               "--disable-sync", f"--user-data-dir={profile}", *args],
                              capture_output=True, text=True, timeout=timeout)
    finally:
        shutil.rmtree(profile, ignore_errors=True)


def test_report_renders_in_headless_chromium(ran, tmp_path):  # noqa: F811
    if not CHROMIUM.exists():
        pytest.skip("no /usr/bin/chromium (Debian: apt-get install chromium) to render the page")
    path, store, _ = ran
    rc, _, err = cli("report", path, "--cache-dir", store, "--out", tmp_path)
    assert rc == 0, err
    page = (tmp_path / "pipeline.report.html").resolve()
    png = Path(os.environ.get("WEIGHTFLOW_REPORT_PNG") or tmp_path / "report.png")
    res = chromium(f"--screenshot={png}", "--window-size=1400,2000", page.as_uri())
    assert png.is_file(), res.stderr[-2000:]
    width, height, pixels = png_pixels(png.read_bytes())
    assert (width, height) == (1400, 2000)
    colours = set(pixels[::7])
    # white page, grey text and baseline bars, the palette's bars, the DAG's fills: not a blank page
    assert len(colours) > 20, len(colours)
    assert sum(p != b"\xff\xff\xff" for p in pixels) > 0.03 * len(pixels)
    dom = chromium("--dump-dom", page.as_uri()).stdout
    assert '<table class="wide">' in dom and "load (baseline)" in dom and "job: acc ↑" in dom
