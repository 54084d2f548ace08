"""Every command README.md and `make help` print composes as printed (Hydra compose in-process, the
same overrides the entry would get; make targets through their Makefile recipes), names a make target
that exists, and names a preset of its own entry; the tiny stage-I example runs (slow).
`make check-docs` runs this file."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from mergevq.entries.cli import CONF_DIR, MODULES, check_preset

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MAKEFILE = ROOT / "Makefile"


def make_variables() -> dict[str, str]:
    """The Makefile's plain variable assignments (`NAME ?= value`, `NAME := value`); `$(shell ...)` ones and
    the interpreter are replaced by stand-ins."""
    found = dict(re.findall(r"^([A-Z_]+) *[?:]?= *(.*)$", MAKEFILE.read_text(), flags=re.M))
    return {**{k: v for k, v in found.items() if "$(shell" not in v}, "PY": "python", "INPUT": "image.png"}


MAKE_DEFAULTS = make_variables()


def readme_commands() -> list[str]:
    """Shell commands of the README: lines of its code blocks (backslash continuations joined, trailing
    comments cut) and inline code spans that run an entry or a make target."""
    commands, in_block, pending = [], False, ""
    for line in README.read_text().splitlines():
        if line.startswith("```"):
            in_block = not in_block
            continue
        if in_block:
            code = pending + " " + re.split(r"\s#\s", line)[0].strip()
            pending = code[:-1] if code.endswith("\\") else ""
            if not pending:
                commands.append(code.strip())
        else:
            commands += re.findall(r"`([^`]+)`", line)
    return [c for c in commands if re.search(r"-m mergevq\.\w+|^make [a-z]", c)]


def help_commands() -> list[str]:
    """The `make ...` examples in the Makefile's `## ` help texts (what `make help` prints)."""
    found = []
    for line in MAKEFILE.read_text().splitlines():
        if "## " in line:
            found += re.findall(r"make [a-z][\w-]*(?: [A-Z]+=(?:\"[^\"]*\"|\S+))*", line.split("## ", 1)[1])
    return found


def recipes() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    target = None
    for line in MAKEFILE.read_text().splitlines():
        match = re.match(r"^([a-z][\w-]*):", line)
        if match:
            target = match.group(1)
            out[target] = []
        elif line.startswith("\t") and target:
            out[target].append(line.strip())
    return out


def entry_calls(command: str) -> list[tuple[str, list[str]]]:
    """(entry, overrides) for each Hydra entry the command runs: a direct `-m mergevq.X ...` or a make
    target whose recipe runs one (its variables filled from the command line)."""
    command = command.replace("[ARGS=", "ARGS=").replace('"]', '"')
    words = shlex.split(command)
    if words[0] == "make":
        variables = dict(MAKE_DEFAULTS, **dict(w.split("=", 1) for w in words[2:] if "=" in w))
        lines = recipes()[words[1]]
        for _ in range(2):  # a variable may name another one
            lines = [re.sub(r"\$\((\w+)\)", lambda m: variables.get(m.group(1), ""), r) for r in lines]
        return [call for line in lines if "$$(" not in line for call in entry_calls(line)]
    match = re.search(r"-m mergevq\.entries\.(\w+)", command)
    config = match and {module: name for name, module in MODULES.items()}.get(match.group(1), match.group(1))
    if match is None or not (CONF_DIR / f"{config}.yaml").is_file():
        return []  # not a Hydra entry (benchmarks, demo_report, report take plain arguments)
    rest = shlex.split(command[match.end():])
    overrides = [w for w in rest if "=" in w and not w.startswith("-") and not w.endswith("...") and w != "..."]
    return [(config, overrides)]


COMMANDS = sorted(set(readme_commands()) | set(help_commands()))


def test_the_documented_commands_were_found():
    assert len(COMMANDS) > 30
    assert any(c.startswith("make reconstruct") for c in COMMANDS)
    assert any("python -m mergevq.entries.train_tokenizer tokenizer=tiny" in c for c in COMMANDS)


@pytest.mark.parametrize("command", COMMANDS)
def test_documented_command_composes(command):
    words = shlex.split(command.replace("[ARGS=", "ARGS="))
    if words[0] == "make":
        assert words[1] in recipes(), f"{command}: no make target {words[1]}"
    for entry, overrides in entry_calls(command):
        check_preset(entry, overrides)  # another entry's preset: SystemExit with its one line
        with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            cfg = compose(entry, overrides=overrides, return_hydra_config=True)
        assert cfg.get("task", entry) == entry, command


@pytest.mark.parametrize("command", COMMANDS)
def test_documented_command_has_no_shell_placeholder(command):
    """`<run>` is a redirection in a shell: a printed command names a real path (or a $(...) that finds it)."""
    assert not re.search(r"<[\w ]+>", command), command


def first_stage1_example() -> str:
    block = README.read_text().split("## Training a tokenizer (stage I)", 1)[1]
    line = next(line for line in block.splitlines() if line.startswith("python -m mergevq.entries.train_tokenizer"))
    return re.split(r"\s#\s", line)[0].strip()


@pytest.mark.slow
def test_first_stage1_example_runs_as_printed(tmp_path):
    """On a fresh clone: no VGG, DINOv2 or data download needed."""
    command = first_stage1_example()
    words = [sys.executable if w == "python" else w for w in shlex.split(command)]
    env = {**os.environ, "MERGEVQ_RUN_DIR": str(tmp_path / "run"), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT),
           "TORCH_HOME": str(tmp_path / "no_torch_hub")}  # no cached VGG16 weights to lean on
    proc = subprocess.run(words, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "run" / "checkpoints").is_dir() and (tmp_path / "run" / "val_per_k.csv").is_file()
