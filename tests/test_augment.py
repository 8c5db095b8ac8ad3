import pytest
import torch

from fedsim.train.augment import Affine, StrongAugment, apply_geometric, scale_jitter, strong_view

W, H = 64, 32


def one_box_batch() -> dict:
    """A 64x32 (W x H) black image with one white box, pixels x 8..24, y 4..20."""
    img = torch.zeros(1, 3, H, W)
    img[0, :, 4:20, 8:24] = 1.0
    return {
        "img": img,
        "batch_idx": torch.zeros(1),
        "cls": torch.tensor([[2.0]]),
        "bboxes": torch.tensor([[16 / W, 12 / H, 16 / W, 16 / H]]),
    }


def random_batch(seed: int = 0, n_img: int = 3, size: tuple[int, int] = (96, 160)) -> dict:
    g = torch.Generator().manual_seed(seed)
    boxes = torch.rand(7, 4, generator=g) * torch.tensor([0.5, 0.5, 0.3, 0.3]) + torch.tensor([0.25, 0.25, 0.1, 0.1])
    return {
        "img": torch.rand(n_img, 3, *size, generator=g),
        "batch_idx": torch.tensor([0, 0, 1, 1, 1, 2, 2], dtype=torch.float32),
        "cls": torch.arange(7, dtype=torch.float32)[:, None],
        "bboxes": boxes,
        "conf": torch.linspace(0.5, 0.9, 7),
        "im_file": ["a.jpg", "b.jpg", "c.jpg"],
    }


@pytest.mark.parametrize(
    ("affine", "expected"),
    [
        # scale 0.5 about the centre (32, 16): x 8..24 -> 20..28, y 4..20 -> 10..18; then x + 8 -> 28..36
        (Affine(0.5, (8.0, 0.0)), (32 / W, 14 / H, 8 / W, 8 / H)),
        # same scale, x + 16 -> 36..44, then flipped in a 64 px canvas -> 20..28
        (Affine(0.5, (16.0, 0.0), flip=True), (24 / W, 14 / H, 8 / W, 8 / H)),
        # scale 1, y - 2 -> 2..18
        (Affine(1.0, (0.0, -2.0)), (16 / W, 10 / H, 16 / W, 16 / H)),
    ],
)
def test_affine_maps_box_exactly_and_with_the_pixels(affine, expected):
    out = apply_geometric(one_box_batch(), [affine], fill=0.0)
    torch.testing.assert_close(out["bboxes"], torch.tensor([expected]), atol=1e-5, rtol=0)
    # the image moved the same way: its white pixels are exactly the box's pixel cells
    cx, cy, w, h = (v * s for v, s in zip(expected, (W, H, W, H), strict=True))
    ys, xs = (out["img"][0, 0] > 0.5).nonzero(as_tuple=True)
    assert (int(xs.min()), int(xs.max()) + 1) == (round(cx - w / 2), round(cx + w / 2))
    assert (int(ys.min()), int(ys.max()) + 1) == (round(cy - h / 2), round(cy + h / 2))


def test_boxes_pushed_out_are_dropped_and_labels_stay_aligned():
    batch = {
        "img": torch.zeros(2, 3, H, W),
        "batch_idx": torch.tensor([0.0, 1.0, 1.0, 1.0]),
        "cls": torch.tensor([[1.0], [2.0], [3.0], [4.0]]),
        # img 1: a box at the right edge, one in the middle, one whose right 3/4 will leave the canvas
        "bboxes": torch.tensor(
            [[0.5, 0.5, 0.25, 0.5], [56 / W, 0.5, 8 / W, 0.5], [16 / W, 0.5, 8 / W, 0.5], [40 / W, 0.5, 16 / W, 0.5]]
        ),
        "conf": torch.tensor([0.9, 0.8, 0.7, 0.6]),
    }
    # img 1 moves 28 px right: x 52..60 -> 80..88 (gone), 12..20 -> 40..48, 32..48 -> 60..76 (1/4 visible)
    out = apply_geometric(batch, [Affine(), Affine(1.0, (28.0, 0.0))], min_visible=0.3)
    assert out["batch_idx"].tolist() == [0.0, 1.0]
    assert out["cls"].flatten().tolist() == [1.0, 3.0]
    assert out["conf"].tolist() == pytest.approx([0.9, 0.7])
    torch.testing.assert_close(out["bboxes"][1], torch.tensor([44 / W, 0.5, 8 / W, 0.5]), atol=1e-5, rtol=0)
    # with a lower visibility bar the last box stays, clipped to the canvas (x 60..64)
    kept = apply_geometric(batch, [Affine(), Affine(1.0, (28.0, 0.0))], min_visible=0.2)
    assert kept["cls"].flatten().tolist() == [1.0, 3.0, 4.0]
    torch.testing.assert_close(kept["bboxes"][2], torch.tensor([62 / W, 0.5, 4 / W, 0.5]), atol=1e-5, rtol=0)
    assert batch["bboxes"].shape == (4, 4)  # the input was not modified


def test_photometric_changes_pixels_never_boxes():
    batch = random_batch()
    before = {k: v.clone() for k, v in batch.items() if isinstance(v, torch.Tensor)}
    cfg = StrongAugment(
        geometric=False, jitter_prob=1, grayscale_prob=1, blur_prob=1, noise_prob=1, erase_prob=1, erase_count=2
    )
    out = strong_view(batch, torch.Generator().manual_seed(3), cfg)
    for key in ("batch_idx", "cls", "bboxes", "conf"):
        assert torch.equal(out[key], before[key])
    assert out["im_file"] == batch["im_file"]
    assert (out["img"] - before["img"]).abs().mean() > 0.05
    assert out["img"].min() >= 0 and out["img"].max() <= 1
    for key, value in before.items():
        assert torch.equal(batch[key], value)


def test_same_seed_same_view_different_seed_different_view():
    batch = random_batch()
    a = strong_view(batch, torch.Generator().manual_seed(7))
    torch.manual_seed(123)  # the global RNG must not matter
    b = strong_view(batch, torch.Generator().manual_seed(7))
    c = strong_view(batch, torch.Generator().manual_seed(8))
    for key in ("img", "batch_idx", "cls", "bboxes", "conf"):
        assert torch.equal(a[key], b[key])
    assert not torch.equal(a["img"], c["img"])
    assert not torch.equal(a["bboxes"], c["bboxes"])


def test_strong_view_draws_nothing_from_the_global_rng():
    state = torch.get_rng_state()
    strong_view(random_batch(), torch.Generator().manual_seed(1))
    assert torch.equal(torch.get_rng_state(), state)


def test_default_view_is_strong_and_switches_work():
    batch = random_batch()
    out = strong_view(batch, torch.Generator().manual_seed(0))
    assert (out["img"] - batch["img"]).abs().mean() > 0.1
    assert not torch.equal(out["bboxes"], batch["bboxes"])  # moved, or some dropped
    same = strong_view(batch, torch.Generator().manual_seed(0), StrongAugment(geometric=False, photometric=False))
    for key in ("img", "batch_idx", "cls", "bboxes"):
        assert torch.equal(same[key], batch[key])


def test_scale_jitter_snaps_to_32_and_keeps_boxes():
    batch = random_batch(size=(96, 160))
    y0, y1, x0, x1 = 24, 72, 40, 120  # a white box, normalised below
    batch["img"][0] = 0
    batch["img"][0, :, y0:y1, x0:x1] = 1
    batch["bboxes"][0] = torch.tensor([(x0 + x1) / 320, (y0 + y1) / 192, (x1 - x0) / 160, (y1 - y0) / 96])
    sizes = set()
    for seed in range(8):
        out = scale_jitter(batch, torch.Generator().manual_seed(seed), 0.5, 1.0)
        h, w = out["img"].shape[-2:]
        sizes.add((h, w))
        assert h % 32 == 0 and w % 32 == 0 and 32 <= h <= 96 and 64 <= w <= 160
        for key in ("batch_idx", "cls", "bboxes", "conf"):
            assert torch.equal(out[key], batch[key])
        # the white box still sits where the unchanged normalised box says (to one pixel)
        ys, xs = (out["img"][0, 0] > 0.5).nonzero(as_tuple=True)
        assert abs(int(xs.min()) - x0 / 160 * w) <= 1 and abs(int(xs.max()) + 1 - x1 / 160 * w) <= 1
        assert abs(int(ys.min()) - y0 / 96 * h) <= 1 and abs(int(ys.max()) + 1 - y1 / 96 * h) <= 1
    assert len(sizes) > 1
    again = scale_jitter(batch, torch.Generator().manual_seed(5), 0.5, 1.0)
    assert torch.equal(again["img"], scale_jitter(batch, torch.Generator().manual_seed(5), 0.5, 1.0)["img"])
