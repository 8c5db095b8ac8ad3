import pytest
import torch

from fedsim.train.pseudo_quality import QualityCounts, merge, pseudo_label_quality


def labels(rows: list[tuple[int, int, float, float, float, float]], conf: list[float] | None = None) -> dict:
    """``(image, class, cx, cy, w, h)`` rows as a label batch."""
    t = torch.tensor(rows, dtype=torch.float32).reshape(-1, 6)
    out = {"batch_idx": t[:, 0], "cls": t[:, 1:2], "bboxes": t[:, 2:]}
    if conf is not None:
        out["conf"] = torch.tensor(conf)
    return out


# Image 0: A (class 0) xyxy 0.15..0.35 square, B (class 1); image 1: C (class 0), 0.4 x 0.2.
TRUE = [(0, 0, 0.25, 0.25, 0.2, 0.2), (0, 1, 0.6, 0.6, 0.2, 0.2), (1, 0, 0.5, 0.5, 0.4, 0.2)]
PRED = [
    (0, 0, 0.25, 0.30, 0.2, 0.2),  # A shifted down 0.05: IoU 0.15*0.2 / (0.04+0.04-0.03) = 0.6, a duplicate
    (0, 0, 0.25, 0.25, 0.2, 0.16),  # inside A: IoU 0.2*0.16 / 0.04 = 0.8
    (0, 0, 0.6, 0.6, 0.2, 0.2),  # exactly on B, but class 0
    (1, 0, 0.6, 0.5, 0.4, 0.2),  # C shifted right 0.1: IoU 0.3*0.2 / (0.08+0.08-0.06) = 0.6
]
CONF = [0.6, 0.9, 0.95, 0.7]


def test_hand_built_two_image_example():
    q = pseudo_label_quality(labels(PRED, CONF), labels(TRUE))
    # the 0.9 box takes A before the 0.6 duplicate does; the wrong-class box finds nothing; B is missed
    tp, fp, fn = 2, 2, 1
    assert (q["tp"], q["fp"], q["fn"]) == (tp, fp, fn)
    assert q["precision"] == pytest.approx(tp / (tp + fp))
    assert q["recall"] == pytest.approx(tp / (tp + fn))
    assert q["mean_iou"] == pytest.approx((0.8 + 0.6) / 2, abs=1e-6)
    assert q["iou_sum"] == pytest.approx(1.4, abs=1e-6) and q["matches"] == tp


def test_confidence_order_decides_who_matches():
    # without conf the input order counts: the duplicate comes first and takes A at IoU 0.6
    q = pseudo_label_quality(labels(PRED), labels(TRUE))
    assert (q["tp"], q["fp"], q["fn"]) == (2, 2, 1)
    assert q["mean_iou"] == pytest.approx(0.6, abs=1e-6)


def test_threshold_turns_weak_matches_into_errors():
    q = pseudo_label_quality(labels(PRED, CONF), labels(TRUE), iou_thres=0.7)
    assert (q["tp"], q["fp"], q["fn"]) == (1, 3, 2)
    assert q["mean_iou"] == pytest.approx(0.8, abs=1e-6)


def test_batches_pool_like_one_batch():
    whole = pseudo_label_quality(labels(PRED, CONF), labels(TRUE))
    first = pseudo_label_quality(labels(PRED[:3], CONF[:3]), labels(TRUE[:2]))
    second = pseudo_label_quality(
        labels([(0, *r[1:]) for r in PRED[3:]], CONF[3:]), labels([(0, *r[1:]) for r in TRUE[2:]])
    )
    assert merge(first, second) == pytest.approx(whole)
    counts = QualityCounts.from_dict(first) + QualityCounts.from_dict(second)
    assert counts.as_dict() == pytest.approx(whole)
    assert first["recall"] == pytest.approx(0.5) and second["recall"] == 1.0  # pooled is 2/3, not their mean


def test_empty_conventions():
    none = labels([])
    assert pseudo_label_quality(none, none) == {
        "tp": 0.0,
        "fp": 0.0,
        "fn": 0.0,
        "matches": 0.0,
        "iou_sum": 0.0,
        "precision": 1.0,
        "recall": 1.0,
        "mean_iou": 0.0,
    }
    missed = pseudo_label_quality(none, labels(TRUE))
    assert (missed["precision"], missed["recall"], missed["fn"]) == (1.0, 0.0, 3.0)
    hallucinated = pseudo_label_quality(labels(PRED, CONF), none)
    assert (hallucinated["precision"], hallucinated["recall"], hallucinated["fp"]) == (0.0, 1.0, 4.0)
