"""Code deps of the DVC stages, generated from each stage's import closure (stdlib only, no Kedro, no YAML library).

``dvc repro`` reruns a stage only when one of its ``deps`` changes, so every project module a stage runs must be
covered by a dep. Hand-kept lists missed most imports; this tool derives them. A stage's closure starts from:

* every module of its pipeline package ``src/eva_pipeline/pipelines/<stage>/`` (stage name == pipeline name);
* what every ``kedro run`` executes: the package ``__init__``, ``settings`` (hooks, config loader) and
  ``pipeline_registry``; and ``cli`` (project commands), whose module-level imports only: Kedro imports it for every
  command, but ``kedro run`` runs none of its own commands' bodies (``kedro dry-run`` is not a stage);
* the project classes that the catalog names by ``type:`` in conf/base and conf/local (the environments
  ``kedro run`` reads without ``--env``), since Kedro imports them by name.

From there it follows static imports: module-level and function-level (lazy) ones, ``if TYPE_CHECKING`` blocks
(here they mirror the PEP 562 lazy exports), relative imports, ``from package import submodule``, the parent
packages' ``__init__`` of every module reached, and string constants that name a project module exactly (worker
entry points run as ``python -m eva_pipeline.training.worker``, ``importlib.import_module`` tables).

Deliberately not followed: ``kedro.framework.project.find_pipelines`` in ``pipeline_registry`` imports every
pipeline package at run time, but only the selected pipeline's nodes execute. Code of other pipelines is imported
but not executed by this stage, so it is not a dep (else every stage would depend on every pipeline's code).
``pipelines/pretrain`` (all four in one go) is not a DVC stage.

Deps are coarsened to a folder when every module under it (recursively) is in the closure, else listed per file.
Usage: ``dvc_code_deps.py`` prints them, ``--check`` fails on modules dvc.yaml does not cover, ``--write`` rewrites
only the ``src/`` entries of each stage's ``deps:`` in dvc.yaml (a text edit: comments and data deps are kept).
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path, PurePosixPath

PROJECT_ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "eva_pipeline"
RUN_MODULES = ("__init__.py", "settings.py", "pipeline_registry.py")
COMMAND_MODULES = ("cli.py",)  # imported by every kedro command; only their module-level imports run
CONF_ENVS = ("base", "local")
CODE_PREFIX = "src/"

_DOTTED = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*")
_CATALOG_TYPE = re.compile(r"^\s*type:\s*[\"']?([A-Za-z_][\w.]*)")


# ------------------------------------------------------------------------------------------------ import closure
def module_file(name: str, src: Path) -> Path | None:
    """The file of dotted module ``name`` under ``src`` (``a/b.py`` or ``a/b/__init__.py``), None if not there."""
    base = src.joinpath(*name.split("."))
    for candidate in (base.with_name(base.name + ".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def module_name(path: Path, src: Path) -> str:
    """Dotted name of the module in ``path`` (a package's ``__init__.py`` -> the package)."""
    parts = list(path.relative_to(src).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _package_of(path: Path, src: Path) -> str:
    """The package a relative import in ``path`` starts from."""
    name = module_name(path, src)
    return name if path.name == "__init__.py" else name.rpartition(".")[0]


def _nodes(tree: ast.AST, module_level_only: bool) -> Iterator[ast.AST]:
    """Every node of ``tree``; with ``module_level_only``, none inside a function body (code that runs on import)."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        if module_level_only and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        todo.extend(ast.iter_child_nodes(node))


def imported_names(path: Path, src: Path, tops: set[str], module_level_only: bool = False) -> set[str]:
    """Dotted names ``path`` may import: every import statement in it (with ``module_level_only``, those outside
    function bodies), plus module-like string constants."""
    names: set[str] = set()
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in _nodes(tree, module_level_only):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                package = _package_of(path, src).split(".")
                base_parts = package[: len(package) - (node.level - 1)] if node.level > 1 else package
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names if alias.name != "*")  # submodules
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and _DOTTED.fullmatch(node.value):
            names.add(node.value)  # kept only if it names a module exactly (worker entry points, lazy tables)
    return {name for name in names if name and name.split(".")[0] in tops}


def _parent_inits(path: Path, src: Path) -> Iterator[Path]:
    """``__init__.py`` of every package above ``path`` (importing ``a.b.c`` runs ``a`` and ``a.b`` first)."""
    folder = path.parent
    while folder != src and src in folder.parents:
        init = folder / "__init__.py"
        if init.is_file() and init != path:
            yield init
        folder = folder.parent


def module_closure(roots: Iterable[Path], src: Path, import_only: Iterable[Path] = ()) -> set[Path]:
    """Every module file under ``src`` reachable from ``roots`` (absolute paths) through imports; of the modules in
    ``import_only`` (also roots) only the imports that run when the module is imported are followed."""
    tops = {p.stem if p.suffix == ".py" else p.name for p in src.iterdir() if p.suffix == ".py" or p.is_dir()}
    shallow = {Path(p) for p in import_only}
    seen: set[Path] = set()
    todo = [Path(root) for root in [*roots, *shallow]]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        todo.extend(_parent_inits(path, src))
        for name in imported_names(path, src, tops, module_level_only=path in shallow):
            found = module_file(name, src)
            if found is not None:
                todo.append(found)
    return seen


def _python_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.py") if "__pycache__" not in p.parts)


def catalog_modules(root: Path, package: str) -> set[Path]:
    """Project modules of the classes the catalog names by ``type:`` (longest dotted prefix that is a module)."""
    src = root / "src"
    found: set[Path] = set()
    for env in CONF_ENVS:
        folder = root / "conf" / env
        if not folder.is_dir():
            continue
        for conf in sorted([*folder.rglob("catalog*.yml"), *folder.rglob("catalog*.yaml")]):
            for line in conf.read_text(encoding="utf-8").splitlines():
                match = _CATALOG_TYPE.match(line)
                if not match or match.group(1).split(".")[0] != package:
                    continue
                parts = match.group(1).split(".")
                for end in range(len(parts), 0, -1):
                    module = module_file(".".join(parts[:end]), src)
                    if module is not None:
                        found.add(module)
                        break
    return found


def stage_roots(stage: str, root: Path = PROJECT_ROOT, package: str = PACKAGE) -> set[Path]:
    """Where a stage's closure starts (absolute paths): its pipeline package and what every ``kedro run`` runs."""
    base = root / "src" / package
    pipeline = base / "pipelines" / stage
    if not pipeline.is_dir():
        raise ValueError(f"stage {stage!r}: no pipeline package {pipeline.relative_to(root)}")
    roots = set(_python_files(pipeline))
    roots.update(base / name for name in RUN_MODULES if (base / name).is_file())
    return roots | catalog_modules(root, package)


def stage_closure(stage: str, root: Path = PROJECT_ROOT, package: str = PACKAGE) -> set[Path]:
    """Module files (relative to ``root``) that ``kedro run --pipelines <stage>`` may import and run."""
    base = root / "src" / package
    commands = [base / name for name in COMMAND_MODULES if (base / name).is_file()]
    closure = module_closure(stage_roots(stage, root, package), root / "src", import_only=commands)
    return {path.relative_to(root) for path in closure}


def covering_deps(closure: set[Path], root: Path = PROJECT_ROOT, package: str = PACKAGE) -> list[str]:
    """Fewest paths covering ``closure``: a folder when all its modules are in it, else the files themselves."""
    wanted = {root / path for path in closure}
    deps: list[Path] = []

    def visit(folder: Path) -> None:
        modules = _python_files(folder)
        if modules and all(module in wanted for module in modules):
            deps.append(folder)
            return
        for child in sorted(folder.iterdir()):
            if child.is_dir() and child.name != "__pycache__":
                visit(child)
            elif child in wanted:
                deps.append(child)

    visit(root / "src" / package)
    outside = sorted(wanted.difference(*[{d} if d.is_file() else set(_python_files(d)) for d in deps]))
    deps += outside  # modules of other top-level packages, if any
    return sorted(path.relative_to(root).as_posix() for path in deps)


def covers(dep: str, path: Path | str) -> bool:
    """A dep covers a file if it is that file or a folder above it."""
    dep_path, file = PurePosixPath(dep.rstrip("/")), PurePosixPath(Path(path).as_posix())
    return file == dep_path or dep_path in file.parents


def uncovered(closure: Iterable[Path], deps: Iterable[str]) -> list[Path]:
    """Modules of ``closure`` that no dep covers."""
    deps = list(deps)
    return sorted(path for path in closure if not any(covers(dep, path) for dep in deps))


# ------------------------------------------------------------------------------------------------ dvc.yaml text
def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _is_content(line: str) -> bool:
    """Neither blank nor a comment line."""
    stripped = line.strip()
    return bool(stripped) and not stripped.startswith("#")


def _item_value(line: str) -> str:
    """The path of a ``- path`` / ``- "path"`` / ``- path:`` list item (inline comment dropped)."""
    value = line.strip()[2:]
    value = re.split(r"\s+#", value, maxsplit=1)[0].strip()
    if value.endswith(":"):
        value = value[:-1].rstrip()
    return value.strip("'\"")


def _stages(lines: list[str]) -> dict[str, tuple[int, int]]:
    """Stage name -> (first, end) line indices of its block under the top-level ``stages:``."""
    start = next((i for i, line in enumerate(lines) if re.match(r"stages:\s*(#.*)?$", line)), None)
    if start is None:
        raise ValueError("dvc.yaml has no top-level 'stages:'")
    blocks: dict[str, tuple[int, int]] = {}
    stage_indent: int | None = None
    current: tuple[str, int] | None = None
    end = len(lines)
    for i in range(start + 1, len(lines)):
        line = lines[i]
        if not _is_content(line):
            continue
        indent = _indent(line)
        if indent == 0:
            end = i
            break
        stage_indent = indent if stage_indent is None else stage_indent
        if indent == stage_indent:
            match = re.match(r"\s*([\w.-]+):\s*(#.*)?$", line)
            if not match:
                raise ValueError(f"dvc.yaml line {i + 1}: expected a stage name")
            if current:
                blocks[current[0]] = (current[1], i)
            current = (match.group(1), i)
    if current:
        blocks[current[0]] = (current[1], end)
    return blocks


def _deps_items(lines: list[str], first: int, end: int) -> tuple[list[int], int, int, str]:
    """List item lines of a stage's ``deps:``: (item indices, index after the last item, item indent, stage)."""
    stage = lines[first].strip().rstrip(":")
    deps_line = next((i for i in range(first + 1, end) if re.match(r"\s*deps:\s*(#.*)?$", lines[i])), None)
    if deps_line is None:
        raise ValueError(f"stage {stage}: no 'deps:' list to edit")
    key_indent = _indent(lines[deps_line])
    items: list[int] = []
    item_indent: int | None = None
    after = deps_line + 1
    for i in range(deps_line + 1, end):
        line = lines[i]
        if not _is_content(line):
            continue
        indent = _indent(line)
        if line.strip().startswith("- ") and indent >= key_indent and item_indent in (None, indent):
            item_indent = indent
            items.append(i)
        elif item_indent is None or indent <= item_indent:
            break
        after = i + 1  # an item or the option lines of a ``- path:`` item
    if item_indent is None:
        raise ValueError(f"stage {stage}: 'deps:' has no list items")
    return items, after, item_indent, stage


def read_code_deps(text: str) -> dict[str, list[str]]:
    """Stage -> its ``src/`` deps, read from dvc.yaml text."""
    lines = text.splitlines()
    deps: dict[str, list[str]] = {}
    for stage, (first, end) in _stages(lines).items():
        items, _, _, _ = _deps_items(lines, first, end)
        deps[stage] = [v for v in (_item_value(lines[i]) for i in items) if v.startswith(CODE_PREFIX)]
    return deps


def rewrite_code_deps(text: str, code_deps: Mapping[str, list[str]]) -> str:
    """``text`` with the ``src/`` deps of each stage in ``code_deps`` replaced; every other byte is kept.

    The new entries go where the first ``src/`` entry was (after the last dep if there was none); an entry that
    stays keeps its line verbatim (inline comment included).
    """
    lines = text.splitlines(keepends=True)
    newline = "\r\n" if lines and lines[0].endswith("\r\n") else "\n"
    blocks = _stages([line.rstrip("\r\n") for line in lines])
    unknown = set(code_deps) - set(blocks)
    if unknown:
        raise ValueError(f"no such stages in dvc.yaml: {sorted(unknown)}")
    for stage, (first, end) in sorted(blocks.items(), key=lambda item: -item[1][0]):  # bottom-up: indices stay valid
        if stage not in code_deps:
            continue
        items, after, indent, _ = _deps_items([line.rstrip("\r\n") for line in lines], first, end)
        code = [i for i in items if _item_value(lines[i]).startswith(CODE_PREFIX)]
        for i in code:
            if lines[i].rstrip().split("#")[0].rstrip().endswith(":"):
                raise ValueError(f"stage {stage}: code dep with options is not supported: {lines[i].strip()}")
        kept = {_item_value(lines[i]): lines[i] for i in code}
        new = [kept.get(dep, " " * indent + f"- {dep}{newline}") for dep in code_deps[stage]]
        at = code[0] if code else after
        for i in reversed(code):
            del lines[i]
        if at == after and not lines[at - 1].endswith(("\n", "\r")):
            lines[at - 1] += newline  # the deps list ended the file without a newline
        lines[at:at] = new
    return "".join(lines)


# ------------------------------------------------------------------------------------------------ command line
def generated(stages: Iterable[str], root: Path = PROJECT_ROOT) -> dict[str, list[str]]:
    """Stage -> the code deps covering its closure."""
    return {stage: covering_deps(stage_closure(stage, root), root) for stage in stages}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="fail if dvc.yaml misses a module of a stage's closure")
    mode.add_argument("--write", action="store_true", help="rewrite the src/ deps of each stage in dvc.yaml")
    parser.add_argument("--dvc-yaml", type=Path, default=PROJECT_ROOT / "dvc.yaml")
    args = parser.parse_args(argv)

    root = args.dvc_yaml.resolve().parent
    text = args.dvc_yaml.read_text(encoding="utf-8")
    current = read_code_deps(text)
    wanted = generated(current, root)

    if args.write:
        new = rewrite_code_deps(text, wanted)
        if new != text:
            args.dvc_yaml.write_text(new, encoding="utf-8")
        for stage, deps in wanted.items():
            status = "unchanged" if deps == current[stage] else "updated"
            print(f"{stage}: {status}" + "".join(f"\n  - {dep}" for dep in deps))
        return 0

    if args.check:
        failed = False
        for stage, deps in current.items():
            missing = uncovered(stage_closure(stage, root), deps)
            absent = [dep for dep in deps if not (root / dep).exists()]
            if missing or absent:
                failed = True
                if missing:
                    modules = [f"  {path.as_posix()}" for path in missing]
                    print(f"{stage}: modules not covered by its deps:", *modules, sep="\n")
                if absent:
                    print(f"{stage}: deps that do not exist:", *[f"  {dep}" for dep in absent], sep="\n")
            elif deps != wanted[stage]:
                print(f"{stage}: covered (deps differ from the generated minimal list)")
            else:
                print(f"{stage}: ok")
        if failed:
            print(f"run: .venv/bin/python scripts/{Path(__file__).name} --write", file=sys.stderr)
        return 1 if failed else 0

    for stage, deps in wanted.items():
        print(f"{stage}:", *[f"  - {dep}" for dep in deps], sep="\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
