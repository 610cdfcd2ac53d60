"""Documentation the project points at exists: a config, comment or page that cites a page
(docs/*.md, README.md) sends the reader to a file in this repository."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CITATION = re.compile(r"(?<![\w./-])((?:docs/)?[A-Z][A-Z0-9_]*\.md)\b")  # e.g. README.md, docs/CHAT.md


def _sources() -> list[Path]:
    files = [ROOT / "README.md", ROOT / ".ci" / "run", *ROOT.glob("*.py"), *(ROOT / "docs").glob("*.md")]
    for folder, pattern in (("conf", "*.yaml"), ("minigpt4", "*.py"), ("tests", "*.py"), ("bench", "*")):
        files += [p for p in (ROOT / folder).rglob(pattern) if p.is_file() and p.suffix in (".py", ".yaml", ".sh", "")]
    return files


def test_every_cited_markdown_file_exists():
    missing = []
    for source in _sources():
        for name in set(CITATION.findall(source.read_text(encoding="utf-8", errors="replace"))):
            if not any(p.is_file() for p in (ROOT / name, ROOT / "docs" / name, source.parent / name)):
                missing.append(f"{source.relative_to(ROOT)} cites {name}")
    assert not missing, missing
