"""Index any YOLO-format data set by PSSFL domain, validating every image and label.

Two ways to say which domain an image belongs to:

* one sub-folder per domain: ``<root>/<domain>/images/*`` with labels in
  ``<root>/<domain>/labels/<stem>.txt`` (what the converters write);
* a manifest CSV with columns ``image,domain,split`` (image relative to ``root`` or
  absolute, split one of ``train``/``test``/``any``); labels follow the Ultralytics
  convention, see :func:`label_path_for`.

Every image is checked (readable image, label file present, every line five numbers with a
class in range and a box inside [0, 1]); a bad image is never indexed. An empty label file is
a background image (a frame with no object, as BDD100K has), indexed like any other.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from PIL import Image

IMAGE_SUFFIXES = frozenset({".bmp", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp"})
SPLITS = frozenset({"train", "test", "any"})
ON_BAD = ("skip", "fail")
MANIFEST_COLUMNS = ("image", "domain", "split")
MAX_LISTED_PROBLEMS = 20


class DataError(ValueError):
    """A data set that cannot be used as given (missing root, no domains, bad images)."""


@dataclass
class DomainIndex:
    """Valid images per domain plus every problem found while indexing.

    ``images`` maps domain -> sorted image paths that passed validation (a domain with no
    valid image is absent);
    ``splits`` maps each of those paths to ``train``/``test``/``any`` (always ``any`` for
    the sub-folder layout); ``problems`` lists ``(path, reason)`` for every skipped image
    (the label path for label problems, the image path otherwise; an image can appear
    more than once).
    """

    images: dict[str, list[Path]]
    problems: list[tuple[Path, str]] = field(default_factory=list)
    splits: dict[Path, str] = field(default_factory=dict)

    @property
    def num_images(self) -> int:
        """Number of valid images over all domains."""
        return sum(len(paths) for paths in self.images.values())

    def summary(self) -> str:
        """Per-domain image counts and the problem count, with the first few problems."""
        lines = [f"{len(self.images)} domains, {self.num_images} images, {len(self.problems)} problems"]
        for domain, paths in sorted(self.images.items()):
            split_counts = Counter(self.splits.get(p, "any") for p in paths)
            splits = ", ".join(f"{s} {n}" for s, n in sorted(split_counts.items()))
            lines.append(f"  {domain}: {len(paths)} images ({splits})")
        lines.extend(_format_problems(self.problems, limit=5))
        return "\n".join(lines)


def label_path_for(image: Path) -> Path:
    """The Ultralytics label path of an image: last ``images`` directory -> ``labels``, suffix -> ``.txt``.

    An image with no ``images`` directory in its path gets its label next to it.
    """
    parts = list(image.parts)
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] == "images":
            parts[i] = "labels"
            break
    return Path(*parts).with_suffix(".txt")


def load_domain_index(
    root: Path, *, manifest: Path | None = None, num_classes: int, on_bad: str = "skip"
) -> DomainIndex:
    """Index the images of ``root`` by domain, from sub-folders or from ``manifest``.

    ``on_bad="skip"`` leaves bad images out and lists them in ``problems``;
    ``on_bad="fail"`` raises :class:`DataError` naming up to 20 of them and the total.
    Raises :class:`DataError` also when ``root`` is missing, has no domains, no usable
    image at all, or a ``classes.txt`` whose length is not ``num_classes``.
    """
    if on_bad not in ON_BAD:
        raise ValueError(f"on_bad must be one of {ON_BAD}, got {on_bad!r}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be positive, got {num_classes}")
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data root {root} does not exist or is not a directory")
    _check_classes_file(root, num_classes)
    problems: list[tuple[Path, str]] = []
    entries = _manifest_entries(root, manifest, problems) if manifest else _folder_entries(root, problems)
    if not entries and not problems:
        source = f"manifest {manifest}" if manifest else f"{root} (expected <root>/<domain>/images/)"
        raise DataError(f"no domains found in {source}")
    index = DomainIndex(images={}, problems=problems)
    for image, domain, split in entries:
        image_problems = validate_image(image, label_path_for(image), num_classes)
        if image_problems:
            problems.extend(image_problems)
            continue
        index.images.setdefault(domain, []).append(image)
        index.splits[image] = split
    index.images = {domain: sorted(paths) for domain, paths in sorted(index.images.items())}
    _raise_if_unusable(index, on_bad)
    return index


def validate_image(image: Path, label: Path, num_classes: int) -> list[tuple[Path, str]]:
    """All problems of one image and its label file (empty list when it is usable)."""
    problems = []
    if not image.is_file():
        problems.append((image, "missing image file"))
    else:
        reason = _image_problem(image)
        if reason:
            problems.append((image, reason))
    reason = _label_problem(label, num_classes)
    if reason:
        problems.append((label, reason))
    return problems


def _image_problem(image: Path) -> str | None:
    try:
        with Image.open(image) as img:
            img.verify()
    except Exception as exc:  # PIL raises many types for corrupt data
        return f"unreadable image: {type(exc).__name__}: {exc}"
    return None


def _label_problem(label: Path, num_classes: int) -> str | None:
    if not label.is_file():
        return "missing label file"
    try:
        text = label.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        return f"unreadable label file: {exc}"
    lines = [(n, line) for n, line in enumerate(text.splitlines(), start=1) if line.strip()]
    bad = [(n, reason) for n, line in lines if (reason := _line_problem(line, num_classes))]
    if not bad:
        return None
    n, reason = bad[0]
    more = f" (and {len(bad) - 1} more bad lines)" if len(bad) > 1 else ""
    return f"line {n}: {reason}{more}"


def _line_problem(line: str, num_classes: int) -> str | None:
    """Why one label line is invalid, or None."""
    tokens = line.split()
    try:
        values = [float(t) for t in tokens]
    except ValueError:
        values = []
    if len(tokens) != 5 or len(values) != 5 or not all(math.isfinite(v) for v in values):
        return f"malformed line {line.strip()!r} (expected 5 numbers: cls cx cy w h)"
    cls, cx, cy, w, h = values
    if not cls.is_integer():
        return f"class id {tokens[0]} is not an integer"
    if not 0 <= cls < num_classes:
        return f"class id {tokens[0]} out of range [0, {num_classes})"
    if not (0 <= cx <= 1 and 0 <= cy <= 1 and 0 < w <= 1 and 0 < h <= 1):
        return f"box out of range ({' '.join(tokens[1:])}); need cx, cy in [0, 1] and w, h in (0, 1]"
    return None


def _check_classes_file(root: Path, num_classes: int) -> None:
    path = root / "classes.txt"
    if not path.is_file():
        return
    names = [line for line in path.read_text().splitlines() if line.strip()]
    if len(names) != num_classes:
        raise DataError(f"{path} lists {len(names)} classes but num_classes is {num_classes}")


def _folder_entries(root: Path, problems: list[tuple[Path, str]]) -> list[tuple[Path, str, str]]:
    """``(image, domain, "any")`` for every image in ``<root>/<domain>/images/``."""
    entries = []
    for domain_dir in sorted(p for p in root.iterdir() if (p / "images").is_dir()):
        images_dir = domain_dir / "images"
        images = sorted(p for p in images_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not images:
            problems.append((images_dir, "domain folder has no images"))
        entries.extend((image, domain_dir.name, "any") for image in images)
    return entries


def _manifest_entries(root: Path, manifest: Path, problems: list[tuple[Path, str]]) -> list[tuple[Path, str, str]]:
    """``(image, domain, split)`` per manifest row; bad rows go to ``problems``."""
    manifest = Path(manifest)
    if not manifest.is_file():
        raise DataError(f"manifest {manifest} does not exist")
    table = pd.read_csv(manifest, dtype=str, keep_default_na=False, skipinitialspace=True)
    missing = [c for c in MANIFEST_COLUMNS if c not in table.columns]
    if missing:
        raise DataError(f"manifest {manifest} lacks columns {missing} (needs {list(MANIFEST_COLUMNS)})")
    entries, seen = [], set()
    for row in table.itertuples(index=False):
        image = Path(row.image.strip())
        image = image if image.is_absolute() else root / image
        domain, split = row.domain.strip(), row.split.strip().lower()
        reason = _row_problem(row.image.strip(), domain, split, image in seen)
        if reason:
            problems.append((image, f"manifest {manifest.name}: {reason}"))
            continue
        seen.add(image)
        entries.append((image, domain, split))
    return entries


def _row_problem(image: str, domain: str, split: str, duplicate: bool) -> str | None:
    if not image:
        return "empty image path"
    if not domain:
        return "empty domain"
    if split not in SPLITS:
        return f"split {split!r} not one of {sorted(SPLITS)}"
    if duplicate:
        return "image listed more than once"
    return None


def _format_problems(problems: list[tuple[Path, str]], limit: int) -> list[str]:
    lines = [f"  {path}: {reason}" for path, reason in problems[:limit]]
    if len(problems) > limit:
        lines.append(f"  ... and {len(problems) - limit} more")
    return lines


def _raise_if_unusable(index: DomainIndex, on_bad: str) -> None:
    if index.problems and on_bad == "fail":
        bad_paths = len({path for path, _ in index.problems})
        header = f"{len(index.problems)} problems in {bad_paths} files (on_bad='fail'):"
        raise DataError("\n".join([header, *_format_problems(index.problems, MAX_LISTED_PROBLEMS)]))
    if index.num_images == 0:
        header = f"no usable images: all were skipped ({len(index.problems)} problems):"
        raise DataError("\n".join([header, *_format_problems(index.problems, MAX_LISTED_PROBLEMS)]))
