"""Each FedMox expert on every test domain: what domain-specialised experts could add.

Loads a finished FedMox run's final state (its ``config.yaml`` and ``final_state.npz``), then
evaluates the model once with the router deciding and once per expert with every location forced
to that expert (``MoEDetect.force_expert``). A row is an expert, a column a test domain; a last
line per client domain names its best single expert, the expert the router sent most of its
locations to, and the router's score against the best expert's.

Under an image-level router, the best single expert per domain is what perfect domain routing
would score with the experts as trained. Under the spatial router a single expert is not what
any routing does (each location picks), so there the rows show how much the experts differ.

    python benchmarks/expert_matrix.py runs/<run dir>

Needs the run's partition and foundation checkpoint in the cache (any run of the config made them).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

import fedsim  # noqa: F401  (sets YOLO_OFFLINE before ultralytics is imported)
from fedsim.config import ExperimentConfig
from fedsim.experiment import prepare_data, prepare_weights
from fedsim.model.detector import build_detector, set_state
from fedsim.model.moe import moe_head
from fedsim.preflight import load
from fedsim.runtime.driver import weights_fingerprint
from fedsim.runtime.server import ServerTrainer
from fedsim.tracking import git_commit
from fedsim.train.evaluate import evaluate
from strategies import build


def load_run_model(run_dir: Path) -> tuple[ExperimentConfig, torch.nn.Module, ServerTrainer]:
    cfg = load(run_dir / "config.yaml")
    if cfg.strategy.name != "fedmox":
        raise SystemExit(f"{run_dir}: a {cfg.strategy.name} run has no experts")
    model = build(cfg).build_model(build_detector(cfg.model.arch, cfg.data.classes, prepare_weights(cfg)))
    with np.load(run_dir / "final_state.npz") as f:
        set_state(model, {k: f[k] for k in f.files})
    return cfg, model, ServerTrainer(model, prepare_data(cfg, echo=lambda _msg: None), cfg)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg, model, server = load_run_model(args.run_dir)
    head = moe_head(model)
    domains = list(server.test_loaders)
    rows: dict[str, dict[str, float]] = {}
    routed = {}
    for expert in [None, *range(head.num_experts)]:
        head.force_expert = expert
        scores = evaluate(model, server.test_loaders)  # scores a copy: the routing counts are read below
        label = "router" if expert is None else f"expert {expert}"
        rows[label] = {d: scores[f"map50/{d}"] for d in domains} | {"total": scores["map50/total"]}
        if expert is None:
            for d, loader in server.test_loaders.items():  # the router's pick per domain, by locations
                head.reset_routing_stats()
                with torch.no_grad():
                    for batch in loader:
                        model.eval()(batch["img"].float() / 255)
                routed[d] = int(head.routing_counts.argmax())
    head.force_expert = None
    print(f"{args.run_dir.name}: mAP@50 per forced expert x test domain")
    print(f"code {git_commit()[:7]}, weights {weights_fingerprint(prepare_weights(cfg))}, data seed {cfg.data.seed}")
    print(f"{'':10s}" + "".join(f"{c:>10s}" for c in [*domains, "total"]))
    for label, row in rows.items():
        print(f"{label:10s}" + "".join(f"{row[c]:10.3f}" for c in [*domains, "total"]))
    experts = [r for r in rows if r != "router"]
    for d in cfg.data.client_domains:
        best = max(experts, key=lambda r: rows[r][d])
        delta = rows["router"][d] - rows[best][d]
        print(
            f"{d}: best single {best} {rows[best][d]:.3f}; the router (mostly expert {routed[d]}) "
            f"{rows['router'][d]:.3f}, {delta:+.3f}"
        )


if __name__ == "__main__":
    main()
