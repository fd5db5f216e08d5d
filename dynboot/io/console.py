"""The console a person reads, apart from everything the libraries print.

    with console.captured(Path(out) / "log.txt", verbose=False):
        console.say("2/6 train IDP on 1000 gold pairs")     # the person's terminal + the log
        print("anything")                                   # the log only (verbose: the terminal too)

Inside `captured`, the process's stdout and stderr file descriptors (1 and 2) point at the run directory's log
file, so every line anyone writes there — Ray's forwarded worker output (`log_to_driver`: the Train controller,
its PlacementGroupCleaner's State API errors, DeepSpeed's op builds and accelerator notes in the workers),
Ray's own driver logger, Python warnings (deprecations, Ray Data's worker-count warnings), C++ glog lines — lands
in the log and not on the terminal. It works at the descriptor level because those writers are many and not ours:
Ray's log monitor prints with `print(..., file=sys.stderr)`, glog writes to fd 2 directly, warnings go through
`sys.stderr`. `say` writes to the terminal the process had before (a duplicate of fd 1) and to the log.
With `verbose`, a thread copies the log to that terminal as it grows, so the person sees all of it, in order.
Outside `captured` (a library call, a test), `say` is print.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

__all__ = ["say", "captured", "duration"]

_state: dict = {"terminal": {}, "log_fd": None, "verbose": False}
_lock = threading.Lock()


def say(text: str, error: bool = False) -> None:
    """One line (or several) for the person: the terminal (stderr for an `error`), and the run's log when captured."""
    line = text if text.endswith("\n") else text + "\n"
    with _lock:
        if _state["log_fd"] is None:
            print(line, end="", flush=True, file=sys.stderr if error else sys.stdout)
            return
        os.write(_state["log_fd"], line.encode())
        if not _state["verbose"]:  # verbose: the log's copier shows it, in its place among the rest
            os.write(_state["terminal"][2 if error else 1], line.encode())


def duration(seconds: float) -> str:
    """12s, 3m05s, 1h02m."""
    s = int(round(max(seconds, 0)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _copy_log(path: Path, start: int, terminal: int, stop: threading.Event) -> None:
    with open(path, "rb") as f:
        f.seek(start)  # where the log ended when the capture began (measured before anything else wrote)
        while True:
            chunk = f.read(1 << 16)
            if chunk:
                os.write(terminal, chunk)
                continue
            if stop.is_set():
                return
            time.sleep(0.2)


@contextlib.contextmanager
def captured(log_path: str | Path, verbose: bool = False) -> Iterator[Path]:
    """Send fds 1 and 2 to `log_path` (appended) for the duration; `say` reaches the terminal. Not re-entrant:
    an inner `captured` (a job run by the quickstart) leaves the outer one in place."""
    if _state["log_fd"] is not None:
        yield Path(log_path)
        return
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    stop = threading.Event()
    copier = None
    if verbose:
        copier = threading.Thread(target=_copy_log, args=(log_path, os.fstat(log_fd).st_size, saved[1], stop),
                                  daemon=True, name="dynboot-log-copy")
        copier.start()
    streams = sys.stdout, sys.stderr
    color = os.environ.get("RAY_COLOR_PREFIX")
    if color is None:  # Ray's forwarded worker lines without terminal colour codes (ray/_private/worker.py)
        os.environ["RAY_COLOR_PREFIX"] = "0"
    with _lock:
        _state.update(terminal=saved, log_fd=log_fd, verbose=verbose)
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        # Python writers too, where sys.stdout is not fd 1 (a notebook, pytest): line-buffered, on the fds
        sys.stdout = open(1, "w", buffering=1, closefd=False, errors="replace")
        sys.stderr = open(2, "w", buffering=1, closefd=False, errors="replace")
    try:
        yield log_path
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        with _lock:
            sys.stdout, sys.stderr = streams
            for fd, dup in saved.items():
                os.dup2(dup, fd)
            _state.update(terminal={}, log_fd=None, verbose=False)
        if color is None:
            os.environ.pop("RAY_COLOR_PREFIX", None)
        if copier is not None:
            stop.set()
            copier.join(timeout=5)
        for dup in saved.values():
            os.close(dup)
        os.close(log_fd)
