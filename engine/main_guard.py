"""Fail fast when a TP ``LLM`` would re-run the user's script in every spawned rank.

torch.multiprocessing's spawn starts each rank by re-running the parent's ``__main__`` file (as
``__mp_main__``). A script that builds ``LLM(tensor_parallel_size > 1)`` at module level without
``if __name__ == "__main__":`` would make every child build one too; multiprocessing refuses that
("bootstrapping phase") and the parent used to wait for ranks that never start. So, before any
process starts, the parent finds the module-level line of ``__main__`` that led to this call and
checks that it sits inside such a guard; a spawn child that gets here anyway refuses at once.
"""

from __future__ import annotations

import ast
import multiprocessing.process
import sys
from types import FrameType

GUARD_MESSAGE = (
    "engine.LLM(tensor_parallel_size > 1) starts its ranks with multiprocessing's spawn, which "
    "re-runs your script's module-level code in every rank. Create the LLM under "
    "`if __name__ == \"__main__\":` (or in a function called from there)"
)


def check_spawn_safe() -> None:
    """Raise RuntimeError when spawning TP ranks now would re-run this call in each of them."""
    if getattr(multiprocessing.process.current_process(), "_inheriting", False):
        raise RuntimeError(f"{GUARD_MESSAGE}: this is a spawned rank re-running the script")
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if not isinstance(path, str):
        return  # interactive session, `python -c`, notebook: spawn does not re-run anything
    frame = _main_module_frame(path)
    if frame is None:
        return  # not reached from the script's module-level code (a thread, an embedding host)
    if not _inside_main_guard(path, frame.f_lineno):
        raise RuntimeError(f"{GUARD_MESSAGE}: {path}, line {frame.f_lineno} is not guarded")


def _main_module_frame(path: str) -> FrameType | None:
    """The outermost frame running ``__main__``'s module-level code from its file."""
    found = None
    frame: FrameType | None = sys._getframe(1)
    while frame is not None:
        code = frame.f_code
        if code.co_name == "<module>" and code.co_filename == path:
            found = frame
        frame = frame.f_back
    return found


def _inside_main_guard(path: str, line: int) -> bool:
    """Whether `line` of the file at `path` is inside an ``if __name__ == "__main__":`` body.
    A file that cannot be read or parsed counts as guarded (no false alarm)."""
    try:
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
    except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
        return True
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and _is_main_test(node.test) and node.body:
            if node.body[0].lineno <= line <= (node.body[-1].end_lineno or node.body[-1].lineno):
                return True
    return False


def _is_main_test(test: ast.expr) -> bool:
    """`__name__ == "__main__"` (either order)."""
    if not (isinstance(test, ast.Compare) and len(test.ops) == 1 and isinstance(test.ops[0], ast.Eq)):
        return False
    sides = [test.left, test.comparators[0]]
    names = [s for s in sides if isinstance(s, ast.Name) and s.id == "__name__"]
    consts = [s for s in sides if isinstance(s, ast.Constant) and s.value == "__main__"]
    return len(names) == 1 and len(consts) == 1
