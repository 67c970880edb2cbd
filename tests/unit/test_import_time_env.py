"""No module of ours reads the environment when it is imported: a process forked from a
zygote (pdserve/zygote.py) imported them with the zygote's environment, not its own, so such
a read would see the wrong value (it did: the push fault tests' prefill delay was lost).
Read from the code: environment access outside any function body, or in a default
argument (evaluated when the function is defined)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("pdserve", "kv_transfer", "scheduler", "frontend", "prefill_worker",
            "decode_worker")
FUNCS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)


def _env_reads(node: ast.AST) -> list[int]:
    return [n.lineno for n in ast.walk(node)
            if isinstance(n, ast.Attribute) and n.attr in ("environ", "getenv")
            or isinstance(n, ast.Name) and n.id in ("environ", "getenv")]


def import_time_env_reads(source: str) -> list[int]:
    """Lines of `source` that read the environment when the module is imported."""
    found: list[int] = []

    def walk(node: ast.AST) -> None:
        for ch in ast.iter_child_nodes(node):
            if isinstance(ch, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for d in [*ch.args.defaults, *ch.args.kw_defaults, *ch.decorator_list]:
                    if d is not None:
                        found.extend(_env_reads(d))
                continue
            if isinstance(ch, ast.Lambda):
                continue
            if isinstance(ch, (ast.Attribute, ast.Name)):
                found.extend(_env_reads(ch))
            walk(ch)
    walk(ast.parse(source))
    return sorted(set(found))


def test_the_check_finds_what_it_looks_for():
    src = ("import os\nA = os.environ.get('X')\nclass C:\n    b = os.getenv('Y')\n"
           "def f(x=os.environ.get('Z')):\n    return os.environ.get('W')\n"
           "g = lambda: os.environ['V']\n")
    assert import_time_env_reads(src) == [2, 4, 5]


def test_no_module_of_ours_reads_the_environment_at_import():
    bad = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            lines = import_time_env_reads(path.read_text())
            if lines:
                bad[str(path.relative_to(ROOT))] = lines
    assert not bad, f"environment read at import time (read it where it is used): {bad}"
