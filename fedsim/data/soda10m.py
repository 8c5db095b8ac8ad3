"""SODA10M (COCO-style) annotations -> fedsim's per-domain YOLO layout (see :mod:`fedsim.data.conversion`)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping
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

# SODA10M category -> fedsim class; Cyclist, Tram and Tricycle are unknown by default.
SODA10M_CATEGORY_MAP: dict[str, str] = {
    "Pedestrian": "pedestrian",
    "Car": "car",
    "Truck": "truck",
}

SODA10M_CLASSES: list[str] = ["Pedestrian", "Cyclist", "Car", "Truck", "Tram", "Tricycle"]


def convert_soda10m(
    annotations_json: Path,
    images_dir: Path,
    out_dir: Path,
    *,
    domain_key: str = "weather",
    category_map: dict[str, str] | None = None,
    classes: list[str] = DEFAULT_CLASSES,
) -> ConversionReport:
    """Convert a SODA10M annotation file into ``<out>/<domain>/{images,labels}``.

    The domain of an image is ``image[domain_key]`` (``weather``: Clear/Overcast/Rainy,
    ``period``: Daytime/Night, or ``location``/``city``), lower-cased and sanitized.
    ``category_map`` maps SODA category names to names in ``classes`` (default
    :data:`SODA10M_CATEGORY_MAP`); with ``classes=SODA10M_CLASSES`` and no map, SODA's own
    six classes are kept. Image sizes come from the JSON, or from the image file when the
    JSON lacks a positive ``width``/``height``. Annotations pointing at no listed image are
    counted as ``orphan_annotations``; an unlisted ``category_id`` counts as the unknown
    category ``"category_id=<id>"``. Clipping, dropping and empty-frame handling are those
    of :func:`fedsim.data.bdd100k.convert_bdd100k`. A file that is unreadable, not JSON or not
    shaped as above raises :class:`ConversionError` before anything is written.
    """
    class_index = build_class_index(classes, category_map, SODA10M_CATEGORY_MAP)
    data = _load(annotations_json)
    images = data["images"]
    if images and not any(domain_key in image for image in images):
        raise ConversionError(f"{annotations_json}: no image has the key {domain_key!r}")
    prepare_out_dir(out_dir)
    report = ConversionReport(
        source=str(annotations_json), out_dir=str(out_dir), domain_key=domain_key, classes=list(classes)
    )
    report.frames = len(images)
    by_image = _group_annotations(data, report)
    return write_frames(_frames(images, by_image, images_dir, domain_key), out_dir, class_index, report)


def _load(annotations_json: Path) -> dict:
    """The parsed annotation file, checked for the shape the conversion relies on."""
    data = read_json(annotations_json)
    if not isinstance(data, dict):
        raise ConversionError(
            f"{annotations_json}: expected a COCO-style JSON object with 'images', got {describe_json(data)}"
        )
    if "images" not in data:
        raise ConversionError(f"{annotations_json}: has no 'images' list, got {describe_json(data)}")
    problem = (
        _list_problem(data, "images", _image_problem, optional=False)
        or _list_problem(data, "annotations", _annotation_problem, optional=True)
        or _list_problem(data, "categories", _category_problem, optional=True)
    )
    if problem:
        raise ConversionError(f"{annotations_json}: {problem}")
    return data


# Image and category ids are dictionary keys and matched against annotations' references.
_ID_TYPES = (int, float, str)


def _bad_id(value: object) -> bool:
    return isinstance(value, bool) or not isinstance(value, _ID_TYPES)


def _list_problem(
    data: Mapping, key: str, entry_problem: Callable[[Mapping], str | None], *, optional: bool
) -> str | None:
    """What is wrong with ``data[key]`` or its first bad entry, or None. Absent or null is fine when ``optional``."""
    entries = data.get(key)
    if entries is None and optional:
        return None
    if not isinstance(entries, list):
        return f"'{key}' is {describe_json(entries)}, expected a list"
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            return f"{key}[{i}] is {describe_json(entry)}, expected a dict"
        problem = entry_problem(entry)
        if problem:
            return f"{key}[{i}] {problem}"
    return None


def _image_problem(image: Mapping) -> str | None:
    if "file_name" not in image:
        return "has no 'file_name'"
    name = image["file_name"]
    if not isinstance(name, str) or not name.strip():
        return f"has a 'file_name' that is {describe_json(name)}, expected a non-empty string"
    if "id" not in image:
        return f"({name!r}) has no 'id'"
    if _bad_id(image["id"]):
        return f"({name!r}) has an 'id' that is {describe_json(image['id'])}, expected a number or string"
    return None


def _annotation_problem(ann: Mapping) -> str | None:
    for key in ("image_id", "category_id"):
        if key in ann and _bad_id(ann[key]):
            article = "an" if key[0] in "aeiou" else "a"
            return f"has {article} '{key}' that is {describe_json(ann[key])}, expected a number or string"
    return None


def _category_problem(category: Mapping) -> str | None:
    for key in ("id", "name"):
        if key not in category:
            return f"has no '{key}'"
    if _bad_id(category["id"]):
        return f"has an 'id' that is {describe_json(category['id'])}, expected a number or string"
    return None


def _group_annotations(data: Mapping, report: ConversionReport) -> dict[object, list[RawObject]]:
    """Objects per image id; annotations of unlisted images are only counted."""
    names = {c["id"]: str(c["name"]) for c in data.get("categories") or []}
    image_ids = {image["id"] for image in data["images"]}
    by_image: dict[object, list[RawObject]] = defaultdict(list)
    for ann in data.get("annotations") or []:
        if ann.get("image_id") not in image_ids:
            report.orphan_annotations += 1
            continue
        category = names.get(ann.get("category_id"), f"category_id={ann.get('category_id')}")
        by_image[ann["image_id"]].append(_object(category, ann.get("bbox")))
    return by_image


def _object(category: str, bbox: object) -> RawObject:
    if bbox is None:
        return RawObject(category, None)
    xywh = as_floats(bbox) if isinstance(bbox, list | tuple) and len(bbox) == 4 else None
    if xywh is None:
        return RawObject(category, None, malformed=True)
    x, y, w, h = xywh
    return RawObject(category, (x, y, x + w, y + h))


def _size(image: Mapping) -> tuple[int, int] | None:
    size = as_floats((image.get("width"), image.get("height")))
    if size is None or min(size) <= 0:
        return None
    return int(size[0]), int(size[1])


def _frames(
    images: list[dict], by_image: Mapping[object, list[RawObject]], images_dir: Path, domain_key: str
) -> Iterator[Frame]:
    for image in images:
        yield Frame(
            name=image["file_name"],
            source=Path(images_dir) / image["file_name"],
            domain=sanitize_domain(image.get(domain_key)),
            objects=by_image.get(image["id"], []),
            size=_size(image),
        )
