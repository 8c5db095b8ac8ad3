"""Converters refuse unreadable or wrongly shaped label files with one clear ConversionError line.

Every case checks that the message is a single line naming the file, says what is wrong and
where, and that nothing was written to the output directory.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from fedsim.data.bdd100k import convert_bdd100k
from fedsim.data.conversion import ConversionError, read_json
from fedsim.data.soda10m import convert_soda10m

PNG_HEAD = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR"

BDD_FRAMES = [
    {
        "name": "a.jpg",
        "attributes": {"weather": "clear", "timeofday": "daytime", "scene": "city street"},
        "labels": [{"category": "car", "box2d": {"x1": 1, "y1": 2, "x2": 30, "y2": 20}}],
    },
    {"name": "b.jpg", "attributes": {"weather": "rainy"}, "labels": []},
]

SODA_DATA = {
    "images": [
        {"file_name": "s1.jpg", "id": 1, "width": 64, "height": 36, "weather": "Clear"},
        {"file_name": "s2.jpg", "id": 2, "width": 64, "height": 36, "weather": "Rainy"},
    ],
    "annotations": [{"id": 1, "image_id": 1, "category_id": 3, "bbox": [8, 4, 16, 16]}],
    "categories": [{"id": 3, "name": "Car"}],
}

Converter = Callable[..., object]


def refusal(convert: Converter, source: Path, tmp_path: Path, **kwargs: object) -> str:
    """The ConversionError message of converting ``source``, checked to be one line naming it."""
    out = tmp_path / "out"
    with pytest.raises(ConversionError) as err:
        convert(source, tmp_path / "images", out, **kwargs)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"{source}: ")
    assert not out.exists()  # refused before anything was written
    return message


def write(tmp_path: Path, content: bytes | str | object, name: str = "labels.json") -> Path:
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif isinstance(content, str):
        path.write_text(content)
    else:
        path.write_text(json.dumps(content, indent=2))
    return path


def with_entry(base: list | dict, path: tuple, value: object) -> list | dict:
    """A deep copy of ``base`` with the entry at ``path`` replaced (or deleted when ``value`` is ...)."""
    data = json.loads(json.dumps(base))
    target = data
    for key in path[:-1]:
        target = target[key]
    if value is ...:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return data


# ---------------------------------------------------------------- unreadable files (both converters)

CONVERTERS = [pytest.param(convert_bdd100k, id="bdd100k"), pytest.param(convert_soda10m, id="soda10m")]


@pytest.mark.parametrize("convert", CONVERTERS)
def test_binary_file_is_not_utf8(convert: Converter, tmp_path: Path) -> None:
    source = write(tmp_path, PNG_HEAD + bytes(range(256)))
    assert refusal(convert, source, tmp_path).endswith(": not a UTF-8 text file (byte 0x89 at position 0)")


def test_non_utf8_byte_position(tmp_path: Path) -> None:
    source = write(tmp_path, b'[{"name": "caf\xe9.jpg"}]')  # Latin-1, not UTF-8
    assert "not a UTF-8 text file (byte 0xe9 at position 14)" in refusal(convert_bdd100k, source, tmp_path)


@pytest.mark.parametrize("convert", CONVERTERS)
def test_plain_text_is_not_json(convert: Converter, tmp_path: Path) -> None:
    source = write(tmp_path, "hello\n")
    message = refusal(convert, source, tmp_path)
    assert message.endswith(": not valid JSON: Expecting value at line 1, column 1 (char 0)")


def test_invalid_json_position(tmp_path: Path) -> None:
    source = write(tmp_path, '[\n  {"name": "a.jpg"}\n  {"name": "b.jpg"}\n]')
    message = refusal(convert_bdd100k, source, tmp_path)
    assert message.endswith(": not valid JSON: Expecting ',' delimiter at line 3, column 3 (char 24)")
    assert "truncated" not in message


@pytest.mark.parametrize("convert, data", [(convert_bdd100k, BDD_FRAMES), (convert_soda10m, SODA_DATA)])
@pytest.mark.parametrize("fraction", [0.2, 0.5, 0.8])
def test_truncated_json(convert: Converter, data: object, fraction: float, tmp_path: Path) -> None:
    text = json.dumps(data, indent=2)
    source = write(tmp_path, text[: int(len(text) * fraction)])
    message = refusal(convert, source, tmp_path)
    assert ": not valid JSON: " in message
    assert " at line " in message and ", column " in message
    assert message.endswith("; the file ends before the JSON does (truncated?)")


def test_every_cut_of_a_label_file_reads_as_truncated(tmp_path: Path) -> None:
    # Cuts inside a literal, number, string or \u escape, and cuts between tokens, all count.
    frame = {"name": "é \u4e2d.jpg", "x": -12.5e3, "t": True, "f": False, "n": None, "e": 'q"\\\u0001'}
    for text in (json.dumps([frame]), json.dumps([frame], ensure_ascii=False, indent=1)):
        data = text.encode()
        for cut in range(1, len(data)):
            source = write(tmp_path, data[:cut])
            with pytest.raises(ConversionError, match=r"\(truncated\?\)$"):
                read_json(source)


@pytest.mark.parametrize("convert", CONVERTERS)
@pytest.mark.parametrize("content", [b"", b"  \n\t\n"], ids=["empty", "whitespace"])
def test_empty_file(convert: Converter, content: bytes, tmp_path: Path) -> None:
    assert refusal(convert, write(tmp_path, content), tmp_path).endswith(": empty file, expected JSON")


@pytest.mark.parametrize("convert", CONVERTERS)
def test_missing_file_and_directory(convert: Converter, tmp_path: Path) -> None:
    assert refusal(convert, tmp_path / "nope.json", tmp_path).endswith(": file not found")
    folder = tmp_path / "a_folder.json"
    folder.mkdir()
    assert refusal(convert, folder, tmp_path).endswith(": is a directory, expected a JSON file")


def test_byte_order_mark_is_accepted(tmp_path: Path) -> None:
    source = write(tmp_path, b"\xef\xbb\xbf" + json.dumps(BDD_FRAMES).encode())
    assert read_json(source) == BDD_FRAMES


# ---------------------------------------------------------------- BDD100K shape


@pytest.mark.parametrize(
    "data, expected",
    [
        ({"frames": BDD_FRAMES}, "expected a JSON list of BDD100K frames, got a dict (keys: 'frames')"),
        (SODA_DATA, "expected a JSON list of BDD100K frames, got a dict (keys: 'images', 'annotations', 'categories')"),
        ('"a.jpg"', "expected a JSON list of BDD100K frames, got a string ('a.jpg')"),
        (None, "expected a JSON list of BDD100K frames, got null"),
        ([*BDD_FRAMES, "c.jpg"], "frame 2 is a string ('c.jpg'), expected a dict with a 'name'"),
        (with_entry(BDD_FRAMES, (1, "name"), ...), "frame 1 has no 'name'"),
        (
            with_entry(BDD_FRAMES, (0, "name"), 7),
            "frame 0 has a 'name' that is a number (7), expected a non-empty string",
        ),
        (with_entry(BDD_FRAMES, (1, "name"), ""), "frame 1 has a 'name' that is a string (''), expected a non-empty"),
        (
            with_entry(BDD_FRAMES, (0, "labels"), {"category": "car"}),
            "frame 0 ('a.jpg') has 'labels' that is a dict (keys: 'category'), expected a list",
        ),
        (with_entry(BDD_FRAMES, (1, "labels"), "car"), "frame 1 ('b.jpg') has 'labels' that is a string ('car')"),
        (with_entry(BDD_FRAMES, (0, "labels", 0), ["car"]), "frame 0 ('a.jpg') label 0 is a list of 1 items"),
        (with_entry(BDD_FRAMES, (1, "attributes"), ["rainy"]), "frame 1 ('b.jpg') has 'attributes' that is a list"),
    ],
    ids=[
        "dict",
        "soda-file",
        "string",
        "null",
        "frame-not-dict",
        "no-name",
        "name-number",
        "name-empty",
        "labels-dict",
        "labels-string",
        "label-not-dict",
        "attributes-list",
    ],
)
def test_bdd100k_wrong_shape(data: object, expected: str, tmp_path: Path) -> None:
    source = write(tmp_path, data)
    assert f"{source}: {expected}" in refusal(convert_bdd100k, source, tmp_path)


def test_bdd100k_null_labels_and_attributes_still_convert(tmp_path: Path) -> None:
    data = [*BDD_FRAMES, {"name": "c.jpg", "attributes": None, "labels": None}]
    report = convert_bdd100k(write(tmp_path, data), tmp_path / "images", tmp_path / "out")
    assert report.frames == 3 and report.missing_images == ["a.jpg", "b.jpg", "c.jpg"]


def test_bdd100k_missing_domain_attribute(tmp_path: Path) -> None:
    source = write(tmp_path, BDD_FRAMES)
    message = refusal(convert_bdd100k, source, tmp_path, domain_key="period")
    assert "no frame has attribute 'period'" in message


# ---------------------------------------------------------------- SODA10M shape


@pytest.mark.parametrize(
    "data, expected",
    [
        (BDD_FRAMES, "expected a COCO-style JSON object with 'images', got a list of 2 items"),
        ({"annotations": []}, "has no 'images' list, got a dict (keys: 'annotations')"),
        (with_entry(SODA_DATA, ("images",), {"s1.jpg": 1}), "'images' is a dict (keys: 's1.jpg'), expected a list"),
        (with_entry(SODA_DATA, ("images",), None), "'images' is null, expected a list"),
        (with_entry(SODA_DATA, ("images", 1), "s2.jpg"), "images[1] is a string ('s2.jpg'), expected a dict"),
        (with_entry(SODA_DATA, ("images", 1, "file_name"), ...), "images[1] has no 'file_name'"),
        (
            with_entry(SODA_DATA, ("images", 0, "file_name"), ["s1.jpg"]),
            "images[0] has a 'file_name' that is a list of 1 items, expected a non-empty string",
        ),
        (with_entry(SODA_DATA, ("images", 1, "id"), ...), "images[1] ('s2.jpg') has no 'id'"),
        (
            with_entry(SODA_DATA, ("images", 0, "id"), [1]),
            "images[0] ('s1.jpg') has an 'id' that is a list of 1 items, expected a number or string",
        ),
        (with_entry(SODA_DATA, ("annotations",), {}), "'annotations' is an empty dict, expected a list"),
        (with_entry(SODA_DATA, ("annotations", 0), 5), "annotations[0] is a number (5), expected a dict"),
        (
            with_entry(SODA_DATA, ("annotations", 0, "image_id"), {"id": 1}),
            "annotations[0] has an 'image_id' that is a dict (keys: 'id'), expected a number or string",
        ),
        (with_entry(SODA_DATA, ("categories",), "Car"), "'categories' is a string ('Car'), expected a list"),
        (with_entry(SODA_DATA, ("categories", 0, "name"), ...), "categories[0] has no 'name'"),
    ],
    ids=[
        "list",
        "no-images",
        "images-dict",
        "images-null",
        "image-not-dict",
        "no-file-name",
        "file-name-list",
        "no-id",
        "id-list",
        "annotations-dict",
        "annotation-not-dict",
        "annotation-image-id-dict",
        "categories-string",
        "category-no-name",
    ],
)
def test_soda10m_wrong_shape(data: object, expected: str, tmp_path: Path) -> None:
    source = write(tmp_path, data)
    assert refusal(convert_soda10m, source, tmp_path) == f"{source}: {expected}"


def test_soda10m_optional_lists_may_be_absent(tmp_path: Path) -> None:
    data = {"images": SODA_DATA["images"], "annotations": None}
    report = convert_soda10m(write(tmp_path, data), tmp_path / "images", tmp_path / "out")
    assert report.frames == 2 and report.missing_images == ["s1.jpg", "s2.jpg"]


def test_soda10m_missing_domain_key(tmp_path: Path) -> None:
    source = write(tmp_path, SODA_DATA)
    assert refusal(convert_soda10m, source, tmp_path, domain_key="period").endswith("no image has the key 'period'")


def test_cli_maps_a_refusal_to_exit_2_and_one_line(tmp_path, capsys):
    from fedsim.cli import main

    labels = tmp_path / "notjson.json"
    labels.write_bytes(b"\x89PNG\r\n\x1a\n")
    code = main(["data", "bdd100k", "--labels", str(labels), "--images", str(tmp_path), "--out", str(tmp_path / "o")])
    assert code == 2
    assert capsys.readouterr().err.splitlines() == [
        f"fedsim: data error: {labels}: not a UTF-8 text file (byte 0x89 at position 0)"
    ]
    assert not (tmp_path / "o").exists()
