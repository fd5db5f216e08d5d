"""The train job's driver-side view of its run: a progress line every few seconds, and the metrics to a tracker.

Rank 0 appends one row per step to `<out>/metrics.jsonl` (dynboot.io.rundir); the driver, blocked in
`TorchTrainer.fit()`, follows that file from a thread. So the console needs nothing from the workers (their output
goes to the run's log: dynboot.io.console) and the tracker package is imported in the driver only.

    idp          step   120/900  loss 0.4123  53.0 samples/s  ETA 4m10s
    fdp_boot     step   225/450  loss 0.2011  52.1 samples/s  ETA 3m05s
"""

from __future__ import annotations

import re
import threading
from typing import Any

from dynboot.io.console import duration, say
from dynboot.io.rundir import RunDir
from dynboot.io.tracking import Tracker, numeric

# what a progress line looks like (tests parse it with this)
PROGRESS_LINE = re.compile(r"^\s*(?P<name>\S+)\s+step\s+(?P<step>\d+)/(?P<steps>\d+)\s+loss (?P<loss>[\d.]+)\s+"
                           r"(?P<rate>[\d.]+) samples/s\s+ETA (?P<eta>\S+)")


def progress_line(name: str, row: dict[str, Any], steps: int, eta_s: float | None, eval_exact: float | None = None) -> str:
    eta = duration(eta_s) if eta_s is not None else "?"
    line = (f"  {name:<12} step {row['step']:>5}/{steps}  loss {row['loss']:.4f}  {row.get('samples_per_s', 0):.1f} "
            f"samples/s  ETA {eta}")
    return line + (f"  eval exact {eval_exact:.3f}" if eval_exact is not None else "")


class RunFollower:
    """Follows a run's metrics.jsonl: every `every_s` a progress line (when steps advanced) and the new rows to
    `tracker`. `stop()` reads the last rows. Rows of a restarted attempt that repeat logged steps are skipped."""

    def __init__(self, run: RunDir, name: str, steps: int, tracker: Tracker, every_s: float):
        self.run, self.name, self.steps, self.tracker, self.every_s = run, name, steps, tracker, every_s
        self.last_step = 0
        self.first: tuple[int, float] | None = None  # (step, time_s) of the attempt's first row seen: the ETA's base
        self.eval_exact: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name=f"dynboot-progress-{name}")

    def start(self) -> "RunFollower":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        try:
            self.poll(show=False)  # the last rows, to the tracker
        except (OSError, ValueError):
            pass

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self.poll(show=True)
            except (OSError, ValueError):  # a half-written line or a file being rewritten: next tick
                continue

    def eta_s(self, row: dict[str, Any]) -> float | None:
        """Seconds left at the wall-clock rate of the steps seen so far (evaluations and checkpoints included)."""
        if self.first is None or row["step"] <= self.first[0] or row["time_s"] <= self.first[1]:
            return None
        rate = (row["step"] - self.first[0]) / (row["time_s"] - self.first[1])
        return (self.steps - row["step"]) / rate

    def poll(self, show: bool) -> None:
        rows = [r for r in self.run.metrics() if r.get("step", 0) > self.last_step and "loss" in r]
        if not rows:
            return
        if self.first is None or rows[0]["time_s"] < self.first[1]:  # a restarted attempt's clock starts again
            self.first = (rows[0]["step"], rows[0]["time_s"])
        for r in rows:
            self.tracker.log(numeric({k: v for k, v in r.items() if k != "step"}), step=r["step"])
            self.eval_exact = r.get("eval_exact", self.eval_exact)
        self.last_step = rows[-1]["step"]
        if show:
            say(progress_line(self.name, rows[-1], self.steps, self.eta_s(rows[-1]), self.eval_exact))


def follow(run: RunDir, name: str, steps: int, tracker: Tracker, every_s: float) -> RunFollower:
    return RunFollower(run, name, steps, tracker, every_s).start()
