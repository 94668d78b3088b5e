"""The documentation: the README stays a short front door whose links resolve, the mkdocs site builds
in strict mode (broken links, missing pages and bad anchors fail it), and the site's glossary page is
the library's."""

import os
import re
import subprocess
import sys
import unicodedata
from pathlib import Path

from pogdiff.glossary import evaluated_metrics, glossary_markdown
from tests.faults.report import render

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
GLOSSARY_PAGE = DOCS / "evaluation.md"
FAULTS_PAGE = DOCS / "reliability.md"
# what the glossary page's "Metrics glossary" shows: the default evaluation's metrics (held-out ones
# included) and the other Fréchet features
GLOSSARY_METRICS = (*evaluated_metrics("pixels", 16, holdout=True), "frechet_dinov2", "frechet_clip")
QUICKSTART = ["python3 run.py demo", "python3 run.py test"]
README_MAX_LINES = 250

_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
_FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading (where the README's links are followed): markup and punctuation
    dropped, lower case, each space a hyphen."""
    text = re.sub(r"[`*_]|!?\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    text = "".join(c for c in unicodedata.normalize("NFC", text) if c.isalnum() or c in " -_")
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = _FENCE.sub("", path.read_text(encoding="utf-8"))
    return {_slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, re.M)}


def _section(text: str, heading: str) -> str:
    match = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert match, f"README has no section {heading!r}"
    return match.group(1)


def test_the_readme_is_short_and_its_quickstart_has_the_two_commands():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= README_MAX_LINES
    block = re.search(r"^```\n(.*?)^```", _section(text, "Quickstart"), re.S | re.M)
    assert block and block.group(1).splitlines() == QUICKSTART


def test_every_relative_link_of_the_readme_resolves():
    text = _FENCE.sub("", README.read_text(encoding="utf-8"))
    targets = [t for t in _LINK.findall(text) if not re.match(r"[a-z][a-z0-9+.-]*:", t)]
    assert any(t.startswith("docs/") for t in targets)  # the parser found the links it is meant to check
    broken = []
    for target in targets:
        path, _, anchor = target.partition("#")
        file = (README.parent / path).resolve() if path else README
        if not file.is_file() or not file.is_relative_to(ROOT):
            broken.append(f"{target}: no file {path}")
        elif anchor and anchor not in _anchors(file):
            broken.append(f"{target}: no heading #{anchor} in {path or 'README.md'}")
    assert not broken, "\n".join(broken)


def test_the_site_builds_in_strict_mode(tmp_path):
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}  # material's notice about mkdocs 2 is not ours
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "site" / "evaluation" / "index.html").is_file()
    assert not (tmp_path / "site" / "screenshot.py").exists()  # docs/screenshot.py is a tool, not a page


def test_the_glossary_page_is_the_librarys():
    assert glossary_markdown(GLOSSARY_METRICS) in GLOSSARY_PAGE.read_text(encoding="utf-8")


def test_the_fault_table_is_in_the_shape_the_fault_report_writes():
    """docs/reliability.md's "The faults tried" is pasted from ``python -m tests.faults.report``."""
    section = re.search(r"^## The faults tried\n(.*?)(?=^## |\Z)", FAULTS_PAGE.read_text(encoding="utf-8"), re.S | re.M)
    assert section, "docs/reliability.md has no section 'The faults tried'"
    table = "".join(line + "\n" for line in section.group(1).splitlines() if line.startswith("|"))
    rows = [dict(zip(("fault", "stage", "outcome"), line[2:-2].split(" | ", 2))) for line in table.splitlines()[2:]]
    assert len(rows) >= 20 and render(rows) == table


def test_the_docs_name_no_path_of_this_machine():
    home = str(Path.home())
    for page in [README, *sorted(DOCS.glob("*.md"))]:
        text = page.read_text(encoding="utf-8")
        assert str(ROOT) not in text, f"{page.name} names the checkout's absolute path"
        assert home in ("/", "") or f"{home}/" not in text, f"{page.name} names the home folder {home}"
