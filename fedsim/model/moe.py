"""Sparse mixture-of-experts drop-in for Ultralytics' ``Detect`` head (the FedMox spatial router).

Expert split
    Every Detect level ``i`` has two branches, ``cv2[i]`` (box) and ``cv3[i]`` (class), each
    ``3x3 conv -> 3x3 conv -> 1x1 Conv2d``. A 3x3 conv needs its neighbours, so it cannot be computed
    for a scattered subset of locations without also computing those neighbours; the two 3x3 layers
    therefore stay a dense *shared stem* (``cv2[i]``/``cv3[i]`` keep only them). The experts are the
    per-location pointwise part: expert ``k`` of level ``i`` owns one box and one class 1x1 projection
    (``box_experts[i].weight[k]``, ``cls_experts[i].weight[k]``). One router per level picks the
    expert for both branches, as METHOD.md §11 says.

Spatial router and sparse compute
    ``routers[i] = Conv2d(C_i, K, 1)`` on the level's input feature map gives K logits per location,
    at any H x W. Each location takes its arg-max expert. The stem features are flattened to
    ``(B*H*W, C)``, the rows routed to expert ``k`` are gathered, multiplied by that expert's weights
    (one ``addmm``), and copied back to their rows. Every location is computed by exactly one expert,
    so the expert FLOPs equal the dense head's pointwise FLOPs whatever K is.

Gradient estimator (router)
    Gate-scaled top-1 in the Switch-Transformer style, normalised so the forward value is untouched:
    ``y = E_k*(x) * p_k* / stop_grad(p_k*)`` with ``p = softmax(logits)``. ``p / p`` is exactly 1.0 in
    floating point, so a location's output *equals* its expert's output (and a conversion with
    identical experts reproduces the dense head bit for bit), while the router receives
    ``dL/dlogits = <dL/dy, y> * (onehot_k* - p)``, the gradient of ``log p_k*``. Plain Switch
    (``y = p_k* * E_k*``) would rescale the pretrained head's outputs by ~1/K at conversion; the
    straight-through estimator (``hard - soft.detach() + soft``) needs every expert's output at every
    location for its backward, which is the dense compute this module avoids.

Load balancing
    Switch-style ``aux = balance_coef * K * sum_k f_k * P_k`` over all locations of all levels (``f_k``:
    fraction routed to k, not differentiable; ``P_k``: mean router probability). ``aux_loss`` holds it
    after each forward; the trainer adds it to the detection loss (``moe_aux_loss(model)``). It is 1 x
    ``balance_coef`` for uniform routing and up to K x ``balance_coef`` when one expert takes everything.

``GlobalRouterMoEDetect`` is the ablation: a ``Linear`` over the flattened P5 map (fixed C x H x W)
picks one expert per image, so it only works at the resolution it was built for.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from ultralytics.nn.modules.conv import Conv, DWConv
from ultralytics.nn.modules.head import Detect

# Transient per-forward results, kept out of pickles and deep copies (they may hold autograd graphs).
_TRANSIENT = (
    "_aux_loss",
    "last_routing_counts",
    "last_level_counts",
    "last_expert_index",
    "last_balance",
    "last_router_logits",
)


class PointwiseExperts(nn.Module):
    """K independent 1x1 projections ``c_in -> c_out``, stored as one ``(K, c_out, c_in)`` weight."""

    def __init__(self, num_experts: int, c_in: int, c_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, c_out, c_in))
        self.bias = nn.Parameter(torch.zeros(num_experts, c_out))
        bound = 1.0 / math.sqrt(c_in)
        nn.init.uniform_(self.weight, -bound, bound)

    @property
    def num_experts(self) -> int:
        return self.weight.shape[0]

    def dense(self, x: torch.Tensor, k: int) -> torch.Tensor:
        """Expert ``k`` applied at every location of ``x`` (B, C, H, W): the reference for tests."""
        return nn.functional.conv2d(x, self.weight[k][..., None, None], self.bias[k])

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        """What one location contributes, ``(B*H*W, C)``: its own feature vector."""
        return x.movedim(1, -1).reshape(-1, x.shape[1])

    def apply(self, rows: torch.Tensor, k: int) -> torch.Tensor:
        return torch.addmm(self.bias[k], rows, self.weight[k].t())


class ConvExperts(nn.Module):
    """K experts of ``3x3 conv (+ folded BatchNorm) -> SiLU -> 1x1 projection``, computed per location.

    A 3x3 conv at one location reads its 3x3 neighbourhood, so each location's input row is its
    unfolded patch ``(C * 9)``; a routed row costs exactly what the dense layer costs at that
    location, and a location is computed by one expert only. The pretrained layer's BatchNorm is
    folded into the conv (eval statistics) at conversion: statistics over only the rows an expert
    receives would differ from expert to expert and from client to client.
    """

    def __init__(self, num_experts: int, c_in: int, c_hidden: int, c_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, c_hidden, c_in * 9))
        self.bias = nn.Parameter(torch.zeros(num_experts, c_hidden))
        nn.init.uniform_(self.weight, -1.0 / math.sqrt(c_in * 9), 1.0 / math.sqrt(c_in * 9))
        self.proj = PointwiseExperts(num_experts, c_hidden, c_out)

    @property
    def num_experts(self) -> int:
        return self.weight.shape[0]

    def dense(self, x: torch.Tensor, k: int) -> torch.Tensor:
        w = self.weight[k].view(self.weight.shape[1], x.shape[1], 3, 3)
        return self.proj.dense(nn.functional.silu(nn.functional.conv2d(x, w, self.bias[k], padding=1)), k)

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        patches = nn.functional.unfold(x, 3, padding=1)  # (B, C*9, H*W), channel-major like conv weights
        return patches.movedim(1, -1).reshape(-1, patches.shape[1])

    def apply(self, rows: torch.Tensor, k: int) -> torch.Tensor:
        hidden = nn.functional.silu(torch.addmm(self.bias[k], rows, self.weight[k].t()))
        return self.proj.apply(hidden, k)

    @torch.no_grad()
    def load_dense(self, conv: Conv, proj: nn.Conv2d) -> None:
        """Every expert from a dense ``Conv`` (conv + BN + SiLU) and its 1x1 projection."""
        bn = conv.bn
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        w = conv.conv.weight * scale[:, None, None, None]
        self.weight.copy_(w.reshape(w.shape[0], -1).expand_as(self.weight))
        self.bias.copy_((bn.bias - bn.running_mean * scale).expand_as(self.bias))
        self.proj.weight.copy_(proj.weight[:, :, 0, 0].expand_as(self.proj.weight))
        self.proj.bias.copy_(proj.bias.expand_as(self.proj.bias))


def _route_rows(
    flats: list[torch.Tensor], experts: list[nn.Module], index: torch.Tensor, num_experts: int
) -> tuple[list[torch.Tensor], list[int]]:
    """Apply expert ``index[n]`` to row ``n`` of each ``flats[j]`` (N, C_j), computing routed rows only."""
    order = torch.argsort(index)
    sizes = torch.bincount(index, minlength=num_experts).tolist()
    outs: list[torch.Tensor | None] = [None] * len(flats)
    start = 0
    for k, n in enumerate(sizes):
        if n == 0:
            continue
        rows = order[start : start + n]
        start += n
        for j, (f, e) in enumerate(zip(flats, experts, strict=True)):
            y = e.apply(f.index_select(0, rows), k)
            if outs[j] is None:  # allocated from the first result so autocast's dtype is kept
                outs[j] = y.new_empty(f.shape[0], y.shape[1])
            outs[j].index_copy_(0, rows, y)
    for j, (f, e) in enumerate(zip(flats, experts, strict=True)):
        if outs[j] is None:  # no rows at all
            out_channels = (e.proj if isinstance(e, ConvExperts) else e).weight.shape[1]
            outs[j] = f.new_empty(0, out_channels)
    return outs, sizes


def _average_rows(flats: list[torch.Tensor], experts: list[nn.Module], num_experts: int) -> list[torch.Tensor]:
    """Every row of each ``flats[j]`` through every expert, averaged: K times the routed cost."""
    return [sum(e.apply(f, k) for k in range(num_experts)) / num_experts for f, e in zip(flats, experts, strict=True)]


class MoEDetect(Detect):
    """Detect head whose pointwise output layers are K experts chosen per location by a spatial router.

    Output format is Detect's: a dict ``{"boxes", "scores", "feats"}`` in training, ``(y, dict)`` in
    eval, so ``v8DetectionLoss``, decoding and NMS work unchanged.

    Two overrides a strategy may set (plain attributes, not state): ``force_expert`` sends every
    location to that expert, in training and eval alike; ``average_experts``, in training mode only,
    gives each location the mean of all experts' outputs, so one loss trains every expert alike.
    Under either, the router gets no gradient from the detection loss, and the routing statistics
    record the router's own choices (what it would pick unforced).
    """

    force_expert: int | None = None
    average_experts: bool = False

    def __init__(
        self,
        nc: int = 80,
        reg_max: int = 16,
        ch: list[int] | tuple[int, ...] = (),
        num_experts: int = 4,
        balance_coef: float = 0.0,
        legacy: bool | None = None,
        expert_depth: int = 1,
    ) -> None:
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}")
        if expert_depth not in (1, 2):
            raise ValueError(f"expert_depth must be 1 (1x1 projection) or 2 (3x3 conv + 1x1), got {expert_depth}")
        super().__init__(nc=nc, reg_max=reg_max, end2end=False, ch=ch)
        self.legacy = Detect.legacy if legacy is None else legacy
        if expert_depth == 2 and not self.legacy:
            raise ValueError("expert_depth 2 supports YOLOv8-style heads (3x3 conv branches), not depthwise ones")
        self.num_experts = num_experts
        self.expert_depth = expert_depth
        self.balance_coef = float(balance_coef)
        c2, c3 = max((16, ch[0] // 4, reg_max * 4)), max(ch[0], min(nc, 100))
        if expert_depth == 2:
            # Shared stems: each branch's first 3x3 conv; experts: its second 3x3 conv and the 1x1.
            self.cv2 = nn.ModuleList(nn.Sequential(Conv(x, c2, 3)) for x in ch)
            self.cv3 = nn.ModuleList(nn.Sequential(Conv(x, c3, 3)) for x in ch)
            self.box_experts = nn.ModuleList(ConvExperts(num_experts, c2, c2, 4 * reg_max) for _ in ch)
            self.cls_experts = nn.ModuleList(ConvExperts(num_experts, c3, c3, nc) for _ in ch)
            self._build_routers(ch)
            self.routing_counts = torch.zeros(num_experts, dtype=torch.long)
            self._reset_transient()
            return
        # Shared dense stems: Detect's branches without their last 1x1 conv.
        self.cv2 = nn.ModuleList(nn.Sequential(Conv(x, c2, 3), Conv(c2, c2, 3)) for x in ch)
        if self.legacy:
            self.cv3 = nn.ModuleList(nn.Sequential(Conv(x, c3, 3), Conv(c3, c3, 3)) for x in ch)
        else:
            self.cv3 = nn.ModuleList(
                nn.Sequential(
                    nn.Sequential(DWConv(x, x, 3), Conv(x, c3, 1)),
                    nn.Sequential(DWConv(c3, c3, 3), Conv(c3, c3, 1)),
                )
                for x in ch
            )
        self.box_experts = nn.ModuleList(PointwiseExperts(num_experts, c2, 4 * reg_max) for _ in ch)
        self.cls_experts = nn.ModuleList(PointwiseExperts(num_experts, c3, nc) for _ in ch)
        self._build_routers(ch)
        self.routing_counts = torch.zeros(num_experts, dtype=torch.long)
        self._reset_transient()

    # ----------------------------------------------------------------------------------------- routing
    def _build_routers(self, ch: list[int] | tuple[int, ...]) -> None:
        self.routers = nn.ModuleList(nn.Conv2d(c, self.num_experts, 1) for c in ch)
        self.reset_routers()

    def reset_routers(self) -> None:
        """Random router init with zero-mean rows and zero bias.

        Neck features are post-SiLU (mostly positive); zero-mean rows damp the shared positive mean
        that would otherwise hand most locations to one expert. That is not enough on its own (a
        level can still send ~90% of locations to one expert): ``calibrate_routers`` on real images
        centres the logits and spreads the routing.
        """
        for r in self.routers:
            w = torch.randn_like(r.weight) / math.sqrt(r.weight.shape[1])
            with torch.no_grad():
                r.weight.copy_(w - w.mean(dim=1, keepdim=True))
                r.bias.zero_()

    def router_logits(self, x: list[torch.Tensor]) -> list[torch.Tensor]:
        """Router logits per level, each ``(B, K, H_i, W_i)``."""
        return [r(xi) for r, xi in zip(self.routers, x, strict=True)]

    @torch.no_grad()
    def calibrate_routers(self, x: list[torch.Tensor]) -> None:
        """Set router biases so each expert's mean logit over the given head inputs is zero."""
        for r, logits in zip(self.routers, self.router_logits(x), strict=True):
            r.bias.sub_(logits.mean(dim=(0, 2, 3)))

    # -------------------------------------------------------------------------------------- statistics
    def _reset_transient(self) -> None:
        self._aux_loss: torch.Tensor | None = None
        self.last_balance: float = float("nan")  # unscaled K * sum f_k P_k of the last forward
        self.last_routing_counts = torch.zeros(self.num_experts, dtype=torch.long)
        self.last_level_counts = torch.zeros(len(self.box_experts), self.num_experts, dtype=torch.long)
        self.last_expert_index: list[torch.Tensor] = []  # per level, (B, H_i, W_i)
        self.last_router_logits: list[torch.Tensor] = []  # per level, (B*H_i*W_i, K), with their graph

    @property
    def aux_loss(self) -> torch.Tensor:
        """``balance_coef * K * sum_k f_k P_k`` of the last forward (0 before any forward)."""
        if self._aux_loss is None:
            return torch.zeros((), device=self.stride.device)
        return self._aux_loss

    def reset_routing_stats(self) -> None:
        self.routing_counts = torch.zeros(self.num_experts, dtype=torch.long)

    def routing_fractions(self) -> torch.Tensor:
        """Fraction of locations per expert accumulated since the last ``reset_routing_stats``."""
        total = int(self.routing_counts.sum())
        return self.routing_counts.double() / max(total, 1)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        for key in _TRANSIENT:
            state.pop(key, None)
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._reset_transient()

    # ----------------------------------------------------------------------------------------- forward
    def forward_head(
        self, x: list[torch.Tensor], box_head: nn.Module | None = None, cls_head: nn.Module | None = None
    ) -> dict[str, torch.Tensor]:
        if box_head is None or cls_head is None:  # Detect.fuse() convention
            return {}
        bs = x[0].shape[0]
        k = self.num_experts
        logits_per_level = self.router_logits(x)
        boxes, scores, indices, level_counts = [], [], [], []
        prob_sums, logits_list = [], []
        for i in range(self.nl):
            sb, sc = box_head[i](x[i]), cls_head[i](x[i])
            h, w = sb.shape[2:]
            logits = logits_per_level[i].movedim(1, -1).reshape(-1, k)
            logits_list.append(logits)
            index = logits.argmax(dim=1)
            probs = logits.softmax(dim=1)
            experts = [self.box_experts[i], self.cls_experts[i]]
            flats = [e.rows(stem) for e, stem in zip(experts, (sb, sc), strict=True)]
            if self.average_experts and self.training:
                yb, yc = _average_rows(flats, experts, k)
                sizes = torch.bincount(index, minlength=k).tolist()
            elif self.force_expert is not None:
                (yb, yc), _ = _route_rows(flats, experts, torch.full_like(index, self.force_expert), k)
                sizes = torch.bincount(index, minlength=k).tolist()
            else:
                (yb, yc), sizes = _route_rows(flats, experts, index, k)
                gate = probs.gather(1, index[:, None])
                scale = gate / gate.detach()  # exactly 1.0 forward; carries the router gradient
                yb, yc = yb * scale, yc * scale
            boxes.append(yb.view(bs, h * w, -1).transpose(1, 2))
            scores.append(yc.view(bs, h * w, -1).transpose(1, 2))
            indices.append(index.view(bs, h, w))
            level_counts.append(sizes)
            prob_sums.append(probs.sum(dim=0))
        self._record(indices, level_counts, prob_sums)
        self.last_router_logits = logits_list
        return {"boxes": torch.cat(boxes, dim=-1), "scores": torch.cat(scores, dim=-1), "feats": x}

    def _record(
        self, indices: list[torch.Tensor], level_counts: list[list[int]], prob_sums: list[torch.Tensor]
    ) -> None:
        counts = torch.tensor(level_counts, dtype=torch.long)
        self.last_level_counts = counts
        self.last_routing_counts = counts.sum(dim=0)
        self.routing_counts = self.routing_counts + self.last_routing_counts
        self.last_expert_index = [i.detach() for i in indices]
        total = int(self.last_routing_counts.sum())
        frac = self.last_routing_counts.to(prob_sums[0].device, prob_sums[0].dtype) / total
        mean_prob = torch.stack(prob_sums).sum(dim=0) / total
        balance = self.num_experts * (frac * mean_prob).sum()
        self.last_balance = float(balance.detach())
        self._aux_loss = self.balance_coef * balance

    def bias_init(self) -> None:
        """Detect's bias prior applied to every expert (needs ``stride``)."""
        for i, (be, ce) in enumerate(zip(self.box_experts, self.cls_experts, strict=True)):
            be, ce = getattr(be, "proj", be), getattr(ce, "proj", ce)
            be.bias.data[:] = 2.0
            ce.bias.data[:] = math.log(5 / self.nc / (640 / self.stride[i]) ** 2)

    # -------------------------------------------------------------------------------------- conversion
    @classmethod
    def from_dense(
        cls,
        head: Detect,
        num_experts: int,
        balance_coef: float = 0.0,
        init_noise: float = 0.0,
        expert_depth: int = 1,
        **kwargs,
    ) -> MoEDetect:
        """A MoE head whose stems are ``head``'s and whose experts are copies of its last layers
        (the 1x1 output convs; with ``expert_depth=2`` also the 3x3 conv before them)."""
        if type(head) is not Detect:
            raise ValueError(f"convert_to_moe supports a plain Detect head, got {type(head).__name__}")
        if getattr(head, "one2one_cv2", None) is not None:
            raise ValueError("convert_to_moe does not support end-to-end (one2one) Detect heads")
        if head.cv2 is None:
            raise ValueError("convert_to_moe needs an unfused Detect head")
        ch = [b[0].conv.in_channels for b in head.cv2]
        legacy = isinstance(head.cv3[0][0], Conv)
        moe = cls(
            head.nc, head.reg_max, ch, num_experts, balance_coef, legacy=legacy, expert_depth=expert_depth, **kwargs
        )
        ref = next(head.parameters())
        moe.to(device=ref.device, dtype=ref.dtype)
        # Ultralytics bookkeeping (f, i, type, np, stride, inplace, anchors, ...).
        for key, value in vars(head).items():
            if not key.startswith("_") and key != "training":
                setattr(moe, key, value)
        moe.type = f"{cls.__module__}.{cls.__name__}"
        moe.legacy = legacy
        stem = 3 - expert_depth  # of each branch's three layers, the first ``stem`` stay shared
        moe.cv2 = nn.ModuleList(branch[:stem] for branch in head.cv2)
        moe.cv3 = nn.ModuleList(branch[:stem] for branch in head.cv3)
        moe.dfl = head.dfl  # the fixed DFL projection, frozen or not as the caller left it
        if expert_depth == 2:
            with torch.no_grad():
                for experts, branches in ((moe.box_experts, head.cv2), (moe.cls_experts, head.cv3)):
                    for e, branch in zip(experts, branches, strict=True):
                        e.load_dense(branch[1], branch[2])
                        if init_noise > 0:
                            for w in (e.weight, e.proj.weight):
                                w.add_(torch.randn_like(w) * (init_noise * float(w[0].std())))
            moe.np = sum(p.numel() for p in moe.parameters())
            moe.train(head.training)
            return moe
        with torch.no_grad():
            for experts, branches in ((moe.box_experts, head.cv2), (moe.cls_experts, head.cv3)):
                for e, branch in zip(experts, branches, strict=True):
                    w, b = branch[2].weight[:, :, 0, 0], branch[2].bias
                    e.weight.copy_(w.expand_as(e.weight))
                    e.bias.copy_(b.expand_as(e.bias))
                    if init_noise > 0:
                        e.weight.add_(torch.randn_like(e.weight) * (init_noise * float(w.std())))
        moe.np = sum(p.numel() for p in moe.parameters())
        moe.train(head.training)
        return moe


class GlobalRouterMoEDetect(MoEDetect):
    """Ablation: one expert per image from a ``Linear`` over the flattened P5 map of a fixed size.

    The router's input size is ``C5 * H5 * W5``, fixed at construction from ``input_hw``; any other
    resolution is rejected. That is the limitation the spatial router removes.
    """

    def __init__(
        self,
        nc: int = 80,
        reg_max: int = 16,
        ch: list[int] | tuple[int, ...] = (),
        num_experts: int = 4,
        balance_coef: float = 0.0,
        legacy: bool | None = None,
        input_hw: tuple[int, int] = (640, 640),
        level_stride: float = 32.0,
        expert_depth: int = 1,
    ) -> None:
        h, w = input_hw
        self.input_hw = (int(h), int(w))
        # Stride-2 convs with padding 1 give ceil(size / stride).
        self.feat_chw = (ch[-1], math.ceil(h / level_stride), math.ceil(w / level_stride))
        super().__init__(nc, reg_max, ch, num_experts, balance_coef, legacy, expert_depth)

    def _build_routers(self, ch: list[int] | tuple[int, ...]) -> None:
        self.routers = nn.ModuleList([nn.Linear(math.prod(self.feat_chw), self.num_experts)])
        self.reset_routers()

    def reset_routers(self) -> None:
        r = self.routers[0]
        with torch.no_grad():
            nn.init.normal_(r.weight, std=1.0 / math.sqrt(r.weight.shape[1]))
            r.weight.sub_(r.weight.mean(dim=1, keepdim=True))
            r.bias.zero_()

    @torch.no_grad()
    def calibrate_routers(self, x: list[torch.Tensor]) -> None:
        self.routers[0].bias.sub_(self.router_logits(x)[0].mean(dim=(0, 2, 3)))

    def router_logits(self, x: list[torch.Tensor]) -> list[torch.Tensor]:
        feat = x[-1]
        if tuple(feat.shape[1:]) != self.feat_chw:
            c, h, w = self.feat_chw
            raise ValueError(
                f"GlobalRouterMoEDetect was built for input {self.input_hw[0]}x{self.input_hw[1]} (H x W): "
                f"its flattened router expects a last-level feature map of {c}x{h}x{w} (C x H x W), got "
                f"{'x'.join(map(str, feat.shape[1:]))}; a fixed-size router cannot change resolution, "
                "use the spatial router"
            )
        logits = self.routers[0](feat.flatten(1))  # (B, K): one expert per image
        return [logits[:, :, None, None].expand(-1, -1, *xi.shape[2:]) for xi in x]


class ImageRouterMoEDetect(MoEDetect):
    """One expert per image, at any resolution: each level's router reads that level's globally
    average-pooled features, and the levels' logits add up to one choice for the whole image.

    The pooled features carry image-level statistics (brightness, contrast, texture: what weather
    and lighting change), which a per-location router sees only locally. The routers keep the
    spatial router's shapes, ``Conv2d(C_i, K, 1)``, applied to a 1 x 1 map.
    """

    def router_logits(self, x: list[torch.Tensor]) -> list[torch.Tensor]:
        logits = sum(r(xi.mean(dim=(2, 3), keepdim=True)) for r, xi in zip(self.routers, x, strict=True))
        return [logits.expand(-1, -1, *xi.shape[2:]) for xi in x]

    @torch.no_grad()
    def calibrate_routers(self, x: list[torch.Tensor]) -> None:
        """Centre the summed logits: the correction goes to the last level's bias alone."""
        self.routers[-1].bias.sub_(self.router_logits(x)[0].mean(dim=(0, 2, 3)))


def convert_to_moe(
    model: nn.Module,
    num_experts: int,
    balance_coef: float = 0.0,
    init_noise: float = 0.0,
    router: str = "spatial",
    input_hw: tuple[int, int] | None = None,
    calibration: torch.Tensor | None = None,
    expert_depth: int = 1,
) -> nn.Module:
    """Replace ``model.model[-1]`` (a ``Detect``) in place by a MoE head initialised from it.

    Each expert starts as a copy of the dense 1x1 output convs (plus ``init_noise`` x their weight
    std of Gaussian noise), so with ``init_noise=0`` the converted model's detections equal the
    dense model's. ``router="image"`` picks one expert per image from pooled features (any size);
    ``router="global"`` builds the fixed-resolution ablation for ``input_hw`` (H, W).
    ``calibration`` (a batch of images, B x 3 x H x W in [0, 1]) centres the router logits on real
    features, which spreads the initial routing far more evenly than the data-free init.
    """
    head = model.model[-1]
    if router in ("spatial", "image"):
        kind = MoEDetect if router == "spatial" else ImageRouterMoEDetect
        moe = kind.from_dense(head, num_experts, balance_coef, init_noise, expert_depth=expert_depth)
    elif router == "global":
        if input_hw is None:
            raise ValueError("router='global' needs input_hw=(height, width)")
        stride = float(head.stride[-1]) if float(head.stride[-1]) > 0 else 32.0
        moe = GlobalRouterMoEDetect.from_dense(
            head,
            num_experts,
            balance_coef,
            init_noise,
            expert_depth=expert_depth,
            input_hw=input_hw,
            level_stride=stride,
        )
    else:
        raise ValueError(f"router must be 'spatial', 'image' or 'global', got {router!r}")
    model.model[-1] = moe
    model.criterion = None  # rebuilt lazily by model.loss()
    if calibration is not None:
        calibrate_model_routers(model, calibration)
    return model


@torch.no_grad()
def calibrate_model_routers(model: nn.Module, images: torch.Tensor) -> None:
    """Run ``images`` through ``model`` in eval mode and centre the MoE head's router logits on them."""
    head = moe_head(model)
    if head is None:
        raise ValueError("model has no MoE head to calibrate")
    feats: list[list[torch.Tensor]] = []
    hook = head.register_forward_pre_hook(lambda _m, args: feats.append(list(args[0])))
    modes = {mod: mod.training for mod in model.modules()}  # BatchNorm must not update its statistics
    counts = head.routing_counts
    try:
        model.eval()
        model(images)
    finally:
        hook.remove()
        for mod, mode in modes.items():
            mod.training = mode
        head.routing_counts = counts
    head.calibrate_routers(feats[0])


def group_routing_loss(head: MoEDetect, group: list[int]) -> torch.Tensor:
    """Cross-entropy of routing into ``group`` (a set of expert indices) for the last forward.

    Per location, ``-log sum_{k in group} softmax(logits)_k``, averaged over the locations of each
    level and then over levels. It is 0 when the router puts all probability inside the group, and
    it trains the router alone: the experts' outputs do not enter it.
    """
    if not head.last_router_logits:
        raise ValueError("group_routing_loss needs a forward pass first")
    losses = [-torch.logsumexp(logits.log_softmax(dim=1)[:, group], dim=1).mean() for logits in head.last_router_logits]
    return torch.stack(losses).mean()


def moe_head(model: nn.Module) -> MoEDetect | None:
    head = model.model[-1]
    return head if isinstance(head, MoEDetect) else None


def moe_aux_loss(model: nn.Module) -> torch.Tensor | float:
    """The head's load-balancing term from the last forward, or 0.0 for a dense model."""
    head = moe_head(model)
    return 0.0 if head is None else head.aux_loss
