"""Metrics to an experiment tracker, as Hugging Face Trainer's `report_to`: none (default), MLflow or W&B.

    tracker = open_tracker("mlflow", run_name="idp", params=cfg.model_dump(mode="json"), uri="", project="dynboot")
    tracker.log({"loss": 0.3, "samples_per_s": 52.0}, step=10)
    tracker.finish({"eval_exact": 0.87})            # summary values; status FINISHED (finish(ok=False): FAILED)

The packages are optional extras (`pip install -e '.[tracking]'`: mlflow-skinny and wandb) and imported
only when a tracker is asked for. Credentials come from the environment the packages read themselves
(MLFLOW_TRACKING_URI / MLFLOW_TRACKING_TOKEN / MLFLOW_TRACKING_USERNAME+PASSWORD, WANDB_API_KEY); nothing here
reads, passes or logs them. MLflow 3's file store (`file:///…`, `./mlruns`) refuses to open unless
MLFLOW_ALLOW_FILE_STORE=true; a database or server URI needs nothing.
"""

from __future__ import annotations

import json
import time
from typing import Any, Literal, Protocol

TrackingKind = Literal["none", "mlflow", "wandb"]

__all__ = ["TrackingKind", "Tracker", "open_tracker", "numeric", "flat_params"]


class Tracker(Protocol):
    def log(self, metrics: dict[str, float], step: int) -> None: ...

    def finish(self, summary: dict[str, Any], ok: bool = True) -> None: ...


def numeric(row: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The row's numeric values (nested dicts flattened with '/'), booleans and strings left out."""
    out: dict[str, float] = {}
    for k, v in row.items():
        if isinstance(v, dict):
            out |= numeric(v, f"{prefix}{k}/")
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[f"{prefix}{k}"] = float(v)
    return out


def flat_params(params: dict[str, Any], prefix: str = "", limit: int = 500) -> dict[str, str]:
    """Nested config -> dotted keys with string values (trackers store parameters as short strings)."""
    out: dict[str, str] = {}
    for k, v in params.items():
        if isinstance(v, dict):
            out |= flat_params(v, f"{prefix}{k}.", limit)
        else:
            text = v if isinstance(v, str) else json.dumps(v, default=str)
            out[f"{prefix}{k}"] = text[:limit]
    return out


class NoTracker:
    def log(self, metrics: dict[str, float], step: int) -> None:
        pass

    def finish(self, summary: dict[str, Any], ok: bool = True) -> None:
        pass


class MlflowTracker:
    """One MLflow run through `MlflowClient` (no fluent global run: a driver may track several jobs in turn)."""

    def __init__(self, run_name: str, params: dict[str, Any], uri: str, project: str):
        from mlflow import MlflowClient
        from mlflow.entities import Param

        self.client = MlflowClient(tracking_uri=uri or None)  # None: MLFLOW_TRACKING_URI, else MLflow's default
        exp = self.client.get_experiment_by_name(project)
        exp_id = exp.experiment_id if exp else self.client.create_experiment(project)
        self.run_id = self.client.create_run(exp_id, run_name=run_name, tags={"dynboot.job": run_name}).info.run_id
        items = [Param(k, v) for k, v in flat_params(params).items()]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=items[i: i + 100])

    def log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, v, now, step) for k, v in metrics.items()]
        for i in range(0, len(batch), 1000):
            self.client.log_batch(self.run_id, metrics=batch[i: i + 1000])

    def finish(self, summary: dict[str, Any], ok: bool = True) -> None:
        values = numeric(summary)
        if values:
            self.log({f"summary/{k}": v for k, v in values.items()}, step=0)
        self.client.set_terminated(self.run_id, status="FINISHED" if ok else "FAILED")


class WandbTracker:
    """One W&B run; the API key and mode (WANDB_API_KEY, WANDB_MODE=offline) are wandb's own environment.
    `reinit="create_new"`: a driver tracks several jobs, in turn or at once (the quickstart's FDP runs), and
    wandb's default would finish the open run when the next one starts."""

    def __init__(self, run_name: str, params: dict[str, Any], project: str):
        import wandb

        self.run = wandb.init(project=project, name=run_name, config=params, reinit="create_new")

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def finish(self, summary: dict[str, Any], ok: bool = True) -> None:
        self.run.summary.update(numeric(summary))
        self.run.finish(exit_code=0 if ok else 1)


def open_tracker(kind: TrackingKind, run_name: str, params: dict[str, Any], uri: str = "",
                 project: str = "dynboot") -> Tracker:
    """A tracker of `kind`; a missing package is an error that names the extra to install."""
    if kind == "none":
        return NoTracker()
    try:
        if kind == "mlflow":
            return MlflowTracker(run_name, params, uri, project)
        return WandbTracker(run_name, params, project)
    except ModuleNotFoundError as err:
        package = {"mlflow": "mlflow-skinny (pip install -e '.[tracking]')", "wandb": "wandb (pip install -e '.[tracking]')"}[kind]
        raise ValueError(f"tracking={kind} needs {package}: {err}") from None
