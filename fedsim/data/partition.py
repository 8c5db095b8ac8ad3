"""The PSSFL split: a labeled high-res server set, N unlabeled low-res client shards, a test set per domain.

Input is a per-domain list of images (labels beside them by the Ultralytics convention
``.../images/x.jpg`` -> ``.../labels/x.txt``), from the synthetic generator or a user's data set.

Layout written (once, cached by a hash of source and split parameters)::

    server/{images,labels}            server domains, labeled, full resolution
    clients/client_000/images         one client domain, resized by client_scale, no labels
    client_labels/client_000/labels   the clients' true labels, for the oracle upper bound only
    test/<domain>/{images,labels}     server domains at full, client domains at client resolution
    partition.json                    what is where (read by everything else)
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import yaml

from fedsim.config import DataConfig
from fedsim.data.yolo_folder import DataError


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


def _place(images: list[Path], out: Path, scale: float, labels_out: Path | None) -> tuple[int, int]:
    """Copy (scale 1) or resize images into ``out/images``; labels (resolution-free) alongside."""
    (out / "images").mkdir(parents=True, exist_ok=True)
    if labels_out is not None:
        labels_out.mkdir(parents=True, exist_ok=True)
    long_side = 0
    for src in images:
        dst = out / "images" / src.name
        img = cv2.imread(str(src))
        if img is None:
            raise DataError(f"cannot read image {src}")
        h, w = round(img.shape[0] * scale), round(img.shape[1] * scale)
        if scale == 1.0:
            _link_or_copy(src, dst)
        else:
            cv2.imwrite(str(dst), cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA), [cv2.IMWRITE_JPEG_QUALITY, 92])
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


def split_problems(available: dict[str, int], data: DataConfig, num_clients: int) -> list[str]:
    """Why a data set with ``available`` images per domain cannot be split as asked (empty if it can)."""
    server_domains, client_domains = data.server_domains, data.client_domains
    server_images, client_images, test_images = data.server_images, data.client_images, data.test_images
    missing = [d for d in dict.fromkeys(server_domains + client_domains) if d not in available]
    if missing:
        return [f"domain(s) {missing} not in the data set; it has {sorted(available)}"]
    problems = []
    per_server_domain = -(-server_images // len(set(server_domains)))
    for d in dict.fromkeys(server_domains + client_domains):
        need = test_images + (per_server_domain if d in server_domains else client_images)
        if available[d] < need:
            problems.append(
                f"domain {d!r} has {available[d]} images, the split needs {need} "
                f"({test_images} test + the rest for {'server' if d in server_domains else 'clients'})"
            )
    for d, ids in clients_of_domain(client_domains, num_clients).items():
        if len(ids) > client_images:
            problems.append(
                f"clients.num_clients={num_clients} gives domain {d!r} {len(ids)} clients for its "
                f"{client_images} images (data.client_images): {len(ids) - client_images} client shards would be empty"
            )
    return problems


def build_partition(
    domain_images: dict[str, list[Path]], data: DataConfig, num_clients: int, out_root: Path, source_key: str
) -> Partition:
    """Split ``domain_images`` as ``data`` asks, under ``out_root`` (cached by source and split)."""
    names, server_domains, client_domains = data.classes, data.server_domains, data.client_domains
    server_images, client_images, test_images = data.server_images, data.client_images, data.test_images
    client_scale, seed = data.client_scale, data.seed
    params = dict(
        source=source_key,
        server=server_domains,
        clients=client_domains,
        n=num_clients,
        ns=server_images,
        nc=client_images,
        nt=test_images,
        scale=client_scale,
        seed=seed,
        names=names,
    )
    key = hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]
    root = Path(out_root) / f"pssfl-{key}"
    if (root / "partition.json").exists():
        return Partition.load(root)

    problems = split_problems({d: len(v) for d, v in domain_images.items()}, data, num_clients)
    if problems:
        raise DataError("; ".join(problems))
    rng = np.random.default_rng(seed)
    server_domains, client_list = list(dict.fromkeys(server_domains)), client_domains
    client_domains = list(dict.fromkeys(client_domains))  # a domain listed twice gets twice the clients
    pools = {
        d: [domain_images[d][i] for i in rng.permutation(len(domain_images[d]))]
        for d in server_domains + client_domains
    }
    per_server_domain = -(-server_images // len(server_domains))

    tmp = root.with_name(root.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    meta: dict = {"names": names, "params": params, "clients": [], "test": {}}
    server_pick = [img for d in server_domains for img in pools[d][test_images : test_images + per_server_domain]]
    _, server_long = _place(server_pick[:server_images], tmp / "server", 1.0, tmp / "server" / "labels")
    meta["server_imgsz"] = _round32(server_long)

    client_long = 0
    members = clients_of_domain(client_list, num_clients)
    for d, ids in members.items():
        pool = pools[d][test_images : test_images + client_images]
        for shard_i, cid in enumerate(ids):
            shard = pool[shard_i :: len(ids)] if ids else []
            name = f"client_{cid:03d}"
            n, long_side = _place(shard, tmp / "clients" / name, client_scale, tmp / "client_labels" / name / "labels")
            client_long = max(client_long, long_side)
            meta["clients"].append({"id": cid, "domain": d, "images": f"clients/{name}/images", "n": n})
    meta["clients"].sort(key=lambda c: c["id"])
    meta["client_imgsz"] = _round32(client_long)

    for d in server_domains + client_domains:
        scale = 1.0 if d in server_domains else client_scale
        out = tmp / "test" / d
        _, long_side = _place(pools[d][:test_images], out, scale, out / "labels")
        meta["test"][d] = {"images": f"test/{d}/images", "imgsz": _round32(long_side)}

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
    }
    (root / "data.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
