"""Regenerate the command output in docs/faq.md and docs/compare.md.

Every ```console block on these pages lists `$ nvfree …` commands (a trailing backslash continues
a command on the next line); the lines after each command, up to the next command or the end of
the block, are that command's output at COLUMNS columns. This script reruns every command and
writes its output back; `--check` only reports the pages that disagree (exit 1).
tests/docs/test_generated_pages.py runs the same check.

    python scripts/gen_docs.py [--check]
"""

import argparse
import contextlib
import io
import os
import re
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGES = ("docs/faq.md", "docs/compare.md")
COLUMNS = 110
"""Terminal width the outputs are rendered at."""
BLOCK = re.compile(r"(```console\n)(.*?)(```)", re.S)


def split_commands(body: str) -> list[tuple[list[str], list[str]]]:
    """(command lines as written, output lines) for each `$ nvfree` command of a block."""
    groups: list[tuple[list[str], list[str]]] = []
    continuing = False
    for line in body.splitlines():
        if line.startswith("$ ") or continuing:
            if not continuing:
                groups.append(([], []))
            groups[-1][0].append(line)
            continuing = line.endswith("\\")
        elif groups:
            groups[-1][1].append(line)
    return groups


def argv_of(command_lines: list[str]) -> list[str]:
    """The arguments after `nvfree` of a command as written."""
    text = " ".join(line.rstrip("\\").strip() for line in command_lines)
    words = shlex.split(text.removeprefix("$ "))
    if not words or words[0] != "nvfree":
        raise ValueError(f"not an nvfree command: {text}")
    return words[1:]


def run(argv: list[str]) -> str:
    """What `nvfree ARGV` prints at COLUMNS columns (in this process; stderr included)."""
    from estimator.cli.app import main

    os.environ["COLUMNS"] = str(COLUMNS)
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out), \
            contextlib.suppress(SystemExit):
        main(argv)
    return "\n".join(line.rstrip() for line in out.getvalue().rstrip().splitlines())


def regenerate(text: str) -> str:
    """The page with every command's output rerun."""

    def block(match: re.Match) -> str:
        parts = []
        for command, _ in split_commands(match.group(2)):
            parts.append("\n".join(command))
            output = run(argv_of(command))
            if output:
                parts.append(output)
        return match.group(1) + "\n".join(parts) + "\n" + match.group(3)

    return BLOCK.sub(block, text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="report, do not write")
    args = parser.parse_args()
    stale = []
    for page in PAGES:
        path = ROOT / page
        text = path.read_text()
        new = regenerate(text)
        if new != text:
            stale.append(page)
            if not args.check:
                path.write_text(new)
    if stale:
        print(("stale: " if args.check else "regenerated: ") + ", ".join(stale))  # noqa: T201
    return 1 if stale and args.check else 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
