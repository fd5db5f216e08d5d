"""A gold + pseudo mixture that keeps every action class at its gold share (dynboot.data.mixture.class_balanced):
what the streaming ingest draws, on the embedded world's gold pairs and a pseudo source with no `add` pair — the
quickstart's filter output on the world. No Ray: seconds."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from dynboot.data.data_index import EmptySource, build_index, class_counts
from dynboot.data.ingest import RankStream
from dynboot.data.mixture import Source, action_class, class_balanced
from dynboot.data.pairs import gold_rows, to_table
from dynboot.io.images import ImagePolicy
from jobs.train_config import gold_plus


@pytest.fixture(scope="module")
def pseudo_without_add(small_world, tmp_path_factory):
    """Pseudo-labelled pairs of every gold class but `add`: the world's gold rows relabelled as pseudo, twice each
    (as a strong IDP's filter output outnumbers the gold)."""
    rows = [r | {"source": "pseudo", "score": -0.001, "id": f"{r['id']}:{k}"}
            for r in gold_rows(small_world / "gold" / "train.json") if action_class(r["action"]) != "add" for k in range(2)]
    out = tmp_path_factory.mktemp("pseudo") / "shards"
    out.mkdir()
    pq.write_table(to_table(rows), out / "part-0.parquet", row_group_size=64)
    return out


def _drawn(sources: list[dict], n: int = 2048) -> dict[str, float]:
    stream = RankStream(build_index([Source.model_validate(s) for s in sources]), 0, 1, ImagePolicy(kind="squash", size=32), seed=0,
                        window=256)
    counts = Counter(action_class(e.action) for e in stream.next(n))
    stream.close()
    return {c: k / n for c, k in counts.items()}


def test_a_class_the_pseudo_pairs_lack_keeps_its_gold_share(small_world, pseudo_without_add):
    gold = {"path": str(small_world / "gold"), "weight": 200.0}
    gold_counts = class_counts(Source.model_validate(gold))
    pseudo_counts = class_counts(Source(path=str(pseudo_without_add)))
    assert "add" in gold_counts and "add" not in pseudo_counts and sum(gold_counts.values()) == 200
    gold_share = {c: k / 200 for c, k in gold_counts.items()}
    pseudo = {"path": str(pseudo_without_add), "weight": float(sum(pseudo_counts.values()))}

    plain = _drawn(gold_plus(gold, [pseudo], balance=False))
    balanced_sources = gold_plus(gold, [pseudo], balance=True)
    balanced = _drawn(balanced_sources)
    # plain: add is diluted by the pseudo pairs (1/3 gold of the draws); balanced: every class at its gold share
    assert plain["add"] == pytest.approx(gold_share["add"] / 3, abs=0.03)
    assert all(balanced[c] == pytest.approx(g, abs=0.03) for c, g in gold_share.items()), (balanced, gold_share)
    # one gold source per class, and the pseudo source as it was
    assert sorted(tuple(s["classes"]) for s in balanced_sources[:-1]) == sorted((c,) for c in gold_counts)
    assert balanced_sources[-1]["path"] == pseudo["path"] and balanced_sources[-1]["weight"] == pseudo["weight"]
    # against a pseudo pair, every gold pair is drawn at least as often as in the plain mixture (where it is 1:1)
    pseudo_per_pair = pseudo["weight"] / sum(pseudo_counts.values())
    assert all(s["weight"] / gold_counts[s["classes"][0]] >= pseudo_per_pair - 1e-9 for s in balanced_sources[:-1])

def test_class_balanced_arithmetic_and_the_class_filter(small_world, pseudo_without_add):
    gold = Source(path="gold", weight=1000.0)
    out = class_balanced(gold, {"add": 200, "move": 300, "swap": 300, "remove": 200},
                         [(Source(path="pseudo", weight=2000.0), {"move": 1000, "swap": 800, "remove": 200})])
    weights = {s.classes[0]: s.weight for s in out[:-1]}
    # move gets the most pseudo pairs per gold pair: its gold pairs keep weight 1 each; the total is 1000 * 13/3
    assert weights == pytest.approx({"add": 2600 / 3, "move": 300.0, "remove": 2000 / 3, "swap": 500.0})
    with pytest.raises(ValueError, match="no rows"):
        class_balanced(gold, {}, [])
    only_add = build_index([Source(path=str(small_world / "gold"), classes=["add"])]).sources[0]
    assert only_add.rows == class_counts(Source(path=str(small_world / "gold")))["add"]
    assert only_add.report["other_classes"] == 200 - only_add.rows
    with pytest.raises(EmptySource, match="no record of the classes"):
        build_index([Source(path=str(small_world / "gold"), classes=["teleport"])])
    # real AURORA records: the counts are of the rows training reads (ag's first two records miss their images)
    aurora = Path(__file__).parent / "data" / "aurora" / "data" / "ag"
    assert sum(class_counts(Source(path=str(aurora))).values()) == build_index([Source(path=str(aurora))]).sources[0].rows == 2
    with pytest.raises(ValueError, match="dynboot filter"):
        build_index([Source(path=str(pseudo_without_add), classes=["move"])])
