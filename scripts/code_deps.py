"""Each `dvc.yaml` stage lists exactly the project code its module imports, so an edit reruns only
the stages it can change.

The imports of `stages/<name>.py` are followed through every project module they reach, the ones
inside functions included (a stage imports torch and its helpers lazily); a package's
`__init__.py` counts, because importing a module runs it. The code entries of a stage's `deps`
(paths under the project's packages) must be exactly those files; its data entries are left alone.

    python scripts/code_deps.py            # check: exit 1 naming each stage whose list is wrong
    python scripts/code_deps.py --write    # rewrite the code entries of dvc.yaml (comments kept)
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("stages", "flows")  # the project's code; a dep under one of them is a code dep


def module_file(name: str, root: Path = ROOT) -> Path | None:
    """The file of project module `name` (`stages.common.io` -> stages/common/io.py, a package
    -> its __init__.py), None when it is not the project's."""
    if name.split(".")[0] not in PACKAGES:
        return None
    base = root.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def imported(file: Path, root: Path = ROOT) -> set[Path]:
    """Project files that importing `file` runs directly: every import statement in it, at any
    depth, with the `__init__.py` of each package on the way."""
    package = ".".join(file.relative_to(root).with_suffix("").parts[:-1])
    names: set[str] = set()
    for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"), str(file))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:  # relative: from the file's own package up
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join([*parts, *([module] if module else [])])
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)  # `from pkg import module`
    found: set[Path] = set()
    for name in names:
        parts = name.split(".")
        for i in range(1, len(parts) + 1):  # a.b.c runs a/__init__, a/b/__init__, then a/b/c
            path = module_file(".".join(parts[:i]), root)
            if path is not None:
                found.add(path)
    found.discard(file)
    return found


def closure(file: Path, root: Path = ROOT) -> set[Path]:
    """`file` and every project file it imports, directly or not."""
    seen, todo = {file}, [file]
    while todo:
        for dep in imported(todo.pop(), root):
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return seen


def stage_module(cmd: str) -> str:
    """`python -m stages.clean` -> `stages.clean`."""
    words = cmd.split()
    if "-m" not in words:
        raise ValueError(f"cmd {cmd!r} does not run a module (python -m stages.<name>)")
    return words[words.index("-m") + 1]


def is_code(dep: str) -> bool:
    return dep.split("/")[0] in PACKAGES


def expected(cmd: str, root: Path = ROOT) -> list[str]:
    """The code deps of the stage run by `cmd`, as sorted project-relative paths."""
    own = module_file(stage_module(cmd), root)
    if own is None:
        raise ValueError(f"cmd {cmd!r} runs no module of this project")
    return sorted(str(p.relative_to(root)) for p in closure(own, root))


def load(dvc_file: Path):  # noqa: ANN201 - ruamel's round-trip mapping
    from ruamel.yaml import YAML

    yaml = YAML()
    yaml.preserve_quotes = True
    yaml.width = 4096
    yaml.indent(mapping=2, sequence=4, offset=2)
    return yaml, yaml.load(dvc_file.read_text(encoding="utf-8"))


def problems(dvc_file: Path = ROOT / "dvc.yaml", root: Path = ROOT) -> dict[str, tuple[list[str], list[str]]]:
    """stage -> (listed but never imported, imported but not listed), for every stage whose code
    deps are wrong."""
    _, graph = load(dvc_file)
    found = {}
    for name, spec in graph["stages"].items():
        listed = {str(d) for d in spec.get("deps") or [] if isinstance(d, str) and is_code(d)}
        want = set(expected(spec["cmd"], root))
        if listed != want:
            found[name] = (sorted(listed - want), sorted(want - listed))
    return found


def write(dvc_file: Path = ROOT / "dvc.yaml", root: Path = ROOT) -> list[str]:
    """Rewrite each stage's code deps to what its module imports (first in its list, sorted; the
    data deps after them, as they were); the stages changed."""
    yaml, graph = load(dvc_file)
    changed = []
    for name, spec in graph["stages"].items():
        deps = spec.get("deps")
        want = expected(spec["cmd"], root)
        code = [d for d in deps or [] if isinstance(d, str) and is_code(d)]
        if [str(d) for d in code] == want:
            continue
        if deps is None:
            from ruamel.yaml.comments import CommentedSeq

            deps = spec["deps"] = CommentedSeq()
        rest = [(i, d) for i, d in enumerate(deps) if not (isinstance(d, str) and is_code(d))]
        comments = {i: deps.ca.items.get(i) for i, _ in rest}  # a data dep keeps its end-of-line comment
        deps.clear()
        deps.extend(want)
        for i, d in rest:
            deps.append(d)
            if comments.get(i):
                deps.ca.items[len(deps) - 1] = comments[i]
        changed.append(name)
    if changed:
        with dvc_file.open("w", encoding="utf-8") as out:
            yaml.dump(graph, out)
    return changed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python scripts/code_deps.py", description=__doc__.splitlines()[0])
    ap.add_argument("--write", action="store_true", help="rewrite dvc.yaml's code deps instead of checking")
    args = ap.parse_args(argv)
    if args.write:
        changed = write()
        print(f"dvc.yaml: code deps rewritten for {', '.join(changed)}" if changed else "dvc.yaml: up to date")
        return 0
    wrong = problems()
    for stage, (extra, missing) in wrong.items():
        print(f"{stage}: " + "; ".join(
            ([f"listed but not imported: {', '.join(extra)}"] if extra else [])
            + ([f"imported but not listed: {', '.join(missing)}"] if missing else [])), file=sys.stderr)
    if wrong:
        print("run `python scripts/code_deps.py --write` to rewrite them", file=sys.stderr)
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
