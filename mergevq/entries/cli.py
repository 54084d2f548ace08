"""Shared plumbing of the Hydra entry points: one-line errors for bad overrides, rank-0-only Hydra
output under multi-process launch, and the resolved config as plain data."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def precheck_overrides(config_name: str, overrides: list[str]) -> None:
    """Compose once with the command-line overrides to turn Hydra's composition errors into one line."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    plain = [o for o in overrides if not o.startswith(("hydra", "-", "+hydra"))]
    try:
        with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            compose(config_name, overrides=plain)
    except (HydraException, OmegaConfBaseException) as error:
        text = str(error)
        first = text.strip().splitlines()[0] if text.strip() else type(error).__name__
        if "Could not find" in text and "Available options" in text:
            options = []
            for line in text.split("Available options", 1)[1].splitlines()[1:]:
                if not line.startswith(("\t", " ")):
                    break  # the indented option names end where "Config search path:" begins
                options.append(line.strip())
            _fail(f"{first.split(':', 1)[-1].strip()}; available: {', '.join(options)}")
        if "not in struct" in text or "Could not override" in text:
            key = first.split("'")[1] if "'" in first else first
            _fail(f"unknown config key '{key}' for {config_name}: check the spelling (`--help` lists the groups), "
                  f"or add a new key with +{key}=...")
        _fail(" ".join(text.split()))


MODULES = {"tokenize": "pretokenize"}  # config name -> entry module, where they differ


def entry_module(config_name: str) -> str:
    """``mergevq.entries.<module>``: what ``python -m`` runs for the entry with this config name."""
    return f"mergevq.entries.{MODULES.get(config_name, config_name)}"


ENTRY_KIND = {"train_tokenizer": "a tokenizer (stage I) preset", "train_ar": "a generator (stage II) preset"}


def preset_entry(name: str) -> str | None:
    """The entry an ``experiment=`` preset is for (its ``task:``, also through the presets it extends)."""
    path = CONF_DIR / "experiment" / f"{name}.yaml"
    if not path.is_file():
        return None
    import yaml

    data = yaml.safe_load(path.read_text()) or {}
    if data.get("task"):
        return data["task"]
    for item in data.get("defaults", []):
        if isinstance(item, str) and item != "_self_":
            return preset_entry(item)
    return None


def entry_presets(config_name: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml") if preset_entry(p.stem) == config_name)


def check_preset(config_name: str, overrides: list[str]) -> None:
    """``experiment=X`` names a preset of this entry; another entry's preset is one line saying whose."""
    for override in overrides:
        key, _, value = override.lstrip("+~").partition("=")
        if key not in ("experiment", "experiment@_global_") or not value:
            continue
        for name in value.split(","):  # a multirun may list several
            owner = preset_entry(name)
            if owner is not None and owner != config_name:
                mine, theirs = entry_module(config_name), entry_module(owner)
                kind = ENTRY_KIND.get(owner, f"a preset of {theirs}")
                _fail(f"experiment={name} is {kind} for {theirs}, not {mine}: run "
                      f"python -m {theirs} experiment={name} ...; presets of {mine}: "
                      f"{', '.join(entry_presets(config_name)) or '(none)'}")


def entry_help(config_name: str) -> str:
    """``--help`` of one entry: its header, the config groups its defaults list uses with their options
    (``experiment``: only this entry's presets), its footer."""
    import yaml

    data = yaml.safe_load((CONF_DIR / f"{config_name}.yaml").read_text())
    help_cfg = data.get("hydra", {}).get("help", {})
    lines = [help_cfg.get("header", entry_module(config_name)).rstrip(), "", "== Configuration groups ==", "Choose one option per group as group=option:"]
    for item in data.get("defaults", []):
        if not isinstance(item, dict):
            continue
        (key, default), = item.items()
        group = key.replace("optional ", "").strip()
        if group.startswith(("hydra", "override")):
            continue
        options = entry_presets(config_name) if group == "experiment" else sorted(
            p.stem for p in (CONF_DIR / group).glob("*.yaml"))
        if group == "local" and not options:
            lines.append("local: optional per-machine settings in conf/local/default.yaml (not tracked; none here)")
            continue
        lines.append(f"{group}: {', '.join(options)}" + (f"  [default: {default}]" if default else ""))
    footer = help_cfg.get("footer", "")
    if footer:
        lines += ["", footer.rstrip()]
    return "\n".join(lines) + "\n"


def one_line_errors(task: Callable) -> Callable:
    """``task`` with known failures (:class:`mergevq.errors.UserError`) turned into one ``error:`` line on
    stderr and exit status 2; with ``HYDRA_FULL_ERROR=1`` they propagate with their traceback."""
    import functools

    from ..errors import UserError, one_line

    @functools.wraps(task)
    def guarded(cfg):
        try:
            return task(cfg)
        except UserError as error:
            if os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            _fail(one_line(error))

    return guarded


def run_entry(config_name: str, task: Callable) -> None:
    """Run ``task(cfg)`` under @hydra.main with the checks above; ranks != 0 write no Hydra output.
    Known failures end in one line and exit status 2 (see :func:`one_line_errors`)."""
    import hydra

    argv = sys.argv[1:]
    if any(a in ("--help", "-h") for a in argv):
        print(entry_help(config_name), end="")
        raise SystemExit(0)
    check_preset(config_name, argv)
    multirun = any(a in ("-m", "--multirun") for a in argv)
    if not multirun and not any(a.startswith(("--help", "-h", "--hydra-help", "--cfg", "-c", "--info")) for a in argv):
        precheck_overrides(config_name, argv)
    if int(os.environ.get("RANK", 0)) != 0 and not multirun:
        sys.argv += ["hydra.output_subdir=null", "hydra/job_logging=none", "hydra/hydra_logging=none", "hydra.run.dir=."]
    owns = owns_process()
    try:
        hydra.main(config_path=str(CONF_DIR), config_name=config_name, version_base="1.3")(one_line_errors(task))()
    except SystemExit as stop:
        if not owns:
            raise
        exit_without_teardown(stop.code)
    if owns:
        exit_without_teardown(0)


def owns_process() -> bool:
    """True when this process was started to run one entry (``python -m mergevq.entries.X``, a
    ``mergevq-*`` script, a launcher's worker), not when a test or a notebook calls an entry's main()."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None:
        return spec.name.startswith("mergevq.entries.")
    return Path(sys.argv[0]).name.startswith("mergevq-")


def exit_without_teardown(code: int | str | None) -> None:
    """End the process as ``sys.exit(code)`` would, less the interpreter's module teardown: the threads
    are joined, the atexit handlers run (logging, W&B, multiprocessing) and the streams are flushed,
    then ``os._exit``. The teardown of torch, torchvision and dynamo costs about 2 s per process on a
    CPU host, which the study, the launchers and the test suite pay for every job."""
    import atexit
    import threading

    if isinstance(code, str):
        print(code, file=sys.stderr)
        code = 1
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code or 0)
