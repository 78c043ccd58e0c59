"""The package's import rule: imports point down the layers (docs/architecture.md), and nothing imports a command-line
module. Read from the source with ast, so an import inside a function counts as much as one at the top."""

from __future__ import annotations

import ast
from pathlib import Path

import tomllib

from tests.conftest import REPO

PACKAGE = REPO / "ldmscale"
# Lowest first. A module may import its own package and any package of a lower layer, nothing else.
LAYERS: list[set[str]] = [
    {"runtime"},  # process groups, atomic files, signals, the CLI error contract: knows nothing else
    {"config"},
    {"data"},  # shards -> micro-batches; the data position
    {"demo", "style"},  # the demo's digit data; the style encoder and its attention path
    {"models"},  # networks, frozen encoders, objective, noise
    {"checkpoint", "latents"},  # save/restore and inference-time loading; precomputed latents
    {"inference"},  # sampling and export
    {"eval"},  # FID/CLIP, validation loss, sample grids
    {"trainer"},  # the loop and what only it uses
    {"train", "launch"},  # entry points
]
# Modules that hold a console script or `python -m` entry: only the documented entry point may import one.
CLI_MODULES = {
    "ldmscale.train", "ldmscale.launch", "ldmscale.trainer.cli", "ldmscale.inference.sample",
    "ldmscale.inference.export", "ldmscale.eval.cli", "ldmscale.eval.curves", "ldmscale.latents.encode",
    "ldmscale.checkpoint.posthoc_cli",
    "ldmscale.checkpoint.universal_cli",
}
ENTRY_IMPORTS = {("ldmscale.train", "ldmscale.trainer.cli")}  # `python -m ldmscale.train` is the trainer's CLI


def _layer(package: str) -> int:
    for i, names in enumerate(LAYERS):
        if package in names:
            return i
    raise AssertionError(f"ldmscale/{package} is in no layer: add it to LAYERS in {__file__}")


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, imported module) for every `import ldmscale...` / `from ldmscale... import x` in the file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("ldmscale")]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("ldmscale"):
            assert node.module is not None
            # `from ldmscale.models import noise` imports the module ldmscale.models.noise
            subs = [f"{node.module}.{a.name}" for a in node.names if (PACKAGE.parent / f"{node.module}.{a.name}"
                    .replace(".", "/")).with_suffix(".py").exists()]
            found += [(node.lineno, m) for m in subs] or [(node.lineno, node.module)]
    return found


def _top(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_imports_point_down_the_layers() -> None:
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        source = _module_name(path)
        if source == "ldmscale":
            continue
        for line, target in _imports(path):
            if target == "ldmscale":
                wrong.append(f"{path.relative_to(REPO)}:{line} imports the package root; import the module")
                continue
            src, dst = _top(source), _top(target)
            if src == dst:
                continue
            if _layer(dst) >= _layer(src):
                wrong.append(f"{path.relative_to(REPO)}:{line} ({src}) imports {target} ({dst}): not a lower layer")
    assert not wrong, "imports against the layers:\n" + "\n".join(wrong)


def test_nothing_imports_a_command_line_module() -> None:
    wrong = [f"{path.relative_to(REPO)}:{line} imports {target}"
             for path in sorted(PACKAGE.rglob("*.py")) for line, target in _imports(path)
             if target in CLI_MODULES and (_module_name(path), target) not in ENTRY_IMPORTS]
    assert not wrong, "command-line modules imported as libraries:\n" + "\n".join(wrong)


def test_every_console_script_lives_in_a_command_line_module() -> None:
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    targets = {name: spec.split(":")[0] for name, spec in scripts.items()}
    assert {"ldmscale-train", "ldmscale-sample", "ldmscale-export", "ldmscale-launch", "ldmscale-eval",
            "ldmscale-encode"} <= set(targets)
    assert set(targets.values()) <= CLI_MODULES, targets
    for module in targets.values():
        assert (REPO / (module.replace(".", "/") + ".py")).exists(), module


def test_the_rule_catches_an_upward_import(tmp_path: Path) -> None:
    """The checker itself: from data/, an import of the trainer is against the layers, one of config/ is not."""
    probe = tmp_path / "probe.py"
    probe.write_text("from ldmscale.config import DataConfig\n\ndef f():\n    from ldmscale.trainer.loop import main\n")
    found = [t for _, t in _imports(probe)]
    assert found == ["ldmscale.config", "ldmscale.trainer.loop"]
    assert [_layer(_top(t)) >= _layer("data") for t in found] == [False, True]


def _edits_sys_path(tree: ast.AST) -> list[int]:
    """Lines that change sys.path (sys.path.insert/append/extend, or assign to it)."""
    lines = []
    for node in ast.walk(tree):
        target = node.func.value if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) else None
        if isinstance(node, ast.Assign | ast.AugAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            target = next((t for t in targets if ast.unparse(t).startswith("sys.path")), None)
        if target is not None and ast.unparse(target).startswith("sys.path"):
            lines.append(node.lineno)
    return sorted(lines)


def test_tools_import_the_installed_package() -> None:
    """Tools run as scripts import ldmscale as installed (and their own folder's modules, which Python puts on the
    path for a script): no sys.path edit, hence no import that must wait for one (`noqa: E402`)."""
    found = []
    for path in sorted((REPO / "tools").rglob("*.py")):
        text = path.read_text()
        found += [f"{path.relative_to(REPO)}:{n}" for n in _edits_sys_path(ast.parse(text))]
        found += [f"{path.relative_to(REPO)}: noqa E402" for _ in range(text.count("noqa: E402"))]
    assert not found, found


def test_the_sys_path_rule_catches_an_edit() -> None:
    tree = ast.parse("import sys\nsys.path.insert(0, 'x')\nsys.path += ['y']\nsys.path.append('z')\nprint(sys.path)\n")
    assert _edits_sys_path(tree) == [2, 3, 4]
