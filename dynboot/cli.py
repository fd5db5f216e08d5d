"""The `dynboot` command.

    dynboot world [CFG.yaml] [key=value ...]      generate the embedded world (library code)
    dynboot init-model backend=... out=...        a random checkpoint of a real backend (library code)
    dynboot convert-vqgan ckpt=...                the released vqgan.ckpt -> vqgan.safetensors, once (library code)
    dynboot relabel|train|eval|rollout|quickstart|bootstrap ... run the job module `jobs.<name>` (the same program that
                                                  `ray job submit -- python -m jobs.<name>` runs)
    dynboot serve ...                             run the Serve app (`serve.run_local`)

Every command takes an optional YAML config file, then `key=value` overrides (`--key value` and
`--key=value` are accepted as spellings of `key=value`); `--help` lists the fields with descriptions;
`--check` validates the command line (the config file, every key and value) and prints the resolved config
without running anything (tests/test_docs_commands.py checks every documented command this way).
Jobs with a console (train, quickstart) print a line per stage and progress lines; everything else the
libraries print (Ray, DeepSpeed, warnings) goes to `<out>/log.txt`; `--verbose` shows it on the console too.
Job modules are launched by name, like torchtune's `tune run` launches recipes, so the library never
imports `jobs/` or `serve/`.
"""

from __future__ import annotations

import runpy
import sys
from typing import Callable, TypeVar

from pathlib import Path

from dynboot.config import Config, ConfigError, load_config
from dynboot.io.console import captured, say

C = TypeVar("C", bound=Config)

JOBS = {
    "relabel": ("jobs.relabel", "Ray Data relabel job: videos -> key-frame pairs -> IDP -> Parquet shards"),
    "filter": ("jobs.filter", "filter pseudo-labelled shards by score / stratified top-K"),
    "train": ("jobs.train", "Ray Train + DeepSpeed job: task=idp|fdp"),
    "eval": ("jobs.evaluate", "evaluation job + report"),
    "rollout": ("jobs.rollout", "multi-step rollouts on held-out world episodes: exact match at step 1..k per N"),
    "serve": ("serve.run_local", "start the best-of-N Serve app locally"),
    "quickstart": ("jobs.quickstart", "the whole bootstrapping loop on the embedded world"),
    "bootstrap": ("jobs.bootstrap", "iterated bootstrapping rounds (rounds=K) on the embedded world"),
}


def normalise_args(argv: list[str]) -> list[str]:
    """`--out DIR` / `--out=DIR` -> `out=DIR`; a leading YAML path and `key=value` pass through."""
    out, i = [], 0
    while i < len(argv):
        a = argv[i]
        if a.startswith("--") and a not in ("--help", "--check"):
            key = a[2:].replace("-", "_")
            if "=" in key:
                out.append(key)
            elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                out.append(f"{key}={argv[i + 1]}")
                i += 1
            else:
                out.append(f"{key}=true")
        else:
            out.append(a)
        i += 1
    return out


LOG_NAME = "log.txt"  # in a job's run directory: everything printed during the run (dynboot.io.console)
CONSOLE_FLAGS = ("--verbose", "-v")


def job_main(cls: type[C], run: Callable[[C], object], argv: list[str] | None = None, doc: str | None = None,
             console: bool = False) -> int:
    """Entry point shared by every command: parse config, print help or errors, run. With `console`, the run's
    own output goes to `<cfg.out>/log.txt` and the terminal shows only `dynboot.io.console.say` lines, unless
    `--verbose` (a flag, not a config field: it does not change what a rerun resumes)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = any(a in CONSOLE_FLAGS for a in argv)
    argv = normalise_args([a for a in argv if a not in CONSOLE_FLAGS])
    if "--help" in argv or "-h" in argv:
        print((doc or cls.__doc__ or "").strip() + "\n\nfields (key=value):\n" + cls.help())
        return 0
    check = "--check" in argv
    try:
        cfg = load_config(cls, [a for a in argv if a != "--check"])
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if check:
        print(cfg.model_dump_json(indent=1))
        return 0
    out = getattr(cfg, "out", "")
    if console and out:
        from dynboot.io import storage

        console = not storage.is_uri(out)  # the log is a local file: a run on object storage prints as before
    if not console:
        run(cfg)
        return 0
    log = Path(out) / LOG_NAME
    with captured(log, verbose):
        say(f"dynboot: everything else this run prints goes to {log} (--verbose: here too)")
        run(cfg)
    return 0


def _world(argv: list[str]) -> int:
    from dynboot.world.generate import WorldConfig, generate_world

    def run(cfg: WorldConfig) -> None:
        summary = generate_world(cfg)
        print(f"world written to {cfg.out}: " + ", ".join(f"{k}={v}" for k, v in summary.items()))

    return job_main(WorldConfig, run, argv, doc="dynboot world: generate the embedded world (gold, videos, test).")


def _library_command(module: str, config: str) -> Callable[[list[str]], int]:
    """A command implemented in the library: `module.main(cfg)` with `module.<config>`; its refusals
    (ValueError / FileNotFoundError, e.g. convert-vqgan's unknown pickle globals) print as errors."""
    def run(argv: list[str]) -> int:
        import importlib

        mod = importlib.import_module(module)
        try:
            return job_main(getattr(mod, config), mod.main, argv, doc=mod.__doc__)
        except (ValueError, FileNotFoundError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 1

    return run


LIBRARY = {  # commands that are library code, not jobs
    "world": (_world, "generate the embedded world"),
    "init-model": (_library_command("dynboot.models.init_model", "InitModelConfig"),
                   "a random checkpoint of a real backend (backend=anole|liquid|janus out=DIR size=tiny|shapes|full)"),
    "convert-vqgan": (_library_command("dynboot.models.vqgan_convert", "ConvertVQGANConfig"),
                      "convert a trusted Lightning vqgan.ckpt to vqgan.safetensors (ckpt=...)"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        print("\ncommands:")
        for name, (_, text) in {**LIBRARY, **JOBS}.items():
            print(f"  {name:<14} {text}")
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd in LIBRARY:
        return LIBRARY[cmd][0](rest)
    if cmd not in JOBS:
        print(f"error: unknown command {cmd!r}; commands: {', '.join([*LIBRARY, *JOBS])}", file=sys.stderr)
        return 2
    module = JOBS[cmd][0]
    sys.argv = [f"dynboot {cmd}", *rest]
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except ModuleNotFoundError as err:
        if err.name and module.startswith(err.name):
            print(f"error: `dynboot {cmd}` needs the {module} module, which is not installed here", file=sys.stderr)
            return 2
        raise
    except SystemExit as ex:
        if ex.code is None or isinstance(ex.code, int):
            return ex.code or 0
        print(f"error: {ex.code}", file=sys.stderr)  # SystemExit("message") means failure with a message
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
