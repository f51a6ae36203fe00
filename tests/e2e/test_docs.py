"""The docs: the site builds with ``mkdocs build --strict`` (every link and anchor resolves),
and every Python sample in the README and the docs runs."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SAMPLE = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)


def _samples() -> list[tuple[str, str]]:
    found = []
    for page in PAGES:
        for number, match in enumerate(SAMPLE.finditer(page.read_text()), 1):
            found.append((f"{page.relative_to(ROOT)}#{number}", match.group(1)))
    return found


def test_the_site_builds_strict(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={"NO_MKDOCS_2_WARNING": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "site" / "metrics" / "index.html").is_file()


def test_the_readme_fits_a_first_read() -> None:
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 300, len(lines)
    assert len((ROOT / "BENCHMARKS.md").read_bytes()) <= 12_500


@pytest.mark.parametrize(("where", "code"), _samples(), ids=[w for w, _ in _samples()])
def test_every_python_sample_runs(where: str, code: str, tmp_path: Path) -> None:
    """Each sample is a whole program: it runs as written, in a directory of its own."""
    script = tmp_path / "sample.py"
    script.write_text(code)
    done = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, f"{where}:\n{done.stdout}{done.stderr}"


def _slug(heading: str) -> str:
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


@pytest.mark.parametrize("page", ["README.md", "CONTRIBUTING.md", "BENCHMARKS.md"])
def test_the_root_pages_links_resolve(page: str) -> None:
    """The pages outside the site (GitHub renders them): every relative link names a file
    that exists, and its anchor a heading of it."""
    text = (ROOT / page).read_text()
    links = re.findall(r"\]\(([^)#\s]+)(?:#([^)\s]+))?\)", text)
    assert links or page != "README.md", page
    for path, anchor in links:
        if path.startswith(("http://", "https://")):
            continue
        target = ROOT / path
        assert target.exists(), f"{page}: {path}"
        if anchor:
            headings = re.findall(r"^#+ (.*)$", target.read_text(), re.MULTILINE)
            assert anchor in {_slug(h) for h in headings}, f"{page}: {path}#{anchor}"
