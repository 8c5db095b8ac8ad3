"""Shared machinery for turning real driving data sets into fedsim's on-disk YOLO layout.

Every converter parses its own annotation format into :class:`Frame` objects and hands them
to :func:`write_frames`, which owns everything that must behave identically across data sets:
category mapping, clipping, degenerate-box filtering, label formatting, image placement and
the :class:`ConversionReport`. The layout written is::

    <out>/<domain>/images/<name>.jpg
    <out>/<domain>/labels/<name>.txt      # "cls cx cy w h" per line, normalized to [0, 1]
    <out>/classes.txt                      # one class name per line
    <out>/conversion_report.json
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import shutil
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

from PIL import Image

from fedsim.config import DEFAULT_CLASSES as CONFIG_DEFAULT_CLASSES

DEFAULT_CLASSES: list[str] = list(CONFIG_DEFAULT_CLASSES)

UNDEFINED_DOMAIN = "undefined"

Box = tuple[float, float, float, float]


class ConversionError(ValueError):
    """A source annotation file that cannot be converted; the message is one line naming the file."""


def read_json(path: Path) -> object:
    """The parsed content of the JSON file ``path``.

    Raises :class:`ConversionError` with a one-line message naming the file when it is missing,
    a directory, unreadable, not UTF-8, empty, or not valid JSON (with the parser's position,
    and a note when the text ends before the JSON does). A UTF-8 byte order mark is allowed.
    """
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise ConversionError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise ConversionError(f"{path}: is a directory, expected a JSON file") from None
    except PermissionError:
        raise ConversionError(f"{path}: permission denied") from None
    except OSError as exc:
        raise ConversionError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        what = f"not a UTF-8 text file (byte 0x{data[exc.start]:02x} at position {exc.start})"
        if exc.end == len(data) and exc.reason == "unexpected end of data":
            what += "; the file ends inside a character (truncated?)"
        raise ConversionError(f"{path}: {what}") from None
    del data
    text = text.removeprefix("\ufeff")
    if not text or text.isspace():
        raise ConversionError(f"{path}: empty file, expected JSON")
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        where = f"{exc.msg} at line {exc.lineno}, column {exc.colno} (char {exc.pos})"
        if _ends_early(text, exc):
            where += "; the file ends before the JSON does (truncated?)"
        raise ConversionError(f"{path}: not valid JSON: {where}") from None
    except RecursionError:
        raise ConversionError(f"{path}: JSON nested too deeply to parse") from None


_JSON_LITERALS = ("true", "false", "null", "NaN", "Infinity", "-Infinity")
_PARTIAL_NUMBER_OR_ESCAPE = re.compile(r"[-+0-9.eE]+|u[0-9a-fA-F]{0,4}")


def _ends_early(text: str, exc: json.JSONDecodeError) -> bool:
    """Whether the parser failed because the text stops mid-document (a cut file)."""
    end = len(text)
    while end and text[end - 1].isspace():
        end -= 1
    if exc.pos >= end or exc.msg.startswith("Unterminated string"):
        # An unterminated string is reported where it starts; it runs to the end of the text.
        return True
    # A cut literal, number or \u escape is reported where that token starts: "[tr", "[1.", "\u00".
    tail = text[exc.pos : end] if end - exc.pos <= 10 else ""
    return bool(tail) and (
        any(lit.startswith(tail) for lit in _JSON_LITERALS) or bool(_PARTIAL_NUMBER_OR_ESCAPE.fullmatch(tail))
    )


def describe_json(value: object) -> str:
    """A short one-line description of a parsed JSON value for error messages: ``a dict (keys: 'a', 'b')``."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, int | float):
        return f"a number ({value!r})"
    if isinstance(value, str):
        shown = value if len(value) <= 40 else value[:40] + "..."
        return f"a string ({shown!r})"
    if isinstance(value, list):
        return f"a list of {len(value)} items"
    if isinstance(value, dict):
        keys = [repr(k if len(k) <= 30 else k[:30] + "...") for k in itertools.islice(value, 5)]
        more = ", ..." if len(value) > 5 else ""
        return f"a dict (keys: {', '.join(keys)}{more})" if keys else "an empty dict"
    return type(value).__name__


@dataclass
class RawObject:
    """One annotated object as found in the source: category name and pixel box ``x1 y1 x2 y2``.

    ``box`` is None when the source annotation has no box at all (e.g. a lane polygon) and
    when it is ``malformed`` (present but not four finite numbers).
    """

    category: str
    box: Box | None
    malformed: bool = False


@dataclass
class Frame:
    """One source image with its objects; ``size`` is ``(width, height)`` or None to read it."""

    name: str
    source: Path
    domain: str
    objects: list[RawObject]
    size: tuple[int, int] | None = None


@dataclass
class ConversionReport:
    """What a conversion did, with every dropped frame and label accounted for.

    Every label of a processed frame ends in exactly one bucket, checked in this order:
    ``unknown_categories`` (category not mapped), ``malformed_boxes`` (box present but not
    four finite numbers), ``no_box2d`` (no box in the source), ``degenerate_boxes`` (no width
    or height after clipping), or kept (``boxes``). So ``labels_seen == boxes +
    sum(unknown_categories.values()) + malformed_boxes + no_box2d + degenerate_boxes``.
    Labels of frames that were not written (missing, unreadable or duplicate image) are not
    looked at.
    """

    source: str
    out_dir: str
    domain_key: str
    classes: list[str]
    frames: int = 0
    frames_written: int = 0
    frames_per_domain: Counter[str] = field(default_factory=Counter)
    frames_without_boxes: int = 0
    labels_seen: int = 0
    boxes: int = 0
    boxes_per_domain: Counter[str] = field(default_factory=Counter)
    boxes_per_class: Counter[str] = field(default_factory=Counter)
    clipped_boxes: int = 0
    unknown_categories: Counter[str] = field(default_factory=Counter)
    no_box2d: int = 0
    malformed_boxes: int = 0
    degenerate_boxes: int = 0
    missing_images: list[str] = field(default_factory=list)
    unreadable_images: list[str] = field(default_factory=list)
    duplicate_frames: list[str] = field(default_factory=list)
    orphan_annotations: int = 0
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        """A JSON-serializable view (Counters become plain dicts sorted by key)."""
        # Not dataclasses.asdict: it rebuilds a Counter from (key, value) pairs, counting pairs.
        data = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Counter):
                value = dict(sorted(value.items()))
            elif isinstance(value, list):
                value = list(value)
            data[f.name] = value
        return data

    def summary(self) -> str:
        """A few human-readable lines for logs and the CLI."""
        domains = ", ".join(
            f"{d}: {n} frames / {self.boxes_per_domain[d]} boxes" for d, n in sorted(self.frames_per_domain.items())
        )
        unknown = ", ".join(f"{name} x{n}" for name, n in self.unknown_categories.most_common()) or "none"
        lines = [
            f"{self.source} -> {self.out_dir} (domain by {self.domain_key!r})",
            f"frames: {self.frames_written} written of {self.frames}; "
            f"{self.frames_without_boxes} without boxes (empty label files)",
            f"domains: {domains or 'none'}",
            f"boxes kept: {self.boxes} of {self.labels_seen} labels ({self.clipped_boxes} clipped)",
            f"dropped labels: unknown categories {sum(self.unknown_categories.values())} ({unknown}); "
            f"no box {self.no_box2d}; malformed {self.malformed_boxes}; degenerate {self.degenerate_boxes}",
            f"missing images: {len(self.missing_images)}; unreadable images: {len(self.unreadable_images)}; "
            f"duplicate frames: {len(self.duplicate_frames)}; orphan annotations: {self.orphan_annotations}",
        ]
        return "\n".join(lines + self.notes)


def sanitize_domain(value: object) -> str:
    """A folder-safe, lower-case domain name: ``"Partly Cloudy"`` -> ``"partly_cloudy"``.

    Missing or blank values become ``"undefined"`` (BDD100K's own name for an unknown value).
    """
    if value is None:
        return UNDEFINED_DOMAIN
    text = re.sub(r"\s+", "_", str(value).strip().lower())
    text = re.sub(r"[^a-z0-9_.-]", "_", text).strip(".")
    return text or UNDEFINED_DOMAIN


def build_class_index(
    classes: Sequence[str], category_map: Mapping[str, str] | None, default_map: Mapping[str, str]
) -> dict[str, int]:
    """Source category name -> class index.

    With an explicit ``category_map`` it is used as is and every target must be in
    ``classes``. Without one, ``default_map`` entries whose target is in ``classes`` apply,
    and any source name that is itself a class name maps to it (so a data set's own class
    list, e.g. SODA10M's six, works without a map).
    """
    if len(set(classes)) != len(classes) or not classes:
        raise ValueError(f"classes must be a non-empty list of unique names, got {list(classes)}")
    index = {name: i for i, name in enumerate(classes)}
    if category_map is not None:
        unknown = sorted({t for t in category_map.values() if t not in index})
        if unknown:
            raise ValueError(f"category_map targets {unknown} are not in classes {list(classes)}")
        return {src: index[tgt] for src, tgt in category_map.items()}
    mapping = {src: index[tgt] for src, tgt in default_map.items() if tgt in index}
    for name, i in index.items():
        mapping.setdefault(name, i)
    return mapping


def as_floats(values: Iterable[object]) -> tuple[float, ...] | None:
    """The values as finite floats, or None if any is missing, non-numeric or not finite."""
    out = []
    for value in values:
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            return None
        out.append(float(value))
    return tuple(out)


def clip_to_yolo(box: Box, width: int, height: int) -> tuple[tuple[float, float, float, float] | None, bool]:
    """Clip a pixel ``x1 y1 x2 y2`` box to the image and normalize it to YOLO ``cx cy w h``.

    Returns ``(yolo_box, clipped)``; ``yolo_box`` is None for a degenerate box, including
    one whose width or height would print as 0.000000 (the loader would reject it).
    """
    x1, y1, x2, y2 = box
    cx1, cx2 = min(max(x1, 0.0), width), min(max(x2, 0.0), width)
    cy1, cy2 = min(max(y1, 0.0), height), min(max(y2, 0.0), height)
    clipped = (cx1, cy1, cx2, cy2) != (x1, y1, x2, y2)
    w, h = (cx2 - cx1) / width, (cy2 - cy1) / height
    if round(w, 6) <= 0 or round(h, 6) <= 0:
        return None, clipped
    return ((cx1 + cx2) / 2 / width, (cy1 + cy2) / 2 / height, w, h), clipped


def format_yolo_line(cls: int, box: tuple[float, float, float, float]) -> str:
    """One label line, ``cls cx cy w h`` with six decimals."""
    cx, cy, w, h = box
    return f"{cls} {cx:.6f} {cy:.6f} {w:.6f} {h:.6f}"


def write_label_file(path: Path, lines: Sequence[str]) -> None:
    """Write label lines (an empty file when there are none)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{line}\n" for line in lines))


def place_image(source: Path, target: Path) -> None:
    """Hard-link ``source`` to ``target``, copying when linking is impossible (other filesystem)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    target.unlink(missing_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def write_classes(out_dir: Path, classes: Sequence[str]) -> None:
    """Write ``<out>/classes.txt``, one name per line in index order."""
    (out_dir / "classes.txt").write_text("".join(f"{name}\n" for name in classes))


def write_report(out_dir: Path, report: ConversionReport) -> None:
    """Write ``<out>/conversion_report.json``."""
    (out_dir / "conversion_report.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n")


def prepare_out_dir(out_dir: Path) -> None:
    """Create ``out_dir``; refuse a non-empty one so stale domains never mix with new ones."""
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"output directory {out_dir} exists and is not empty; choose a new one")
    out_dir.mkdir(parents=True, exist_ok=True)


def _image_size(path: Path) -> tuple[int, int] | None:
    try:
        with Image.open(path) as img:
            return img.size if min(img.size) > 0 else None
    except (OSError, ValueError, Image.DecompressionBombError, ImportError):
        # ImportError: once Ultralytics is imported, its patched Image.open tries an optional
        # HEIF plugin on files PIL cannot identify, and that import fails here.
        return None


def _convert_objects(
    frame: Frame, size: tuple[int, int], class_index: Mapping[str, int], report: ConversionReport
) -> list[str]:
    """Label lines for a frame's objects, counting every dropped object in ``report``."""
    lines = []
    for obj in frame.objects:
        report.labels_seen += 1
        cls = class_index.get(obj.category)
        if cls is None:
            report.unknown_categories[obj.category] += 1
        elif obj.malformed:
            report.malformed_boxes += 1
        elif obj.box is None:
            report.no_box2d += 1
        else:
            yolo, clipped = clip_to_yolo(obj.box, *size)
            if yolo is None:
                report.degenerate_boxes += 1
                continue
            report.clipped_boxes += clipped
            report.boxes_per_class[report.classes[cls]] += 1
            lines.append(format_yolo_line(cls, yolo))
    return lines


def write_frames(
    frames: Iterable[Frame], out_dir: Path, class_index: Mapping[str, int], report: ConversionReport
) -> ConversionReport:
    """Write every usable frame into the layout and finish ``report`` (also saved as JSON).

    A frame whose image is missing, unreadable (its header is opened with PIL when
    ``size`` is None; pixels are never decoded) or whose ``(domain, stem)`` was already
    written is skipped and listed in the report.
    Frames with no kept box are written with an empty label file and counted.
    """
    seen: set[tuple[str, str]] = set()
    for frame in frames:
        name = Path(frame.name).name
        key = (frame.domain, Path(name).stem)
        if key in seen:
            report.duplicate_frames.append(frame.name)
            continue
        if not frame.source.is_file():
            report.missing_images.append(frame.name)
            continue
        size = frame.size or _image_size(frame.source)
        if size is None:
            report.unreadable_images.append(frame.name)
            continue
        seen.add(key)
        lines = _convert_objects(frame, size, class_index, report)
        domain_dir = out_dir / frame.domain
        place_image(frame.source, domain_dir / "images" / name)
        write_label_file(domain_dir / "labels" / f"{Path(name).stem}.txt", lines)
        report.frames_written += 1
        report.frames_per_domain[frame.domain] += 1
        report.boxes_per_domain[frame.domain] += len(lines)
        report.boxes += len(lines)
        report.frames_without_boxes += not lines
    _finish(out_dir, report)
    return report


def _finish(out_dir: Path, report: ConversionReport) -> None:
    if report.frames_without_boxes:
        report.notes.append(
            f"note: {report.frames_without_boxes} frames have no kept boxes; their label files are empty "
            "and load_domain_index indexes them as background images (no objects)"
        )
    write_classes(out_dir, report.classes)
    write_report(out_dir, report)
