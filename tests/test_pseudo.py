import torch
from torch import nn

from fedsim.train.pseudo import EMATeacher, pseudo_labels


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
