import pytest
import torch
from torch import nn

from fedsim.train.augment import Affine, apply_geometric
from fedsim.train.pseudo import EMATeacher, pseudo_labels, teacher_views, warp_scores


class FixedDetector(nn.Module):
    """Eval-mode output of a YOLO detector, (B, 4 + nc, anchors), with chosen boxes and scores."""

    def __init__(self, boxes_xywh: list[list[float]], scores: list[list[float]]):
        super().__init__()
        self.pred = torch.cat([torch.tensor(boxes_xywh).T, torch.tensor(scores).T], 0)[None]

    def forward(self, img):
        return self.pred.repeat(img.shape[0], 1, 1), {}


def test_threshold_keeps_only_confident_boxes_in_normalised_xywh():
    # three far-apart boxes on a 100x50 image: class 0 @0.9, class 2 @0.55, class 1 @0.2
    boxes = [[20, 10, 10, 10], [60, 25, 20, 10], [90, 40, 8, 8]]
    scores = [[0.9, 0.0, 0.0], [0.0, 0.1, 0.55], [0.0, 0.2, 0.0]]
    teacher = FixedDetector(boxes, scores)
    img = torch.zeros(2, 3, 50, 100)
    out = pseudo_labels(teacher, img, conf_thres=0.5, iou_thres=0.65)
    assert out["cls"].shape == (4, 1)  # two confident boxes in each of two images
    assert sorted(out["cls"][:2, 0].tolist()) == [0.0, 2.0]
    assert out["batch_idx"].tolist() == [0, 0, 1, 1]
    assert (out["conf"] >= 0.5).all()
    first = out["bboxes"][out["cls"][:, 0] == 0][0]
    torch.testing.assert_close(first, torch.tensor([0.2, 0.2, 0.1, 0.2]))
    assert pseudo_labels(teacher, img, conf_thres=0.15, iou_thres=0.65)["cls"].shape[0] == 6
    assert pseudo_labels(teacher, img, conf_thres=0.95, iou_thres=0.65)["cls"].shape[0] == 0


def test_ema_teacher_trails_the_student():
    student = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        student.weight.fill_(1.0)
    teacher = EMATeacher(student, momentum=0.75, keys=["weight"])
    with torch.no_grad():
        student.weight.fill_(3.0)
    teacher.update(student)
    torch.testing.assert_close(teacher.model.weight, torch.full((1, 2), 1.5))
    assert not teacher.model.weight.requires_grad


def test_uncertain_teacher_scores_carry_no_background_loss():
    from fedsim.train.pseudo import IgnoreUncertainBCE

    teacher = torch.tensor([[[0.05, 0.3, 0.9]]])  # confident background, unsure, confident object
    pred = torch.zeros(1, 1, 3)
    target = torch.tensor([[[0.0, 0.0, 0.8]]])
    loss = IgnoreUncertainBCE(teacher, low=0.1, high=0.5)(pred, target)
    plain = torch.nn.functional.binary_cross_entropy_with_logits(pred, target, reduction="none")
    assert loss[0, 0, 1] == 0  # unsure and unassigned: ignored
    torch.testing.assert_close(loss[0, 0, [0, 2]], plain[0, 0, [0, 2]])
    unsure_but_assigned = IgnoreUncertainBCE(teacher, 0.1, 0.5)(pred, torch.tensor([[[0.0, 0.6, 0.8]]]))
    assert unsure_but_assigned[0, 0, 1] > 0


def test_soft_negatives_take_the_teachers_score_off_the_boxes():
    from fedsim.train.pseudo import SoftNegativeBCE, class_criterion

    teacher = torch.tensor([[[0.05, 0.3, 0.9]]])
    pred = torch.tensor([[[0.0, 2.0, -1.0]]])  # logits: sigmoid 0.5, 0.88, 0.27
    target = torch.tensor([[[0.0, 0.0, 0.8]]])  # only the third element has a pseudo-box
    loss = SoftNegativeBCE(teacher)(pred, target)
    p = torch.sigmoid(pred)[0, 0]
    by_hand = [-(t * torch.log(q) + (1 - t) * torch.log(1 - q)) for t, q in zip([0.05, 0.3, 0.8], p, strict=True)]
    torch.testing.assert_close(loss[0, 0], torch.stack(by_hand))
    # a student that matches the teacher off the boxes pays only the targets' own entropy there
    at_teacher = SoftNegativeBCE(teacher)(torch.logit(teacher), torch.zeros_like(teacher))
    assert at_teacher[0, 0, 1] < SoftNegativeBCE(teacher)(torch.zeros_like(teacher), torch.zeros_like(teacher))[0, 0, 1]
    assert isinstance(class_criterion(teacher, "soft", 0.1, 0.5), SoftNegativeBCE)
    assert class_criterion(teacher, "band", None, 0.5) is None


@pytest.mark.parametrize(
    "params",
    [Affine(1.0, (16.0, 8.0), False), Affine(1.0, (-8.0, 8.0), True), Affine(2.0, (8.0, 0.0), True), Affine(0.5)],
)
def test_teacher_scores_follow_the_strong_views_geometry(params):
    """The ignore mask (teacher scores warped per level) covers the same pixels as the mapped box."""
    height, width, strides = 64, 128, [8, 16, 32]
    anchors = sum((height // s) * (width // s) for s in strides)
    h, w = height // 8, width // 8
    scores = torch.zeros(1, anchors, 1)
    scores[0, : h * w, 0].view(h, w)[1:5, 2:6] = 1.0  # level P3 cells covering x 16..48, y 8..40
    warped = warp_scores(scores, [params], (height, width), strides)[0, : h * w, 0].view(h, w)
    ys, xs = warped.nonzero(as_tuple=True)
    box = {"img": torch.zeros(1, 3, height, width), "batch_idx": torch.zeros(1), "cls": torch.zeros(1, 1)}
    box["bboxes"] = torch.tensor([[32 / width, 24 / height, 32 / width, 32 / height]])
    moved = apply_geometric(box, [params], min_visible=0.0)["bboxes"][0] * torch.tensor([width, height] * 2)
    x, y, bw, bh = moved.tolist()
    cells = (xs.min().item() * 8, (xs.max().item() + 1) * 8, ys.min().item() * 8, (ys.max().item() + 1) * 8)
    # nearest-neighbour sampling of an 8-px grid: edges agree to half a cell
    assert cells == pytest.approx((max(0, x - bw / 2), x + bw / 2, max(0, y - bh / 2), y + bh / 2), abs=4)


def test_unconfident_pseudo_boxes_lose_their_anchors_for_box_regression_only():
    from fedsim.model.detector import build_detector
    from fedsim.train.pseudo import ReliableBoxAssigner

    # image 0 holds boxes at 0.9 and 0.3, image 1 one at 0.6; 4 anchors per image
    img = torch.zeros(2, 3, 32, 32)
    batch = {"img": img, "batch_idx": torch.tensor([0.0, 0.0, 1.0]), "conf": torch.tensor([0.9, 0.3, 0.6])}
    gt_idx = torch.tensor([[0, 1, 1, 0], [0, 0, 0, 0]])
    fg = torch.tensor([[True, True, False, True], [True, False, True, True]])
    labels, boxes, scores = torch.zeros(2, 4), torch.ones(2, 4, 4), torch.rand(2, 4, 3)
    criterion = build_detector("yolov8n.yaml", ["car", "person"]).init_criterion()
    criterion.assigner = lambda: (labels, boxes, scores, fg, gt_idx)
    out = ReliableBoxAssigner(criterion, batch, box_thres=0.5)()
    assert out[3].tolist() == [[True, False, False, True], [True, False, True, True]]
    assert out[2] is scores and out[4] is gt_idx  # class targets untouched
    assert not ReliableBoxAssigner(criterion, batch, box_thres=0.95)()[3].any()
    empty = {"img": img, "batch_idx": torch.zeros(0), "conf": torch.zeros(0)}
    assert ReliableBoxAssigner(criterion, empty, 0.5)()[3] is fg


def test_box_threshold_removes_the_box_losses_and_keeps_the_class_loss():
    from fedsim.model.detector import build_detector, train_mode
    from fedsim.train.pseudo import ReliableBoxAssigner

    torch.manual_seed(0)
    model = train_mode(build_detector("yolov8n.yaml", ["car", "person"]))
    criterion = model.init_criterion()
    model.criterion = criterion
    batch = {
        "img": torch.rand(2, 3, 64, 96),
        "batch_idx": torch.tensor([0.0, 1.0]),
        "cls": torch.tensor([[0.0], [1.0]]),
        "bboxes": torch.tensor([[0.3, 0.4, 0.3, 0.4], [0.6, 0.5, 0.4, 0.3]]),
        "conf": torch.tensor([0.35, 0.8]),
    }
    plain = criterion.assigner

    def items(box_thres):
        criterion.assigner = plain if box_thres is None else ReliableBoxAssigner(criterion, batch, box_thres)
        try:
            return model.loss(batch)[0].detach()
        finally:
            criterion.assigner = plain

    every, below_all, above_all, between = items(None), items(0.1), items(1.0), items(0.5)
    torch.testing.assert_close(below_all, every)
    assert above_all[0] == 0 and above_all[2] == 0  # box (CIoU) and DFL
    torch.testing.assert_close(above_all[1], every[1])  # the class loss is the same
    assert 0 < between[0] < every[0] and 0 < between[2] < every[2]
    torch.testing.assert_close(between[1], every[1])


class _ScaleMarkingTeacher(nn.Module):
    """Two levels (strides 8, 16); a box at the input's centre; class scores that say which input size it saw."""

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        b, _, h, w = img.shape
        anchors = (h // 8) * (w // 8) + (h // 16) * (w // 16)
        out = torch.zeros(b, 4 + 2, anchors)
        out[:, :4] = torch.tensor([w / 2, h / 2, 10.0, 10.0]).view(1, 4, 1)
        if h == 32:  # 1x: class 0 at level-16 cell (1, 0); class 1 weakly at level-8 cell (2, 1)
            out[:, 4, 16 + 1 * 2 + 0] = 0.3
            out[:, 5, 2 * 4 + 1] = 0.2
        else:  # 2x: class 1 at level-8 fine cell (5, 2), which lies in the 1x cell (2, 1)
            out[:, 5, 5 * 8 + 2] = 0.9
        return out


def test_teacher_views_bring_an_upscaled_view_back_to_the_images_pixels_and_grid():
    img = torch.rand(1, 3, 32, 32)
    preds, scores = teacher_views(_ScaleMarkingTeacher(), img, (1, 2), [8, 16])
    assert preds.shape == (1, 6, 20 + 80)  # both scales' anchors, for one NMS
    assert torch.equal(preds[0, :4, 0], torch.tensor([16.0, 16.0, 10.0, 10.0]))
    assert torch.equal(preds[0, :4, 20], torch.tensor([16.0, 16.0, 5.0, 5.0]))  # 2x box in 1x pixels
    assert scores.shape == (1, 20, 2)  # the 1x grid
    expected = torch.zeros(20, 2)
    expected[18, 0] = 0.3
    expected[9, 1] = 0.9  # the 2x score, max-pooled onto its 1x cell, above the 1x 0.2
    assert torch.equal(scores[0], expected)
    plain, plain_scores = teacher_views(_ScaleMarkingTeacher(), img, (1,), [8, 16])
    assert plain.shape == (1, 6, 20) and plain_scores[0, 9, 1] == 0.2
