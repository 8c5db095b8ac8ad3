"""Real-data input: BDD100K and SODA10M converters and the generic YOLO-folder loader.

Every fixture is written by the tests themselves in the real formats, with tiny images.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from PIL import Image

from fedsim.data import conversion
from fedsim.data.bdd100k import convert_bdd100k
from fedsim.data.conversion import DEFAULT_CLASSES, sanitize_domain
from fedsim.data.soda10m import SODA10M_CLASSES, convert_soda10m
from fedsim.data.yolo_folder import DataError, label_path_for, load_domain_index, validate_image

W, H = 64, 36


def write_image(path: Path, size: tuple[int, int] = (W, H)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (90, 120, 150)).save(path, format="JPEG")
    return path


def write_label(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def read_lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def box2d(x1: float, y1: float, x2: float, y2: float) -> dict:
    return {"x1": x1, "y1": y1, "x2": x2, "y2": y2}


# ---------------------------------------------------------------- BDD100K


@pytest.fixture
def bdd(tmp_path: Path) -> tuple[Path, Path]:
    images = tmp_path / "bdd_images"
    for name in ("a.jpg", "b.jpg", "frame c.jpg", "d.jpg"):
        write_image(images / name)
    (images / "bad.jpg").write_bytes(b"not a jpeg at all")
    clear = {"weather": "clear", "timeofday": "daytime", "scene": "city street"}
    cloudy = {"weather": "partly cloudy", "timeofday": "night", "scene": "highway"}
    frames = [
        {
            "name": "a.jpg",
            "attributes": clear,
            "labels": [
                {"category": "car", "box2d": box2d(8, 4, 24, 20)},
                {"category": "traffic sign", "box2d": box2d(0, 0, 32, 18)},
                {"category": "person", "box2d": box2d(-8, 18, 16, 44)},  # partly outside: clipped
                {"category": "rider", "box2d": box2d(1, 1, 5, 5)},  # unknown
                {"category": "lane", "poly2d": [{"vertices": [[0, 0], [5, 5]]}]},  # unknown, no box
                {"category": "car", "poly2d": [{"vertices": [[0, 0], [5, 5]]}]},  # known, no box
            ],
        },
        {
            "name": "b.jpg",
            "attributes": cloudy,
            "labels": [
                {"category": "truck", "box2d": box2d(32, 0, 64, 36)},
                {"category": "bus", "box2d": box2d(70, 5, 80, 10)},  # outside: degenerate
                {"category": "car", "box2d": box2d(10, 10, 10, 20)},  # zero width: degenerate
                {"category": "car", "box2d": {"x1": "a", "y1": 0, "x2": 4, "y2": 4}},  # malformed
            ],
        },
        {"name": "frame c.jpg", "attributes": cloudy, "labels": [{"category": "drivable area"}]},
        {"name": "d.jpg", "attributes": clear},  # no labels at all
        {
            "name": "missing.jpg",
            "attributes": clear,
            "labels": [{"category": "car", "box2d": box2d(0, 0, 4, 4)}],
        },
        {"name": "bad.jpg", "attributes": clear, "labels": [{"category": "car", "box2d": box2d(0, 0, 4, 4)}]},
        {"name": "a.jpg", "attributes": clear, "labels": []},  # duplicate
    ]
    labels_json = tmp_path / "bdd100k_labels_images_val.json"
    labels_json.write_text(json.dumps(frames))
    return labels_json, images


def test_bdd100k_labels_and_layout(bdd: tuple[Path, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    convert_bdd100k(*bdd, out)

    assert sorted(p.name for p in out.iterdir()) == [
        "classes.txt",
        "clear",
        "conversion_report.json",
        "partly_cloudy",
    ]
    assert read_lines(out / "clear" / "labels" / "a.txt") == [
        "0 0.250000 0.333333 0.250000 0.444444",
        "4 0.250000 0.250000 0.500000 0.500000",
        "3 0.125000 0.750000 0.250000 0.500000",
    ]
    assert read_lines(out / "partly_cloudy" / "labels" / "b.txt") == ["1 0.750000 0.500000 0.500000 1.000000"]
    assert (out / "partly_cloudy" / "labels" / "frame c.txt").read_text() == ""
    assert (out / "clear" / "labels" / "d.txt").read_text() == ""
    assert sorted(p.name for p in (out / "clear" / "images").iterdir()) == ["a.jpg", "d.jpg"]
    assert sorted(p.name for p in (out / "partly_cloudy" / "images").iterdir()) == ["b.jpg", "frame c.jpg"]
    assert read_lines(out / "classes.txt") == DEFAULT_CLASSES


def test_bdd100k_report_counts(bdd: tuple[Path, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    report = convert_bdd100k(*bdd, out)

    assert report.frames == 7
    assert report.frames_written == 4
    assert report.frames_per_domain == {"clear": 2, "partly_cloudy": 2}
    assert report.boxes == 4
    assert report.boxes_per_domain == {"clear": 3, "partly_cloudy": 1}
    assert report.boxes_per_class == {"car": 1, "traffic_sign": 1, "pedestrian": 1, "truck": 1}
    assert report.unknown_categories == {"rider": 1, "lane": 1, "drivable area": 1}
    assert report.no_box2d == 1
    assert report.malformed_boxes == 1
    assert report.degenerate_boxes == 2
    assert report.clipped_boxes == 1
    assert report.frames_without_boxes == 2
    assert report.missing_images == ["missing.jpg"]
    assert report.unreadable_images == ["bad.jpg"]
    assert report.duplicate_frames == ["a.jpg"]
    assert (
        report.labels_seen
        == 11
        == (
            report.boxes
            + sum(report.unknown_categories.values())
            + report.malformed_boxes
            + report.no_box2d
            + report.degenerate_boxes
        )
    )
    saved = json.loads((out / "conversion_report.json").read_text())
    assert saved == json.loads(json.dumps(report.to_dict()))
    assert saved["unknown_categories"] == {"drivable area": 1, "lane": 1, "rider": 1}
    text = report.summary()
    for fragment in ("4 written of 7", "2 without boxes", "partly_cloudy: 2 frames / 1 boxes", "rider x1"):
        assert fragment in text
    assert any("empty" in note for note in report.notes)


def test_bdd100k_hard_links_then_copies(bdd: tuple[Path, Path], tmp_path: Path, monkeypatch) -> None:
    labels_json, images = bdd
    convert_bdd100k(labels_json, images, tmp_path / "linked")
    assert os.path.samefile(tmp_path / "linked" / "clear" / "images" / "a.jpg", images / "a.jpg")

    def no_link(src, dst):
        raise OSError("cross-device link")

    monkeypatch.setattr(conversion.os, "link", no_link)
    convert_bdd100k(labels_json, images, tmp_path / "copied")
    copied = tmp_path / "copied" / "clear" / "images" / "a.jpg"
    assert not os.path.samefile(copied, images / "a.jpg")
    assert copied.read_bytes() == (images / "a.jpg").read_bytes()


def test_bdd100k_domain_key_and_category_map(bdd: tuple[Path, Path], tmp_path: Path) -> None:
    report = convert_bdd100k(*bdd, tmp_path / "tod", domain_key="timeofday", category_map={"rider": "pedestrian"})
    assert report.frames_per_domain == {"daytime": 2, "night": 2}
    assert read_lines(tmp_path / "tod" / "daytime" / "labels" / "a.txt") == ["3 0.046875 0.083333 0.062500 0.111111"]
    assert report.unknown_categories["car"] == 4  # an explicit map replaces the default one


def test_bdd100k_rejects_bad_arguments(bdd: tuple[Path, Path], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not in classes"):
        convert_bdd100k(*bdd, tmp_path / "x", category_map={"car": "automobile"})
    with pytest.raises(ValueError, match="no frame has attribute 'wether'"):
        convert_bdd100k(*bdd, tmp_path / "x", domain_key="wether")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "old.txt").write_text("stale")
    with pytest.raises(FileExistsError, match="not empty"):
        convert_bdd100k(*bdd, tmp_path / "full")


def test_bdd100k_output_loads_with_empty_frames_as_background(bdd: tuple[Path, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    convert_bdd100k(*bdd, out)
    index = load_domain_index(out, num_classes=len(DEFAULT_CLASSES))
    assert index.images == {
        "clear": [out / "clear" / "images" / "a.jpg", out / "clear" / "images" / "d.jpg"],
        "partly_cloudy": [out / "partly_cloudy" / "images" / "b.jpg", out / "partly_cloudy" / "images" / "frame c.jpg"],
    }
    assert index.problems == []


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("partly cloudy", "partly_cloudy"),
        ("Clear", "clear"),
        (" Night  Time ", "night_time"),
        (None, "undefined"),
    ],
)
def test_sanitize_domain(raw: str | None, clean: str) -> None:
    assert sanitize_domain(raw) == clean


def test_sanitize_domain_keeps_folders_inside_out_dir() -> None:
    assert "/" not in sanitize_domain("../../etc")
    assert sanitize_domain("..") == "undefined"


# ---------------------------------------------------------------- SODA10M


@pytest.fixture
def soda(tmp_path: Path) -> tuple[Path, Path]:
    images = tmp_path / "soda_images"
    write_image(images / "s1.jpg")
    write_image(images / "s2.jpg", size=(32, 18))  # no size in the JSON: read from the file
    write_image(images / "s3.jpg")
    data = {
        "images": [
            {
                "file_name": "s1.jpg",
                "id": 1,
                "width": W,
                "height": H,
                "weather": "Clear",
                "period": "Daytime",
            },
            {"file_name": "s2.jpg", "id": 2, "weather": "Overcast", "period": "Night"},
            {
                "file_name": "s3.jpg",
                "id": 3,
                "width": W,
                "height": H,
                "weather": "Clear",
                "period": "Daytime",
            },
            {
                "file_name": "gone.jpg",
                "id": 4,
                "width": W,
                "height": H,
                "weather": "Rainy",
                "period": "Night",
            },
        ],
        "categories": [
            {"id": i, "name": name} for i, name in enumerate(SODA10M_CLASSES, start=1)
        ],  # Pedestrian=1, Cyclist=2, Car=3, Truck=4, Tram=5, Tricycle=6
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 3, "bbox": [8, 4, 16, 16]},
            {"id": 2, "image_id": 1, "category_id": 1, "bbox": [56, 30, 16, 12]},  # clipped
            {"id": 3, "image_id": 1, "category_id": 2, "bbox": [0, 0, 10, 10]},  # Cyclist: unknown
            {"id": 4, "image_id": 1, "category_id": 3, "bbox": [1, 2, 0, 5]},  # degenerate
            {"id": 5, "image_id": 2, "category_id": 4, "bbox": [0, 0, 16, 9]},
            {"id": 6, "image_id": 2, "category_id": 5, "bbox": [0, 0, 4, 4]},  # Tram: unknown
            {"id": 7, "image_id": 2, "category_id": 99, "bbox": [0, 0, 4, 4]},  # unlisted category
            {"id": 8, "image_id": 2, "category_id": 3},  # no bbox
            {"id": 9, "image_id": 2, "category_id": 3, "bbox": [1, 2, 3]},  # malformed
            {"id": 10, "image_id": 42, "category_id": 3, "bbox": [0, 0, 4, 4]},  # orphan
            {"id": 11, "image_id": 4, "category_id": 3, "bbox": [0, 0, 4, 4]},  # image missing
        ],
    }
    annotations = tmp_path / "instance_train.json"
    annotations.write_text(json.dumps(data))
    return annotations, images


def test_soda10m_labels_and_report(soda: tuple[Path, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    report = convert_soda10m(*soda, out)

    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["clear", "overcast"]
    assert read_lines(out / "clear" / "labels" / "s1.txt") == [
        "0 0.250000 0.333333 0.250000 0.444444",
        "3 0.937500 0.916667 0.125000 0.166667",
    ]
    assert read_lines(out / "overcast" / "labels" / "s2.txt") == ["1 0.250000 0.250000 0.500000 0.500000"]
    assert (out / "clear" / "labels" / "s3.txt").read_text() == ""
    assert report.frames == 4
    assert report.frames_written == 3
    assert report.frames_per_domain == {"clear": 2, "overcast": 1}
    assert report.boxes == 3
    assert report.boxes_per_domain == {"clear": 2, "overcast": 1}
    assert report.unknown_categories == {"Cyclist": 1, "Tram": 1, "category_id=99": 1}
    assert (report.no_box2d, report.malformed_boxes, report.degenerate_boxes) == (1, 1, 1)
    assert report.clipped_boxes == 1
    assert report.labels_seen == 9
    assert report.frames_without_boxes == 1
    assert report.missing_images == ["gone.jpg"]
    assert report.orphan_annotations == 1
    assert json.loads((out / "conversion_report.json").read_text())["orphan_annotations"] == 1


def test_soda10m_period_domains_and_own_classes(soda: tuple[Path, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    report = convert_soda10m(*soda, out, domain_key="period", classes=SODA10M_CLASSES)

    assert report.frames_per_domain == {"daytime": 2, "night": 1}
    assert read_lines(out / "daytime" / "labels" / "s1.txt") == [
        "2 0.250000 0.333333 0.250000 0.444444",
        "0 0.937500 0.916667 0.125000 0.166667",
        "1 0.078125 0.138889 0.156250 0.277778",
    ]
    assert read_lines(out / "night" / "labels" / "s2.txt") == [
        "3 0.250000 0.250000 0.500000 0.500000",
        "4 0.062500 0.111111 0.125000 0.222222",  # Tram [0, 0, 4, 4] in the 32x18 image
    ]
    assert report.unknown_categories == {"category_id=99": 1}
    assert read_lines(out / "classes.txt") == SODA10M_CLASSES


def test_soda10m_unknown_domain_key(soda: tuple[Path, Path], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no image has the key 'scene'"):
        convert_soda10m(*soda, tmp_path / "out", domain_key="scene")


# ---------------------------------------------------------------- generic loader

GOOD = "0 0.5 0.5 0.2 0.2\n3 0.1 0.9 0.05 0.1\n"


@pytest.fixture
def yolo_root(tmp_path: Path) -> Path:
    root = tmp_path / "yolo"
    clear = root / "clear"
    for stem, label in [
        ("ok2", GOOD),
        ("ok1", GOOD),
        ("badline", "0 0.5 0.5 0.2 0.2\n0 0.5 0.5 0.1\n1 a b c d\n"),
        ("badcls", "7 0.5 0.5 0.2 0.2\n"),
        ("badbox", "0 1.5 0.5 0.2 0.2\n"),
        ("empty", "\n  \n"),
    ]:
        write_image(clear / "images" / f"{stem}.jpg")
        write_label(clear / "labels" / f"{stem}.txt", label)
    write_image(clear / "images" / "nolabel.jpg")
    (clear / "images" / "corrupt.jpg").write_bytes(b"\xff\xd8garbage")
    write_label(clear / "labels" / "corrupt.txt", GOOD)
    (clear / "images" / "notes.md").write_text("not an image")
    write_image(root / "rainy" / "images" / "r1.png")
    write_label(root / "rainy" / "labels" / "r1.txt", GOOD)
    (root / "not_a_domain").mkdir()
    return root


def test_loader_subfolders_skip(yolo_root: Path) -> None:
    index = load_domain_index(yolo_root, num_classes=5)
    clear, rainy = yolo_root / "clear", yolo_root / "rainy"

    assert index.images == {
        "clear": [clear / "images" / "empty.jpg", clear / "images" / "ok1.jpg", clear / "images" / "ok2.jpg"],
        "rainy": [rainy / "images" / "r1.png"],
    }
    assert set(index.splits.values()) == {"any"}
    problems = dict(index.problems)
    assert len(index.problems) == 5
    assert problems[clear / "labels" / "badline.txt"].startswith("line 2: malformed line '0 0.5 0.5 0.1'")
    assert problems[clear / "labels" / "badline.txt"].endswith("(and 1 more bad lines)")
    assert problems[clear / "labels" / "badcls.txt"] == "line 1: class id 7 out of range [0, 5)"
    assert problems[clear / "labels" / "badbox.txt"].startswith("line 1: box out of range (1.5 0.5 0.2 0.2)")
    assert clear / "labels" / "empty.txt" not in problems  # a background image
    assert problems[clear / "labels" / "nolabel.txt"] == "missing label file"
    assert problems[clear / "images" / "corrupt.jpg"].startswith("unreadable image")
    summary = index.summary()
    assert "2 domains, 4 images, 5 problems" in summary
    assert "clear: 3 images" in summary


def test_loader_fail_names_paths(yolo_root: Path) -> None:
    with pytest.raises(DataError) as err:
        load_domain_index(yolo_root, num_classes=5, on_bad="fail")
    message = str(err.value)
    assert message.startswith("5 problems in 5 files")
    for name in ("badline.txt", "badcls.txt", "badbox.txt", "nolabel.txt", "corrupt.jpg"):
        assert name in message
    assert "empty.txt" not in message


def test_loader_fail_lists_at_most_20(tmp_path: Path) -> None:
    root = tmp_path / "many"
    write_image(root / "d" / "images" / "good.jpg")
    write_label(root / "d" / "labels" / "good.txt", GOOD)
    for i in range(25):
        write_image(root / "d" / "images" / f"x{i:02d}.jpg")
    with pytest.raises(DataError) as err:
        load_domain_index(root, num_classes=5, on_bad="fail")
    message = str(err.value)
    assert message.startswith("25 problems in 25 files")
    assert message.count("missing label file") == 20
    assert "... and 5 more" in message


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ("0 0.5 0.5 0.1", "malformed line"),
        ("0 0.5 0.5 0.1 0.1 0.3", "malformed line"),
        ("0 nan 0.5 0.1 0.1", "malformed line"),
        ("car 0.5 0.5 0.1 0.1", "malformed line"),
        ("5 0.5 0.5 0.1 0.1", "class id 5 out of range [0, 5)"),
        ("-1 0.5 0.5 0.1 0.1", "class id -1 out of range [0, 5)"),
        ("1.5 0.5 0.5 0.1 0.1", "class id 1.5 is not an integer"),
        ("0 0.5 -0.1 0.1 0.1", "box out of range"),
        ("0 0.5 0.5 0 0.1", "box out of range"),
        ("0 0.5 0.5 0.1 -0.2", "box out of range"),
        ("0 0.5 0.5 1.2 0.1", "box out of range"),
    ],
)
def test_validate_image_label_lines(tmp_path: Path, line: str, reason: str) -> None:
    image = write_image(tmp_path / "images" / "x.jpg")
    label = write_label(tmp_path / "labels" / "x.txt", f"{line}\n")
    [(path, message)] = validate_image(image, label, num_classes=5)
    assert path == label
    assert message.startswith(f"line 1: {reason}")


def test_validate_image_accepts_good_and_float_class(tmp_path: Path) -> None:
    image = write_image(tmp_path / "images" / "x.jpg")
    label = write_label(tmp_path / "labels" / "x.txt", "1.0 0.5 0.5 1 1\n4 0 1 0.1 0.1\n")
    assert validate_image(image, label, num_classes=5) == []


def test_label_path_for() -> None:
    assert label_path_for(Path("/d/images/x/images/y/img.png")) == Path("/d/images/x/labels/y/img.txt")
    assert label_path_for(Path("/d/flat/img.jpeg")) == Path("/d/flat/img.txt")
    assert label_path_for(Path("/d/images/images.jpg")) == Path("/d/labels/images.txt")


def test_loader_manifest(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    for stem in ("a", "b", "c", "d"):
        write_image(root / "images" / "train" / f"{stem}.jpg")
        write_label(root / "labels" / "train" / f"{stem}.txt", GOOD)
    elsewhere = write_image(tmp_path / "other" / "images" / "e.jpg")
    write_label(tmp_path / "other" / "labels" / "e.txt", GOOD)
    manifest = tmp_path / "domains.csv"
    manifest.write_text(
        "image,domain,split\n"
        "images/train/a.jpg,sunny,train\n"
        f"{elsewhere},night,test\n"
        "images/train/c.jpg,sunny,any\n"
        "images/train/b.jpg,NA,Train\n"
        "images/train/d.jpg,sunny,validation\n"
        "images/train/a.jpg,night,test\n"
        "images/train/zzz.jpg,sunny,train\n"
        "images/train/c.jpg,,train\n"
    )
    index = load_domain_index(root, manifest=manifest, num_classes=5)
    img = root / "images" / "train"

    assert index.images == {
        "NA": [img / "b.jpg"],
        "night": [elsewhere],
        "sunny": [img / "a.jpg", img / "c.jpg"],
    }
    assert index.splits == {
        img / "a.jpg": "train",
        elsewhere: "test",
        img / "c.jpg": "any",
        img / "b.jpg": "train",
    }
    assert sorted((p.name, r.split(": ", 1)[-1]) for p, r in index.problems) == [
        ("a.jpg", "image listed more than once"),
        ("c.jpg", "empty domain"),
        ("d.jpg", "split 'validation' not one of ['any', 'test', 'train']"),
        ("zzz.jpg", "missing image file"),
        ("zzz.txt", "missing label file"),
    ]
    assert "night: 1 images (test 1)" in index.summary()


def test_loader_manifest_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("image,domain\nx.jpg,sunny\n")
    with pytest.raises(DataError, match=r"lacks columns \['split'\]"):
        load_domain_index(tmp_path, manifest=bad, num_classes=5)
    with pytest.raises(DataError, match="does not exist"):
        load_domain_index(tmp_path, manifest=tmp_path / "nope.csv", num_classes=5)
    empty = tmp_path / "empty.csv"
    empty.write_text("image,domain,split\n")
    with pytest.raises(DataError, match="no domains found in manifest"):
        load_domain_index(tmp_path, manifest=empty, num_classes=5)


def test_loader_root_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_domain_index(tmp_path / "nowhere", num_classes=5)
    (tmp_path / "stray").mkdir()
    with pytest.raises(DataError, match="no domains found"):
        load_domain_index(tmp_path, num_classes=5)
    with pytest.raises(ValueError, match="on_bad must be one of"):
        load_domain_index(tmp_path, num_classes=5, on_bad="ignore")


def test_loader_all_bad_and_classes_mismatch(tmp_path: Path) -> None:
    root = tmp_path / "r"
    write_image(root / "d" / "images" / "x.jpg")
    write_label(root / "d" / "labels" / "x.txt", "9 0.5 0.5 0.1 0.1\n")
    with pytest.raises(DataError, match="no usable images"):
        load_domain_index(root, num_classes=5)
    (root / "classes.txt").write_text("a\nb\n")
    with pytest.raises(DataError, match="lists 2 classes but num_classes is 5"):
        load_domain_index(root, num_classes=5)


def test_loader_reports_empty_domain_folder(yolo_root: Path) -> None:
    (yolo_root / "foggy" / "images").mkdir(parents=True)
    index = load_domain_index(yolo_root, num_classes=5)
    assert "foggy" not in index.images
    assert (yolo_root / "foggy" / "images", "domain folder has no images") in index.problems
