"""The README's troubleshooting quotes real log and error lines: each quoted fragment must be
produced by the code (a renamed message would otherwise leave operators grepping for nothing)."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def source_text():
    return " ".join(" ".join(p.read_text().split()) for p in (ROOT / "attune_sensor").rglob("*.py"))


def quoted_fragments():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Troubleshooting", 1)[1].split("\n## ", 1)[0]
    fragments = []
    for quote in re.findall(r"`([^`]+)`", section):
        quote = " ".join(quote.split())
        # keep the literal parts of messages; upper-case words, "..." and "30s" stand for values
        for part in re.split(r"\.\.\.|\b[A-Z]{1,6}\b|\d+s\b", quote):
            part = part.strip(" '(:")
            if len(part) >= 12 and not part.startswith(("journalctl", "systemctl", "attune-sensor ", "which", "echo")):
                fragments.append(part)
    return fragments


def test_troubleshooting_quotes_real_messages():
    text = source_text()
    fragments = quoted_fragments()
    assert len(fragments) >= 6
    missing = [f for f in fragments if f not in text]
    assert not missing, missing
