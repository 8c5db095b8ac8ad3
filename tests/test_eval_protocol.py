"""The evaluation protocol: hi-res client tests, per-domain test sizes, manifest splits, background images."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from fedsim.config import DataConfig, field_problems
from fedsim.data import yolo_format
from fedsim.data.partition import LAYOUT_VERSION, Partition, split_problems
from fedsim.data.synthetic import render, write_label_file
from fedsim.data.synthetic_format import prepare as synthetic_partition
from fedsim.data.yolo_folder import DataError, load_domain_index, validate_image

W, H = 64, 32


def quiet(_: str) -> None:
    pass


def write_domain(root: Path, domain: str, style: str, n: int, suffix: str = ".jpg", **save) -> list[Path]:
    """``n`` synthetic scenes of ``style`` as ``root/<domain>/{images,labels}`` (YOLO layout)."""
    (root / domain / "images").mkdir(parents=True, exist_ok=True)
    (root / domain / "labels").mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        img, labels = render(style, i, seed=3, width=W, height=H)
        path = root / domain / "images" / f"{domain}_{i:02d}{suffix}"
        Image.fromarray(img[..., ::-1]).save(path, **save)
        write_label_file(root / domain / "labels" / f"{path.stem}.txt", labels)
        paths.append(path)
    return paths


def names(images: Path) -> set[str]:
    return {p.name for p in images.iterdir()}


def shards(part: Partition) -> set[str]:
    return {name for c in part.clients for name in names(c.images)}


def test_client_domains_get_a_full_resolution_copy_of_their_test_set(tmp_path: Path) -> None:
    data = DataConfig(
        server_domains=["cloudy"],
        client_domains=["rainy", "snowy"],
        server_images=2,
        client_images=2,
        test_images=2,
        width=W,
        height=H,
    )
    part = synthetic_partition(data, num_clients=2, cache_root=tmp_path)

    assert set(part.test_hi) == {"rainy", "snowy"}  # server domains are tested at full resolution already
    for d, (hi_dir, hi_imgsz) in part.test_hi.items():
        lo_dir, lo_imgsz = part.test[d]
        assert names(hi_dir) == names(lo_dir) and len(names(hi_dir)) == 2
        assert (hi_imgsz, lo_imgsz) == (64, 32)
        for image in hi_dir.iterdir():
            assert cv2.imread(str(image)).shape[:2] == (H, W)
            assert cv2.imread(str(lo_dir / image.name)).shape[:2] == (H // 2, W // 2)
            label = f"{image.stem}.txt"
            assert (hi_dir.parent / "labels" / label).read_text() == (lo_dir.parent / "labels" / label).read_text()
    meta = json.loads((part.root / "partition.json").read_text())
    assert meta["params"]["layout"] == LAYOUT_VERSION
    assert meta["test_hi"]["rainy"] == {"images": "test_hi/rainy/images", "imgsz": 64}
    assert Partition.load(part.root) == part
    assert "test_hi_domains" in (part.root / "data.yaml").read_text()

    # A partition written before test_hi existed still loads (with none); its key differs anyway.
    del meta["test_hi"]
    (part.root / "partition.json").write_text(json.dumps(meta))
    assert Partition.load(part.root).test_hi == {}


def test_test_sizes_per_domain_and_the_random_draw_is_unchanged(tmp_path: Path) -> None:
    base = dict(
        server_domains=["cloudy"], client_domains=["rainy"], server_images=2, client_images=2, width=W, height=H
    )
    part = synthetic_partition(DataConfig(**base, test_images={"cloudy": 3, "rainy": 1}), 1, tmp_path / "a")
    assert {d: len(names(p)) for d, (p, _) in part.test.items()} == {"cloudy": 3, "rainy": 1}
    assert len(names(part.test_hi["rainy"][0])) == 1

    # An int size draws what the partition drew before manifests and per-domain sizes existed.
    part = synthetic_partition(DataConfig(**base, test_images=2), 1, tmp_path / "b")
    source = next((tmp_path / "b").glob("synth-*"))  # 2 + 2 images per domain
    rng = np.random.default_rng(0)
    for d in ("cloudy", "rainy"):
        images = sorted((source / d / "images").glob("*.jpg"))
        old_draw = [images[i].name for i in rng.permutation(len(images))][:2]
        assert names(part.test[d][0]) == set(old_draw)

    problems = field_problems({"data": {**base, "test_images": {"foggy": 2}}})[1]
    assert problems == ["data test_images names domain(s) ['foggy'] that are neither server nor client domains"]
    assert field_problems({"data": {"test_images": {"rainy": 0}}})[1][0].startswith("data.test_images must be")
    missing = split_problems({"cloudy": 10, "rainy": 10}, DataConfig(**base, test_images={"cloudy": 2}), 1)
    assert missing == [
        "domain 'rainy': data.test_images names no test size for it and the manifest marks none of its images 'test'"
    ]


def test_manifest_split_is_honoured(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    day = write_domain(root, "day", "cloudy", 6)
    night = write_domain(root, "night", "night", 10)
    rows = [f"{p.relative_to(root)},day,any" for p in day]
    splits = ["test"] * 3 + ["train"] * 5 + ["any"] * 2
    rows += [f"{p.relative_to(root)},night,{s}" for p, s in zip(night, splits, strict=True)]
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("image,domain,split\n" + "\n".join(rows) + "\n")
    base = dict(
        format="yolo", root=root, manifest=manifest, server_domains=["day"], client_domains=["night"], width=W, height=H
    )
    marked_test = {p.name for p in night[:3]}
    marked_train = {p.name for p in night[3:8]}

    data = DataConfig(**base, server_images=2, client_images=7, test_images=2)
    assert yolo_format.available_images(data) == {"day": {"any": 6}, "night": {"test": 3, "train": 5, "any": 2}}
    part = yolo_format.prepare(data, 1, tmp_path / "cache", quiet)
    night_test = names(part.test["night"][0])
    assert len(night_test) == 2 and night_test <= marked_test  # capped at test_images, only 'test' rows
    assert names(part.test_hi["night"][0]) == night_test
    assert not marked_test & shards(part)  # a 'test' row over the cap is still never trained on
    assert shards(part) == marked_train | {p.name for p in night[8:]}
    assert len(names(part.test["day"][0])) == 2  # no 'test' rows: a random draw, as before

    # A mapping that leaves the domain out takes all its 'test' rows.
    data = DataConfig(**base, server_images=2, client_images=7, test_images={"day": 2})
    part = yolo_format.prepare(data, 1, tmp_path / "cache", quiet)
    assert names(part.test["night"][0]) == marked_test

    # 'train' rows are never tested on: without 'test' rows the draw comes from 'any' only.
    available = {"day": {"any": 6}, "night": {"train": 5, "any": 2}}
    assert split_problems(available, DataConfig(**base, server_images=2, client_images=4, test_images=2), 1) == []
    assert split_problems(available, DataConfig(**base, server_images=2, client_images=4, test_images=3), 1) == [
        "domain 'night' has 2 images of split 'any' for its 3 test images (images of split 'train' are never tested on)"
    ]
    available = {"day": {"any": 6}, "night": {"test": 3, "train": 2}}
    assert split_problems(available, DataConfig(**base, server_images=2, client_images=4, test_images=2), 1) == [
        "domain 'night' has 2 images outside its manifest test split, the clients need 4"
    ]
    too_many = DataConfig(**base, server_images=2, client_images=8, test_images=2)
    with pytest.raises(DataError, match="^domain 'night' has 7 images outside its manifest test split"):
        yolo_format.prepare(too_many, 1, tmp_path / "cache", quiet)


def test_empty_label_file_is_a_background_image(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    write_domain(root, "day", "cloudy", 4)
    frames = write_domain(root, "night", "night", 4)
    (root / "night" / "labels" / f"{frames[0].stem}.txt").write_text("")
    (root / "night" / "labels" / f"{frames[1].stem}.txt").write_text("\n \n")
    (root / "night" / "labels" / f"{frames[2].stem}.txt").unlink()

    assert validate_image(frames[0], root / "night" / "labels" / f"{frames[0].stem}.txt", 5) == []
    index = load_domain_index(root, num_classes=5)
    assert index.images["night"] == [frames[0], frames[1], frames[3]]
    assert index.problems == [(root / "night" / "labels" / f"{frames[2].stem}.txt", "missing label file")]

    data = DataConfig(
        format="yolo",
        root=root,
        server_domains=["day"],
        client_domains=["night"],
        server_images=2,
        client_images=1,
        test_images=2,
    )
    part = yolo_format.prepare(data, 1, tmp_path / "cache", quiet)
    placed = [part.test_hi["night"][0], part.test["night"][0], part.clients[0].images]
    assert set().union(*(names(p) for p in placed)) == {frames[0].name, frames[1].name, frames[3].name}
    for image in names(part.test["night"][0]):  # every test image comes with its (maybe empty) labels
        assert (part.test_hi["night"][0].parent / "labels" / f"{Path(image).stem}.txt").is_file()


def test_partitioning_png_prints_no_warning(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "ds"
    write_domain(root, "day", "cloudy", 3, suffix=".png")
    # A broken colour profile: OpenCV's libpng says "libpng warning: iCCP: ..." for every such file.
    night = write_domain(root, "night", "night", 4, suffix=".png", icc_profile=b"not a profile" * 20)
    data = DataConfig(
        format="yolo",
        root=root,
        server_domains=["day"],
        client_domains=["night"],
        server_images=2,
        client_images=3,
        test_images=1,
    )
    capfd.readouterr()
    part = yolo_format.prepare(data, 1, tmp_path / "cache", quiet)
    out, err = capfd.readouterr()
    assert "warn" not in (out + err).lower(), out + err

    shard = sorted(part.clients[0].images.iterdir())
    assert len(shard) == 3 and all(p.suffix == ".png" for p in shard)
    small = np.asarray(Image.open(shard[0]).convert("RGB"))
    full = np.asarray(Image.open(root / "night" / "images" / shard[0].name).convert("RGB"))
    expected = cv2.resize(full, (W // 2, H // 2), interpolation=cv2.INTER_AREA)
    assert small.shape == (H // 2, W // 2, 3) and np.array_equal(small, expected)  # lossless, same pixels
    assert {p.name for p in night} == shards(part) | names(part.test["night"][0])


def test_evaluate_scores_client_domains_at_both_resolutions(tmp_path: Path, cpu_threads) -> None:
    from fedsim.model.detector import build_detector
    from fedsim.preflight import load
    from fedsim.runtime.server import ServerTrainer
    from fedsim.storage import cache_dir
    from fedsim.train.evaluate import evaluate
    from fedsim.train.foundation import pretrain
    from tests.conftest import TINY

    cfg = load(TINY, ["data.server_images=4", "data.client_images=4", "data.test_images=4", "train.eval_batch=4"])
    m = cfg.model
    weights = pretrain(
        cache_dir(), m.arch, m.pretrain_images, m.pretrain_epochs, m.pretrain_seed, cfg.data.width, cfg.data.height
    )  # cached after the first test session
    part = synthetic_partition(cfg.data, cfg.clients.num_clients, tmp_path)
    trainer = ServerTrainer(build_detector(m.arch, cfg.data.classes, weights=str(weights)), part, cfg)
    out = trainer.evaluate()

    hi = {f"map50_hi/{d}" for d in ("rainy", "snowy")} | {f"map_hi/{d}" for d in ("rainy", "snowy")}
    assert hi | {"map50_hi/total", "map_hi/total"} <= set(out)
    assert "map50_hi/cloudy" not in out
    assert out["map50/total"] > 0 and out["map50_hi/total"] > 0
    per_class = [v for k, v in out.items() if k.startswith("map50_class/")]
    assert len(per_class) >= 2 and set(per_class) != {out["map50/total"]}
    assert sum(per_class) / len(per_class) == pytest.approx(out["map50/total"])
    # map50_hi/total pools the server domain's test set with the client domains' hi-res ones.
    every_domain_hi = {**trainer.test_loaders, **trainer.test_hi_loaders}
    with torch.no_grad():
        again = evaluate(trainer.model, every_domain_hi)
    assert again["map50/total"] == pytest.approx(out["map50_hi/total"])
    assert again["map/rainy"] == pytest.approx(out["map_hi/rainy"])
    assert again["map50/cloudy"] == pytest.approx(out["map50/cloudy"])
