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


def yaml_block_keys(text):
    """section.key pairs named in a YAML example, commented-out keys ("  # key: ...") included;
    nested keys (deeper indentation) are not settings."""
    keys, section = set(), None
    for line in text.splitlines():
        scalar = re.match(r"^(?:# )?([a-z_]+): \S", line)
        if scalar:
            keys.add(scalar.group(1))  # a top-level key with a value (packs_base_dir)
            continue
        top = re.match(r"^([a-z_]+):\s*$", line)
        if top:
            section = top.group(1)
            continue
        key = re.match(r"^  (?:# )?([a-z_]+):", line)
        if key and section:
            keys.add(f"{section}.{key.group(1)}")
    return keys


def declared_keys():
    from attune_sensor.config import SCHEMA, TOP_LEVEL

    return {f"{section}.{key}" for section, body in SCHEMA.items() for key in body} | set(TOP_LEVEL)


def test_the_readme_example_names_every_config_key():
    readme = (ROOT / "README.md").read_text()
    block = readme.split("## Configuration", 1)[1].split("```yaml", 1)[1].split("```", 1)[0]
    assert declared_keys() - yaml_block_keys(block) == set()


def test_the_shipped_config_names_every_key():
    shipped = (ROOT / "packaging" / "config.yaml").read_text()
    assert declared_keys() - yaml_block_keys(shipped) == set()


COMMANDS = (("run",), ("migrate", "run"), ("migrate", "info"), ("workers",), ("check",), ("metrics",), ("place",),
            ("rebalance",), ("unplace",), ("sync",), ("assignments",), ("config",))
GLOBAL = {"--help", "--config", "--instance"}  # every command takes them; the top-level lines document them


def help_options(*command):
    """The long options `attune-sensor COMMAND --help` lists (the real program)."""
    from support import run_cli

    result = run_cli(*command, "--help")
    assert result.returncode == 0, result.stderr
    options = result.stdout.split("\noptions:", 1)[1]
    return set(re.findall(r"^\s+(?:-\w, )?(--[a-z][a-z-]*)", options, re.M))


def readme_rows():
    """command -> the long options its row of the README's command table names."""
    section = (ROOT / "README.md").read_text().split("## Commands", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cell = re.split(r"(?<!\\)\|", line)[1] if line.startswith("| `") else ""  # \| is a pipe inside a cell
        if cell.strip().startswith("`attune-sensor"):
            words = tuple(w for w in re.findall(r"(?<![-\w])[a-z]+(?![-\w])", cell.split("[", 1)[0])
                          if w not in ("attune", "sensor"))
            rows[words or ("",)] = set(re.findall(r"--[a-z][a-z-]*", cell))
    return rows


def man_entries():
    """command -> the long options its entry under COMMANDS in the man page names; "" the
    SYNOPSIS and OPTIONS."""
    text = (ROOT / "docs" / "attune-sensor.1").read_text().replace("\\-", "-")
    entries = {("",): set(re.findall(r"--[a-z][a-z-]*", text.split(".SH SYNOPSIS", 1)[1].split(".SH COMMANDS", 1)[0]))}
    commands = text.split(".SH COMMANDS", 1)[1].split("\n.SH ", 1)[0]
    for head in re.findall(r"^\.TP\n\.B (.*)$", commands, re.M):
        plain = re.sub(r"\\f[BIR]", "", head)
        words = tuple(re.findall(r"(?<![-\w])[a-z]+(?![-\w])", plain.split("[", 1)[0].split(" SENSOR_REF")[0]))
        entries[words] = set(re.findall(r"--[a-z][a-z-]*", plain))
    return entries


def test_the_readme_and_the_man_page_say_what_help_says():
    top = help_options() - {"--help"}
    for name, documented in (("README", readme_rows()), ("man page", man_entries())):
        assert set(COMMANDS) | {("",)} == set(documented), (name, sorted(documented))
        assert documented[("",)] >= top, (name, top - documented[("",)])
        for command in COMMANDS:
            expected = help_options(*command) - GLOBAL
            assert documented[command] == expected, (name, command, expected ^ documented[command])
