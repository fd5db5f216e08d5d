"""Every documented command is checked: the command lines in README.md and cluster/README.md (code blocks and
inline code) and the first line of each YAML under jobs/configs/. `python -m pytest -q tests/test_docs_commands.py`

A complete command runs with `--check` (dynboot.cli.job_main: the config file, every key and every value are
validated and the resolved config printed, nothing runs), so a renamed field or a wrong value in the docs fails
here with the job's own error. A template in prose or in the commands table (`[CFG]`, `…`, `a|b` alternatives)
cannot run as written: its `key=` names are checked against the job's config instead. Running the commands at a
tiny size is what the quickstart, protocol and job tests do; this test makes sure the docs say what they run, and
runs the cheap one for real (`dynboot world`, its placeholders filled with a tiny world) to check that it writes the
run-directory contract (dynboot.io.rundir.contract_problems).
"""

from __future__ import annotations

import contextlib
import io
import re
import runpy
import shlex
import sys
from pathlib import Path

import pytest

from dynboot import cli
from dynboot.config import Config
from dynboot.io.rundir import contract_problems

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "cluster" / "README.md"]
PLACEHOLDER = re.compile(r"…|\.\.\.|\[[^\]]*\]|<[^>]*>|\||\bDIR\b")
SUBCOMMANDS = "|".join(re.escape(c) for c in sorted({*cli.JOBS, *cli.LIBRARY}, key=len, reverse=True))
COMMAND = re.compile(rf"(?:^|(?<=[\s(]))((?:dynboot (?:{SUBCOMMANDS})|python -m (?:jobs|serve)\.\w+)(?=\s|$)[^`\n]*)")


def _code_lines(text: str) -> list[str]:
    """Lines of fenced code blocks (backslash continuations joined) and inline code spans."""
    lines, fenced, buf = [], False, ""
    for raw in text.splitlines():
        if raw.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if fenced:
            buf += raw.rstrip("\\").strip() + " "
            if not raw.rstrip().endswith("\\"):
                lines.append(buf.strip())
                buf = ""
        else:
            lines += re.findall(r"`([^`]+)`", raw)
    return lines


def _commands(line: str) -> list[str]:
    """The dynboot / `python -m jobs.X` / `python -m serve.X` commands on a line (after `&&`, `--`, `nice`...)."""
    out = []
    for part in re.split(r"&&|;|\|\||(?<=\s)--(?=\s)", line):
        m = COMMAND.search(part)
        if m:
            out.append(m.group(1).split(" #")[0].strip())
    return out


def documented() -> list[tuple[str, str]]:
    found = []
    for doc in DOCS:
        for line in _code_lines(doc.read_text()):
            found += [(doc.relative_to(ROOT).as_posix(), c) for c in _commands(line)]
    for yml in sorted((ROOT / "jobs" / "configs").glob("*.yaml")):
        first = yml.read_text().splitlines()[0]
        assert first.startswith("# "), f"{yml.name}: the first line must be the command that runs it"
        cmds = _commands(first[2:].split("(")[0])
        assert cmds, f"{yml.name}: no command on its first line: {first!r}"
        found += [(f"jobs/configs/{yml.name}", c) for c in cmds]
    return sorted(set(found))


def module_and_args(command: str) -> tuple[str, list[str]] | None:
    argv = shlex.split(command.replace("\\|", "|"))
    if argv[0] == "python":  # python -m jobs.x / serve.x
        return argv[2], argv[3:]
    if len(argv) < 2 or argv[1].startswith("-"):
        return None  # `dynboot --help`
    if argv[1] in cli.JOBS:
        return cli.JOBS[argv[1]][0], argv[2:]
    if argv[1] in cli.LIBRARY:
        return f"dynboot-library:{argv[1]}", argv[2:]
    raise AssertionError(f"unknown dynboot command {argv[1]!r} in {command!r}")


def config_class(module: str) -> type[Config]:
    if module.startswith("dynboot-library:"):
        name = module.split(":", 1)[1]
        if name == "world":
            from dynboot.world.generate import WorldConfig

            return WorldConfig
        import importlib

        mod_name, cls_name = {"init-model": ("dynboot.models.init_model", "InitModelConfig"),
                              "convert-vqgan": ("dynboot.models.vqgan_convert", "ConvertVQGANConfig")}[name]
        return getattr(importlib.import_module(mod_name), cls_name)
    import importlib

    mod = importlib.import_module(module)
    names = re.findall(r"job_main\(([\w.]+)", Path(mod.__file__).read_text())
    assert len(names) == 1, f"{module}: expected one job_main(Config, run) call, found {names}"
    return getattr(mod, names[0].split(".")[-1])


def run_check(module: str, args: list[str]) -> tuple[int, str]:
    """Run the command with --check in this process; (exit code, stderr)."""
    err, old_argv = io.StringIO(), sys.argv
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
            if module.startswith("dynboot-library:"):
                return cli.main([module.split(":", 1)[1], *args, "--check"]), err.getvalue()
            sys.argv = [module, *args, "--check"]
            try:
                runpy.run_module(module, run_name="__main__", alter_sys=True)
            except SystemExit as ex:
                return (ex.code if isinstance(ex.code, int) else 1), err.getvalue()
            return 0, err.getvalue()
    finally:
        sys.argv = old_argv


COMMANDS = documented()


def test_the_docs_document_the_main_commands():
    text = " ".join(c for _, c in COMMANDS)
    for needed in ("dynboot quickstart", "python -m jobs.relabel", "python -m jobs.train", "python -m jobs.filter",
                   "python -m jobs.evaluate"):
        assert needed in text, f"no documented {needed!r} command"


@pytest.mark.parametrize("where, command", COMMANDS, ids=[f"{w}:{c[:60]}" for w, c in COMMANDS])
def test_documented_command_is_valid(where, command, monkeypatch):
    monkeypatch.chdir(ROOT)  # config paths in the docs are relative to the repository root
    parsed = module_and_args(command)
    if parsed is None:
        return
    module, args = parsed
    cls = config_class(module)
    if PLACEHOLDER.search(command):  # a template: its keys must be fields of the job's config
        for a in cli.normalise_args(args):
            if "=" in a and not a.startswith(("-", "'", '"', "[")):
                key = a.split("=", 1)[0].split(".")[0]
                assert key in cls.model_fields, f"{where}: {command!r}: {key!r} is not a field of {cls.__name__}"
        return
    code, err = run_check(module, args)
    assert code == 0, f"{where}: {command!r} does not validate: {err.strip()}"


TINY_WORLD = {"gold": "3", "videos": "1", "test": "2", "seed": "0", "workers": "1"}  # seconds, not minutes


def test_the_documented_world_command_writes_the_run_directory_contract(tmp_path):
    worlds = sorted({c for _, c in COMMANDS if c.startswith("dynboot world")})
    assert worlds, "no documented `dynboot world` command"
    for i, command in enumerate(worlds):
        words = [w.strip("[]") for w in shlex.split(command)[2:]]
        keys = [a.split("=", 1)[0] for a in cli.normalise_args(words) if "=" in a and not a.startswith("out=")]
        out = tmp_path / f"world{i}"  # never the documented out (a directory of the repository)
        assert set(keys) <= set(TINY_WORLD), f"{command}: give {set(keys) - set(TINY_WORLD)} a tiny value in TINY_WORLD"
        assert cli.main(["world", *(f"{k}={v}" for k, v in TINY_WORLD.items()), f"out={out}"]) == 0, command
        assert not contract_problems(out), command
