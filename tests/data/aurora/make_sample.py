"""Rebuild this sample from a clone of McGill-NLP/AURORA (MIT, see LICENSE here); not run by the tests.

    python tests/data/aurora/make_sample.py /path/to/AURORA        # a work tree, or a bare mirror (git show)

Copies the image files below byte for byte (nothing downscaled or re-encoded: the point is AURORA's real mixed
sizes and formats) and writes cut-down JSON files in the repository's layout (paths relative to its root).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
# Aurora-Bench test.json records kept: one MagicBrush turn (500x500 input, 1024x1024 output), Action-Genome
# 480x270 and 480x360, Something-Something 320x240 and 427x240, a WhatsUp 1280x960 pair, Kubric 512x512.
KEEP = {"magicbrush": ["70491/70491-input.png"], "ag": ["WJEVU.mp4_2", "KWQKH.mp4_8"],
        "something": ["215668/", "219259/", "215405/"], "whatsup": ["cup_in-front_of_remote"],
        "kubric": ["counting/4707/", "attribute/3737/"]}
# The first records of the real data/<set>/train.json files (their images are not in the AURORA repository
# either: AURORA's training images are downloaded separately), kept to show missing images being counted.
REAL_TRAIN_HEAD = 2


def reader(repo: Path):
    if (repo / "test.json").is_file():
        return lambda rel: (repo / rel).read_bytes()
    return lambda rel: subprocess.run(["git", "-C", str(repo), "show", f"HEAD:{rel}"], check=True,
                                      capture_output=True).stdout


def main(repo: Path) -> None:
    read = reader(repo)
    test = json.loads(read("test.json"))
    kept = [r for r in test if any(k in r["input"] for k in KEEP.get(r["task"], []))]
    for rec in kept:
        for rel in (rec["input"], rec["output"]):
            dst = HERE / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(read(rel))
    (HERE / "test.json").write_text(json.dumps(kept, indent=2) + "\n")
    for name in ("ag", "magicbrush", "something", "kubric"):  # whatsup has no train.json in AURORA
        mine = [{k: v for k, v in r.items() if k != "task"} for r in kept if r["task"] == name]
        try:
            head = json.loads(read(f"data/{name}/train.json"))[:REAL_TRAIN_HEAD]
        except subprocess.CalledProcessError:  # something/kubric train.json are not in the repository
            head = []
        (HERE / "data" / name / "train.json").write_text(json.dumps(head + mine, indent=2) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
