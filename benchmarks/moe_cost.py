"""Training-step cost of the K-expert MoE Detect head against the dense head, same resolution.

Frozen backbone (``freeze_backbone`` + ``train_mode``), yolov8n, synthetic batch. Each case runs in a
fresh interpreter (``--case dense|moe``); the parent alternates them ``--repeats`` times and keeps
each case's best time. Activation memory: on CPU the bytes of the tensors autograd saves for
backward during forward + loss (``saved_tensors_hooks``, one count per storage, parameters
excluded); on CUDA the ``max_memory_allocated`` rise over forward + loss.

    python benchmarks/moe_cost.py [--imgsz 320x192] [--batch 8] [--experts 4] [--device cpu]

Last line: ``moe cost K4/dense time=X.XX memory=Y.YY``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time

import torch
from torch import nn

import fedsim  # noqa: F401  (sets YOLO_OFFLINE before ultralytics is imported)
from fedsim.model.detector import build_detector, freeze_backbone, train_mode
from fedsim.model.moe import convert_to_moe, moe_aux_loss

NAMES = ["car", "person", "truck", "bike", "sign"]


# ------------------------------------------------------------------ helpers shared with memory.py
def parse_wh(text: str, stride: int = 32) -> tuple[int, int]:
    """``"320x192"`` (width x height) -> (height, width), padded up to a multiple of ``stride``.

    Ultralytics letterboxes to the stride the same way (1280x720 trains as 1280x736).
    """
    w, h = (int(v) for v in text.lower().split("x"))
    return math.ceil(h / stride) * stride, math.ceil(w / stride) * stride


def build(arch: str, head: str, experts: int, frozen: bool, device: str, expert_depth: int = 2) -> nn.Module:
    torch.manual_seed(0)
    model = build_detector(arch, NAMES)
    if head == "moe":
        convert_to_moe(model, experts, init_noise=0.01, expert_depth=expert_depth)
    if frozen:
        freeze_backbone(model)
    else:
        for name, p in model.named_parameters():
            p.requires_grad = ".dfl." not in name
    model.to(device)
    train_mode(model, frozen_backbone=frozen)
    return model


def synthetic_batch(batch: int, hw: tuple[int, int], device: str, boxes_per_image: int = 4) -> dict:
    g = torch.Generator().manual_seed(1)
    n = batch * boxes_per_image
    xy = torch.rand(n, 2, generator=g) * 0.6 + 0.2
    wh = torch.rand(n, 2, generator=g) * 0.25 + 0.05
    return {
        "img": torch.rand(batch, 3, *hw, generator=g).to(device),
        "batch_idx": torch.arange(batch).repeat_interleave(boxes_per_image).float().to(device),
        "cls": torch.randint(0, len(NAMES), (n, 1), generator=g).float().to(device),
        "bboxes": torch.cat([xy, wh], 1).to(device),
    }


def make_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.05)


def train_step(model: nn.Module, opt: torch.optim.Optimizer, batch: dict) -> None:
    opt.zero_grad(set_to_none=True)
    loss, _ = model.loss(batch)
    (loss.sum() + moe_aux_loss(model)).backward()
    opt.step()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_case(script: str, args: list[str]) -> dict:
    """Run ``script --case ...`` in a fresh interpreter; its last stdout line is a JSON result."""
    proc = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"case {args} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------- measuring
def saved_activation_bytes(model: nn.Module, batch: dict) -> int:
    """Bytes autograd keeps for backward over forward + loss (each storage once, parameters excluded)."""
    param_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in param_ptrs:
            seen[ptr] = max(seen.get(ptr, 0), storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _ = model.loss(batch)
    del loss
    return sum(seen.values())


def case(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    hw = parse_wh(args.imgsz)
    model = build(args.arch, args.case, args.experts, frozen=True, device=args.device, expert_depth=args.expert_depth)
    opt = make_optimizer(model)
    batch = synthetic_batch(args.batch, hw, args.device)
    for _ in range(args.warmup):
        train_step(model, opt, batch)
    times = []
    for _ in range(args.steps):
        sync(args.device)
        t0 = time.perf_counter()
        train_step(model, opt, batch)
        sync(args.device)
        times.append(time.perf_counter() - t0)
    opt.zero_grad(set_to_none=True)
    if args.device.startswith("cuda"):
        sync(args.device)
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        loss, _ = model.loss(batch)
        sync(args.device)
        memory = torch.cuda.max_memory_allocated() - base
        del loss
    else:
        memory = saved_activation_bytes(model, batch)
    return {"case": args.case, "time_s": min(times), "median_s": statistics.median(times), "memory_b": memory}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", choices=["dense", "moe"])
    ap.add_argument("--arch", default="yolov8n.yaml")
    ap.add_argument("--imgsz", default="320x192", help="width x height")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--expert-depth", type=int, default=2, choices=[1, 2], help="2: 3x3 conv + 1x1 per expert")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2, help="fresh processes per case, alternating")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    if args.case:
        print(json.dumps(case(args)))
        return

    common = [f"--{k}={getattr(args, k)}" for k in ("arch", "imgsz", "batch", "experts", "steps", "warmup")]
    common.append(f"--expert-depth={args.expert_depth}")
    common += [f"--threads={args.threads}", f"--device={args.device}"]
    runs: dict[str, list[dict]] = {"dense": [], "moe": []}
    for _ in range(args.repeats):
        for name in runs:
            runs[name].append(run_case(__file__, [f"--case={name}", *common]))
    best = {name: min(r["time_s"] for r in rs) for name, rs in runs.items()}
    mem = {name: rs[-1]["memory_b"] for name, rs in runs.items()}
    kind = "peak alloc rise, fwd+loss" if args.device.startswith("cuda") else "saved-for-backward"
    print(
        f"{args.arch} batch {args.batch} imgsz {args.imgsz} frozen backbone, expert depth {args.expert_depth}, "
        f"device {args.device}"
    )
    print(f"{'head':<10}{'step time (best)':>18}{'median':>10}{'activation MiB (' + kind + ')':>40}")
    for name, rs in runs.items():
        med = statistics.median(r["median_s"] for r in rs)
        print(f"{name:<10}{best[name] * 1e3:>15.1f} ms{med * 1e3:>7.1f} ms{mem[name] / 2**20:>40.2f}")
    print(
        f"moe cost K{args.experts}/dense time={best['moe'] / best['dense']:.2f} memory={mem['moe'] / mem['dense']:.2f}"
    )


if __name__ == "__main__":
    main()
