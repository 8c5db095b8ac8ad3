"""One experiment = one pydantic model tree, loaded from YAML with ``--set key=value`` overrides.

Every invalid field is reported in a single error, before any Ray process starts::

    fedsim: config error: clients.sampling_rate must be in (0, 1], got 1.5

This is the bottom floor: it imports nothing of the project. Checks that need names defined
higher up (synthetic domains, device profiles, a strategy's parameters) run in
``fedsim.preflight``, with the same one-line-per-field messages.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)

# BDD100K's five classes, the embedded data set's and the converters' default.
DEFAULT_CLASSES: tuple[str, ...] = ("car", "truck", "bus", "pedestrian", "traffic_sign")


class ConfigError(ValueError):
    """An experiment config that cannot run; the message names every bad field."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def without_defaults(data: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """``data`` less the fields that equal their ``defaults`` (see ``_OMITTED_AT_DEFAULT``)."""
    return {k: v for k, v in data.items() if k not in defaults or not _same(v, defaults[k])}


def _same(a: Any, b: Any) -> bool:
    """Equal values, a tuple equal to the list it serialises to in JSON mode."""
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return list(a) == list(b)
    return a == b


class DataConfig(Section):
    format: str = "synthetic"  # a name in fedsim/data/formats.py FORMATS
    root: Path | None = None  # yolo: <root>/<domain>/{images,labels}
    manifest: Path | None = None  # yolo: CSV image,domain,split instead of domain folders
    on_bad: Literal["skip", "fail"] = "skip"  # images with broken labels: skip with a report, or stop
    classes: list[str] = Field(default_factory=lambda: list(DEFAULT_CLASSES))
    server_domains: list[str] = Field(default_factory=lambda: ["cloudy"])
    client_domains: list[str] = Field(default_factory=lambda: ["overcast", "rainy", "snowy"])
    server_images: int = Field(200, gt=0)  # labeled, high resolution
    client_images: int = Field(200, gt=0)  # unlabeled, per client domain, shared by that domain's clients
    # Labeled test images per domain, or a mapping domain -> count. A manifest's `test` images are
    # the domain's test set (at most this many; a domain the mapping leaves out keeps them all).
    test_images: int | dict[str, int] = 50
    width: int = Field(320, ge=32)  # server (high) resolution of generated images
    height: int = Field(192, ge=32)
    client_scale: float = Field(0.5, gt=0, le=1)  # client resolution = server resolution * this
    seed: int = 0  # data seed: runs with different run seeds share one data set
    # Client populations, within each client domain (README "Client populations"), seeded by `seed`.
    # iid: equal shares, dealt round-robin. dirichlet: label skew, each class's images go to the
    # domain's clients in proportions drawn from Dir(dirichlet_alpha) (an image counts as its most
    # frequent class; fedsim/data/partition.py). quantity_alpha: client sizes ~ Dir(quantity_alpha)
    # instead of equal (null: equal). Every client keeps at least one image.
    partition: Literal["iid", "dirichlet"] = "iid"
    dirichlet_alpha: float = Field(0.5, gt=0)
    quantity_alpha: float | None = Field(None, gt=0)

    @model_serializer(mode="wrap")
    def _omit_population_at_default(self, handler) -> dict[str, Any]:
        # added later: configs that leave them keep their key()
        return without_defaults(handler(self), {"partition": "iid", "dirichlet_alpha": 0.5, "quantity_alpha": None})

    @field_validator("test_images", mode="before")
    @classmethod
    def _test_sizes(cls, v: Any) -> Any:
        sizes = v.values() if isinstance(v, dict) else [v]
        if not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in sizes):
            raise ValueError(f"must be a positive integer or a mapping domain -> positive integer, got {v!r}")
        return v

    @model_validator(mode="after")
    def _domains(self) -> DataConfig:
        if not self.server_domains or not self.client_domains:
            raise ValueError("needs at least one server domain and one client domain")
        if isinstance(self.test_images, dict):
            unknown = sorted(set(self.test_images) - set(self.server_domains + self.client_domains))
            if unknown:
                raise ValueError(f"test_images names domain(s) {unknown} that are neither server nor client domains")
        return self


class ModelConfig(Section):
    arch: str = "yolov8n.yaml"  # any Ultralytics detection YAML; the scale letter selects the size
    # "foundation": the cached `fedsim pretrain` checkpoint (built on first use);
    # a path: a local .pt (yolov8n.pt, yolo11n.pt, ...); null: random initialisation.
    weights: str | None = "foundation"
    pretrain_images: int = Field(1200, gt=0)
    pretrain_epochs: int = Field(12, gt=0)
    pretrain_seed: int = 0
    # Load a .pt that needs classes outside the safe allow-list (fedsim/model/checkpoint.py): it
    # can run code when unpickled, so only for files whose source you trust.
    trust_checkpoint: bool = False
    # The frozen backbone's precision on client actors only (the server and the trained head stay
    # float32): bf16 weights and activations, or int8 weights dequantized per layer at forward time.
    client_backbone: Literal["fp32", "bf16", "int8"] = "fp32"

    @model_serializer(mode="wrap")
    def _omit_trust_at_default(self, handler) -> dict[str, Any]:
        data = handler(self)  # trust changes nothing a run computes, so it stays out of cfg.key()
        if data.get("trust_checkpoint") is False:
            del data["trust_checkpoint"]
        if data.get("client_backbone") == "fp32":  # added later: configs that leave it keep their key()
            del data["client_backbone"]
        return data

    @field_validator("weights")
    @classmethod
    def _weights_exist(cls, v: str | None) -> str | None:
        if v not in (None, "foundation") and not Path(v).expanduser().is_file():
            raise ValueError(f"file not found: {v} (fedsim never downloads weights)")
        return v

    @field_validator("arch")
    @classmethod
    def _arch_yaml(cls, v: str) -> str:
        if not v.endswith((".yaml", ".yml")):
            raise ValueError(f"must name an Ultralytics model YAML such as yolov8n.yaml, got {v!r}")
        return v


class ProfileSpec(Section):
    """A user device profile (``clients.profiles.<name>``); see fedsim/runtime/resources.py."""

    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    memory_gib: float = Field(2.0, gt=0)  # per-job memory budget, and Ray's memory reservation
    threads: int = Field(1, gt=0)
    speed: float = Field(1.0, gt=0)  # compute relative to this machine (1.0)
    up_mbps: float = Field(1000.0, gt=0)
    down_mbps: float = Field(1000.0, gt=0)


# Fields added after runs were recorded: left out of dumps while at their defaults, so configs that
# do not use them keep their ``key()`` (and MLflow records stay matched to them).
_OMITTED_AT_DEFAULT = {
    "profiles": {},
    "min_clients": 1,
    "over_selection": 1.0,
    "deadline_s": None,
    "work": "train",
    "image_cost_s": 0.05,
    "availability": 1.0,
}


def clients_per_round(sampling_rate: float, num_clients: int) -> int:
    return max(1, int(round(sampling_rate * num_clients)))


class ClientsConfig(Section):
    """Virtual clients: how many, which are sampled, on which devices, and how a round waits for them.

    ``profile`` is one profile name for every client, or a list assigned round-robin by client id
    (client i gets ``profile[i % len(profile)]``). ``over_selection`` samples ``ceil(m * factor)``
    clients and aggregates the first ``m`` to finish on the virtual clock; ``deadline_s`` (simulated
    seconds) drops later ones too; a round with fewer than ``min_clients`` usable results aborts the
    run. ``work: noop`` clients return the state they received (scale tests, benchmarks).

    ``availability``: each client is online in a round with this probability, drawn independently
    per client and round from (seed, round); a round samples among the online clients only (all of
    them when fewer are online than it wants), and redraws the online set, as if waiting on the
    virtual clock (not charged), while fewer than ``min_clients`` are online. 1.0: always online.
    """

    num_clients: int = Field(3, gt=0)
    sampling_rate: float = 1.0  # fraction of clients sampled per round
    profiles: dict[str, ProfileSpec] = Field(default_factory=dict)  # user profiles, added to the built-in ones
    profile: str | list[str] = "cpu-1"  # device profile(s), see fedsim/runtime/resources.py
    max_actors: int | None = Field(None, gt=0)  # cap on the client actor pool
    min_clients: int = Field(1, ge=1)  # fewer usable results in a round: the run aborts
    over_selection: float = Field(1.0, ge=1.0)  # FedScale's overcommitment factor
    deadline_s: float | None = Field(None, gt=0)  # round deadline on the virtual clock
    work: Literal["train", "noop"] = "train"
    image_cost_s: float = Field(0.05, gt=0)  # virtual-clock seconds per image on a speed-1.0 device at 320 px
    availability: float = Field(1.0, gt=0, le=1)  # each client's online probability per round

    @property
    def per_round(self) -> int:
        """Clients a round aggregates: ``round(sampling_rate * num_clients)``, at least one."""
        return clients_per_round(self.sampling_rate, self.num_clients)

    @field_validator("sampling_rate")
    @classmethod
    def _rate(cls, v: float) -> float:
        if not 0 < v <= 1:
            raise ValueError(f"must be in (0, 1], got {v}")
        return v

    @field_validator("profile")
    @classmethod
    def _profile(cls, v: str | list[str]) -> str | list[str]:
        if not ([v] if isinstance(v, str) else v):
            raise ValueError("needs at least one device profile name")
        return v

    @property
    def profile_names(self) -> list[str]:
        return [self.profile] if isinstance(self.profile, str) else list(self.profile)

    @field_validator("min_clients")
    @classmethod
    def _quorum(cls, v: int, info: ValidationInfo) -> int:
        if "num_clients" in info.data and "sampling_rate" in info.data:
            per_round = clients_per_round(info.data["sampling_rate"], info.data["num_clients"])
            if v > per_round:
                raise ValueError(f"can never be met: a round aggregates at most {per_round} clients")
        return v

    @model_serializer(mode="wrap")
    def _omit_defaults_of_new_fields(self, handler) -> dict[str, Any]:
        return without_defaults(handler(self), _OMITTED_AT_DEFAULT)


class StrategyConfig(Section):
    name: str = "fedavg"
    params: dict[str, Any] = Field(default_factory=dict)


class TrainConfig(Section):
    batch: int = Field(8, gt=0)
    lr: float = Field(2e-4, gt=0)  # AdamW, server and clients, per round (cosine over the rounds)
    warmup_lr: float = Field(1e-3, gt=0)  # server warm-up (cosine over its epochs)
    weight_decay: float = Field(0.05, ge=0)
    warmup_epochs: int = Field(10, ge=0)  # server-only supervised epochs before round 1
    server_epochs: int = Field(1, ge=0)  # supervised server epochs per round
    # The round's server epochs add server_prox/2 * ||w - w_agg||^2 (w_agg: the weights they start
    # from, the clients' aggregate), so the server's labels refine what the clients learned instead of
    # pulling the head back to the server's domain (drift/server, drift/cosine). 0: off; not in warm-up.
    server_prox: float = Field(0.0, ge=0)
    client_epochs: int = Field(1, gt=0)  # unsupervised local epochs per round
    client_lr: float | None = Field(None, gt=0)  # default: lr; cosine over the rounds like the server's
    client_lr_warmup_rounds: int = Field(1, ge=0)  # client lr ramps up linearly over these first rounds
    ema_momentum: float = Field(0.99, ge=0, lt=1)  # client teacher, reset from the received model each job
    # The teacher labels each weak view at these integer upscalings (bilinear) and one NMS merges their
    # detections: at 2x a low-resolution client image shows objects at the size the server's images
    # taught, so the teacher finds small objects the 1x view misses (fedsim/train/pseudo.py).
    teacher_scales: tuple[int, ...] = (1,)
    conf_thres: float = Field(0.4, gt=0, lt=1)  # pseudo-label confidence threshold (FedSTO's tau2)
    ignore_thres: float | None = Field(0.1, ge=0, lt=1)  # scores in [this, conf_thres): no class loss (tau1)
    # Class targets where the teacher drew no pseudo-box: "band": 0, except no loss in the uncertain
    # band [ignore_thres, conf_thres); "soft": the teacher's own score (an object it missed at the
    # threshold is not taught as background; dense distillation of the class scores).
    negatives: Literal["band", "soft"] = "band"
    # Pseudo-boxes under this teacher confidence teach their class but no box regression (CIoU, DFL):
    # confidence says little about where a box's edges are. None: every pseudo-box teaches both;
    # 1.0: none does (classification-only pseudo-labels, as Unbiased Teacher).
    box_thres: float | None = Field(None, gt=0, le=1)
    # "adaptive": each class's threshold is conf_thres scaled by the teacher's mean confidence in that
    # class over its best class's (FreeMatch's self-adaptive class thresholds; fedsim/train/thresholds.py),
    # down to ignore_thres (conf_thres / 4 without one): classes it scores lower (small objects at low
    # resolution) are not starved of pseudo-labels.
    class_thres: Literal["fixed", "adaptive"] = "fixed"
    nms_iou: float = Field(0.65, gt=0, lt=1)
    # Client objective: unsup_weight * (pseudo-label loss per image) + the method's extra terms
    # (FedProx, FedSTO, MoE balance) at their nominal coefficients. AdamW is invariant to the scale
    # of the whole objective, so this weight only matters against those terms.
    unsup_weight: float = Field(1.0, gt=0)
    client_bn_stats: Literal["frozen", "train"] = "frozen"  # clients keep the received BatchNorm statistics
    # The student learns a strong view (random scale in strong_scale, shift, flip, colour, blur, noise,
    # cutouts) of what the teacher labelled on the weak view (flip only); "weak": both see the weak view.
    student_view: Literal["weak", "strong"] = "strong"
    strong_scale: tuple[float, float] = (0.5, 1.5)
    # Supervised epochs (warm-up, server rounds, centralized baselines) resize each batch by a random
    # factor in server_scale (covering the clients' resolution) and jitter its colours; null: flip only.
    server_scale: tuple[float, float] | None = (0.5, 1.0)
    # Score each client's pseudo-labels against its true labels (the simulator keeps them; no real
    # client has them): pseudo/precision|recall|iou/<domain> per round. Nothing trains on them.
    pseudo_diagnostics: bool = True
    server_threads: int = Field(2, gt=0)
    eval_batch: int = Field(16, gt=0)
    # Score the test sets every k rounds (and always after the warm-up and the last round); the
    # rounds between log no map50 metrics. Sweeps need 1: their schedulers compare every round.
    eval_every: int = Field(1, gt=0)

    @field_validator("teacher_scales")
    @classmethod
    def _scales(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if not v or min(v) < 1 or len(set(v)) != len(v):
            raise ValueError(f"must be distinct integers >= 1, got {list(v)}")
        return tuple(sorted(v))

    @model_serializer(mode="wrap")
    def _omit_defaults_of_new_fields(self, handler) -> dict[str, Any]:
        new_fields = {
            "negatives": "band",
            "eval_every": 1,
            "box_thres": None,
            "class_thres": "fixed",
            "server_prox": 0.0,
            "teacher_scales": (1,),
        }
        return without_defaults(handler(self), new_fields)


class CompressionConfig(Section):
    """What a client sends back (``fedsim/compression.py``); the global state travels down uncompressed.

    Every codec encodes the float entries' *delta* from the received state; integer buffers
    (BatchNorm batch counters) travel as they are. ``topk`` sends the ``topk_fraction`` largest
    entries of delta + the client's residual (error feedback) and keeps the rest as its new residual.
    """

    uplink: Literal["none", "fp16", "int8", "topk"] = "none"
    int8_granularity: Literal["tensor", "channel"] = "channel"  # affine int8 per tensor or per output channel
    topk_fraction: float = Field(0.1, gt=0, le=1)


class PrivacyConfig(Section):
    """Client-level DP-FedAvg (McMahan et al. 2018); see ``fedsim/privacy.py`` for the threat model.

    Each client's delta is clipped to L2 norm ``clip_norm``; the server adds N(0, (noise_multiplier *
    clip_norm)^2) to the sum of clipped deltas once per round and divides by the clients per round.
    """

    clip_norm: float | None = Field(None, gt=0)  # None: no clipping, no noise (privacy off)
    noise_multiplier: float = Field(0.0, ge=0)
    delta: float = Field(1e-5, gt=0, lt=1)
    accountant: Literal["rdp", "pld"] = "rdp"


# The settings only a run's client side reads (local training, pseudo-labels, the uplink's codec,
# client-level DP), as names or section prefixes of ``ExperimentConfig.flat()``. A strategy that
# trains no clients (``Strategy.uses_clients`` False) computes the same run whatever they are, so
# ``fedsim table`` reuses its recorded runs across them. ``clients.num_clients`` is not one: it
# shapes the data split every strategy trains and tests on.
CLIENT_SIDE_SETTINGS = (
    *(f"clients.{k}" for k in ClientsConfig.model_fields if k != "num_clients"),
    "train.client_epochs",
    "train.client_lr",
    "train.client_lr_warmup_rounds",
    "train.ema_momentum",
    "train.teacher_scales",
    "train.conf_thres",
    "train.ignore_thres",
    "train.negatives",
    "train.box_thres",
    "train.class_thres",
    "train.nms_iou",
    "train.unsup_weight",
    "train.client_bn_stats",
    "train.student_view",
    "train.strong_scale",
    "train.pseudo_diagnostics",
    "compression",
    "privacy",
)


def settings_key(flat: dict[str, str], ignored: tuple[str, ...] = ()) -> str:
    """Hash of a ``flat()`` config (or a run's MLflow params), tracking and ``ignored`` left out.

    An ignored name drops that setting and, as a prefix, every setting under it.
    """

    def kept(name: str) -> bool:
        return not any(name == p or name.startswith(p + ".") for p in ("tracking", *ignored))

    blob = json.dumps({k: v for k, v in flat.items() if kept(k)}, sort_keys=True).encode()
    return hashlib.sha1(blob).hexdigest()[:10]


class TrackingConfig(Section):
    uri: str | None = None  # default: $MLFLOW_TRACKING_URI, else sqlite:///runs/mlflow.db
    experiment: str = "fedsim"
    run_name: str | None = None
    keep_checkpoints: int | None = Field(None, ge=1)  # newest round checkpoints kept on disk; None: all


class ExperimentConfig(Section):
    name: str = "experiment"
    seed: int = 0
    rounds: int = Field(5, ge=0)
    output_dir: Path = Path("runs")
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    clients: ClientsConfig = Field(default_factory=ClientsConfig)
    strategy: StrategyConfig = Field(default_factory=StrategyConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    compression: CompressionConfig = Field(default_factory=CompressionConfig)
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig)

    @model_serializer(mode="wrap")
    def _omit_sections_at_default(self, handler) -> dict[str, Any]:
        data = handler(self)  # sections added later: left out while at their defaults, as in ClientsConfig
        for key, default in (("compression", CompressionConfig()), ("privacy", PrivacyConfig())):
            if key in data and getattr(self, key) == default:
                del data[key]
        return data

    def flat(self) -> dict[str, str]:
        """Dotted-key view for MLflow params."""
        out: dict[str, str] = {}

        def walk(prefix: str, value: Any) -> None:
            if isinstance(value, dict) and value:
                for k, v in value.items():
                    walk(f"{prefix}.{k}" if prefix else k, v)
            else:
                out[prefix] = json.dumps(value) if isinstance(value, (list, dict)) else str(value)

        walk("", self.model_dump(mode="json"))
        return out

    def key(self) -> str:
        """Hash of everything but tracking: two configs with one key produce identical runs."""
        blob = json.dumps(self.model_dump(mode="json", exclude={"tracking"}), sort_keys=True).encode()
        return hashlib.sha1(blob).hexdigest()[:10]

    def dump_yaml(self, path: Path) -> None:
        path.write_text(yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False))


def _field_path(loc: tuple) -> str:
    return ".".join(str(p) for p in loc if not str(p).startswith("function-"))


def _describe(err: dict) -> str:
    where = _field_path(err["loc"])
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        return f"{where}: unknown key"
    got = err.get("input")
    suffix = "" if ", got " in msg or isinstance(got, dict) else f", got {got!r}"
    return f"{where} {msg}{suffix}" if where else msg


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """``a.b=c`` sets raw["a"]["b"] = yaml(c)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        node = raw
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {key}: {part} is not a section")
        node[parts[-1]] = _scalar(value)
    return raw


def _scalar(text: str) -> Any:
    """YAML's reading of a --set value, except that ``1e-4`` is a number (YAML 1.1 says string)."""
    value = yaml.safe_load(text)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    return value


def config_error(problems: list[str]) -> ConfigError:
    """One error holding one ``fedsim: config error: ...`` line per problem."""
    return ConfigError("\n".join(f"fedsim: config error: {p}" for p in problems))


def field_problems(raw: dict) -> tuple[ExperimentConfig | None, list[str]]:
    """The config a raw dict describes, or None, and one line per invalid field."""
    try:
        return ExperimentConfig.model_validate(raw), []
    except ValidationError as exc:
        return None, [_describe(e) for e in exc.errors()]


def parse(raw: dict) -> ExperimentConfig:
    """Validate a raw dict's fields (the checks against domains, profiles and strategies are
    ``fedsim.preflight.parse``'s)."""
    cfg, problems = field_problems(raw)
    if problems:
        raise config_error(problems)
    return cfg


def read_yaml_mapping(path: Path, prefix: str, error: type[Exception], kind: str = "config file") -> dict:
    """The top-level mapping of a YAML file; a missing file, bad YAML or a non-mapping raise ``error``."""
    if not path.is_file():
        raise error(f"{prefix}{kind} not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise error(f"{prefix}{path} is not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise error(f"{prefix}{path} must hold a mapping at the top level")
    return raw
