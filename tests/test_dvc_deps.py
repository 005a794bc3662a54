"""dvc.yaml's code dependencies cannot drift: each stage lists exactly the project modules its
command imports, directly or through other project modules (function-level imports included),
so that changing any code a stage runs re-runs it, and nothing else does."""

from __future__ import annotations

import ast
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("bestrq", "stages")


def module_file(name: str) -> Path | None:
    """The file of a project module (a package's __init__.py), None for anything else."""
    if name.split(".")[0] not in PACKAGES:
        return None
    base = REPO.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def imported_modules(path: Path) -> set[str]:
    """The project modules a file imports anywhere in it (and the packages above them)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from bestrq import convert` imports the module bestrq.convert
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            found |= {".".join(parts[:i]) for i in range(1, len(parts) + 1)
                      if module_file(".".join(parts[:i]))}
    return found


def closure(module: str) -> set[Path]:
    """Every project file that running `python -m <module>` imports."""
    seen: set[str] = set()
    todo = [module, *imported_modules(module_file(module))]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        todo += imported_modules(module_file(name)) - seen
    return {module_file(name) for name in seen}


def as_deps(files: set[Path]) -> set[str]:
    """Files as dvc.yaml names them: a sub-package (bestrq/adapters) as its folder."""
    out = set()
    for path in files:
        rel = path.relative_to(REPO)
        out.add(rel.parts[0] + "/" + rel.parts[1] if len(rel.parts) > 2 else rel.as_posix())
    return out


def test_closure_follows_imports_through_the_library():
    deps = as_deps(closure("stages.evaluate"))
    assert {"stages/evaluate.py", "stages/common.py", "bestrq/evaluate.py",
            "bestrq/adapters", "bestrq/__init__.py", "stages/__init__.py"} <= deps
    assert "stages/finetune.py" not in deps and "bestrq/study.py" not in deps


def test_every_stage_lists_exactly_the_code_it_imports():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    wrong = {}
    for name, stage in stages.items():
        module = stage["cmd"].removeprefix("python -m ").split()[0]
        listed = {d if isinstance(d, str) else next(iter(d)) for d in stage.get("deps", [])}
        listed = {d for d in listed if d.split("/")[0] in PACKAGES}
        want = as_deps(closure(module))
        if listed != want:
            wrong[name] = {"missing": sorted(want - listed), "not imported": sorted(listed - want)}
    assert not wrong, "dvc.yaml deps differ from the imports: " + yaml.safe_dump(wrong)
