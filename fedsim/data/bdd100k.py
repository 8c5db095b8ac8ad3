"""BDD100K detection labels -> fedsim's per-domain YOLO layout (see :mod:`fedsim.data.conversion`)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path

from fedsim.data.conversion import (
    DEFAULT_CLASSES,
    ConversionError,
    ConversionReport,
    Frame,
    RawObject,
    as_floats,
    build_class_index,
    describe_json,
    prepare_out_dir,
    read_json,
    sanitize_domain,
    write_frames,
)

# BDD100K category -> fedsim class. Everything else (rider, bike, motor, train, traffic
# light, lane, drivable area, ...) is unknown and counted in the report.
BDD100K_CATEGORY_MAP: dict[str, str] = {
    "pedestrian": "pedestrian",
    "person": "pedestrian",
    "car": "car",
    "bus": "bus",
    "truck": "truck",
    "traffic sign": "traffic_sign",
}

BDD100K_DOMAIN_KEYS = ("weather", "timeofday", "scene")


def convert_bdd100k(
    labels_json: Path,
    images_dir: Path,
    out_dir: Path,
    *,
    domain_key: str = "weather",
    category_map: dict[str, str] | None = None,
    classes: list[str] = DEFAULT_CLASSES,
) -> ConversionReport:
    """Convert a BDD100K detection label file into ``<out>/<domain>/{images,labels}``.

    ``labels_json`` is the list of frames (``name``, ``attributes``, ``labels``); the domain
    of a frame is ``attributes[domain_key]`` (``weather``, ``timeofday`` or ``scene``),
    sanitized for folders (``"partly cloudy"`` -> ``"partly_cloudy"``; missing in a frame ->
    ``"undefined"``, missing in every frame -> ConversionError). ``category_map`` maps BDD
    category names to names in ``classes`` (default :data:`BDD100K_CATEGORY_MAP`). Image
    sizes are read from each image file's header with PIL (no decoding); an image PIL
    cannot open is skipped and listed in ``unreadable_images``.

    Boxes are clipped to the image; boxes with no area after clipping are dropped and
    counted. Frames whose image file is missing are skipped and listed. Frames left with no
    box are still written, with an empty label file, and counted in
    ``frames_without_boxes``: they are real negatives, and :func:`load_domain_index` indexes
    them as background images.
    ``out_dir`` must not exist or be empty. A label file that is unreadable, not JSON or not
    shaped like BDD100K frames raises :class:`ConversionError` before anything is written.
    """
    class_index = build_class_index(classes, category_map, BDD100K_CATEGORY_MAP)
    raw = _load_frames(labels_json)
    if raw and not any(domain_key in (f.get("attributes") or {}) for f in raw):
        raise ConversionError(
            f"{labels_json}: no frame has attribute {domain_key!r} (BDD100K has {BDD100K_DOMAIN_KEYS})"
        )
    prepare_out_dir(out_dir)
    report = ConversionReport(
        source=str(labels_json), out_dir=str(out_dir), domain_key=domain_key, classes=list(classes)
    )
    report.frames = len(raw)
    return write_frames(_frames(raw, images_dir, domain_key), out_dir, class_index, report)


def _load_frames(labels_json: Path) -> list[dict]:
    """The frames of a BDD100K label file, checked for the shape the conversion relies on."""
    data = read_json(labels_json)
    if not isinstance(data, list):
        raise ConversionError(f"{labels_json}: expected a JSON list of BDD100K frames, got {describe_json(data)}")
    for i, frame in enumerate(data):
        problem = _frame_problem(frame)
        if problem:
            raise ConversionError(f"{labels_json}: frame {i} {problem}")
    return data


def _frame_problem(frame: object) -> str | None:
    """What is wrong with one frame (phrased to follow "frame <i>"), or None."""
    if not isinstance(frame, dict):
        return f"is {describe_json(frame)}, expected a dict with a 'name'"
    if "name" not in frame:
        return "has no 'name'"
    name = frame["name"]
    if not isinstance(name, str) or not name.strip():
        return f"has a 'name' that is {describe_json(name)}, expected a non-empty string"
    # null counts as absent (the converter has always accepted it for both keys).
    attributes = frame.get("attributes")
    if attributes is not None and not isinstance(attributes, dict):
        return f"({name!r}) has 'attributes' that is {describe_json(attributes)}, expected a dict"
    labels = frame.get("labels")
    if labels is None:
        return None
    if not isinstance(labels, list):
        return f"({name!r}) has 'labels' that is {describe_json(labels)}, expected a list"
    for j, label in enumerate(labels):
        if not isinstance(label, dict):
            return f"({name!r}) label {j} is {describe_json(label)}, expected a dict"
    return None


def _frames(raw: list[dict], images_dir: Path, domain_key: str) -> Iterator[Frame]:
    for item in raw:
        attributes = item.get("attributes") or {}
        yield Frame(
            name=item["name"],
            source=Path(images_dir) / item["name"],
            domain=sanitize_domain(attributes.get(domain_key)),
            objects=[_object(label) for label in item.get("labels") or []],
        )


def _object(label: Mapping) -> RawObject:
    category = str(label.get("category"))
    box2d = label.get("box2d")
    if box2d is None:
        return RawObject(category, None)
    box = as_floats(box2d.get(k) for k in ("x1", "y1", "x2", "y2")) if isinstance(box2d, dict) else None
    return RawObject(category, box, malformed=box is None)
