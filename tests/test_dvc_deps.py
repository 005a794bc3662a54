"""dvc.yaml's code dependencies cannot drift: each stage lists exactly the project modules its
command imports, directly or through other project modules (function-level imports included),
so that changing any code a stage runs re-runs it, and nothing else does.

`python tests/test_dvc_deps.py` rewrites dvc.yaml's lists from the imports (the lines after
each stage's `# the code:` comment), leaving everything else as it is."""

from __future__ import annotations

import ast
import re
import sys
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


def stage_module(stage: dict) -> str:
    """The module a stage's command runs (`python -m <module>`)."""
    return stage["cmd"].removeprefix("python -m ").split()[0]


def test_every_stage_lists_exactly_the_code_it_imports():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    wrong = {}
    for name, stage in stages.items():
        listed = {d if isinstance(d, str) else next(iter(d)) for d in stage.get("deps", [])}
        listed = {d for d in listed if d.split("/")[0] in PACKAGES}
        want = as_deps(closure(stage_module(stage)))
        if listed != want:
            wrong[name] = {"missing": sorted(want - listed), "not imported": sorted(listed - want)}
    assert not wrong, ("dvc.yaml deps differ from the imports (`python tests/test_dvc_deps.py` "
                       "rewrites them): " + yaml.safe_dump(wrong))


CODE_COMMENT = "# the code: every project module the stage imports (tests/test_dvc_deps.py)"
_STAGE = re.compile(r"^  ([\w-]+):\s*$")
_CODE_DEP = re.compile(r"^\s+- (?:" + "|".join(PACKAGES) + r")/\S+\s*$")


def rewrite_code_deps(text: str) -> str:
    """dvc.yaml's `text` with each stage's code dependencies (the list items after its
    `CODE_COMMENT`) replaced by the project modules its command imports, sorted."""
    stages = yaml.safe_load(text)["stages"]
    out: list[str] = []
    stage = None
    lines = iter(text.splitlines(keepends=True))
    for line in lines:
        found = _STAGE.match(line)
        if found and found.group(1) in stages:
            stage = found.group(1)
        if line.strip() != CODE_COMMENT:
            out.append(line)
            continue
        out.append(line)
        indent = line[:len(line) - len(line.lstrip())]
        out += [f"{indent}- {dep}\n" for dep in sorted(as_deps(closure(stage_module(
            stages[stage]))))]
        for rest in lines:  # the old list, then what follows it
            if not _CODE_DEP.match(rest):
                out.append(rest)
                break
    return "".join(out)


def test_the_rewrite_gives_the_lists_the_test_wants(tmp_path):
    text = (REPO / "dvc.yaml").read_text()
    # a module dropped, one added that no stage imports: both are put right, nothing else moves
    broken = text.replace("      - stages/common.py\n", "", 1).replace(
        "      - stages/download.py\n", "      - stages/download.py\n      - bestrq/study.py\n", 1)
    assert broken != text
    fixed = rewrite_code_deps(broken)
    assert yaml.safe_load(fixed) == yaml.safe_load(rewrite_code_deps(text))
    assert [x for x in fixed.splitlines() if not _CODE_DEP.match(x)] == \
        [x for x in text.splitlines() if not _CODE_DEP.match(x)]


# ----------------------------------------------------------------------------- params
def _changed(info, value):
    """Another value of a knob that its declared type and bounds accept."""
    from typing import Annotated, Literal, get_args, get_origin

    from pydantic import TypeAdapter, ValidationError

    kind = info.annotation
    if value is None:  # an optional knob left unset (an optional choice: each choice)
        candidates = [1.0, 1, "x", *(v for arg in get_args(kind) if get_origin(arg) is Literal
                                     for v in get_args(arg))]
    elif get_origin(kind) is Literal:
        candidates = [v for v in get_args(kind) if v != value]
    elif kind is bool:
        candidates = [not value]
    elif get_origin(kind) in (list, tuple):
        item = get_args(kind)[0]
        item = get_args(item)[0] if get_origin(item) is Annotated else item
        candidates = ([[v] for v in get_args(item) if [v] != list(value)]
                      if get_origin(item) is Literal else
                      [[value[0] + 1], [value[0] - 1]])
    elif kind is str:
        candidates = ["cpu", value + "x"]
    else:
        candidates = [value + 1, value - 1, value * 2, value / 2, 0.5]
    check = TypeAdapter(Annotated[(kind, *info.metadata)] if info.metadata else kind)
    for candidate in candidates:
        try:
            # strict as params.yaml is read, but for a tuple knob, which takes YAML's list
            strict = get_origin(kind) is not tuple
            if check.validate_python(candidate, strict=strict) != \
                    check.validate_python(value, strict=strict):
                return candidate
        except ValidationError:
            continue
    raise AssertionError(f"no other value for {info}")


def unlisted_knobs(tmp_path: Path) -> tuple[dict[str, list[str]], int]:
    """The declared knobs (`bestrq.params.TopLevel`, sections' included) that change a
    pre-training's or fine-tune's identity but are not `params:` of that stage in dvc.yaml, by
    stage; and how many (knob, stage) pairs changed an identity. Each knob is moved, in turn, to
    another value its declaration accepts."""
    from bestrq.params import SECTION_MODELS, TopLevel, from_dict
    from bestrq.run_identity import finetune_key, pretrain_key

    features = tmp_path / "features"
    (features / "train").mkdir(parents=True, exist_ok=True)
    (features / "stats.json").write_text("{}")
    (features / "train" / "index.json").write_text("[]")
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    keys = {"pretrain": lambda p: pretrain_key(p, features).fingerprint,
            "finetune": lambda p: (finetune_key(p, features, "stock", p.finetune.seeds[0], None)
                                   .fingerprint)}
    base = {stage: key(from_dict(raw)) for stage, key in keys.items()}
    knobs = [(name, info, None) for name, info in TopLevel.model_fields.items()
             if name not in SECTION_MODELS]
    knobs += [(name, info, section) for section, model in SECTION_MODELS.items()
              for name, info in model.model_fields.items()]
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    missing: dict[str, list[str]] = {}
    tried = 0
    for name, info, section in knobs:
        changed = dict(raw, **({section: {**raw[section], name: None}} if section else {}))
        where = changed[section] if section else changed
        where[name] = _changed(info, (raw[section] if section else raw).get(name, info.default))
        p = from_dict(changed)
        dotted = f"{section}.{name}" if section else name
        for stage, key in keys.items():
            if key(p) != base[stage]:
                tried += 1
                listed = set(stages[stage]["params"])
                if dotted not in listed and section not in listed:
                    missing.setdefault(stage, []).append(dotted)
    return missing, tried


def test_every_knob_that_keys_a_run_is_a_param_of_its_stage(tmp_path):
    """Params cannot drift either: a knob that changes a run's checkpoint identity (what the
    run computes, bestrq.run_identity) is a `params:` dependency of the stage that runs it, so
    DVC re-runs the stage when it changes. Every declared knob is tried, sections' included, so
    a new one is checked without being named here (tests/test_knobs.py adds one)."""
    from dataclasses import replace

    from bestrq.params import from_dict
    from bestrq.run_identity import finetune_key

    missing, tried = unlisted_knobs(tmp_path)
    assert tried > 40  # the perturbations reach the identities
    assert not missing, f"knobs that key a run but are not params of its stage: {missing}"
    # The fine-tune is not keyed by BEST-RQ's own knobs (mask_prob, the top-level seed, ...).
    features = tmp_path / "features"
    raw = yaml.safe_load((REPO / "params.yaml").read_text())

    def key(p):
        return finetune_key(p, features, "stock", p.finetune.seeds[0], None).fingerprint

    p = from_dict(dict(raw, mask_prob=raw["mask_prob"] * 2, seed=raw["seed"] + 1))
    assert key(p) == key(from_dict(raw)) != key(
        replace(p, finetune=replace(p.finetune, max_steps=p.finetune.max_steps + 1)))


if __name__ == "__main__":
    path = REPO / "dvc.yaml"
    before = path.read_text()
    after = rewrite_code_deps(before)
    path.write_text(after)
    sys.stdout.write("dvc.yaml: code deps rewritten\n" if after != before else
                     "dvc.yaml: code deps already match the imports\n")
