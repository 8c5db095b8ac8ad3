"""Client populations: Dirichlet label skew, quantity skew, no empty shard, and client availability.

The expected splits are computed here from the documented rule (``fedsim/data/partition.py``,
``skewed_shards``) with numpy's Generator directly, not with the code under test.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from fedsim.config import ClientsConfig, DataConfig, ExperimentConfig, field_problems
from fedsim.data.partition import build_partition, skewed_shards, split_problems
from fedsim.preflight import check, load
from fedsim.runtime.rounds import online_clients, sample_clients
from tests.conftest import TINY

NAMES = ["car", "truck", "bus", "pedestrian", "traffic_sign"]
BACKGROUND = len(NAMES)  # the group of images without objects


def write_image(root: Path, domain: str, name: str, objects: list[int]) -> Path:
    """A tiny image and its YOLO label file (one box per entry of ``objects``)."""
    (root / domain / "images").mkdir(parents=True, exist_ok=True)
    (root / domain / "labels").mkdir(parents=True, exist_ok=True)
    path = root / domain / "images" / f"{name}.png"
    Image.new("RGB", (16, 8), (len(objects) * 20, 0, 0)).save(path)
    (root / domain / "labels" / f"{name}.txt").write_text("".join(f"{c} 0.5 0.5 0.2 0.2\n" for c in objects))
    return path


def expected_counts(class_sizes: dict[int, int], k: int, alpha: float, rng: np.random.Generator) -> np.ndarray:
    """(k clients, classes) counts by the rule: classes in increasing id, p ~ Dir(alpha) over the
    clients for each, client j's run ends at floor(cumsum(p)[j] * n) (the last at n)."""
    out = np.zeros((k, BACKGROUND + 1), dtype=int)
    for c in sorted(class_sizes):
        n = class_sizes[c]
        ends = np.floor(np.cumsum(rng.dirichlet(np.full(k, alpha))) * n).astype(int)
        ends[-1] = n
        out[:, c] = np.diff(np.concatenate([[0], ends]))
    return out


def test_dirichlet_label_histograms_match_a_hand_check(tmp_path: Path) -> None:
    # Objects per client-domain image and the class the rule gives it (most frequent, lowest on a tie).
    recipes = [
        ([0, 0, 1], 0),
        ([1, 2, 2], 2),
        ([3, 1], 1),  # a tie: the lower id
        ([4], 4),
        ([], BACKGROUND),  # no objects: a group of its own
        ([2, 0, 2, 0, 3], 0),
    ]
    src, splits = tmp_path / "src", {}
    images: dict[str, list[Path]] = {"cloudy": [], "rainy": []}
    dominant: dict[str, int] = {}
    for i in range(36):
        objects, cls = recipes[i % len(recipes)]
        path = write_image(src, "rainy", f"rainy_{i:02d}", objects)
        images["rainy"].append(path)
        dominant[path.stem] = cls
    for i in range(5):
        images["cloudy"].append(write_image(src, "cloudy", f"cloudy_{i}", [0]))
    # Test images marked in the manifest, so that the clients' pool is exactly the 36 above.
    for d in ("cloudy", "rainy"):
        test = write_image(src, d, f"{d}_test", [1])
        images[d].append(test)
        splits[test] = "test"
    data = DataConfig(
        server_domains=["cloudy"],
        client_domains=["rainy"],
        server_images=5,
        client_images=36,
        test_images=1,
        client_scale=1.0,
        seed=11,
        partition="dirichlet",
        dirichlet_alpha=0.8,
    )
    part = build_partition(images, data, 4, tmp_path / "out", source_key="hand", splits=splits)

    got = np.zeros((4, BACKGROUND + 1), dtype=int)
    for shard in part.clients:
        for label in (part.root / "client_labels" / f"client_{shard.client_id:03d}" / "labels").iterdir():
            got[shard.client_id, dominant[label.stem]] += 1
    sizes = Counter(dominant.values())  # 6 images of each of the six groups
    want = expected_counts(dict(sizes), 4, 0.8, np.random.default_rng([11, 1, 0]))
    assert want.sum(axis=1).min() > 0  # no client left empty by the draws: no image was moved
    np.testing.assert_array_equal(got, want)
    assert [s.num_images for s in part.clients] == want.sum(axis=1).tolist()
    assert len({tuple(row) for row in got}) > 1  # skewed: the clients' histograms differ
    # Skew changes the cache key; the test set is the one the manifest marked.
    assert (
        part.root.name
        != build_partition(
            images, data.model_copy(update={"partition": "iid"}), 4, tmp_path / "o2", "hand", splits
        ).root.name
    )
    assert {p.name for p in part.test["rainy"][0].iterdir()} == {"rainy_test.png"}


def test_skewed_shards_follow_the_rule_with_quantity_skew_too() -> None:
    classes = [2, 0, 1, 0, 2, 2, 1, 0, 0, 3, 2, 1, 0, 2, 1, 3, 0, 2, 2, 1]
    data = DataConfig(partition="dirichlet", dirichlet_alpha=0.5, quantity_alpha=1.0)
    got = skewed_shards(classes, 3, data, np.random.default_rng(4))

    rng = np.random.default_rng(4)
    q = rng.dirichlet([1.0, 1.0, 1.0])
    want: list[list[int]] = [[], [], []]
    for c in sorted(set(classes)):
        members = [i for i, x in enumerate(classes) if x == c]
        p = rng.dirichlet([0.5, 0.5, 0.5]) * q
        ends = [int(e) for e in np.cumsum(p / p.sum()) * len(members)][:-1] + [len(members)]
        starts = [0, *ends[:-1]]
        for j in range(3):
            want[j] += members[starts[j] : ends[j]]
    assert all(want)  # nobody empty here, so the result is the plain cut
    assert got == [sorted(w) for w in want]


def test_quantity_skew_sizes() -> None:
    data = DataConfig(quantity_alpha=0.5)  # partition iid: runs of the shuffled pool
    got = skewed_shards([0] * 100, 5, data, np.random.default_rng(2))
    q = np.random.default_rng(2).dirichlet([0.5] * 5)
    ends = [*np.floor(np.cumsum(q) * 100).astype(int)[:-1].tolist(), 100]
    want_sizes = np.diff([0, *ends]).tolist()
    assert min(want_sizes) > 0
    assert [len(s) for s in got] == want_sizes
    assert len(set(want_sizes)) > 1
    assert sorted(i for s in got for i in s) == list(range(100))  # a partition: disjoint, complete
    assert got[0] == list(range(want_sizes[0]))  # consecutive runs of the pool


@pytest.mark.parametrize("partition,quantity", [("dirichlet", None), ("dirichlet", 0.05), ("iid", 0.05)])
def test_every_client_keeps_an_image_however_skewed(partition: str, quantity: float | None) -> None:
    data = DataConfig(partition=partition, dirichlet_alpha=0.01, quantity_alpha=quantity)
    classes = [i % 3 for i in range(30)]
    for k in (10, 29, 30):
        shards = skewed_shards(classes, k, data, np.random.default_rng(k))
        assert min(len(s) for s in shards) >= 1
        assert sorted(i for s in shards for i in s) == list(range(30))
    # The repair: an empty client takes the last image of the largest shard (the first on a tie).
    tight = skewed_shards(
        [0, 0, 0], 3, DataConfig(partition="dirichlet", dirichlet_alpha=1e-3), np.random.default_rng(0)
    )
    assert sorted(len(s) for s in tight) == [1, 1, 1]


def test_iid_is_todays_partition(tmp_path: Path) -> None:
    """The same cache key and shards as before the skew options existed (pinned from that code)."""
    images = {}
    for d, n in (("cloudy", 6), ("rainy", 14), ("snowy", 11)):
        images[d] = [write_image(tmp_path / "src", d, f"{d}_{i:02d}", [i % 3]) for i in range(n)]
    data = DataConfig(
        server_domains=["cloudy"],
        client_domains=["rainy", "snowy", "rainy"],
        server_images=4,
        client_images=9,
        test_images=2,
        client_scale=1.0,
        seed=5,
    )
    part = build_partition(images, data, 5, tmp_path / "out", source_key="golden")
    assert part.root.name == "pssfl-f4d1a5ff8e58"
    assert {c.client_id: sorted(p.stem for p in c.images.iterdir()) for c in part.clients} == {
        0: ["rainy_00", "rainy_03", "rainy_11"],
        1: ["snowy_03", "snowy_05", "snowy_06", "snowy_07", "snowy_08"],
        2: ["rainy_02", "rainy_07", "rainy_08"],
        3: ["rainy_01", "rainy_04", "rainy_12"],
        4: ["snowy_00", "snowy_01", "snowy_09", "snowy_10"],
    }


def test_new_fields_stay_out_of_the_config_key_at_their_defaults() -> None:
    base = ExperimentConfig()
    dumped = base.model_dump(mode="json")
    assert not {"partition", "dirichlet_alpha", "quantity_alpha"} & set(dumped["data"])
    assert "availability" not in dumped["clients"]
    explicit = ExperimentConfig.model_validate(
        {"data": {"partition": "iid", "quantity_alpha": None}, "clients": {"availability": 1.0}}
    )
    assert explicit.key() == base.key()
    skewed = ExperimentConfig.model_validate({"data": {"partition": "dirichlet"}})
    assert skewed.model_dump(mode="json")["data"]["partition"] == "dirichlet" and skewed.key() != base.key()
    _, problems = field_problems(
        {"data": {"partition": "zipf", "dirichlet_alpha": 0, "quantity_alpha": -1}, "clients": {"availability": 0}}
    )
    assert [p.split(" ")[0] for p in problems] == [
        "data.partition",
        "data.dirichlet_alpha",
        "data.quantity_alpha",
        "clients.availability",
    ]


def test_skewed_configs_with_empty_shards_are_refused_before_ray() -> None:
    data = DataConfig(client_domains=["rainy"], client_images=6, partition="dirichlet")
    problems = split_problems({"cloudy": 250, "rainy": 56}, data, 8)
    assert problems == [
        "clients.num_clients=8 gives domain 'rainy' 8 clients for its 6 images (data.client_images): "
        "2 client shards would be empty"
    ]
    cfg = load(TINY, ["data.partition=dirichlet", "data.quantity_alpha=0.1", "clients.num_clients=40"])
    report = check(cfg)
    assert any("clients.num_clients=40" in p and "'rainy'" in p and "16 images" in p for p in report.problems)
    ok = check(load(TINY, ["data.partition=dirichlet", "data.dirichlet_alpha=0.3"]))
    assert any("label skew Dir(0.3): at least 1" in line for line in ok.summary)


class Uniform:
    """The base strategy's sampler: m = round(rate * N) clients, uniformly."""

    def __init__(self, rate: float):
        self.rate = rate

    def sample_clients(self, rnd: int, num_clients: int, rng: np.random.Generator) -> list[int]:
        m = max(1, round(self.rate * num_clients))
        return sorted(int(c) for c in rng.choice(num_clients, size=m, replace=False))


def cfg_of(**clients) -> SimpleNamespace:
    return SimpleNamespace(seed=3, clients=ClientsConfig(**clients))


def test_availability_samples_online_clients_only_and_deterministically() -> None:
    cfg = cfg_of(num_clients=200, sampling_rate=0.1, availability=0.3, over_selection=1.5)
    for rnd in range(1, 6):
        online = online_clients(3, rnd, 200, 0.3, 1)
        want = np.flatnonzero(np.random.default_rng([3, rnd, 7, 0]).random(200) < 0.3).tolist()
        assert online == want
        selected, wanted = sample_clients(Uniform(0.1), cfg, rnd)
        assert wanted == 20 and len(selected) == 30 and set(selected) <= set(online)
        assert (selected, wanted) == sample_clients(Uniform(0.1), cfg, rnd)  # same seed, same round
    rounds = [sample_clients(Uniform(0.1), cfg, rnd)[0] for rnd in range(1, 4)]
    assert rounds[0] != rounds[1] != rounds[2]
    other = sample_clients(Uniform(0.1), SimpleNamespace(seed=4, clients=cfg.clients), 1)[0]
    assert other != rounds[0]


def test_a_round_with_few_clients_online_samples_them_all() -> None:
    cfg = cfg_of(num_clients=40, sampling_rate=0.5, availability=0.1)
    for rnd in range(1, 6):
        selected, wanted = sample_clients(Uniform(0.5), cfg, rnd)
        assert selected == online_clients(3, rnd, 40, 0.1, 1) and wanted == len(selected) < 20
    # min_clients: the online set is drawn again until enough clients are online.
    needy = cfg_of(num_clients=6, sampling_rate=1.0, availability=0.2, min_clients=3)
    for rnd in range(1, 6):
        selected, wanted = sample_clients(Uniform(1.0), needy, rnd)
        assert len(selected) >= 3 and wanted == len(selected)


def test_full_availability_samples_as_before() -> None:
    cfg = cfg_of(num_clients=50, sampling_rate=0.2, over_selection=1.3)
    for rnd in range(1, 4):
        rng = np.random.default_rng([3, rnd])
        primary = Uniform(0.2).sample_clients(rnd, 50, rng)
        selected, wanted = sample_clients(Uniform(0.2), cfg, rnd)
        assert wanted == 10 and set(primary) <= set(selected) and len(selected) == 13
