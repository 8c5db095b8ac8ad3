import numpy as np
import pytest

from fedsim.config import DataConfig
from fedsim.data.partition import Partition, label_path
from fedsim.data.synthetic import CLASSES, DOMAINS, SynthSpec, generate, render
from fedsim.data.synthetic_format import prepare as synthetic_partition


def test_render_is_deterministic_and_labels_are_valid():
    for domain in DOMAINS:
        img_a, lab_a = render(domain, 3, seed=5, width=160, height=96)
        img_b, lab_b = render(domain, 3, seed=5, width=160, height=96)
        assert img_a.shape == (96, 160, 3) and img_a.dtype == np.uint8
        assert np.array_equal(img_a, img_b) and np.array_equal(lab_a, lab_b)
        assert len(lab_a) > 0
        assert set(lab_a[:, 0].astype(int)) <= set(range(len(CLASSES)))
        assert (lab_a[:, 1:] >= 0).all() and (lab_a[:, 1:] <= 1).all()
        assert (lab_a[:, 3:] > 0).all()
        # boxes stay inside the image
        assert (lab_a[:, 1] - lab_a[:, 3] / 2 >= -1e-6).all() and (lab_a[:, 1] + lab_a[:, 3] / 2 <= 1 + 1e-6).all()


def test_seed_and_domain_change_the_scene():
    a, _ = render("rainy", 0, seed=0, width=160, height=96)
    b, _ = render("rainy", 0, seed=1, width=160, height=96)
    c, _ = render("snowy", 0, seed=0, width=160, height=96)
    assert not np.array_equal(a, b) and not np.array_equal(a, c)


def test_domains_shift_appearance_and_label_mix():
    def stats(domain):
        imgs, labs = zip(*(render(domain, i, 0, 160, 96) for i in range(40)), strict=True)
        counts = np.bincount(np.concatenate([lab[:, 0].astype(int) for lab in labs]), minlength=5)
        return np.mean([im.mean() for im in imgs]), np.mean([im.std() for im in imgs]), counts / counts.sum()

    cloudy, night, snowy, rainy = (stats(d) for d in ("cloudy", "night", "snowy", "rainy"))
    assert night[0] < cloudy[0] - 30 and snowy[0] > cloudy[0] + 10  # darkness and snow cover
    assert rainy[1] < cloudy[1]  # rain and haze flatten contrast
    assert rainy[2][3] < cloudy[2][3] / 2  # far fewer pedestrians out in the rain
    assert snowy[2][1] > cloudy[2][1] * 1.5  # more trucks on snowy roads


def test_generate_caches_by_parameters(tmp_path):
    spec = SynthSpec(images_per_domain={"cloudy": 3, "night": 2}, width=64, height=32, seed=1)
    root = generate(spec, tmp_path)
    assert root.name == f"synth-{spec.key()}"
    images = sorted((root / "cloudy" / "images").glob("*.jpg"))
    assert len(images) == 3 and len(list((root / "night" / "labels").glob("*.txt"))) == 2
    stamp = images[0].stat().st_mtime_ns
    assert generate(spec, tmp_path) == root and images[0].stat().st_mtime_ns == stamp
    other = SynthSpec(images_per_domain={"cloudy": 3, "night": 2}, width=64, height=32, seed=2)
    assert generate(other, tmp_path) != root


def test_partition_splits_server_clients_and_tests(tmp_path):
    data = DataConfig(
        server_domains=["cloudy"],
        client_domains=["rainy", "snowy"],
        server_images=4,
        client_images=6,
        test_images=2,
        width=128,
        height=64,
        client_scale=0.5,
    )
    part = synthetic_partition(data, num_clients=4, cache_root=tmp_path)
    assert Partition.load(part.root) == part
    assert len(list(part.server_images.glob("*.jpg"))) == 4
    assert [(c.client_id, c.domain, c.num_images) for c in part.clients] == [
        (0, "rainy", 3),
        (1, "snowy", 3),
        (2, "rainy", 3),
        (3, "snowy", 3),
    ]
    import cv2

    client_img = next(part.clients[0].images.glob("*.jpg"))
    assert cv2.imread(str(client_img)).shape[:2] == (32, 64)  # half resolution
    assert not (part.clients[0].images.parent / "labels").exists()  # clients hold no labels
    assert (part.server_imgsz, part.client_imgsz) == (128, 64)
    assert part.test["cloudy"][1] == 128 and part.test["rainy"][1] == 64
    # no image is in two places
    names = [p.name for p in part.server_images.glob("*.jpg")]
    for c in part.clients:
        names += [p.name for p in c.images.glob("*.jpg")]
    for path, _ in part.test.values():
        names += [p.name for p in path.glob("*.jpg")]
    assert len(names) == len(set(names)) == 4 + 12 + 6
    for path, _ in part.test.values():
        assert all(label_path(p).exists() for p in path.glob("*.jpg"))
    text = (part.root / "data.yaml").read_text()
    assert "download" not in text and str(part.root) in text


def test_partition_reports_too_few_images(tmp_path):
    from fedsim.data.partition import build_partition

    root = generate(SynthSpec(images_per_domain={"cloudy": 3, "rainy": 3}, width=64, height=32), tmp_path)
    images = {d: sorted((root / d / "images").glob("*.jpg")) for d in ("cloudy", "rainy")}
    with pytest.raises(ValueError, match="domain .rainy. has 3 images, the split needs 5"):
        data = DataConfig(
            server_domains=["cloudy"], client_domains=["rainy"], server_images=1, client_images=4, test_images=1
        )
        build_partition(images, data, 1, tmp_path, "x")
