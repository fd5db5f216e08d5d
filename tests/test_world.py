"""The embedded world: exactness of tokenizer, parser, actions, videos and splits. `pytest tests/test_world.py`"""

import json

import numpy as np
import pytest

from dynboot.data.aurora import read_aurora
from dynboot.io.images import load_image
from dynboot.io.rundir import contract_problems
from dynboot.data.video import read_video
from dynboot.world import (ActionError, GridTokenizer, WorldSpec, apply_action, infer_action, parse, parse_action,
                           random_scene, render, valid_actions)
from dynboot.world.augment import augment_pair
from dynboot.world.generate import WorldConfig, generate_world

SPECS = [WorldSpec(), WorldSpec(grid=8, n_shapes=4, n_colours=6, max_objects=6), WorldSpec(grid=4, cell_px=6)]


@pytest.mark.parametrize("spec", SPECS, ids=["default", "big", "small"])
def test_tokenizer_round_trip_and_parser_exact(spec):
    rng = np.random.default_rng(0)
    tok = GridTokenizer(spec)
    scenes = np.stack([random_scene(spec, rng) for _ in range(200)])
    images = np.stack([render(spec, s) for s in scenes])
    assert images.shape == (200, spec.image_px, spec.image_px, 3) and images.dtype == np.uint8
    codes = tok.encode(images)
    assert np.array_equal(codes.numpy(), scenes)  # parser exact
    assert np.array_equal(tok.decode(codes), images)  # decode(encode(x)) == x on renders
    assert tok.features(images).shape == (200, spec.cells, spec.cell_px**2 * 3)


@pytest.mark.parametrize("spec", SPECS, ids=["default", "big", "small"])
def test_actions_deterministic_both_ways(spec):
    """Every after is a function of (before, action); no two actions give the same after; text <-> struct."""
    rng = np.random.default_rng(1)
    checked = 0
    for _ in range(300):
        before = random_scene(spec, rng)
        afters = {}
        for action in valid_actions(spec, before):
            after = apply_action(spec, before, action)
            key = after.tobytes()
            assert key not in afters, f"{action} and {afters.get(key)} give the same after"
            afters[key] = action
            assert infer_action(spec, before, after) == action
            assert parse_action(spec, action.text(spec)) == action
            checked += 1
    assert checked > 3000


def test_parse_action_rejects_other_text():
    spec = WorldSpec()
    for text in ["", "move the red circle", "fly the red circle up", "remove the pink circle", "remove the orange square"]:
        with pytest.raises(ActionError):
            parse_action(spec, text)  # orange is outside the default 4 colours


def test_invalid_action_raises():
    spec = WorldSpec()
    scene = np.zeros(spec.cells, dtype=np.int64)
    scene[0] = 1
    with pytest.raises(ActionError):
        apply_action(spec, scene, parse_action(spec, "move the red square up"))


def test_augmentation_preserves_labels():
    spec = WorldSpec()
    rng = np.random.default_rng(2)
    for _ in range(500):
        before = random_scene(spec, rng)
        action = valid_actions(spec, before)[0]
        a, b, act = augment_pair(spec, before, apply_action(spec, before, action), rng)
        assert np.array_equal(apply_action(spec, a, act), b)
        assert act in valid_actions(spec, a)


def test_generated_world_layout(small_world):
    spec = WorldSpec()
    summary = json.loads((small_world / "summary.json").read_text())
    assert summary["gold_pairs"] == 200 and summary["test_pairs"] == 100 and summary["videos"] == 12
    gold = read_aurora(small_world / "gold" / "train.json")
    test = read_aurora(small_world / "test" / "test.json")
    assert len(gold) == 200 and len(test) == 100
    truth = [json.loads(l) for l in (small_world / "test" / "truth.jsonl").read_text().splitlines()]
    for rec, t in zip(test[:20], truth[:20]):
        a = parse(spec, load_image(small_world / "test" / rec.input))[0]
        b = parse(spec, load_image(small_world / "test" / rec.output))[0]
        assert a.tolist() == t["before"] and b.tolist() == t["after"]
        assert infer_action(spec, a, b).text(spec) == rec.instruction
    keys = lambda recs, root: {(load_image(root / r.input).tobytes(), load_image(root / r.output).tobytes()) for r in recs}
    assert not keys(gold, small_world / "gold") & keys(test, small_world / "test")  # disjoint splits
    manifest = [json.loads(l) for l in (small_world / "videos" / "manifest.jsonl").read_text().splitlines()]
    assert len(manifest) == 12 and not (small_world / "videos" / "videos_truth.jsonl").exists()
    assert not contract_problems(small_world)  # config.yaml, metrics.jsonl, summary.json like every job's output


def test_videos_decode_to_rendered_frames(small_world):
    """decord reads the mp4s back; up to codec loss they are the rendered frames, key states parse exactly."""
    spec = WorldSpec()
    for line in (small_world / "videos_truth.jsonl").read_text().splitlines()[:4]:
        truth = json.loads(line)
        frames, decoder = read_video(small_world / "videos" / f"{truth['video_id']}.mp4")
        assert decoder == "decord" and frames.shape[1:] == (spec.image_px, spec.image_px, 3)
        assert len(frames) == truth["segments"][-1][1]
        for (start, end), scene in zip(truth["segments"], truth["scenes"]):
            rendered = render(spec, np.array(scene)).astype(int)
            for f in frames[start:end]:
                assert np.abs(f.astype(int) - rendered).mean() < 4  # codec loss only
                assert parse(spec, f)[0].tolist() == scene
        for (_, _), a, s0, s1 in zip(truth["segments"], truth["actions"], truth["scenes"], truth["scenes"][1:]):
            assert infer_action(spec, np.array(s0), np.array(s1)).text(spec) == a


def test_seed_reproducible(tmp_path, small_world):
    out = tmp_path / "again"
    generate_world(WorldConfig(out=str(out), gold=200, videos=12, test=100, seed=0, workers=2))
    for rel in ["gold/train.json", "test/truth.jsonl", "videos_truth.jsonl", "gold/images/000017_b.png"]:
        assert (out / rel).read_bytes() == (small_world / rel).read_bytes(), rel
    other = tmp_path / "other"
    generate_world(WorldConfig(out=str(other), gold=20, videos=0, test=10, seed=1, workers=1))
    assert (other / "test/truth.jsonl").read_text() != (small_world / "test/truth.jsonl").read_text()
