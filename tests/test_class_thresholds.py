import pytest
import torch

from fedsim.train.pseudo import IgnoreUncertainBCE, pseudo_labels
from fedsim.train.thresholds import ClassThresholds


def test_each_class_threshold_follows_the_teachers_mean_confidence_in_it():
    t = ClassThresholds(num_classes=3, conf_thres=0.25, floor=0.1, momentum=0.9)
    torch.testing.assert_close(t.values(), torch.full((3,), 0.25))  # nothing seen: the base threshold
    t.update(torch.tensor([0.8, 0.6, 0.3]), torch.tensor([[0.0], [0.0], [2.0]]))
    # means: class 0 0.7, class 2 0.3; class 1 unseen keeps the base
    torch.testing.assert_close(t.values(), torch.tensor([0.25, 0.25, 0.25 * 0.3 / 0.7]))
    t.update(torch.tensor([0.5, 0.12]), torch.tensor([0, 2]))
    # EMA: class 0 0.9 * 0.7 + 0.1 * 0.5 = 0.68, class 2 0.9 * 0.3 + 0.1 * 0.12 = 0.282
    torch.testing.assert_close(t.values(), torch.tensor([0.25, 0.25, 0.25 * 0.282 / 0.68]))
    t.update(torch.tensor([0.11] * 50), torch.tensor([1] * 50))  # far below the best class: held at the floor
    assert float(t.values()[1]) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="floor"):
        ClassThresholds(3, conf_thres=0.25, floor=0.3)


def test_cutting_each_class_after_nms_at_the_floor_equals_nms_at_its_threshold():
    # Overlapping boxes of two classes at many scores: the greedy NMS never lets a lower-scored
    # candidate suppress a higher one, so what is left above a threshold does not depend on the floor.
    gen = torch.Generator().manual_seed(0)
    n = 300
    centres = torch.rand(n, 2, generator=gen) * torch.tensor([100.0, 60.0])
    sizes = 8 + torch.rand(n, 2, generator=gen) * 20
    scores = torch.zeros(n, 2)
    scores[torch.arange(n), torch.randint(0, 2, (n,), generator=gen)] = torch.rand(n, generator=gen)
    preds = torch.cat([centres, sizes, scores], 1).T[None].repeat(2, 1, 1)
    img = torch.zeros(2, 3, 64, 128)
    thres = torch.tensor([0.6, 0.3])
    found = pseudo_labels(preds, img, 0.1, 0.65)
    keep = found["conf"] >= thres[found["cls"].view(-1).long()]
    for c in (0, 1):
        direct = pseudo_labels(preds, img, float(thres[c]), 0.65)
        mine = found["cls"].view(-1) == c
        theirs = direct["cls"].view(-1) == c
        assert int(theirs.sum()) > 3
        torch.testing.assert_close(found["bboxes"][keep & mine], direct["bboxes"][theirs])


def test_the_uncertain_band_ends_at_each_class_threshold():
    teacher = torch.tensor([[[0.2, 0.2]]])  # the same score for two classes
    loss = IgnoreUncertainBCE(teacher, low=0.1, high=torch.tensor([0.3, 0.15]))(
        torch.zeros(1, 1, 2), torch.zeros(1, 1, 2)
    )
    assert loss[0, 0, 0] == 0  # under class 0's threshold: unsure, no background loss
    assert loss[0, 0, 1] > 0  # over class 1's, yet no pseudo-box: background


def test_a_client_job_with_adaptive_thresholds_reports_them_per_class(tmp_path, cpu_threads):
    from dataclasses import replace

    from fedsim.data.synthetic_format import prepare as synthetic_partition
    from fedsim.model.detector import build_detector, get_state
    from fedsim.preflight import load
    from fedsim.runtime.client import ClientWorker
    from fedsim.runtime.rounds import class_threshold_metrics
    from fedsim.storage import cache_dir
    from fedsim.train.foundation import pretrain
    from fedsim.types import ClientJob
    from strategies import build
    from tests.conftest import TINY

    cfg = load(TINY, ["data.server_images=4", "data.client_images=8", "data.test_images=2", "train.conf_thres=0.3"])
    m = cfg.model
    weights = pretrain(
        cache_dir(), m.arch, m.pretrain_images, m.pretrain_epochs, m.pretrain_seed, cfg.data.width, cfg.data.height
    )  # a trained detector, so the teacher finds objects; cached after the first test session
    part = synthetic_partition(cfg.data, 2, tmp_path)

    def job_metrics(class_thres: str, **train) -> dict[str, float]:
        run_cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"class_thres": class_thres, **train})})
        model = build(run_cfg).build_model(build_detector(m.arch, cfg.data.classes, weights=str(weights)))
        full = get_state(model, list(model.state_dict()))  # the frozen backbone too
        worker = ClientWorker(run_cfg.model_dump(mode="json"), {"yaml": model.yaml}, full, threads=1)
        plan = replace(build(run_cfg).client_plan(1), batch=8)  # one batch: both jobs label the same images
        job = ClientJob(0, 1, str(part.clients[0].images), part.client_imgsz, 7, plan)
        return worker.run(job, get_state(model)).metrics

    fixed, adaptive = job_metrics("fixed"), job_metrics("adaptive")
    assert not [k for k in fixed if k.startswith("class_thres_")]
    values = [adaptive[f"class_thres_{c}"] for c in range(len(cfg.data.classes))]
    assert min(values) >= cfg.train.ignore_thres and max(values) == pytest.approx(0.3)
    assert min(values) < 0.25  # some class is scored lower than the best one
    assert adaptive["n_pseudo"] > fixed["n_pseudo"] > 0  # no class is cut higher than conf_thres, some lower
    # an empty uncertain band (ignore_thres above conf_thres) leaves the thresholds at conf_thres
    banded = job_metrics("adaptive", ignore_thres=0.5)
    assert [banded[f"class_thres_{c}"] for c in range(len(cfg.data.classes))] == [pytest.approx(0.3)] * 5
    named = class_threshold_metrics([_result(adaptive)], cfg.data.classes)
    assert named == {f"pseudo/class_thres/{name}": v for name, v in zip(cfg.data.classes, values, strict=True)}


def _result(metrics: dict[str, float]):
    from fedsim.types import ClientResult

    return ClientResult(0, 1, {}, 8, metrics=metrics)
