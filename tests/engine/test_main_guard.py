"""A TP LLM built at a script's module level without the main guard fails at once, saying why."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

from deploy.config import DEFAULT_MODEL_DIR
from engine.main_guard import GUARD_MESSAGE, _inside_main_guard

ROOT = Path(__file__).resolve().parents[2]


def _lines_guarded(tmp_path: Path, source: str) -> list[bool]:
    path = tmp_path / "script.py"
    path.write_text(textwrap.dedent(source))
    n = len(path.read_text().splitlines())
    return [_inside_main_guard(str(path), line) for line in range(1, n + 1)]


def test_guard_detection(tmp_path: Path) -> None:
    source = """\
        x = 1
        if __name__ == "__main__":
            a = 2
            b = 3
        if "__main__" == __name__:
            c = 4
        if __name__ != "__main__":
            d = 5
        try:
            if __name__ == "__main__":
                e = 6
        except Exception:
            pass
        """
    assert _lines_guarded(tmp_path, source) == [
        False, False, True, True, False, True, False, False, False, False, True, False, False,
    ]


def test_unreadable_script_counts_as_guarded(tmp_path: Path) -> None:
    assert _inside_main_guard(str(tmp_path / "missing.py"), 3)
    (tmp_path / "bad.py").write_text("def (:\n")
    assert _inside_main_guard(str(tmp_path / "bad.py"), 1)


def test_unguarded_script_fails_at_once(tmp_path: Path) -> None:
    script = tmp_path / "unguarded.py"
    script.write_text(textwrap.dedent(f"""\
        import time
        from engine import LLM

        start = time.monotonic()
        try:
            llm = LLM({DEFAULT_MODEL_DIR!r}, tensor_parallel_size=2)
        finally:
            print(f"elapsed {{time.monotonic() - start:.3f}}", flush=True)
        print("built", flush=True)
        """))
    began = time.monotonic()
    proc = subprocess.run([sys.executable, str(script)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    wall = time.monotonic() - began
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert "built" not in proc.stdout
    assert 'if __name__ == "__main__":' in proc.stderr and "line 6 is not guarded" in proc.stderr
    assert GUARD_MESSAGE in proc.stderr
    elapsed = float(proc.stdout.split("elapsed ")[1].split()[0])
    assert elapsed < 2.0, (elapsed, wall)  # before: 120 s wait, or a rank that died in bootstrap
    assert "bootstrapping phase" not in proc.stderr  # no rank was started
