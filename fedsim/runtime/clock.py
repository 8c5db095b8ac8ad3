"""The virtual clock: how long a client job would take on its device, and who makes the round.

A job's simulated duration is ``download + compute + upload`` on its device profile::

    down_s    = bytes_down * 8 / (down_mbps * 1e6)
    compute_s = work_images * image_cost_s * (imgsz / 320)**2 / speed
    up_s      = bytes_up * 8 / (up_mbps * 1e6)

Nothing sleeps: the clock only orders results (FedScale's ``virtual_client_clock``).

Why a work measure and not the measured wall time: wall time on a shared machine moves with
whatever else runs (two runs of one config differ by 10-30 % here), and the straggler cut picks
*which* clients are aggregated, so wall-time noise would change the model. The compute term is
therefore the images a client processed (shard size x local epochs, reported by the client)
times a per-image cost: ``clients.image_cost_s``, the seconds one unlabeled image costs a
speed-1.0 device at 320 px (teacher forward + student forward/backward). Its default, 0.05 s, is
this machine's frozen-backbone yolov8n step (0.30 s per batch of 8 at 320 px, ECOSYSTEM.md)
plus the teacher's forward pass, calibrated once; pixels scale it quadratically with ``imgsz``,
and ``speed`` scales it per profile. Bytes are counted exactly. The result is identical on every
rerun, on every machine, whatever order the actors finish in. Measured wall seconds are still
logged (``client/seconds``) to check the calibration against.

Selection, FedScale style: the driver samples ``ceil(m * clients.over_selection)`` clients, all
of them run, and the first ``m`` successful ones by simulated finish time (ties: lower client id)
are aggregated; later ones are stragglers. With ``clients.deadline_s`` a result that would
arrive after the deadline is a straggler too. The round's simulated length is the finish time of
the last aggregated client, or the deadline when fewer than ``m`` made it in time (the server
waited until then). Failed jobs take no place on the clock: a device that fails never answers.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedsim.runtime.resources import DeviceProfile
from fedsim.types import ClientResult

REFERENCE_IMGSZ = 320


@dataclass(frozen=True)
class JobTime:
    down_s: float
    compute_s: float
    up_s: float

    @property
    def total_s(self) -> float:
        return self.down_s + self.compute_s + self.up_s


def transfer_seconds(nbytes: float, mbps: float) -> float:
    return float(nbytes) * 8 / (mbps * 1e6)


def job_time(
    profile: DeviceProfile, work_images: float, imgsz: int, bytes_down: float, bytes_up: float, image_cost_s: float
) -> JobTime:
    compute = work_images * image_cost_s * (imgsz / REFERENCE_IMGSZ) ** 2 / profile.speed
    return JobTime(
        down_s=transfer_seconds(bytes_down, profile.down_mbps),
        compute_s=compute,
        up_s=transfer_seconds(bytes_up, profile.up_mbps),
    )


@dataclass
class Cut:
    kept: list[ClientResult]  # aggregated, sorted by client id
    stragglers: list[ClientResult]  # finished, but too late or beyond the first m; sorted by client id
    round_sim_s: float


def first_to_finish(
    results: list[ClientResult], times: dict[int, float], wanted: int, deadline_s: float | None = None
) -> Cut:
    """Keep the first ``wanted`` results by simulated finish time, none later than ``deadline_s``."""
    order = sorted(results, key=lambda r: (times[r.client_id], r.client_id))
    in_time = [r for r in order if deadline_s is None or times[r.client_id] <= deadline_s]
    kept = in_time[:wanted]
    kept_ids = {r.client_id for r in kept}
    if len(kept) == wanted:
        round_s = times[kept[-1].client_id]
    elif deadline_s is not None:
        round_s = deadline_s
    else:
        round_s = max((times[r.client_id] for r in order), default=0.0)
    return Cut(
        kept=sorted(kept, key=lambda r: r.client_id),
        stragglers=sorted((r for r in results if r.client_id not in kept_ids), key=lambda r: r.client_id),
        round_sim_s=float(round_s),
    )
