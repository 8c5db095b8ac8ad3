"""The PSSFL split: a labeled high-res server set, N unlabeled low-res client shards, a test set per domain.

Input is a per-domain list of images (labels beside them by the Ultralytics convention
``.../images/x.jpg`` -> ``.../labels/x.txt``), from the synthetic generator or a user's data set.

Layout written (once, cached by a hash of source and split parameters)::

    server/{images,labels}            server domains, labeled, full resolution
    clients/client_000/images         one client domain, resized by client_scale, no labels
    client_labels/client_000/labels   the clients' true labels, for the oracle upper bound only
    test/<domain>/{images,labels}     server domains at full, client domains at client resolution
    test_hi/<domain>/{images,labels}  client domains' test images again, at full resolution
    partition.json                    what is where (read by everything else)

Client shards (``data.partition``; README "Client populations"): ``iid`` deals a client domain's
shuffled images round-robin to its clients (equal shares); ``dirichlet`` gives each class's images
to them in proportions drawn from Dir(``data.dirichlet_alpha``), an image counting as its most
frequent class (``dominant_class``); ``data.quantity_alpha`` draws unequal client sizes. Both are
seeded by ``data.seed`` and leave every client at least one image (``skewed_shards``).

A domain's test set is a random draw of ``data.test_images`` of its images, unless a manifest
marks some of them ``test``: then it is those (at most ``data.test_images`` of them, when that
names a size for the domain). Images marked ``train`` are never tested on; ``any`` go either way.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import os
import shutil
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import yaml
from PIL import Image, ImageOps

from fedsim.config import DataConfig
from fedsim.data.yolo_folder import DataError

# Part of the cache key: a partition written by an older layout is rebuilt, not misread.
# 2: test_hi/, manifest test splits, per-domain test sizes.
LAYOUT_VERSION = 2
SPLIT_NAMES = ("train", "test", "any")
# Encoder options by suffix: OpenCV warns once per image about an option its encoder ignores.
_WRITE_PARAMS = {".jpg": [cv2.IMWRITE_JPEG_QUALITY, 92], ".jpeg": [cv2.IMWRITE_JPEG_QUALITY, 92]}


@dataclass(frozen=True)
class ClientShard:
    client_id: int
    domain: str
    images: Path
    num_images: int


@dataclass(frozen=True)
class Partition:
    root: Path
    names: list[str]
    server_images: Path
    server_imgsz: int
    client_imgsz: int
    clients: list[ClientShard]
    test: dict[str, tuple[Path, int]]  # domain -> (images dir, imgsz)
    # client domain -> (images dir, imgsz): the same test images as ``test``, at full resolution
    test_hi: dict[str, tuple[Path, int]] = field(default_factory=dict)

    def labeled_client_view(self, client_id: int) -> Path:
        """A client's images with their true labels, for the oracle baseline only."""
        return _labeled_view(self.root, client_id)

    @classmethod
    def load(cls, root: Path) -> Partition:
        meta = json.loads((root / "partition.json").read_text())
        return cls(
            root=root,
            names=meta["names"],
            server_images=root / "server" / "images",
            server_imgsz=meta["server_imgsz"],
            client_imgsz=meta["client_imgsz"],
            clients=[ClientShard(c["id"], c["domain"], root / c["images"], c["n"]) for c in meta["clients"]],
            test={d: (root / t["images"], t["imgsz"]) for d, t in meta["test"].items()},
            test_hi={d: (root / t["images"], t["imgsz"]) for d, t in meta.get("test_hi", {}).items()},
        )


def _labeled_view(root: Path, client_id: int) -> Path:
    """``oracle/client_XXX/{images,labels}``: hard links joining a client's images and true labels."""
    name = f"client_{client_id:03d}"
    view = root / "oracle" / name
    if not (view / "done").exists():
        (view / "images").mkdir(parents=True, exist_ok=True)
        (view / "labels").mkdir(parents=True, exist_ok=True)
        for img in sorted((root / "clients" / name / "images").glob("*")):
            _link_or_copy_if_missing(img, view / "images" / img.name)
            label = root / "client_labels" / name / "labels" / (img.stem + ".txt")
            _link_or_copy_if_missing(label, view / "labels" / label.name)
        (view / "done").touch()
    return view / "images"


def _link_or_copy_if_missing(src: Path, dst: Path) -> None:
    if not dst.exists():
        _link_or_copy(src, dst)


def label_path(image: Path) -> Path:
    parts = list(image.parts)
    i = len(parts) - 1 - parts[::-1].index("images")
    parts[i] = "labels"
    return Path(*parts).with_suffix(".txt")


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except FileExistsError:  # another run built the same view at the same time
        pass
    except OSError:
        shutil.copyfile(src, dst)


def _long_side(src: Path) -> int:
    """The longer side of an image, from its header alone."""
    try:
        with Image.open(src) as img:
            return max(img.size)
    except Exception as exc:  # PIL raises many types for corrupt data
        raise DataError(f"cannot read image {src}: {exc}") from exc


def _read_bgr(src: Path) -> np.ndarray:
    """An image as 8-bit BGR, as ``cv2.imread`` gives it."""
    if src.suffix.lower() != ".png":
        img = cv2.imread(str(src))
        if img is None:
            raise DataError(f"cannot read image {src}")
        return img
    # OpenCV's libpng prints a warning per file for ancillary chunks it dislikes (an iCCP colour
    # profile, say); PIL decodes the same pixels silently.
    try:
        with Image.open(src) as img:
            img = ImageOps.exif_transpose(img)
            if img.mode in ("I", "I;16", "I;16B", "I;16L"):  # 16-bit grey: keep the high byte, as OpenCV does
                grey = (np.asarray(img).astype(np.uint32) >> 8).astype(np.uint8)
                return np.repeat(grey[..., None], 3, axis=2)
            return np.ascontiguousarray(np.asarray(img.convert("RGB"))[..., ::-1])
    except Exception as exc:  # PIL raises many types for corrupt data
        raise DataError(f"cannot read image {src}: {exc}") from exc


def _place(images: list[Path], out: Path, scale: float, labels_out: Path | None) -> tuple[int, int]:
    """Link (scale 1) or resize images into ``out/images``; labels (resolution-free) alongside."""
    (out / "images").mkdir(parents=True, exist_ok=True)
    if labels_out is not None:
        labels_out.mkdir(parents=True, exist_ok=True)
    long_side = 0
    for src in images:
        dst = out / "images" / src.name
        if scale == 1.0:
            _link_or_copy(src, dst)
            long_side = max(long_side, _long_side(src))
        else:
            img = _read_bgr(src)
            h, w = round(img.shape[0] * scale), round(img.shape[1] * scale)
            small = cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA)
            if not cv2.imwrite(str(dst), small, _WRITE_PARAMS.get(dst.suffix.lower(), [])):
                raise DataError(f"cannot write image {dst}")
            long_side = max(long_side, h, w)
        if labels_out is not None:
            _link_or_copy(label_path(src), labels_out / (src.stem + ".txt"))
    return len(images), long_side


def _round32(n: int) -> int:
    return max(32, int(np.ceil(n / 32) * 32))


def clients_of_domain(client_domains: list[str], num_clients: int) -> dict[str, list[int]]:
    """Client ids per client domain: client ``i`` holds ``client_domains[i % len]``."""
    out: dict[str, list[int]] = {d: [] for d in client_domains}
    for i in range(num_clients):
        out[client_domains[i % len(client_domains)]].append(i)
    return out


# Seeds the population draws apart from the test split's shuffle: skew leaves the test sets alone.
POPULATION_STREAM = 1


def population_params(data: DataConfig) -> dict:
    """The skew settings a partition depends on; empty for today's equal IID shares."""
    if data.partition == "iid" and data.quantity_alpha is None:
        return {}
    out: dict = {"partition": data.partition, "quantity_alpha": data.quantity_alpha}
    if data.partition == "dirichlet":
        out["dirichlet_alpha"] = data.dirichlet_alpha
    return out


def dominant_class(label_file: Path, num_classes: int) -> int:
    """An image's class for label skew: its most frequent object class, the lowest id on a tie;
    an image without objects (or without a label file) is a group of its own, ``num_classes``."""
    if not label_file.is_file():
        return num_classes
    counts = Counter(int(float(line.split()[0])) for line in label_file.read_text().splitlines() if line.strip())
    if not counts:
        return num_classes
    top = max(counts.values())
    return min(c for c, n in counts.items() if n == top)


def _cut(items: list[int], weights: np.ndarray | None, parts: int) -> list[list[int]]:
    """``items`` in ``parts`` consecutive runs: run j ends at ``floor(cumsum(weights)[j] * len(items))``
    (the last at the end); ``None`` weights: equal shares."""
    if weights is None:
        weights = np.full(parts, 1.0 / parts)
    bounds = [0, *(np.cumsum(weights) * len(items)).astype(int)[:-1].tolist(), len(items)]
    return [items[bounds[j] : bounds[j + 1]] for j in range(parts)]


def skewed_shards(classes: list[int], num_clients: int, data: DataConfig, rng: np.random.Generator) -> list[list[int]]:
    """One domain's pool (image ``i`` of dominant class ``classes[i]``) as ``num_clients`` shards of indices.

    The draws, in this order from ``rng``: with ``data.quantity_alpha``, client weights
    ``q ~ Dir(quantity_alpha)``. Then ``partition: iid`` cuts the (already shuffled) pool into runs
    sized by ``q``; ``dirichlet`` takes the classes in increasing id (the no-object group last), draws
    ``p ~ Dir(dirichlet_alpha)`` over the clients for each and cuts that class's images (in pool order)
    into runs sized by ``p`` (by ``p * q`` renormalised, with quantity skew). Last, while a client is
    empty, the first empty one takes the last image (in pool order) of the largest shard (the first
    on a tie): a domain with at least as many images as clients (``split_problems``) leaves nobody empty.
    """
    if len(classes) < num_clients:
        raise DataError(f"{len(classes)} images cannot give {num_clients} clients one each")
    weights = rng.dirichlet([data.quantity_alpha] * num_clients) if data.quantity_alpha is not None else None
    shards: list[list[int]] = [[] for _ in range(num_clients)]
    if data.partition == "dirichlet":
        groups: dict[int, list[int]] = {}
        for i, c in enumerate(classes):
            groups.setdefault(c, []).append(i)
        for c in sorted(groups):
            p = rng.dirichlet([data.dirichlet_alpha] * num_clients)
            if weights is not None and float((p * weights).sum()) > 0:
                p = p * weights / (p * weights).sum()
            for j, part in enumerate(_cut(groups[c], p, num_clients)):
                shards[j] += part
    else:
        shards = _cut(list(range(len(classes))), weights, num_clients)
    shards = [sorted(s) for s in shards]
    largest = [(-len(s), j) for j, s in enumerate(shards) if s]  # a heap, entries of old sizes skipped
    heapq.heapify(largest)
    for empty in [j for j, s in enumerate(shards) if not s]:
        while True:
            size, donor = heapq.heappop(largest)
            if -size == len(shards[donor]):
                break
        shards[empty].append(shards[donor].pop())  # a donor holds at least 2 while a client is empty
        heapq.heappush(largest, (-len(shards[donor]), donor))
        heapq.heappush(largest, (-1, empty))
    return [sorted(s) for s in shards]


def domain_test_size(data: DataConfig, domain: str) -> int | None:
    """Test images ``data.test_images`` asks of ``domain`` (None: a mapping that does not name it)."""
    sizes = data.test_images
    return sizes if isinstance(sizes, int) else sizes.get(domain)


def split_counts(available: int | Mapping[str, int]) -> dict[str, int]:
    """A domain's images per manifest split (``train``/``test``/``any``); a plain count is all ``any``."""
    if isinstance(available, int):
        return {"train": 0, "test": 0, "any": available}
    return {s: int(available.get(s, 0)) for s in SPLIT_NAMES}


def split_problems(available: Mapping[str, int | Mapping[str, int]], data: DataConfig, num_clients: int) -> list[str]:
    """Why a data set with ``available`` images per domain cannot be split as asked (empty if it can).

    ``available[domain]`` is an image count, or a mapping manifest split -> count (``split_counts``).
    """
    server_domains, client_domains, client_images = data.server_domains, data.client_domains, data.client_images
    missing = [d for d in dict.fromkeys(server_domains + client_domains) if d not in available]
    if missing:
        return [f"domain(s) {missing} not in the data set; it has {sorted(available)}"]
    problems = []
    per_server_domain = -(-data.server_images // len(set(server_domains)))
    for d in dict.fromkeys(server_domains + client_domains):
        counts, n_test = split_counts(available[d]), domain_test_size(data, d)
        role, train_need = ("server", per_server_domain) if d in server_domains else ("clients", client_images)
        if counts["test"]:
            if counts["train"] + counts["any"] < train_need:
                problems.append(
                    f"domain {d!r} has {counts['train'] + counts['any']} images outside its manifest test split, "
                    f"the {role} need {train_need}"
                )
        elif n_test is None:
            problems.append(
                f"domain {d!r}: data.test_images names no test size for it "
                "and the manifest marks none of its images 'test'"
            )
        elif sum(counts.values()) < n_test + train_need:
            problems.append(
                f"domain {d!r} has {sum(counts.values())} images, the split needs {n_test + train_need} "
                f"({n_test} test + the rest for {role})"
            )
        elif counts["any"] < n_test:
            problems.append(
                f"domain {d!r} has {counts['any']} images of split 'any' for its {n_test} test images "
                "(images of split 'train' are never tested on)"
            )
    for d, ids in clients_of_domain(client_domains, num_clients).items():
        if len(ids) > client_images:
            problems.append(
                f"clients.num_clients={num_clients} gives domain {d!r} {len(ids)} clients for its "
                f"{client_images} images (data.client_images): {len(ids) - client_images} client shards would be empty"
            )
    return problems


def _split_test(shuffled: list[Path], splits: Mapping[Path, str], n_test: int | None) -> tuple[list[Path], list[Path]]:
    """(test images, images left to train on) of one domain, both in ``shuffled`` order."""
    marked = [p for p in shuffled if splits.get(p) == "test"]
    if marked:
        return marked[:n_test], [p for p in shuffled if splits.get(p) != "test"]
    test = [p for p in shuffled if splits.get(p, "any") == "any"][:n_test]
    chosen = set(test)
    return test, [p for p in shuffled if p not in chosen]


def build_partition(
    domain_images: dict[str, list[Path]],
    data: DataConfig,
    num_clients: int,
    out_root: Path,
    source_key: str,
    splits: Mapping[Path, str] | None = None,
) -> Partition:
    """Split ``domain_images`` as ``data`` asks, under ``out_root`` (cached by source and split).

    ``splits`` maps images to their manifest split (absent: ``any``); ``source_key`` must change
    whenever the images, their domains or their splits do.
    """
    names, server_domains, client_domains = data.classes, data.server_domains, data.client_domains
    server_images, client_images = data.server_images, data.client_images
    client_scale, seed = data.client_scale, data.seed
    splits = splits or {}
    params: dict = dict(
        layout=LAYOUT_VERSION,
        source=source_key,
        server=server_domains,
        clients=client_domains,
        n=num_clients,
        ns=server_images,
        nc=client_images,
        nt=data.test_images,
        scale=client_scale,
        seed=seed,
        names=names,
    )
    population = population_params(data)
    if population:  # only when skewed: iid partitions keep their cache key (and their shards)
        params["population"] = population
    key = hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]
    root = Path(out_root) / f"pssfl-{key}"
    if (root / "partition.json").exists():
        return Partition.load(root)

    available = {d: dict(Counter(splits.get(p, "any") for p in v)) for d, v in domain_images.items()}
    problems = split_problems(available, data, num_clients)
    if problems:
        raise DataError("; ".join(problems))
    rng = np.random.default_rng(seed)
    server_domains, client_list = list(dict.fromkeys(server_domains)), client_domains
    client_domains = list(dict.fromkeys(client_domains))  # a domain listed twice gets twice the clients
    tests, pools = {}, {}
    for d in server_domains + client_domains:
        shuffled = [domain_images[d][i] for i in rng.permutation(len(domain_images[d]))]
        tests[d], pools[d] = _split_test(shuffled, splits, domain_test_size(data, d))
    per_server_domain = -(-server_images // len(server_domains))

    tmp = root.with_name(root.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    meta: dict = {"names": names, "params": params, "clients": [], "test": {}, "test_hi": {}}
    server_pick = [img for d in server_domains for img in pools[d][:per_server_domain]]
    _, server_long = _place(server_pick[:server_images], tmp / "server", 1.0, tmp / "server" / "labels")
    meta["server_imgsz"] = _round32(server_long)

    client_long = 0
    members = clients_of_domain(client_list, num_clients)
    for domain_i, (d, ids) in enumerate(members.items()):
        pool = pools[d][:client_images]
        if population:
            # seeded by (data.seed, the domain's place among the distinct client domains)
            rng_d = np.random.default_rng([seed, POPULATION_STREAM, domain_i])
            classes = [dominant_class(label_path(p), len(names)) for p in pool]
            shards = skewed_shards(classes, len(ids), data, rng_d)
        else:
            shards = [[i for i in range(shard_i, len(pool), len(ids))] for shard_i in range(len(ids))]
        for shard_i, cid in enumerate(ids):
            shard = [pool[i] for i in shards[shard_i]]
            name = f"client_{cid:03d}"
            n, long_side = _place(shard, tmp / "clients" / name, client_scale, tmp / "client_labels" / name / "labels")
            client_long = max(client_long, long_side)
            meta["clients"].append({"id": cid, "domain": d, "images": f"clients/{name}/images", "n": n})
    meta["clients"].sort(key=lambda c: c["id"])
    meta["client_imgsz"] = _round32(client_long)

    for d in server_domains + client_domains:
        scale = 1.0 if d in server_domains else client_scale
        out = tmp / "test" / d
        _, long_side = _place(tests[d], out, scale, out / "labels")
        meta["test"][d] = {"images": f"test/{d}/images", "imgsz": _round32(long_side)}
    for d in client_domains:
        if d in server_domains:  # its test set is at full resolution already
            continue
        out = tmp / "test_hi" / d
        _, long_side = _place(tests[d], out, 1.0, out / "labels")
        meta["test_hi"][d] = {"images": f"test_hi/{d}/images", "imgsz": _round32(long_side)}

    (tmp / "partition.json").write_text(json.dumps(meta, indent=1))
    if root.exists():
        shutil.rmtree(tmp)
    else:
        tmp.rename(root)
        write_data_yaml(root, meta)
    return Partition.load(root)


def write_data_yaml(root: Path, meta: dict) -> None:
    """An Ultralytics data YAML with absolute paths and no download key (usable by ``yolo val``)."""

    doc = {
        "path": str(root.resolve()),
        "train": "server/images",
        "val": [t["images"] for t in meta["test"].values()],
        "names": dict(enumerate(meta["names"])),
        "clients": {c["id"]: {"domain": c["domain"], "images": c["images"]} for c in meta["clients"]},
        "test_domains": {d: t["images"] for d, t in meta["test"].items()},
        "test_hi_domains": {d: t["images"] for d, t in meta.get("test_hi", {}).items()},
    }
    (root / "data.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
