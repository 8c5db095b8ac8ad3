"""The embedded default data set: procedural multi-domain driving scenes in YOLO format.

Each image is a road scene in perspective (sky, buildings, trees, road, lane marks, sidewalks)
with vehicles, pedestrians and traffic signs drawn from far to near so near objects occlude
far ones. A *domain* changes two things, as weather does in BDD100K:

- appearance: contrast, colour cast, haze/fog with depth, rain streaks and blur, snow cover
  and flakes, darkness with sensor noise and light glows;
- label mix: how many objects of each class a scene holds.

The ``source`` domain is the stand-in for the foundation model's pretraining corpus (think COCO):
clear, saturated daylight with balanced classes and a wider range of object sizes, and no weather.

Everything is deterministic from ``(seed, domain, index)``; a whole data set is written once
into a folder named by the hash of its parameters and reused afterwards.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np

from fedsim.config import DEFAULT_CLASSES

CLASSES = list(DEFAULT_CLASSES)
CAR, TRUCK, BUS, PEDESTRIAN, SIGN = range(5)


@dataclass(frozen=True)
class DomainStyle:
    """How a domain looks and what it contains."""

    class_weights: tuple[float, float, float, float, float]
    objects: tuple[int, int]  # min/max objects per scene
    sky: tuple[int, int, int]  # BGR at the horizon
    contrast: float = 1.0
    brightness: float = 0.0  # added after contrast, in [0, 255] units
    saturation: float = 1.0
    fog: float = 0.0  # haze strength at the horizon
    fog_colour: tuple[int, int, int] = (200, 200, 200)
    rain: int = 0  # streak count per 100k pixels
    snow: int = 0  # flake count per 100k pixels
    snow_ground: float = 0.0  # how white the ground turns
    blur: int = 0  # box blur kernel (0 = none)
    noise: float = 0.0  # Gaussian sensor noise std
    night: bool = False
    tint: tuple[float, float, float] = (1.0, 1.0, 1.0)  # BGR multipliers
    jitter: float = 0.0  # per-image random contrast/brightness spread (natural variety, no weather)


DOMAINS: dict[str, DomainStyle] = {
    "source": DomainStyle(
        (0.3, 0.15, 0.15, 0.2, 0.2), (3, 9), (235, 200, 150), contrast=1.05, saturation=1.2, jitter=0.35
    ),
    "cloudy": DomainStyle(
        (0.45, 0.12, 0.08, 0.2, 0.15),
        (8, 16),
        (200, 195, 185),
        contrast=0.75,
        saturation=0.75,
        fog=0.25,
        noise=5,
    ),
    "overcast": DomainStyle(
        (0.5, 0.15, 0.1, 0.12, 0.13),
        (8, 16),
        (165, 165, 160),
        contrast=0.7,
        brightness=-10,
        saturation=0.55,
        fog=0.3,
        fog_colour=(170, 170, 168),
        noise=5,
        tint=(1.05, 1.0, 0.95),
    ),
    "rainy": DomainStyle(
        (0.55, 0.18, 0.12, 0.05, 0.1),
        (8, 16),
        (120, 118, 112),
        contrast=0.7,
        brightness=-25,
        saturation=0.6,
        fog=0.25,
        fog_colour=(130, 130, 128),
        rain=180,
        noise=6,
        tint=(1.1, 1.0, 0.92),
    ),
    "snowy": DomainStyle(
        (0.4, 0.3, 0.1, 0.08, 0.12),
        (8, 16),
        (225, 225, 230),
        contrast=0.75,
        brightness=15,
        saturation=0.5,
        fog=0.2,
        fog_colour=(235, 235, 240),
        snow=220,
        snow_ground=0.35,
        noise=5,
        tint=(1.08, 1.0, 0.95),
    ),
    "night": DomainStyle(
        (0.6, 0.1, 0.05, 0.1, 0.15),
        (8, 16),
        (60, 35, 25),
        contrast=0.7,
        brightness=-45,
        saturation=0.6,
        noise=10,
        night=True,
        tint=(1.1, 0.95, 0.85),
    ),
}


@dataclass(frozen=True)
class SynthSpec:
    """Everything that determines a generated data set (its hash names the cache folder)."""

    images_per_domain: dict[str, int] = field(default_factory=lambda: {"cloudy": 100})
    width: int = 320
    height: int = 192
    seed: int = 0
    version: int = 4  # bump when rendering changes so stale caches are not reused

    def key(self) -> str:
        blob = json.dumps(asdict(self), sort_keys=True).encode()
        return hashlib.sha1(blob).hexdigest()[:12]


def _rand_colour(rng: np.random.Generator, lo: int = 30, hi: int = 230) -> tuple[int, int, int]:
    return tuple(int(c) for c in rng.integers(lo, hi, 3))


def _vehicle_colour(rng: np.random.Generator) -> tuple[int, int, int]:
    palette = [
        (40, 40, 200),
        (200, 60, 30),
        (230, 230, 230),
        (30, 30, 30),
        (60, 160, 60),
        (0, 200, 230),
        (140, 140, 140),
        (120, 60, 150),
    ]
    base = np.array(palette[int(rng.integers(len(palette)))], float)
    return tuple(int(c) for c in np.clip(base + rng.normal(0, 18, 3), 0, 255))


def _draw_background(img: np.ndarray, rng: np.random.Generator, style: DomainStyle) -> tuple[int, int]:
    h, w = img.shape[:2]
    horizon = int(h * rng.uniform(0.36, 0.48))
    sky_top = np.array(style.sky, float) * 0.75
    ramp = np.linspace(0, 1, horizon)[:, None, None]
    img[:horizon] = (sky_top * (1 - ramp) + np.array(style.sky, float) * ramp).astype(np.uint8)
    ground = np.array(_rand_colour(rng, 60, 120), float) * np.array([0.7, 1.0, 0.8])
    img[horizon:] = ground.astype(np.uint8)
    # Buildings and trees along the horizon.
    x = int(rng.integers(-20, 0))
    while x < w:
        bw = int(rng.integers(w // 14, w // 5))
        bh = int(rng.integers(h // 12, h // 3))
        if rng.random() < 0.75:
            colour = _rand_colour(rng, 70, 200)
            cv2.rectangle(img, (x, horizon - bh), (x + bw, horizon), colour, -1)
            win = tuple(int(c * 0.6) for c in colour)
            for wy in range(horizon - bh + 4, horizon - 4, 7):
                for wx in range(x + 3, x + bw - 3, 7):
                    cv2.rectangle(img, (wx, wy), (wx + 2, wy + 3), win, -1)
        else:
            r = max(3, bh // 3)
            cv2.circle(img, (x + bw // 2, horizon - r), r, (40, int(rng.integers(90, 150)), 40), -1)
        x += bw + int(rng.integers(0, 8))
    # Road: a trapezoid meeting the horizon near a vanishing point.
    vx = int(w * rng.uniform(0.4, 0.6))
    road = np.array([[vx - w // 40, horizon], [vx + w // 40, horizon], [int(w * 1.15), h], [int(-w * 0.15), h]])
    asphalt = int(rng.integers(70, 110))
    cv2.fillPoly(img, [road], (asphalt, asphalt, asphalt + 4))
    for lane in (-0.33, 0.33):
        bottom = vx + int(lane * w * 1.3)
        for t0 in np.arange(0.05, 1.0, 0.12):
            t1 = t0 + 0.05
            p0 = (int(vx + (bottom - vx) * t0), int(horizon + (h - horizon) * t0))
            p1 = (int(vx + (bottom - vx) * t1), int(horizon + (h - horizon) * t1))
            cv2.line(img, p0, p1, (220, 220, 220), max(1, int(3 * t1)))
    if style.snow_ground:  # snow covers the ground, not the objects drawn on it later
        ground = img[horizon:].astype(np.float32)
        cover = (0.6 + 0.4 * rng.random(ground.shape[:2], dtype=np.float32))[..., None] * np.float32(style.snow_ground)
        img[horizon:] = (ground * (1 - cover) + 235.0 * cover).astype(np.uint8)
    _draw_clutter(img, rng, horizon, vx)
    return horizon, vx


def _draw_clutter(img: np.ndarray, rng: np.random.Generator, horizon: int, vx: int) -> None:
    """Unlabeled roadside things that look a little like objects: bins, boxes, poles, boards."""
    h, w = img.shape[:2]
    for _ in range(int(rng.integers(2, 7))):
        t = rng.uniform(0.1, 1.0)
        size = max(3.0, t * h * 0.25)
        side = rng.choice([-1, 1])
        cx = int(vx + side * (0.3 + t * 0.6 + rng.uniform(0, 0.3)) * w * 0.5)
        bottom = int(horizon + t * (h - horizon))
        kind = int(rng.integers(3))
        colour = _rand_colour(rng, 40, 220)
        if kind == 0:  # box or bin
            cv2.rectangle(
                img, (cx - int(size * 0.4), bottom - int(size * 0.6)), (cx + int(size * 0.4), bottom), colour, -1
            )
        elif kind == 1:  # lamp post
            cv2.line(img, (cx, bottom), (cx, bottom - int(size * 2.5)), (80, 80, 80), max(1, int(size / 8)))
            cv2.circle(img, (cx, bottom - int(size * 2.5)), max(1, int(size / 5)), (200, 230, 240), -1)
        else:  # advertising board on a pole (not a traffic sign)
            top = bottom - int(size * 2.2)
            cv2.line(img, (cx, bottom), (cx, top), (80, 80, 80), max(1, int(size / 10)))
            cv2.rectangle(img, (cx - int(size * 0.7), top - int(size * 0.5)), (cx + int(size * 0.7), top), colour, -1)


def _draw_car(img, x0, y0, x1, y1, rng):
    body = _vehicle_colour(rng)
    bh = y1 - y0
    cv2.rectangle(img, (x0, y0 + bh // 3), (x1, y1 - bh // 6), body, -1)
    inset = (x1 - x0) // 6
    cabin = np.array(
        [[x0 + inset, y0 + bh // 3], [x0 + inset * 2, y0], [x1 - inset * 2, y0], [x1 - inset, y0 + bh // 3]]
    )
    cv2.fillPoly(img, [cabin], tuple(int(c * 0.8) for c in body))
    cv2.rectangle(img, (x0 + inset * 2, y0 + bh // 12), (x1 - inset * 2, y0 + bh // 3 - 1), (90, 70, 60), -1)
    r = max(1, bh // 6)
    for cx in (x0 + (x1 - x0) // 5, x1 - (x1 - x0) // 5):
        cv2.circle(img, (cx, y1 - r), r, (20, 20, 20), -1)
    lw = max(1, (x1 - x0) // 8)
    for lx in (x0, x1 - lw):
        cv2.rectangle(img, (lx, y0 + bh // 2), (lx + lw, y0 + bh // 2 + max(1, bh // 10)), (30, 30, 200), -1)


def _draw_truck(img, x0, y0, x1, y1, rng):
    bw = x1 - x0
    cargo = _rand_colour(rng, 120, 240)
    cv2.rectangle(img, (x0, y0), (x1, y1 - (y1 - y0) // 7), cargo, -1)
    cv2.rectangle(img, (x0, y0), (x1, y1 - (y1 - y0) // 7), tuple(int(c * 0.6) for c in cargo), max(1, bw // 30))
    cab_w = bw // 3
    cv2.rectangle(img, (x1 - cab_w, y0 + (y1 - y0) // 3), (x1, y1 - (y1 - y0) // 7), _vehicle_colour(rng), -1)
    r = max(1, (y1 - y0) // 9)
    for cx in (x0 + bw // 6, x0 + bw // 2, x1 - bw // 6):
        cv2.circle(img, (cx, y1 - r), r, (20, 20, 20), -1)


def _draw_bus(img, x0, y0, x1, y1, rng):
    colour = [(0, 180, 240), (40, 40, 200), (200, 120, 20), (230, 230, 230)][int(rng.integers(4))]
    bh = y1 - y0
    cv2.rectangle(img, (x0, y0), (x1, y1 - bh // 8), colour, -1)
    win_h = max(1, bh // 4)
    step = max(3, (x1 - x0) // 7)
    for wx in range(x0 + 2, x1 - step // 2, step):
        cv2.rectangle(img, (wx, y0 + bh // 6), (wx + step - 3, y0 + bh // 6 + win_h), (80, 60, 50), -1)
    cv2.rectangle(img, (x0, y1 - bh // 3), (x1, y1 - bh // 4), (40, 40, 40), -1)
    r = max(1, bh // 9)
    for cx in (x0 + (x1 - x0) // 6, x1 - (x1 - x0) // 6):
        cv2.circle(img, (cx, y1 - r), r, (20, 20, 20), -1)


def _draw_pedestrian(img, x0, y0, x1, y1, rng):
    bw, bh = x1 - x0, y1 - y0
    cx = (x0 + x1) // 2
    head_r = max(1, min(bw // 2, bh // 9))
    skin = [(140, 180, 230), (90, 130, 180), (60, 90, 130)][int(rng.integers(3))]
    cv2.circle(img, (cx, y0 + head_r), head_r, skin, -1)
    shirt = _rand_colour(rng)
    cv2.rectangle(img, (x0, y0 + 2 * head_r), (x1, y0 + int(bh * 0.58)), shirt, -1)
    legs = _rand_colour(rng, 20, 120)
    lw = max(1, bw // 3)
    stride = int(rng.integers(0, max(1, bw // 2) + 1))
    cv2.line(img, (cx - lw // 2, y0 + int(bh * 0.58)), (cx - stride, y1 - 1), legs, lw)
    cv2.line(img, (cx + lw // 2, y0 + int(bh * 0.58)), (cx + stride, y1 - 1), legs, lw)


def _draw_sign(img, x0, y0, x1, y1, rng):
    # The box covers the sign plate only; the pole below it is context, not object.
    bw = x1 - x0
    cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
    cv2.line(img, (cx, y1), (cx, min(img.shape[0] - 1, y1 + 2 * (y1 - y0))), (90, 90, 90), max(1, bw // 8))
    kind = int(rng.integers(3))
    if kind == 0:
        cv2.circle(img, (cx, cy), bw // 2, (30, 30, 220), -1)
        cv2.circle(img, (cx, cy), max(1, bw // 3), (240, 240, 240), -1)
    elif kind == 1:
        tri = np.array([[cx, y0], [x1, y1], [x0, y1]])
        cv2.fillPoly(img, [tri], (30, 30, 220))
        inner = np.array(
            [[cx, y0 + (y1 - y0) // 3], [x1 - bw // 4, y1 - (y1 - y0) // 8], [x0 + bw // 4, y1 - (y1 - y0) // 8]]
        )
        cv2.fillPoly(img, [inner], (240, 240, 240))
    else:
        cv2.rectangle(img, (x0, y0), (x1, y1), (170, 90, 20), -1)
        cv2.rectangle(img, (x0 + bw // 4, y0 + (y1 - y0) // 4), (x1 - bw // 4, y1 - (y1 - y0) // 4), (240, 240, 240), 1)


DRAW = {CAR: _draw_car, TRUCK: _draw_truck, BUS: _draw_bus, PEDESTRIAN: _draw_pedestrian, SIGN: _draw_sign}
# Real-world size (width, height) relative to a car's height, and an aspect jitter.
SIZE = {CAR: (1.5, 1.0), TRUCK: (1.9, 1.6), BUS: (2.6, 1.45), PEDESTRIAN: (0.4, 1.15), SIGN: (0.45, 0.45)}


def _place_objects(rng, style, h, w, horizon, vx, min_px, domain_sizes=True):
    """Pick (class, box) for one scene; boxes are pixel xyxy, sorted far to near."""
    n = int(rng.integers(style.objects[0], style.objects[1] + 1))
    weights = np.array(style.class_weights, float)
    classes = rng.choice(len(CLASSES), size=n, p=weights / weights.sum())
    placed: list[tuple[int, np.ndarray]] = []
    for cls in classes:
        for _ in range(6):  # a few tries to find a spot that does not bury another object
            # depth: 0 at the horizon, 1 at the bottom
            t = rng.uniform(0.08, 1.0) ** 0.7 if domain_sizes else rng.uniform(0.12, 1.0) ** 0.8
            car_h = max(min_px, t * h * 0.42)
            sw, sh = SIZE[int(cls)]
            bw, bh = sw * car_h * rng.uniform(0.85, 1.15), sh * car_h * rng.uniform(0.9, 1.1)
            bottom = horizon + t * (h - horizon)
            if cls in (PEDESTRIAN, SIGN):
                side = rng.choice([-1, 1])
                cx = vx + side * (0.25 + t * 0.55 + rng.uniform(0, 0.25)) * w * 0.5
                if cls == SIGN:
                    bottom -= bh * rng.uniform(1.5, 2.5)
            else:
                cx = vx + rng.uniform(-0.55, 0.55) * t * w * 0.9
            box = np.array([cx - bw / 2, bottom - bh, cx + bw / 2, bottom])
            box[[0, 2]] = np.clip(box[[0, 2]], 0, w - 1)
            box[[1, 3]] = np.clip(box[[1, 3]], 0, h - 1)
            if (box[2] - box[0]) < min_px * 0.5 or (box[3] - box[1]) < min_px:
                continue
            if all(_overlap(box, other) < (0.6 if domain_sizes else 0.5) for _, other in placed):
                placed.append((int(cls), box))
                break
    placed.sort(key=lambda cb: cb[1][3])
    return placed


def _overlap(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over the smaller box (how much one box hides the other)."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return iw * ih / max(smaller, 1e-6)


def _apply_weather(
    img: np.ndarray, rng: np.random.Generator, style: DomainStyle, horizon: int, boxes: list[tuple[int, np.ndarray]]
) -> np.ndarray:
    h, w = img.shape[:2]
    out = img.astype(np.float32)
    if style.night:
        out *= 0.35
        for cls, (x0, y0, x1, y1) in boxes:  # lights make vehicles findable in the dark
            if cls in (CAR, TRUCK, BUS):
                r = max(1, int((x1 - x0) / 10))
                for lx in (x0 + r, x1 - r):
                    cv2.circle(out, (int(lx), int((y0 + y1) / 2)), r, (60, 60, 255), -1)
        for _ in range(int(rng.integers(2, 6))):
            cv2.circle(
                out,
                (int(rng.integers(0, w)), int(rng.integers(0, horizon + 1))),
                int(rng.integers(2, 6)),
                (120, 220, 255),
                -1,
            )
    grey = out.mean(axis=2, keepdims=True)
    out = grey + (out - grey) * np.float32(style.saturation)
    contrast, brightness = style.contrast, style.brightness
    if style.jitter:
        contrast *= 1 + rng.uniform(-style.jitter, style.jitter)
        brightness += 120 * rng.uniform(-style.jitter, style.jitter)
    out = (out - np.float32(128.0)) * np.float32(contrast) + np.float32(128.0 + brightness)
    out *= np.array(style.tint, np.float32)
    if style.fog:
        depth = np.clip(1.0 - np.abs(np.arange(h) - horizon) / (0.7 * h), 0, 1) ** 1.5
        alpha = (style.fog * rng.uniform(0.8, 1.2) * depth).astype(np.float32)[:, None, None]
        out = out * (1 - alpha) + np.array(style.fog_colour, np.float32) * alpha
    if style.rain:
        layer = np.zeros((h, w), np.float32)
        slant = rng.uniform(-0.4, 0.1)
        for _ in range(style.rain * h * w // 100_000):
            x, y = int(rng.integers(0, w)), int(rng.integers(0, h))
            length = int(rng.integers(h // 20, h // 8))
            cv2.line(layer, (x, y), (int(x + slant * length), y + length), float(rng.uniform(0.3, 0.8)), 1)
        out = out * (1 - layer[..., None] * 0.6) + 200.0 * layer[..., None] * 0.6
    if style.blur:
        out = cv2.blur(out, (style.blur, style.blur))
    if style.snow:
        for _ in range(style.snow * h * w // 100_000):
            r = int(rng.integers(1, max(2, h // 90)))
            cv2.circle(out, (int(rng.integers(0, w)), int(rng.integers(0, h))), r, (245, 245, 250), -1)
    if style.noise:
        out += rng.standard_normal(out.shape, dtype=np.float32) * np.float32(style.noise)
    return np.clip(out, 0, 255).astype(np.uint8)


def render(domain: str, index: int, seed: int, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """One scene: BGR image and labels as ``(n, 5)`` rows ``cls cx cy w h`` normalised to [0, 1]."""
    if domain not in DOMAINS:
        raise ValueError(f"unknown synthetic domain {domain!r}; known: {sorted(DOMAINS)}")
    # One RNG per (seed, domain, image): any subset of a data set renders identically.
    domain_id = int(hashlib.sha1(domain.encode()).hexdigest()[:8], 16)
    rng = np.random.default_rng([seed, domain_id, index])
    style = DOMAINS[domain]
    img = np.zeros((height, width, 3), np.uint8)
    horizon, vx = _draw_background(img, rng, style)
    # Weather domains hold denser, more distant and more occluded traffic than the source corpus.
    boxes = _place_objects(rng, style, height, width, horizon, vx, max(3.0, height / 48), domain != "source")
    for cls, (x0, y0, x1, y1) in boxes:
        DRAW[cls](img, int(x0), int(y0), int(x1), int(y1), rng)
    img = _apply_weather(img, rng, style, horizon, boxes)
    labels = np.array(
        [
            [c, (b[0] + b[2]) / 2 / width, (b[1] + b[3]) / 2 / height, (b[2] - b[0]) / width, (b[3] - b[1]) / height]
            for c, b in boxes
        ],
        np.float64,
    ).reshape(-1, 5)
    return img, labels


def write_label_file(path: Path, labels: np.ndarray) -> None:
    lines = [f"{int(r[0])} {r[1]:.6f} {r[2]:.6f} {r[3]:.6f} {r[4]:.6f}" for r in labels]
    path.write_text("\n".join(lines) + ("\n" if lines else ""))


def generate(spec: SynthSpec, cache_root: Path) -> Path:
    """Write (once) ``<cache_root>/synth-<key>/<domain>/{images,labels}`` and return that root."""
    root = Path(cache_root) / f"synth-{spec.key()}"
    done = root / "spec.json"
    if done.exists():
        return root
    tmp = root.with_name(root.name + ".partial")
    for domain, count in spec.images_per_domain.items():
        images, labels = tmp / domain / "images", tmp / domain / "labels"
        images.mkdir(parents=True, exist_ok=True)
        labels.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            img, lab = render(domain, i, spec.seed, spec.width, spec.height)
            name = f"{domain}_{i:05d}"
            cv2.imwrite(str(images / f"{name}.jpg"), img, [cv2.IMWRITE_JPEG_QUALITY, 92])
            write_label_file(labels / f"{name}.txt", lab)
    (tmp / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    (tmp / "spec.json").write_text(json.dumps(asdict(spec), indent=1))
    if root.exists():  # a concurrent writer finished first
        shutil.rmtree(tmp)
        return root
    tmp.rename(root)
    return root
