"""Peak training memory of one client step: conventional full model at server resolution vs FedMox.

Cases (yolov8n, batch 8, AdamW, 3 training steps each, each case in a fresh interpreter):
  full_hi       every parameter trainable, dense head, ``--imgsz-hi`` (default 640x384)
  fedmox_lo     frozen backbone + K-expert MoE head, ``--imgsz-lo`` (default 320x192)
  frozen_lo     frozen backbone + dense head, ``--imgsz-lo``
  fedmox_lo_bf16, fedmox_lo_int8   fedmox_lo with the client's backbone lowered as ``model.client_backbone``
                does it (``fedsim/model/precision.py``): bf16 weights and activations, or int8 weights
                dequantized per layer (compute stays float32)

On CPU the peak is a rise over a baseline that already holds the weights, so the backbone's own bytes are
a row of their own ("backbone MiB held").

CPU: peak RSS above the process's baseline taken after the model, optimizer and batch are built
(psutil sampled every 5 ms from a thread during the steps). CUDA (``--device cuda``):
``torch.cuda.max_memory_allocated`` over the steps, which includes the weights on the device.
A paper-like GPU run: ``--device cuda --imgsz-hi 1280x720 --imgsz-lo 640x360`` (sizes are padded up
to stride 32 as Ultralytics letterboxes them: 1280x736 and 640x384).

Last line (all cases): ``memory ratio full_hi/fedmox_lo = X.XX``. ``--cases a,b`` runs a subset.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time

import psutil
import torch
from moe_cost import build, make_optimizer, parse_wh, run_case, sync, synthetic_batch, train_step

from fedsim.model.precision import backbone_bytes, lower_backbone

CASES = {
    "full_hi": {"head": "dense", "frozen": False, "res": "hi"},
    "fedmox_lo": {"head": "moe", "frozen": True, "res": "lo"},
    "frozen_lo": {"head": "dense", "frozen": True, "res": "lo"},
    "fedmox_lo_bf16": {"head": "moe", "frozen": True, "res": "lo", "backbone": "bf16"},
    "fedmox_lo_int8": {"head": "moe", "frozen": True, "res": "lo", "backbone": "int8"},
}


class RssSampler(threading.Thread):
    """Highest resident set size seen while running, sampled every ``period`` seconds."""

    def __init__(self, period: float = 0.005) -> None:
        super().__init__(daemon=True)
        self.proc = psutil.Process(os.getpid())
        self.period = period
        self.peak = self.proc.memory_info().rss
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.period)

    def stop(self) -> int:
        self._done.set()
        self.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)
        return self.peak


def case(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    spec = CASES[args.case]
    hw = parse_wh(args.imgsz_hi if spec["res"] == "hi" else args.imgsz_lo)
    model = build(args.arch, spec["head"], args.experts, frozen=spec["frozen"], device=args.device)
    lower_backbone(model, spec.get("backbone", "fp32"))
    opt = make_optimizer(model)
    batch = synthetic_batch(args.batch, hw, args.device)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    cuda = args.device.startswith("cuda")
    if cuda:
        sync(args.device)
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = psutil.Process(os.getpid()).memory_info().rss
        sampler = RssSampler()
        sampler.start()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        train_step(model, opt, batch)
    sync(args.device)
    elapsed = (time.perf_counter() - t0) / args.steps
    if cuda:
        peak, rise = torch.cuda.max_memory_allocated(), torch.cuda.max_memory_allocated() - base
    else:
        peak = sampler.stop()
        rise = peak - base
    return {
        "case": args.case,
        "imgsz": f"{hw[1]}x{hw[0]}",
        "trainable": trainable,
        "backbone_b": backbone_bytes(model),
        "memory_b": peak if cuda else rise,
        "rise_b": rise,
        "step_s": elapsed,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", choices=list(CASES))
    ap.add_argument("--cases", default=",".join(CASES), help="comma-separated cases to run (default: all)")
    ap.add_argument("--arch", default="yolov8n.yaml")
    ap.add_argument("--imgsz-hi", default="640x384", help="server resolution, width x height")
    ap.add_argument("--imgsz-lo", default="320x192", help="client resolution, width x height")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    if args.case:
        print(json.dumps(case(args)))
        return

    common = [f"--arch={args.arch}", f"--imgsz-hi={args.imgsz_hi}", f"--imgsz-lo={args.imgsz_lo}"]
    common += [f"--batch={args.batch}", f"--experts={args.experts}", f"--steps={args.steps}"]
    common += [f"--threads={args.threads}", f"--device={args.device}"]
    chosen = [c for c in args.cases.split(",") if c]
    unknown = sorted(set(chosen) - set(CASES))
    if unknown:
        ap.error(f"unknown case(s) {unknown}; valid: {', '.join(CASES)}")
    res = {name: run_case(__file__, [f"--case={name}", *common]) for name in chosen}
    cuda = args.device.startswith("cuda")
    what = "peak max_memory_allocated" if cuda else "peak RSS over post-build baseline"
    print(f"{args.arch} batch {args.batch}, {args.steps} AdamW steps, device {args.device}; memory = {what}")
    names = chosen
    rows = [
        ("input (WxH)", [res[n]["imgsz"] for n in names]),
        ("trainable params", [f"{res[n]['trainable']:,}" for n in names]),
        ("peak memory MiB", [f"{res[n]['memory_b'] / 2**20:.1f}" for n in names]),
        ("backbone MiB held", [f"{res[n]['backbone_b'] / 2**20:.2f}" for n in names]),
        ("mean step s (1st incl.)", [f"{res[n]['step_s']:.2f}" for n in names]),
    ]
    print(f"{'':<24}" + "".join(f"{n:>16}" for n in names))
    for label, vals in rows:
        print(f"{label:<24}" + "".join(f"{v:>16}" for v in vals))
    if "fedmox_lo" not in res:
        return
    base = res["fedmox_lo"]["memory_b"]
    for name in ("fedmox_lo_bf16", "fedmox_lo_int8"):
        if name in res:
            step = res[name]["step_s"] / res["fedmox_lo"]["step_s"]
            print(f"{name}/fedmox_lo: memory {res[name]['memory_b'] / base:.2f}, step time {step:.2f}")
    if "frozen_lo" in res:
        print(f"frozen_lo/fedmox_lo = {res['frozen_lo']['memory_b'] / base:.2f}")
    if "full_hi" in res:
        print(f"memory ratio full_hi/fedmox_lo = {res['full_hi']['memory_b'] / base:.2f}")


if __name__ == "__main__":
    main()
