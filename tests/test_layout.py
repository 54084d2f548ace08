"""The package's shape: commands live in mergevq.entries (one console script each), every `-m mergevq.X`
a document or script names exists."""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "mergevq"
COMMANDS = ("train_tokenizer", "train_ar", "pretokenize", "evaluate", "probe", "sample", "reconstruct", "summary",
            "report", "demo_report", "study", "screenshot")
DOCUMENTS = ["README.md", "Makefile", *sorted(str(p.relative_to(ROOT)) for p in ROOT.glob("launch/**/*") if p.is_file()),
             *sorted(str(p.relative_to(ROOT)) for p in ROOT.glob("experiments/**/*") if p.is_file()),
             *sorted(str(p.relative_to(ROOT)) for p in ROOT.glob("conf/**/*.yaml"))]


def test_top_level_holds_packages_and_at_most_two_modules():
    modules = sorted(p.name for p in PACKAGE.glob("*.py") if p.name != "__init__.py")
    assert len(modules) <= 2, modules


def test_one_console_script_per_command():
    block = (ROOT / "pyproject.toml").read_text().split("[project.scripts]\n", 1)[1].split("\n\n", 1)[0]
    scripts = dict(re.findall(r'^([\w-]+) = "([\w.:]+)"$', block, re.M))  # (tomllib is Python >= 3.11)
    assert sorted(scripts) == sorted(f"mergevq-{c.replace('_', '-')}" for c in COMMANDS)
    for name, target in scripts.items():
        module, function = target.split(":")
        assert module == f"mergevq.entries.{name.removeprefix('mergevq-').replace('-', '_')}"
        assert callable(getattr(importlib.import_module(module), function)), target


@pytest.mark.slow
@pytest.mark.parametrize("script, args, expected", [
    ("mergevq-summary", ["tokenizer=tiny"], "quantizer_bits"),
    ("mergevq-train-tokenizer", ["--cfg", "job", "tokenizer=tiny"], "max_steps"),
])
def test_console_scripts_run_from_any_directory(tmp_path, script, args, expected):
    """The installed scripts find the configs (Hydra's config path must not depend on how the entry was started)."""
    import subprocess
    import sys

    from helpers.entries import describe, subprocess_env

    executable = Path(sys.executable).parent / script
    assert executable.exists(), f"{executable} missing: reinstall the package (make install)"
    proc = subprocess.run([str(executable), *args], cwd=tmp_path, env=subprocess_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and expected in proc.stdout, describe(proc)


@pytest.mark.parametrize("document", DOCUMENTS)
def test_every_named_module_exists(document):
    """`python -m mergevq.X` (and `mergevq.X` in help texts, sweep YAMLs and launch scripts) name modules that exist."""
    text = (ROOT / document).read_text(errors="replace")
    for dotted in set(re.findall(r"\bmergevq(?:\.[a-z_][a-z0-9_]*)+", text)):
        assert resolves(dotted), f"{document}: {dotted}"


def resolves(dotted: str) -> bool:
    """``dotted`` is a module, or a module and an attribute path in it (mergevq.interop.export_run)."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for name in parts[cut:]:
            if not hasattr(obj, name):
                return False
            obj = getattr(obj, name)
        return True
    return False
def imports_of(path: Path) -> set[str]:
    """Absolute names of the mergevq modules ``path`` imports (relative imports resolved)."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
            name = (f"{base}.{node.module}" if node.module else base) if node.level else node.module
            found.add(name)
            found |= {f"{name}.{a.name}" for a in node.names}
    return {n for n in found if n and n.startswith("mergevq")}


LIBRARY = ("models", "losses", "data", "eval", "interop")


@pytest.mark.parametrize("layer", LIBRARY)
def test_library_layers_import_neither_engine_nor_entries(layer):
    bad = {str(p.relative_to(ROOT)): sorted(n for n in imports_of(p) if n.startswith(("mergevq.engine", "mergevq.entries")))
           for p in (PACKAGE / layer).rglob("*.py")}
    assert not {k: v for k, v in bad.items() if v}


def test_imports_of_resolves_relative_imports():
    names = imports_of(PACKAGE / "entries" / "train_ar.py")
    assert "mergevq.entries.cli" in names and "mergevq.engine.stage2" in names


def test_no_source_file_over_500_lines():
    long = {str(p.relative_to(ROOT)): n for p in [*PACKAGE.rglob("*.py"), *(ROOT / "tests").rglob("*.py")]
            if (n := len(p.read_text().splitlines())) > 500}
    assert not long


INFERENCE = ["entries/sampling.py", "entries/sampling_randar.py", "entries/sample.py", "entries/evaluate.py",
             "entries/probe.py", "entries/reconstruct.py", "entries/pretokenize.py", "entries/summary.py"]


@pytest.mark.parametrize("module", INFERENCE + [str(p.relative_to(PACKAGE)) for p in sorted((PACKAGE / "runs").glob("*.py"))])
def test_inference_and_runs_import_no_trainer(module):
    """Sampling, evaluation, pre-tokenization and loading a run build models through models.factory."""
    trainers = sorted(n for n in imports_of(PACKAGE / module) if n.startswith(("mergevq.engine.stage", "mergevq.engine.trainer")))
    assert not trainers
