"""`dynboot world --out DIR`: write the embedded world's data sets.

    DIR/world.json            the WorldSpec and generation settings (models read the spec from here)
    DIR/gold/train.json       labelled pairs, AURORA format, PNG images under gold/images/
    DIR/videos/*.mp4          unlabelled episodes (H.264) + videos/manifest.jsonl
    DIR/videos_truth.jsonl    their true key states and actions: for scoring pseudo-labels only
    DIR/test/test.json        held-out pairs, AURORA format, + test/truth.jsonl (structured truth)
    DIR/summary.json          counts, sizes, seconds
    DIR/config.yaml, DIR/metrics.jsonl   the run-directory contract (dynboot.io.rundir): the config, a row per split

Every split is drawn from its own seeded stream, and no gold pair or video transition equals a test
pair, so the splits are disjoint and reproducible from `seed` whatever the number of workers.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from pydantic import Field

from dynboot.data.aurora import write_aurora
from dynboot.config import Config
from dynboot.io.rundir import RunDir, atomic_write_text, write_json
from dynboot.data.video import write_video
from dynboot.world.actions import apply_action, infer_action, random_action
from dynboot.world.episodes import make_episode, pair_key
from dynboot.world.render import render
from dynboot.world.scene import WorldSpec, random_scene

_STREAMS = {"test": 1, "gold": 2, "videos": 3}


class WorldConfig(Config):
    """Settings of `dynboot world`."""

    out: str = Field("runs/world", description="Output directory.")
    gold: int = Field(2000, ge=0, description="Labelled pairs in gold/ (AURORA format).")
    videos: int = Field(400, ge=0, description="Unlabelled episode videos in videos/.")
    test: int = Field(500, ge=0, description="Held-out labelled pairs in test/.")
    seed: int = Field(0, description="Seed of every split (each split has its own stream).")
    actions_per_video: int = Field(8, ge=1, description="Actions per episode; each gives one key-frame pair.")
    hold: int = Field(4, ge=1, description="Frames each key state is held in a video.")
    transition: int = Field(4, ge=1, description="In-between frames showing each action.")
    fps: int = Field(10, ge=1, description="Frame rate written into the videos.")
    workers: int = Field(2, ge=1, description="Processes encoding videos.")
    world: WorldSpec = Field(default_factory=WorldSpec, description="Grid, shapes, colours, objects, pixels.")


def _rng(seed: int, stream: str, index: int = 0) -> np.random.Generator:
    return np.random.default_rng([seed, _STREAMS[stream], index])


def random_pairs(spec: WorldSpec, n: int, rng: np.random.Generator, avoid: set[bytes]) -> list[tuple[np.ndarray, np.ndarray]]:
    """`n` distinct (before, after) scene pairs with a uniformly random action type, none in `avoid`."""
    out, seen = [], set(avoid)
    while len(out) < n:
        before = random_scene(spec, rng)
        action = random_action(spec, before, rng)
        if action is None:
            continue
        after = apply_action(spec, before, action)
        key = pair_key(before, after)
        if key not in seen:
            seen.add(key)
            out.append((before, after))
    return out


def _write_episode(args: tuple) -> dict:
    cfg, index, avoid = args
    spec = cfg.world
    ep = make_episode(spec, _rng(cfg.seed, "videos", index), cfg.actions_per_video, cfg.hold, cfg.transition, avoid)
    video_id = f"ep{index:06d}"
    path = Path(cfg.out) / "videos" / f"{video_id}.mp4"
    write_video(path, ep.frames, fps=cfg.fps)
    return {
        "video_id": video_id,
        "path": f"videos/{video_id}.mp4",
        "frames": len(ep.frames),
        "segments": ep.segments,
        "actions": [a.text(spec) for a in ep.actions],
        "scenes": [s.tolist() for s in ep.scenes],
    }


def generate_world(cfg: WorldConfig) -> dict:
    """Write the world described by `cfg`; returns the summary."""
    # resume="force": a world is written whole every time, so a rerun replaces the recorded config, never resumes it
    with RunDir(cfg.out).open(cfg, resume="force") as run:
        return _generate(cfg, run)


def _generate(cfg: WorldConfig, run: RunDir) -> dict:
    t0 = time.time()
    spec, out = cfg.world, run.root
    write_json(out / "world.json", cfg.model_dump(mode="json"))

    test = random_pairs(spec, cfg.test, _rng(cfg.seed, "test"), avoid=set())
    test_keys = {pair_key(a, b) for a, b in test}
    write_aurora(out / "test" / "test.json",
                 [(render(spec, a), render(spec, b), infer_action(spec, a, b).text(spec)) for a, b in test], task="world")
    truth = [json.dumps({"index": i, "before": a.tolist(), "after": b.tolist(), **infer_action(spec, a, b).fields(spec)})
             for i, (a, b) in enumerate(test)]
    atomic_write_text(out / "test" / "truth.jsonl", "\n".join(truth) + ("\n" if truth else ""))

    gold = random_pairs(spec, cfg.gold, _rng(cfg.seed, "gold"), avoid=test_keys)
    write_aurora(out / "gold" / "train.json",
                 [(render(spec, a), render(spec, b), infer_action(spec, a, b).text(spec)) for a, b in gold], task="world")
    t_pairs = time.time() - t0
    run.log(split="test+gold", pairs=len(test) + len(gold), seconds=round(t_pairs, 2))

    jobs = [(cfg, i, test_keys) for i in range(cfg.videos)]
    if cfg.workers > 1 and cfg.videos > 1:
        with ProcessPoolExecutor(cfg.workers) as pool:
            episodes = list(pool.map(_write_episode, jobs, chunksize=8))
    else:
        episodes = [_write_episode(j) for j in jobs]
    manifest = [json.dumps({k: e[k] for k in ("video_id", "path", "frames")} | {"fps": cfg.fps}) for e in episodes]
    atomic_write_text(out / "videos" / "manifest.jsonl", "\n".join(manifest) + ("\n" if manifest else ""))
    atomic_write_text(out / "videos_truth.jsonl",
                      "".join(json.dumps({k: e[k] for k in ("video_id", "segments", "actions", "scenes")}) + "\n" for e in episodes))

    video_bytes = sum(p.stat().st_size for p in (out / "videos").glob("*.mp4"))
    run.log(split="videos", videos=len(episodes), seconds=round(time.time() - t0 - t_pairs, 2))
    summary = {
        "gold_pairs": len(gold),
        "test_pairs": len(test),
        "videos": len(episodes),
        "video_pairs": sum(len(e["actions"]) for e in episodes),
        "video_frames": sum(e["frames"] for e in episodes),
        "video_mb": round(video_bytes / 2**20, 2),
        "image_px": spec.image_px,
        "seconds_pairs": round(t_pairs, 2),
        "seconds_total": round(time.time() - t0, 2),
    }
    run.write_summary(summary)
    return summary


def load_spec(world_dir: str | Path) -> WorldSpec:
    """The WorldSpec a world directory was generated with (world.json), searched upward from a split dir."""
    p = Path(world_dir).resolve()
    for d in (p, *p.parents):
        if (d / "world.json").is_file():
            return WorldSpec.model_validate(json.loads((d / "world.json").read_text())["world"])
    raise FileNotFoundError(f"no world.json in {world_dir} or its parents: is it a `dynboot world` directory?")
