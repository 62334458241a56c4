"""Fenced code blocks of README.md and docs/*.md marked runnable, and how to run one as a user would.

The marker is an HTML comment on the line directly above the opening fence:

    <!-- runnable -->           run against a cluster (tests/e2e/test_docs_snippets.py starts one)
    <!-- runnable: cluster -->  the same, spelled out
    <!-- runnable: offline -->  needs no cluster (the offline engine, config checks)

The fence's language picks the runner: bash / sh / shell / console (or none) go through bash, python
/ py is written to a script file and run with the venv's python. Every run has the repository root
as its working directory and the venv's bin first on PATH, as after `make demo`.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOCS = (REPO / "README.md", *sorted((REPO / "docs").glob("*.md")))
MARKER = re.compile(r"^<!--\s*runnable(?::\s*(?P<kind>[\w-]+))?\s*-->\s*$")
FENCE = re.compile(r"^(?P<fence>```+|~~~+)\s*(?P<lang>[\w+-]*)")
KINDS = ("cluster", "offline")
SHELLS = ("", "bash", "sh", "shell", "console")
PYTHONS = ("python", "py", "python3")


@dataclass(frozen=True, slots=True)
class Snippet:
    file: Path
    line: int  # 1-based line of the opening fence
    kind: str  # one of KINDS
    lang: str
    code: str

    @property
    def name(self) -> str:
        return f"{self.file.relative_to(REPO)}:{self.line}"


def extract(path: Path) -> list[Snippet]:
    """Every runnable block of one Markdown file; a bad marker or language raises ValueError."""
    lines = path.read_text(encoding="utf-8").splitlines()
    out: list[Snippet] = []
    for i, line in enumerate(lines):
        mark = MARKER.match(line.strip())
        if mark is None:
            continue
        kind = mark.group("kind") or "cluster"
        fence = FENCE.match(lines[i + 1]) if i + 1 < len(lines) else None
        if kind not in KINDS or fence is None:
            raise ValueError(f"{path}:{i + 1}: a runnable marker needs one of {KINDS} and a fence "
                             "on the next line")
        lang = fence.group("lang").lower()
        if lang not in SHELLS + PYTHONS:
            raise ValueError(f"{path}:{i + 2}: no runner for a {lang!r} block")
        end = next(j for j in range(i + 2, len(lines)) if lines[j].startswith(fence.group("fence")))
        out.append(Snippet(path, i + 2, kind, lang, "\n".join(lines[i + 2:end]) + "\n"))
    return out


def all_snippets() -> list[Snippet]:
    return [s for path in DOCS for s in extract(path)]


def user_env(**extra: str) -> dict[str, str]:
    """The environment of a user who ran `make demo`: the venv's bin first on PATH."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PDSERVE_ADDRESS")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


def run(snippet: Snippet, env: dict[str, str], scratch: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    if snippet.lang in PYTHONS:
        script = scratch / f"snippet_{snippet.line}.py"
        script.write_text(snippet.code)
        cmd = [sys.executable, str(script)]
    else:
        cmd = ["bash", "-e", "-o", "pipefail", "-c", snippet.code]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
