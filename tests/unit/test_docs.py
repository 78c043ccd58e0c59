"""The docs stay true to the code: the generated config reference is current and complete, every file or module a
doc names exists, and README's file tree is the disk. (The strict site build is in tests/integration.)"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import re
import sys
import typing
from functools import cache
from pathlib import Path
from types import ModuleType

import pytest

from ldmscale.config import schema

REPO = Path(__file__).resolve().parents[2]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
PACKAGES = ("config", "runtime", "data", "style", "models", "checkpoint", "latents", "inference", "eval", "trainer",
            "demo")

# a repository path (ldmscale/x.py, tools/bench/, configs/a.yaml, docs/results/demo.md), not part of a longer path
REPO_PATH = re.compile(r"(?<![\w./~<>-])((?:ldmscale|tools|configs|slurm|tests|docs)/[\w.*/-]*)")
# a module path written relative to the package, as the architecture diagram does (data/stream.py)
PACKAGE_PATH = re.compile(rf"(?<![\w./~<>-])((?:{'|'.join(PACKAGES)})/[\w/]*\w\.py)\b")
# a dotted module, maybe followed by one name defined in it (ldmscale.data.stream, ldmscale.data.ResumableLoader)
MODULE = re.compile(r"(?<![\w.-])ldmscale(?:\.[A-Za-z_]\w*)+")


def load_generator() -> ModuleType:
    """tools/gen_config_reference.py as a fresh module (tests may patch its PAGE)."""
    spec = importlib.util.spec_from_file_location("gen_config_reference", REPO / "tools" / "gen_config_reference.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


@cache
def top_level_names(path: Path) -> frozenset[str]:
    names: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, ast.ImportFrom | ast.Import):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
    return frozenset(names)


def module_exists(dotted: str, root: Path = REPO) -> bool:
    """`ldmscale.a.b` is a module or package, or a module followed by a name it defines (deeper parts unchecked)."""
    parts = dotted.split(".")
    source: Path | None = None
    for i in range(1, len(parts) + 1):
        base = root.joinpath(*parts[:i])
        if (base / "__init__.py").exists():
            source = base / "__init__.py"
        elif base.with_suffix(".py").exists():
            source = base.with_suffix(".py")
        elif source is not None and i > 1:
            return parts[i - 1] in top_level_names(source)
        else:
            return False
    return True


def repo_path_exists(ref: str, root: Path = REPO) -> bool:
    if "*" in ref:
        return any(root.glob(ref))
    return (root / ref).exists()


def missing_references(text: str, root: Path = REPO) -> list[str]:
    """The file and module paths `text` names that do not exist under `root`."""
    missing = []
    for m in REPO_PATH.finditer(text):
        ref = m.group(1).rstrip(".")
        if not repo_path_exists(ref, root):
            missing.append(ref)
    for m in PACKAGE_PATH.finditer(text):
        if not (root / "ldmscale" / m.group(1)).exists():
            missing.append(m.group(1))
    for m in MODULE.finditer(text):
        if not module_exists(m.group(0), root):
            missing.append(m.group(0))
    return missing


def test_the_reference_check_catches_paths_and_modules_that_do_not_exist() -> None:
    text = ("see `ldmscale/foo.py`, tools/bar.py and configs/x.yaml; `ldmscale.data.nostream` and "
            "ldmscale.data.NoSuchLoader; data/nothing.py")
    assert missing_references(text) == ["ldmscale/foo.py", "tools/bar.py", "configs/x.yaml", "data/nothing.py",
                                        "ldmscale.data.nostream", "ldmscale.data.NoSuchLoader"]
    existing = ("`ldmscale/data/stream.py`, tools/bench/, configs/tiny.yaml, tools/make_*_shards.py, data/stream.py, "
                "ldmscale.train, python -m ldmscale.eval.curves, ldmscale.data.ResumableLoader, "
                "<out_dir>/checkpoints/latest, s3://b/tools/x.tar, ldmscale-train, demo_out/samples/grid.png")
    assert missing_references(existing) == []


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_docs_name_only_files_and_modules_that_exist(doc: Path) -> None:
    missing = missing_references(doc.read_text())
    assert not missing, f"{doc.relative_to(REPO)} names what does not exist: {sorted(set(missing))}"


def test_package_docstrings_and_comments_name_only_what_exists() -> None:
    problems = {str(p.relative_to(REPO)): sorted(set(m)) for p in sorted((REPO / "ldmscale").rglob("*.py"))
                if (m := missing_references(p.read_text()))}
    assert not problems, f"stale paths in docstrings or comments: {problems}"


def test_config_reference_is_current() -> None:
    gen = load_generator()
    current = gen.PAGE.read_text() if gen.PAGE.exists() else ""
    problems = gen.stale_keys(current, gen.render())
    assert not problems, f"run python tools/gen_config_reference.py: {problems}"


def config_keys(cls: type = schema.Config, prefix: str = "") -> list[str]:
    keys = []
    hints = typing.get_type_hints(cls)
    nested = []
    for f in dataclasses.fields(cls):
        item = typing.get_args(hints[f.name])[0] if typing.get_origin(hints[f.name]) is list else None
        if dataclasses.is_dataclass(hints[f.name]):
            nested += config_keys(hints[f.name], f"{prefix}{f.name}.")
        elif prefix:
            keys.append(prefix + f.name)
            if dataclasses.is_dataclass(item):  # a list of sections (data.sources): its items' keys after the rest
                nested += config_keys(item, f"{prefix}{f.name}[].")
    return keys + nested


def test_the_reference_has_every_config_key_and_no_other() -> None:
    gen = load_generator()
    assert list(gen.rows_by_key(gen.PAGE.read_text())) == config_keys()


def test_check_mode_names_the_stale_keys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    gen = load_generator()
    page = gen.render()
    lines = [ln for ln in page.splitlines(keepends=True) if not ln.startswith("| `train.seed` |")]
    stale = "".join(lines).replace("| `data.resolution` | `int` | `256` |", "| `data.resolution` | `int` | `512` |")
    stale += "| `data.gone` | `int` | `0` |  | a key that no longer exists |\n"
    monkeypatch.setattr(gen, "PAGE", tmp_path / "config.md")
    gen.PAGE.write_text(stale)
    assert gen.main(["--check"]) == 1
    err = capsys.readouterr().err
    assert "missing: train.seed" in err and "no longer exists: data.gone" in err and "changed: data.resolution" in err
    gen.PAGE.write_text(page)
    assert gen.main(["--check"]) == 0


def test_field_docs_come_from_the_comments_around_a_field_or_its_docstring() -> None:
    gen = load_generator()
    source = '''
@dataclass
class C:
    plain: int = 0
    # two lines of comment
    # above the field
    above: int = 0  # and one on its line

    with_doc: str = "x"
    """A docstring under the field."""
    wrapped: list[int] = field(
        default_factory=list)  # on the field's last line
    # a comment that a blank line separates from the next field

    after_blank: int = 0
'''
    docs = gen.field_comments(source)["C"]
    assert docs == {"plain": "", "above": "two lines of comment above the field and one on its line",
                    "with_doc": "A docstring under the field.", "wrapped": "on the field's last line",
                    "after_blank": ""}


def readme_tree() -> list[str]:
    """The paths README's file-structure block names, relative to the repository (folders end in /)."""
    text = (REPO / "README.md").read_text()
    block = text.split("## File structure", 1)[1].split("```", 2)[1]
    paths: list[str] = []
    stack: list[str] = []
    for line in block.splitlines()[1:]:
        start = next((i for i, ch in enumerate(line) if ch.isalnum() or ch in "._"), None)
        if start is None:
            continue
        depth = start // 4
        name = line[start:].split()[0]
        stack = stack[:depth] + [name]
        paths.append("".join(stack))
    return paths


def test_readme_tree_is_the_disk() -> None:
    tree = set(readme_tree())
    on_disk = {str(p.relative_to(REPO)) for p in (REPO / "ldmscale").rglob("*.py") if p.name != "__init__.py"}
    on_disk |= {str(p.parent.relative_to(REPO)) + "/" for p in (REPO / "ldmscale").rglob("__init__.py")}
    in_tree = {p for p in tree if p.startswith("ldmscale/")}
    assert not on_disk - in_tree, f"add to README's file tree: {sorted(on_disk - in_tree)}"
    assert not in_tree - on_disk, f"README's file tree names what is not on disk: {sorted(in_tree - on_disk)}"
    others = tree - in_tree
    assert others and all((REPO / p).exists() for p in others), sorted(p for p in others if not (REPO / p).exists())


def test_readme_is_a_front_page() -> None:
    assert len((REPO / "README.md").read_text().splitlines()) <= 200


# how the project was made is no part of what it says about itself
PROCESS_WORDS = re.compile(r"this session|this stop|the issue's|in this work|the lead\b|\bagents?\b", re.IGNORECASE)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_docs_speak_of_the_project_only(doc: Path) -> None:
    found = [m.group(0) for m in PROCESS_WORDS.finditer(doc.read_text())]
    assert not found, f"{doc.relative_to(REPO)}: {found}"
