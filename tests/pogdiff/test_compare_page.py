"""The comparison page: self-contained (nothing to load), deltas signed by each metric's direction."""

import base64
import re
from html.parser import HTMLParser

from pogdiff.compare_page import Side, comparison_rows, direction, render

A = {"few/grecall": 0.2, "overall/grecall": 0.5, "overall/frechet_pixels16": 30.0, "train/loss": 0.3}
B = {"few/grecall": 0.5, "overall/grecall": 0.5, "overall/frechet_pixels16": 25.0}
PNG_A, PNG_B = b"\x89PNG a-few", b"\x89PNG b-few"


class _Page(HTMLParser):
    """Every attribute that makes a browser fetch something, and the table's rows as text."""

    def __init__(self):
        super().__init__()
        self.sources, self.links, self.rows, self._row = [], [], [], None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag in ("img", "script", "iframe", "source", "video", "audio", "embed") or (tag == "link" and attrs.get("rel") != "alternate"):
            self.sources.append((tag, attrs.get("src") or attrs.get("href")))
        if tag == "a":
            self.links.append(attrs["href"])
        if tag == "tr":
            self._row = []

    def handle_data(self, data):
        if self._row is not None and data.strip():
            self._row.append(data.strip())

    def handle_endtag(self, tag):
        if tag == "tr":
            self.rows.append(self._row)
            self._row = None


def test_page_inlines_the_grids_and_signs_deltas_by_direction():
    a = Side("model v1 <champion>", "run aaa", A, {"few": PNG_A, "many": b"\x89PNG a-many"}, link="http://mlflow.example/#/runs/aaa")
    b = Side("model v2", "run bbb", B, {"few": PNG_B})
    page = render("v1 against v2", a, b)
    parsed = _Page()
    parsed.feed(page)
    # nothing is fetched when the page opens: both pictures are data: URIs of exactly the logged bytes
    assert [tag for tag, _ in parsed.sources] == ["img", "img", "img"]
    images = [base64.b64decode(src.removeprefix("data:image/png;base64,")) for _, src in parsed.sources]
    assert images == [b"\x89PNG a-many", PNG_A, PNG_B]  # many (A only), then few: A beside B
    assert all(src.startswith("data:image/png;base64,") for _, src in parsed.sources)
    assert "no grid_many.png in this run" in page  # B has no many grid
    assert parsed.links == ["http://mlflow.example/#/runs/aaa"]  # a link to follow, not a resource to load
    assert "model v1 &lt;champion&gt;" in page and "<champion>" not in page
    assert not re.search(r"url\(|@import", page)
    # the table: bucket, metric, direction, A, B, B - A, which side is better
    assert ["few", "grecall", "higher", "0.2000", "0.5000", "+0.3000", "B"] in parsed.rows
    assert ["overall", "frechet_pixels16", "lower", "30.0000", "25.0000", "-5.0000", "B"] in parsed.rows
    assert ["overall", "grecall", "higher", "0.5000", "0.5000", "+0.0000", "="] in parsed.rows
    assert not any("loss" in row for row in parsed.rows)


def test_rows_have_deltas_and_know_that_a_lower_frechet_distance_is_better():
    old = {**A, "few/frechet_pixels16": 40.0, "many/grecall": 0.8}
    new = {**B, "many/grecall": 0.8, "few/accuracy": 0.9}
    rows = {(r["bucket"], r["metric"]): r for r in comparison_rows(old, new)}
    # bucket metrics only (train/loss is not one), in bucket then display order
    assert list(rows)[:4] == [("many", "grecall"), ("few", "grecall"), ("few", "accuracy"), ("few", "frechet_pixels16")]
    assert rows[("few", "grecall")] == {"bucket": "few", "metric": "grecall", "a": 0.2, "b": 0.5,
                                        "delta": 0.3, "better": "B"}
    assert rows[("many", "grecall")]["better"] == "="
    assert rows[("overall", "frechet_pixels16")]["delta"] == -5.0 and rows[("overall", "frechet_pixels16")]["better"] == "B"
    assert rows[("few", "frechet_pixels16")] == {"bucket": "few", "metric": "frechet_pixels16", "a": 40.0, "b": None, "delta": None, "better": None}
    assert rows[("few", "accuracy")]["a"] is None
    assert comparison_rows(new, old)[1]["better"] == "A"  # few/grecall, seen the other way round
    assert (direction("frechet_pixels16"), direction("grecall")) == ("lower", "higher")
