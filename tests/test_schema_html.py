"""`plan.to_html()` and `autoshard plan --html` (`schema/html.py`): one self-contained page whose
content is the plan's — every parameter's placement, every collective count, the report's memory
figures — and that fetches nothing."""

from __future__ import annotations

import re
import shutil
from collections import Counter
from html.parser import HTMLParser

import pytest

from autoshard.__main__ import main
from autoshard.schema.plan import Plan
from autoshard.schema.units import format_bytes


class _Page(HTMLParser):
    """Every element's attributes, and the text inside elements carrying a data-memory / data-time key."""

    def __init__(self):
        super().__init__()
        self.elements: list[tuple[str, dict]] = []
        self.figures: dict[str, str] = {}
        self._key = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.elements.append((tag, a))
        self._key = ("memory:" + a["data-memory"]) if "data-memory" in a else ("time:" + a["data-time"]) if "data-time" in a else None

    def handle_data(self, data):
        if self._key:
            self.figures[self._key] = self.figures.get(self._key, "") + data
            self._key = None


def _parse(text: str) -> _Page:
    page = _Page()
    page.feed(text)
    return page


def _check_against_plan(text: str, plan: Plan) -> None:
    page = _parse(text)
    rows = {a["data-fqn"]: a["data-placement"] for tag, a in page.elements if tag == "tr" and "data-fqn" in a}
    assert rows == {f: p.placement for f, p in plan.params.items()}          # every parameter, its placement
    counts = {a["data-collective"]: int(a["data-count"]) for tag, a in page.elements if tag == "tr" and "data-count" in a}
    assert counts == dict(Counter(b.collective for b in plan.boundaries if b.collective))
    m = plan.estimate["memory_bytes"]
    for key in ("total", "params", "grads", "optimizer", "activations"):   # the report's own figures
        assert format_bytes(m[key]) in page.figures[f"memory:{key}"], (key, page.figures.get(f"memory:{key}"))
        assert format_bytes(m[key]) in plan.report()
    assert page.figures["memory:total"] == format_bytes(m["total"])
    t = plan.estimate["time_s"]
    assert page.figures["time:total"] == f"{t['total'] * 1e3:.3f} ms" and page.figures["time:compute"] == f"{t['compute'] * 1e3:.3f} ms"
    # self-contained: no attribute or CSS pulls another resource (the SVG namespace is not a fetch)
    for tag, a in page.elements:
        assert "src" not in a and "href" not in a, (tag, a)
        assert not any(k == "xmlns" and v != "http://www.w3.org/2000/svg" for k, v in a.items())
    assert "url(" not in text and "<script" not in text and "@import" not in text
    assert plan.fingerprint in text


def test_tiny_plan_page(tmp_path, capsys):
    out, js = tmp_path / "tiny.html", tmp_path / "tiny.json"
    assert main(["plan", "--config", "tiny-llama", "--mesh", "tp=2", "--seq", "16", "--quiet",
                 "--html", str(out), "--json", str(js)]) == 0
    plan = Plan.from_json(js.read_text())
    text = out.read_text()
    _check_against_plan(text, plan)
    page = _parse(text)
    drawn = [a.get("data-fqn") or a.get("data-collective") for tag, a in page.elements
             if tag == "g" and ("data-fqn" in a or "data-collective" in a)]
    # one layer in dataflow order, with its collectives where they run
    layer = [d for d in drawn if d.startswith("model.layers.") or d in ("all_gather", "reduce_scatter", "all_reduce")]
    assert "model.layers.1.self_attn.q_proj.weight" not in drawn                      # folded: one layer drawn
    assert drawn.index("model.layers.0.input_layernorm.weight") < drawn.index("model.layers.0.self_attn.q_proj.weight")
    assert drawn.index("model.layers.0.self_attn.o_proj.weight") < drawn.index("model.layers.0.mlp.gate_proj.weight")
    assert layer.count("all_gather") >= 2 and "x 2)" in text


def test_70b_and_mixtral_pages_one_per_mesh(tmp_path, capsys):
    out, js = tmp_path / "p.html", tmp_path / "p.json"
    assert main(["plan", "--config", "llama-3.1-70b", "--mesh", "tp=8", "--mesh", "tp=4", "--seq", "1024", "--quiet",
                 "--html", str(out), "--json", str(js)]) == 0
    for mesh in ("tp8", "tp4"):
        plan = Plan.from_json((tmp_path / f"p-{mesh}.json").read_text())
        text = (tmp_path / f"p-{mesh}.html").read_text()
        _check_against_plan(text, plan)
        assert "x 80)" in text and "model.layers.*.input_layernorm.weight" in text   # 80 layers folded
    assert main(["plan", "--config", "tiny-mixtral", "--mesh", "tp=2", "--seq", "16", "--quiet",
                 "--html", str(out), "--json", str(js)]) == 0
    text = out.read_text()
    _check_against_plan(text, Plan.from_json(js.read_text()))
    assert 'data-kind="strided-fused"' in text and 'data-kind="expert-split"' in text   # the legend holds what the plan has


def test_page_renders_in_a_headless_browser(tmp_path, capsys):
    browser = next((b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)
    if browser is None:
        pytest.skip("no Chromium installed (apt install chromium): the page is not rendered; its content is checked above")
    import subprocess

    out = tmp_path / "tiny.html"
    assert main(["plan", "--config", "tiny-llama", "--mesh", "tp=2", "--seq", "16", "--quiet", "--html", str(out)]) == 0
    shot = tmp_path / "shot.png"
    subprocess.run([browser, "--headless", "--disable-gpu", f"--screenshot={shot}", "--window-size=1400,900", out.as_uri()],
                   check=True, timeout=120, capture_output=True)
    assert shot.stat().st_size > 10_000 and re.match(rb"\x89PNG", shot.read_bytes()[:4])
