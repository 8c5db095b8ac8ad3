"""Weak/strong views of a labeled batch for teacher-student training, built on ``torchvision.transforms.v2``.

A batch is what ``fedsim.train.supervised.to_float`` yields: ``img`` float ``(B, 3, H, W)`` in
[0, 1] and labels ``batch_idx (N,)``, ``cls (N, 1)``, ``bboxes (N, 4)`` normalised centre xywh
(pseudo-label batches may add ``conf (N,)``). Every function returns a new dict and leaves its
input untouched; keys it does not know (``im_file``, ``ori_shape``, ...) are passed through as they are.

Reproducibility: torchvision's random transforms (``v2.RandomAffine``, ``v2.ColorJitter``,
``v2.GaussianNoise``, ``v2.RandomErasing``, ...) draw their parameters from torch's *global* RNG,
which other code (Ray, the data loader, the model) also advances. So every random number here is
drawn from the ``torch.Generator`` the caller passes, and applied with the deterministic
``v2.functional`` kernels: the same seed gives the same view, whatever else ran in between.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torchvision import tv_tensors
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F

LABEL_KEYS = ("batch_idx", "cls", "bboxes", "conf")
XYXY = tv_tensors.BoundingBoxFormat.XYXY
CXCYWH = tv_tensors.BoundingBoxFormat.CXCYWH


@dataclass(frozen=True)
class Affine:
    """One image's geometric transform: scale about the image centre, then shift, then optional flip.

    ``translate`` is in pixels (x, y); the output canvas keeps the input size.
    """

    scale: float = 1.0
    translate: tuple[float, float] = (0.0, 0.0)
    flip: bool = False


@dataclass(frozen=True)
class StrongAugment:
    """Knobs of ``strong_view``. The defaults give a clearly strong view, in the range of Soft/Unbiased Teacher.

    Geometric (image and boxes), when ``geometric``:
      ``scale_min``/``scale_max``: zoom factor about the centre (0.5-1.5);
      ``translate``: shift up to this fraction of the width/height in each direction (0.1);
      ``flip_prob``: horizontal flip (0.5);
      ``min_visible``: a box keeping less than this fraction of its area on the canvas is dropped (0.3);
      ``min_size``: a box narrower or lower than this many pixels after clipping is dropped (2);
      ``fill``: value of the canvas uncovered by the image (114/255, Ultralytics' letterbox grey).
    Photometric (image only), when ``photometric``; each op fires with its own probability:
      ``jitter_prob`` with ``brightness``/``contrast``/``saturation`` factors in [1 - x, 1 + x] and
      ``hue`` shift in [-hue, hue] (0.8; 0.4, 0.4, 0.4, 0.1), applied in random order;
      ``grayscale_prob`` (0.2);
      ``blur_prob`` with sigma in ``blur_sigma`` pixels (0.5; 0.1-2.0);
      ``noise_prob`` with additive Gaussian noise of std up to ``noise_std`` (0.5; 0.04);
      ``erase_prob`` per each of ``erase_count`` cutouts, each covering a ``erase_area`` fraction
      of the image with aspect ratio in ``erase_ratio``, filled with a random colour (0.7, 3; 0.02-0.2, 0.3-3.3).
    """

    geometric: bool = True
    scale_min: float = 0.5
    scale_max: float = 1.5
    translate: float = 0.1
    flip_prob: float = 0.5
    min_visible: float = 0.3
    min_size: float = 2.0
    fill: float = 114 / 255
    photometric: bool = True
    jitter_prob: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    grayscale_prob: float = 0.2
    blur_prob: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    noise_prob: float = 0.5
    noise_std: float = 0.04
    erase_prob: float = 0.7
    erase_count: int = 3
    erase_area: tuple[float, float] = (0.02, 0.2)
    erase_ratio: tuple[float, float] = (0.3, 3.3)

    def __post_init__(self) -> None:
        if not 0 < self.scale_min <= self.scale_max:
            raise ValueError(f"need 0 < scale_min <= scale_max, got {self.scale_min}, {self.scale_max}")
        if not 0 <= self.translate <= 1:
            raise ValueError(f"translate must be in [0, 1], got {self.translate}")


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator, device=generator.device))


def _chance(generator: torch.Generator, p: float) -> bool:
    return p > 0 and _uniform(generator, 0.0, 1.0) < p


def _labels_of(batch: dict) -> dict[str, torch.Tensor]:
    return {k: batch[k] for k in LABEL_KEYS if k in batch}


def draw_affine(generator: torch.Generator, cfg: StrongAugment, height: int, width: int) -> Affine:
    """Random ``Affine`` within ``cfg``'s ranges, drawn from ``generator`` only."""
    scale = _uniform(generator, cfg.scale_min, cfg.scale_max)
    tx = _uniform(generator, -cfg.translate, cfg.translate) * width
    ty = _uniform(generator, -cfg.translate, cfg.translate) * height
    return Affine(scale=scale, translate=(tx, ty), flip=_chance(generator, cfg.flip_prob))


def apply_geometric(
    batch: dict, params: Sequence[Affine], min_visible: float = 0.3, min_size: float = 2.0, fill: float = 114 / 255
) -> dict:
    """Apply ``params[i]`` to image i and its boxes; clip boxes to the canvas and drop the lost ones.

    A box is dropped when less than ``min_visible`` of its transformed area lies on the canvas, or
    when it is under ``min_size`` pixels wide/high after clipping (``v2.functional.sanitize_bounding_boxes``).
    All label keys are filtered with the same mask and keep their order, so they stay aligned.
    """
    img = batch["img"]
    n_img, _, height, width = img.shape
    if len(params) != n_img:
        raise ValueError(f"need one Affine per image: {len(params)} for {n_img} images")
    labels = _labels_of(batch)
    owner = labels["batch_idx"].long()
    boxes = labels["bboxes"].clone()
    keep = torch.ones(len(boxes), dtype=torch.bool, device=boxes.device)
    size = torch.tensor([width, height, width, height], dtype=boxes.dtype, device=boxes.device)
    out = torch.empty_like(img)
    for i, p in enumerate(params):
        kwargs = {"angle": 0.0, "translate": list(p.translate), "scale": p.scale, "shear": [0.0, 0.0]}
        image = F.affine(img[i], interpolation=InterpolationMode.BILINEAR, fill=fill, **kwargs)
        rows = (owner == i).nonzero().squeeze(1)
        xyxy = F.convert_bounding_box_format(boxes[rows] * size, old_format=CXCYWH, new_format=XYXY)
        # clamping_mode=None keeps the full transformed box, so the visible fraction can be measured.
        raw = tv_tensors.BoundingBoxes(xyxy, format=XYXY, canvas_size=(height, width), clamping_mode=None)
        raw = F.affine(raw, **kwargs)
        if p.flip:
            image, raw = F.horizontal_flip(image), F.horizontal_flip(raw)
        out[i] = image
        clipped = F.clamp_bounding_boxes(raw, clamping_mode="hard")
        _, valid = F.sanitize_bounding_boxes(clipped, min_size=min_size, min_area=min_size * min_size)
        visible = _area(clipped) >= min_visible * _area(raw)
        keep[rows] = valid & visible
        plain = clipped.as_subclass(torch.Tensor)
        boxes[rows] = F.convert_bounding_box_format(plain, old_format=XYXY, new_format=CXCYWH) / size
    labels["bboxes"] = boxes
    return {**batch, "img": out, **{k: v[keep] for k, v in labels.items()}}


def _area(xyxy: torch.Tensor) -> torch.Tensor:
    xyxy = xyxy.as_subclass(torch.Tensor)
    return (xyxy[:, 2] - xyxy[:, 0]).clamp(min=0) * (xyxy[:, 3] - xyxy[:, 1]).clamp(min=0)


def _blur_kernel(sigma: float, height: int, width: int) -> int:
    k = 2 * math.ceil(3 * sigma) + 1
    largest = 2 * ((min(height, width) - 1) // 2) + 1  # reflect padding needs pad < side
    return max(1, min(k, largest))


def photometric_image(image: torch.Tensor, generator: torch.Generator, cfg: StrongAugment) -> torch.Tensor:
    """Colour jitter, grayscale, blur, noise and cutouts on one ``(3, H, W)`` image in [0, 1]."""
    _, height, width = image.shape
    if _chance(generator, cfg.jitter_prob):
        ops = [
            (F.adjust_brightness, _uniform(generator, max(0.0, 1 - cfg.brightness), 1 + cfg.brightness)),
            (F.adjust_contrast, _uniform(generator, max(0.0, 1 - cfg.contrast), 1 + cfg.contrast)),
            (F.adjust_saturation, _uniform(generator, max(0.0, 1 - cfg.saturation), 1 + cfg.saturation)),
            (F.adjust_hue, _uniform(generator, -cfg.hue, cfg.hue)),
        ]
        for j in torch.randperm(len(ops), generator=generator, device=generator.device).tolist():
            op, factor = ops[j]
            image = op(image, factor)
    if _chance(generator, cfg.grayscale_prob):
        image = F.rgb_to_grayscale(image, num_output_channels=3)
    if _chance(generator, cfg.blur_prob):
        sigma = _uniform(generator, *cfg.blur_sigma)
        k = _blur_kernel(sigma, height, width)
        image = F.gaussian_blur(image, kernel_size=[k, k], sigma=[sigma, sigma])
    if _chance(generator, cfg.noise_prob):
        # Not F.gaussian_noise: it samples with torch.randn_like, i.e. from the global RNG.
        std = _uniform(generator, 0.0, cfg.noise_std)
        noise = torch.randn(image.shape, generator=generator, device=generator.device).to(image)
        image = (image + std * noise).clamp(0, 1)
    for _ in range(cfg.erase_count):
        if not _chance(generator, cfg.erase_prob):
            continue
        area = _uniform(generator, *cfg.erase_area) * height * width
        ratio = math.exp(_uniform(generator, math.log(cfg.erase_ratio[0]), math.log(cfg.erase_ratio[1])))
        h, w = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
        h, w = min(max(h, 1), height), min(max(w, 1), width)
        top = int(torch.randint(0, height - h + 1, (), generator=generator, device=generator.device))
        left = int(torch.randint(0, width - w + 1, (), generator=generator, device=generator.device))
        colour = torch.rand((3, 1, 1), generator=generator, device=generator.device).to(image)
        image = F.erase(image, top, left, h, w, colour)
    return image


def photometric_batch(img: torch.Tensor, generator: torch.Generator, cfg: StrongAugment) -> torch.Tensor:
    """``photometric_image`` on every image of a ``(B, 3, H, W)`` batch, in order."""
    return torch.stack([photometric_image(img[i], generator, cfg) for i in range(len(img))])


def strong_view(batch: dict, generator: torch.Generator, cfg: StrongAugment | None = None) -> dict:
    """A strongly augmented copy of ``batch``: per image, geometric (image and boxes), then photometric (image)."""
    cfg = cfg or StrongAugment()
    n_img, _, height, width = batch["img"].shape
    if cfg.geometric:
        params = [draw_affine(generator, cfg, height, width) for _ in range(n_img)]
        batch = apply_geometric(batch, params, cfg.min_visible, cfg.min_size, cfg.fill)
    else:
        batch = {**batch, "img": batch["img"].clone(), **{k: v.clone() for k, v in _labels_of(batch).items()}}
    if cfg.photometric:
        img = batch["img"]
        batch["img"] = photometric_batch(img, generator, cfg)
    return batch


def scale_jitter(batch: dict, generator: torch.Generator, low: float, high: float, stride: int = 32) -> dict:
    """Resize the whole batch by one random factor in [low, high], H and W snapped to multiples of ``stride``.

    Boxes are normalised to the canvas, so they are unchanged, even though snapping may change the
    aspect ratio slightly (both axes are resampled to exactly the new canvas).
    """
    if not 0 < low <= high:
        raise ValueError(f"need 0 < low <= high, got {low}, {high}")
    img = batch["img"]
    factor = _uniform(generator, low, high)
    height, width = (max(stride, round(side * factor / stride) * stride) for side in img.shape[-2:])
    resized = F.resize(img, [height, width], interpolation=InterpolationMode.BILINEAR, antialias=True)
    return {**batch, "img": resized.clamp(0, 1), **{k: v.clone() for k, v in _labels_of(batch).items()}}
