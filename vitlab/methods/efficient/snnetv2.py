"""SN-Netv2: Stitched ViTs are Flexible Vision Backbones (Pan, Liu, Ren, Zhuang, 2023/24, arXiv:2307.00154).
Official code: https://github.com/ziplab/SN-Netv2 (``classification/snnet.py``, ``models.py``, ``utils.py``,
``main.py``). Written from the paper and a reading of that code; none of it is copied.

Take two trained ViTs of one family, a small anchor S (depth d_S, width D_S) and a large anchor L (d_L ≥ d_S,
D_L), fed the same tokens. A *stitch* runs the first blocks of one anchor, maps its tokens to the other anchor's
width with a linear *stitching layer*, and finishes in the other anchor. One network then holds many
sub-networks between S and L in cost, chosen at run time with no retraining:

    S→L      S[0..i] ─st─▶ L[j..d_L-1] ─▶ L.norm, L.head          (SN-Net v1 had only these)
    L→S      L[0..j] ─st─▶ S[i..d_S-1] ─▶ S.norm, S.head          (v2: two-way stitching)
    L→S→L    L[0..j] ─st─▶ S[i..k] ─st─▶ L[m..d_L-1]
    S→L→S    S[0..i] ─st─▶ L[j..k] ─st─▶ S[m..d_S-1]
             the embedding is the first anchor's, the norm + head the last anchor's; every stitching layer is
             shared by all configurations that cross at that point (one per S block for S→L, one per L→S point)

Where to cross (``stitch_configs``). Block positions are matched by nearest-neighbour resampling of S's block
indices onto L's depth, m(j) = ⌊j·d_S/d_L⌋ for L block j. S→L after S block i resumes L after the last L block
that maps to i; L→S after such a "last" L block j (j < d_L − 1) resumes S at m(j) + 1; the two-way routes chain an
L→S and an S→L (or S→L and L→S) crossing, each anchor running at least one block, and L→S→L never uses the S→L
crossing after S's last block. This is the official ``get_stitch_configs_bidirection`` wherever that code runs
(d_L = d_S or d_L = 2·d_S); it generalises it to any depths (the official code indexes past its list of L→S
layers when d_L/d_S is not 1 or 2, e.g. our (4, 6)). For depths (4, 6): 2 anchors + 4 S→L + 3 L→S + 3 L→S→L +
3 S→L→S = 15 configurations, against 5 for SN-Net v1 (the large anchor and the 4 S→L stitches).

Least-squares init (``least_squares_stitch``, the official ``ps_inv``). On one batch, with X [n, D_in] the tokens
after the block the stitch leaves and Y [n, D_out] the tokens after the block of the other anchor it replaces
(every token of every image is a row):

    [W | b]ᵀ = pinv([X, 1]) · Y            so that   X Wᵀ + b ≈ Y   in the least-squares sense

Low-rank training (``StitchLinear``, the official LoRA ``Linear``): W stays frozen at its least-squares value; what
trains is the bias and a rank-r update,  y = x (W + (α/r)·B A)ᵀ + b,  A [r, D_in] Kaiming-uniform, B [D_out, r]
zero (so training starts from the least-squares stitch), α = 1. The paper finds this keeps the stitches stable and
the Pareto front good on downstream tasks. ``StitchLinear.merged()`` folds B A into W for deployment.

Resource-constrained sampling (``group_by_flops``, ``sample_config``, official ``group_subnets_by_flops`` and the
uniform ``flops_sampling_probs``). Sort the configurations by FLOPs; a new group starts whenever a configuration
is more than ``gap`` FLOPs above the first of the current group. Each training step draws a group uniformly, then
a configuration uniformly inside it, and trains it (anchors and stitching layers jointly, one configuration per
batch). Drawing configurations uniformly instead would oversample the FLOPs range where configurations crowd.

    model = build(small, large, train, seed=s)          # copies of the anchors, least squares on one batch
    history = fit_snnet(model, train, **recipes.finetune_kwargs(P), seed=s)   # joint, FLOPs-grouped sampling
    logits = model(images, config=3)                    # any configuration at run time
    deployable = model.extract(3)                       # one stitch as a plain module (LoRA merged)

At small scale we differ from the paper in the budget (the chapter's fine-tune: 100 AdamW steps at lr 1e-4 in the
cpu profile, not 50 epochs of LAMB), the FLOPs gap (a tenth of the anchors' FLOPs range: the official 1 GFLOPs is
~1/13 of the DeiT-S→B range), the LoRA rank (8, not 64) and we draw the LS batch without mixup. The offline anchors
are vit_nano_scenes (4 × 64, trained on 4,000 scenes) and the chapter's base vit_tiny_scenes (6 × 96, trained on
20,000 scenes): same tokens and test set, different training sets.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from vitlab.checks import check_int as _check_int, check_model as _check_model

__all__ = ["StitchConfig", "stitch_configs", "v1_configs", "selective_forward", "least_squares_stitch",
           "StitchLinear", "SNNetv2", "StitchedViT", "group_by_flops", "sample_config", "config_flops",
           "evaluate_configs", "fit_snnet", "mid_config", "build", "for_compare", "DEFAULTS"]

KINDS = ("S", "L", "S→L", "L→S", "L→S→L", "S→L→S")
# The small anchor stitched to the chapter's base (recipes.base_model): vit_nano_scenes offline; on GPU a smaller
# CIFAR-100 ViT than vit_small_cifar100 (a zoo entry the course still has to add).
SMALL_ANCHOR = {"smoke": "vit_nano_scenes", "cpu": "vit_nano_scenes", "gpu": "vit_tiny_cifar100"}
# The lesson's and the comparison's settings. The anchors' weights always train with the chapter's fine-tune
# (recipes.finetune_kwargs: AdamW lr 1e-4, finetune_steps(P) steps); the stitching layers are new parameters and
# train at that lr times stitch_lr_scale (1: the official code trains anchors and stitches at one lr).
DEFAULTS = dict(lora_r=8, gap_fraction=0.1, stitch_lr_scale=1.0, ls_images=64, pick_images=256)


# ------------------------------------------------------------------------------------------------ configurations
@dataclass(frozen=True)
class StitchConfig:
    """One sub-network. ``route[k] = (anchor, first_block, last_block)`` (inclusive; anchor 0 = S, 1 = L; an empty
    last segment, first = depth, means only that anchor's norm and head);
    ``stitches[k]`` names the stitching layer between route segments k and k+1 ("s2l_i": after S block i;
    "l2s_j": after L block j)."""
    kind: str
    route: tuple[tuple[int, int, int], ...]
    stitches: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        return " → ".join(f"{'SL'[a]}[{b}..{e}]" if b <= e else f"{'SL'[a]}[head]" for a, b, e in self.route)


def _check_depths(depths, fn: str) -> tuple[int, int]:
    if not isinstance(depths, (tuple, list)) or len(depths) != 2:
        raise TypeError(f"{fn}: depths must be a pair (depth_small, depth_large), got {depths!r}")
    s, l = (_check_int(d, "depths[i]", fn) for d in depths)
    if s > l:
        raise ValueError(f"{fn}: depths must be (small, large) with small <= large, got {depths!r}")
    return s, l


def _crossings(d_s: int, d_l: int):
    """S→L crossings [(i, j)]: after S block i resume L at block j; L→S crossings [(j, i)]."""
    m = [j * d_s // d_l for j in range(d_l)]  # nearest resampling of S block ids onto L's depth
    last_l = {m[j]: j for j in range(d_l)}  # the last L block mapping to each S block
    s2l = [(i, last_l[i] + 1) for i in range(d_s)]
    l2s = [(j, m[j] + 1) for j in range(d_l - 1) if m[j + 1] != m[j]]
    return s2l, l2s


def stitch_configs(depths, *, two_way: bool = True) -> list[StitchConfig]:
    """All configurations for anchors of ``depths = (d_S, d_L)``: anchors, S→L, and with ``two_way`` also L→S,
    L→S→L and S→L→S, in that order (the official order)."""
    d_s, d_l = _check_depths(depths, "stitch_configs")
    if not isinstance(two_way, bool):
        raise TypeError(f"stitch_configs: two_way must be a bool, got {type(two_way).__name__}")
    s2l, l2s = _crossings(d_s, d_l)
    S, L = 0, 1
    cfgs = [StitchConfig("S", ((S, 0, d_s - 1),)), StitchConfig("L", ((L, 0, d_l - 1),))]
    cfgs += [StitchConfig("S→L", ((S, 0, i), (L, j, d_l - 1)), (f"s2l_{i}",)) for i, j in s2l]
    if not two_way:
        return cfgs
    cfgs += [StitchConfig("L→S", ((L, 0, j), (S, i, d_s - 1)), (f"l2s_{j}",)) for j, i in l2s]
    cfgs += [StitchConfig("L→S→L", ((L, 0, j), (S, i, i2), (L, j2, d_l - 1)), (f"l2s_{j}", f"s2l_{i2}"))
             for j, i in l2s for i2, j2 in s2l if i2 != d_s - 1 and i2 >= i]
    cfgs += [StitchConfig("S→L→S", ((S, 0, i), (L, j, j2), (S, i2, d_s - 1)), (f"s2l_{i}", f"l2s_{j2}"))
             for i, j in s2l for j2, i2 in l2s if j2 >= j]
    return cfgs


def v1_configs(depths) -> list[StitchConfig]:
    """SN-Net v1's space (official ``get_stitch_configs_general_unequal``): the large anchor and the S→L stitches
    (the last of which, S's blocks + L's head, stands in for the small anchor)."""
    cfgs = stitch_configs(depths, two_way=False)
    return [c for c in cfgs if c.kind != "S"]


# ------------------------------------------------------------------------------------------------ building blocks
def selective_forward(vit: nn.Module, x: torch.Tensor, begin: int, end: int) -> torch.Tensor:
    """Run ``vit.blocks[begin..end]`` (both inclusive, as the official ``selective_forward``) on tokens x."""
    depth = len(vit.blocks)
    if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end < depth):
        raise ValueError(f"selective_forward: need 0 <= begin <= end < {depth}, got begin={begin!r}, end={end!r}")
    for blk in vit.blocks[begin:end + 1]:
        x = blk(x)
    return x


@torch.no_grad()
def least_squares_stitch(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(W [D_out, D_in], b [D_out]) minimising ‖x Wᵀ + b − y‖², via pinv([x, 1]) (the official ``ps_inv``).

    x [..., D_in] and y [..., D_out] are flattened to rows (every token a sample); solved in float64."""
    if not (torch.is_tensor(x) and torch.is_tensor(y)):
        raise TypeError(f"least_squares_stitch: x and y must be tensors, got {type(x).__name__}, {type(y).__name__}")
    x2, y2 = x.reshape(-1, x.shape[-1]).double(), y.reshape(-1, y.shape[-1]).double()
    if x2.shape[0] != y2.shape[0]:
        raise ValueError(f"least_squares_stitch: x and y must hold the same number of tokens, got "
                         f"{tuple(x.shape)} and {tuple(y.shape)}")
    ones = torch.ones(x2.shape[0], 1, dtype=x2.dtype, device=x2.device)
    wb = (torch.linalg.pinv(torch.cat([x2, ones], 1)) @ y2).T  # [D_out, D_in + 1]
    return wb[:, :-1].to(x.dtype), wb[:, -1].to(x.dtype)


class StitchLinear(nn.Module):
    """A stitching layer: y = x (W + (α/r)·B A)ᵀ + b with W frozen (least-squares init), b, A, B trained.

    ``lora_r = 0`` trains W itself (a plain linear stitch, as SN-Net v1)."""

    def __init__(self, in_features: int, out_features: int, lora_r: int = 8, lora_alpha: float = 1.0):
        super().__init__()
        _check_int(in_features, "in_features", "StitchLinear")
        _check_int(out_features, "out_features", "StitchLinear")
        _check_int(lora_r, "lora_r", "StitchLinear", low=0)
        if lora_r > min(in_features, out_features):
            raise ValueError(f"StitchLinear: lora_r must be <= min(in_features, out_features) = "
                             f"{min(in_features, out_features)}, got {lora_r}")
        self.in_features, self.out_features, self.r = in_features, out_features, lora_r
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=lora_r == 0)
        self.bias = nn.Parameter(torch.zeros(out_features))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # nn.Linear's default (the random-init baseline)
        if lora_r:
            self.scaling = lora_alpha / lora_r
            self.lora_A = nn.Parameter(torch.empty(lora_r, in_features))
            self.lora_B = nn.Parameter(torch.zeros(out_features, lora_r))
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    @torch.no_grad()
    def init_least_squares(self, x: torch.Tensor, y: torch.Tensor) -> "StitchLinear":
        """W, b ← least squares x → y; the LoRA update restarts at zero (B = 0)."""
        w, b = least_squares_stitch(x, y)
        if w.shape != self.weight.shape:
            raise ValueError(f"StitchLinear.init_least_squares: features give W {tuple(w.shape)}, "
                             f"expected {tuple(self.weight.shape)}")
        self.weight.copy_(w)
        self.bias.copy_(b)
        if self.r:
            self.lora_B.zero_()
        return self

    def merged(self) -> nn.Linear:
        """A plain nn.Linear with W + (α/r)·B A folded in (what is deployed)."""
        lin = nn.Linear(self.in_features, self.out_features, device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            lin.weight.copy_(self.weight + (self.scaling * self.lora_B @ self.lora_A if self.r else 0))
            lin.bias.copy_(self.bias)
        return lin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        if self.r:
            out = out + self.scaling * F.linear(F.linear(x, self.lora_A), self.lora_B)
        return out

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, lora_r={self.r}"


def _check_anchor(vit, name: str) -> nn.Module:
    _check_model(vit, "SNNetv2")
    for attr in ("embed", "blocks", "norm", "forward_head", "patch_embed"):
        if not hasattr(vit, attr):
            raise TypeError(f"SNNetv2: {name} must be a vitlab VisionTransformer (missing .{attr}), "
                            f"got {type(vit).__name__}")
    if getattr(vit, "global_pool", "token") != "token" or getattr(vit, "num_prefix_tokens", 1) != 1:
        raise ValueError(f"SNNetv2: {name} must pool the CLS token and have no register tokens")
    return vit


class SNNetv2(nn.Module):
    """Two anchors (used as given, not copied), one stitching layer per crossing, and every configuration.

    ``forward(images, config=None)`` runs configuration ``config`` (an index into ``self.configs``), else
    ``self.config_id``."""

    def __init__(self, small: nn.Module, large: nn.Module, *, lora_r: int = 8, two_way: bool = True):
        super().__init__()
        _check_anchor(small, "small")
        _check_anchor(large, "large")
        if small.patch_embed.num_patches != large.patch_embed.num_patches or \
                small.patch_embed.img_size != large.patch_embed.img_size:
            raise ValueError("SNNetv2: the anchors must see the same image size and token count, got "
                             f"{small.patch_embed.img_size}/{small.patch_embed.num_patches} and "
                             f"{large.patch_embed.img_size}/{large.patch_embed.num_patches}")
        if len(small.blocks) > len(large.blocks):
            raise ValueError(f"SNNetv2: small must not be deeper than large, got depths {len(small.blocks)} and "
                             f"{len(large.blocks)}")
        self.anchors = nn.ModuleList([small, large])
        self.depths = (len(small.blocks), len(large.blocks))
        self.configs = stitch_configs(self.depths, two_way=two_way)
        d_s, d_l = small.embed_dim, large.embed_dim
        s2l, l2s = _crossings(*self.depths)
        layers = {f"s2l_{i}": StitchLinear(d_s, d_l, lora_r) for i, _ in s2l}
        if two_way:
            layers.update({f"l2s_{j}": StitchLinear(d_l, d_s, lora_r) for j, _ in l2s})
        self.stitch_layers = nn.ModuleDict(layers)
        self.crossings = {f"s2l_{i}": (0, i, 1, j - 1) for i, j in s2l}  # key -> (from, after block, to, target)
        self.crossings.update({f"l2s_{j}": (1, j, 0, i - 1) for j, i in l2s} if two_way else {})
        self.config_id = 0

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {f"anchors.{k}.{n}" for k in range(2) for n in ("pos_embed", "cls_token")}

    def _check_config(self, config, fn: str) -> StitchConfig:
        if isinstance(config, bool) or not isinstance(config, int) or not 0 <= config < len(self.configs):
            raise ValueError(f"{fn}: config must be an int in [0, {len(self.configs)}), got {config!r}")
        return self.configs[config]

    @torch.no_grad()
    def init_stitches(self, images: torch.Tensor) -> "SNNetv2":
        """Least-squares init of every stitching layer from one batch of images: the tokens after the block the
        stitch leaves → the tokens after the block (of the other anchor) just before where it resumes. Tokens
        at a target index -1 (resume at block 0) are the other anchor's embedding."""
        if not torch.is_tensor(images) or images.ndim != 4:
            raise ValueError(f"SNNetv2.init_stitches: images must be a batch [B, C, H, W], got "
                             f"{tuple(images.shape) if torch.is_tensor(images) else type(images).__name__}")
        feats = []
        for anchor in self.anchors:
            was = anchor.training
            anchor.eval()
            x, outs = anchor.embed(images), {}
            outs[-1] = x
            for k, blk in enumerate(anchor.blocks):
                x = outs[k] = blk(x)
            anchor.train(was)
            feats.append(outs)
        for key, (a, i, b, j) in self.crossings.items():
            self.stitch_layers[key].init_least_squares(feats[a][i], feats[b][j])
        return self

    def forward(self, x: torch.Tensor, config: int | None = None) -> torch.Tensor:
        cfg = self._check_config(self.config_id if config is None else config, "SNNetv2.forward")
        x = self.anchors[cfg.route[0][0]].embed(x)
        for k, (a, begin, end) in enumerate(cfg.route):
            if begin <= end:  # S→L after S's last block resumes L at its depth: only L's norm and head remain
                x = selective_forward(self.anchors[a], x, begin, end)
            if k < len(cfg.stitches):
                x = self.stitch_layers[cfg.stitches[k]](x)
        last = self.anchors[cfg.route[-1][0]]
        return last.forward_head(last.norm(x))

    @torch.no_grad()
    def extract(self, config: int) -> "StitchedViT":
        """Configuration ``config`` as a standalone module (copied weights, LoRA merged): what one deploys."""
        cfg = self._check_config(config, "SNNetv2.extract")
        layers = []
        for k, (a, begin, end) in enumerate(cfg.route):
            layers += [copy.deepcopy(b) for b in self.anchors[a].blocks[begin:end + 1]]
            if k < len(cfg.stitches):
                layers.append(self.stitch_layers[cfg.stitches[k]].merged())
        return StitchedViT(self.anchors[cfg.route[0][0]], self.anchors[cfg.route[-1][0]], layers, cfg).eval()


class StitchedViT(nn.Module):
    """A plain network: ``first``'s embedding, ``layers`` (blocks and merged stitches), ``last``'s norm and head."""

    def __init__(self, first: nn.Module, last: nn.Module, layers: list[nn.Module], config: StitchConfig | None = None):
        super().__init__()
        self.patch_embed = copy.deepcopy(first.patch_embed)
        self.cls_token = nn.Parameter(first.cls_token.detach().clone())
        self.pos_embed = nn.Parameter(first.pos_embed.detach().clone())
        self.blocks = nn.Sequential(*layers)
        self.norm = copy.deepcopy(last.norm)
        self.head = copy.deepcopy(last.head)
        self.num_prefix_tokens = 1
        self.config = config

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1) + self.pos_embed
        return self.head(self.norm(self.blocks(x))[:, 0])

    def extra_repr(self) -> str:
        return f"config={self.config.label if self.config else None}"


# ------------------------------------------------------------------------------------------------ sampling
def group_by_flops(flops, gap: float) -> list[list[int]]:
    """Official ``group_subnets_by_flops``: configurations sorted by FLOPs; a new group starts when one is more
    than ``gap`` above the first of the current group. ``flops``: {config: FLOPs} or a list. Groups hold ids."""
    items = dict(enumerate(flops)) if isinstance(flops, (list, tuple)) else dict(flops)
    if not items:
        raise ValueError("group_by_flops: flops is empty")
    if isinstance(gap, bool) or not isinstance(gap, (int, float)) or not gap >= 0:
        raise ValueError(f"group_by_flops: gap must be a number >= 0, got {gap!r}")
    groups, start = [], None
    for cid, f in sorted(items.items(), key=lambda kv: kv[1]):
        if start is None or abs(f - start) > gap:
            groups.append([cid])
            start = f
        else:
            groups[-1].append(cid)
    return [sorted(g) for g in groups]


def sample_config(groups: list[list[int]], generator: torch.Generator | None = None) -> int:
    """Resource-constrained sampling: a FLOPs group uniformly, then a configuration uniformly inside it."""
    if not groups or not all(groups):
        raise ValueError(f"sample_config: groups must be non-empty lists of config ids, got {groups!r}")
    g = groups[int(torch.randint(len(groups), (1,), generator=generator))]
    return g[int(torch.randint(len(g), (1,), generator=generator))]


@torch.no_grad()
def config_flops(model: SNNetv2, image: torch.Tensor) -> list[int]:
    """Per-image FLOPs (2 per MAC) of every configuration, counted on its deployed form (LoRA merged)."""
    from vitlab import measure

    if not isinstance(model, SNNetv2):
        raise TypeError(f"config_flops: model must be an SNNetv2, got {type(model).__name__}")
    return [measure.flops(model.extract(c), image[:1]) for c in range(len(model.configs))]


@torch.no_grad()
def evaluate_configs(model: SNNetv2, data, configs=None, *, batch_size: int = 500) -> dict[int, float]:
    """Accuracy of each configuration on ``data`` (an ImageDataset or (images, labels)). Configurations share
    prefixes (all S→L stitches start with S's first blocks), so each prefix is computed once per batch."""
    if not isinstance(model, SNNetv2):
        raise TypeError(f"evaluate_configs: model must be an SNNetv2, got {type(model).__name__}")
    images, labels = (data.images, data.labels) if hasattr(data, "images") else data
    configs = list(range(len(model.configs))) if configs is None else list(configs)
    for c in configs:
        model._check_config(c, "evaluate_configs")
    was = model.training
    model.eval()
    correct = dict.fromkeys(configs, 0)
    dev = next(model.parameters()).device
    for s in range(0, len(images), batch_size):
        xb, yb = images[s:s + batch_size].to(dev), labels[s:s + batch_size].to(dev)
        cache = {}

        def run(prefix):  # prefix: ("embed", a), then ("blk", a, k) / ("st", key) steps
            if prefix not in cache:
                *head, op = prefix
                if op[0] == "embed":
                    cache[prefix] = model.anchors[op[1]].embed(xb)
                elif op[0] == "blk":
                    cache[prefix] = model.anchors[op[1]].blocks[op[2]](run(tuple(head)))
                else:
                    cache[prefix] = model.stitch_layers[op[1]](run(tuple(head)))
            return cache[prefix]

        for c in configs:
            cfg = model.configs[c]
            prefix = (("embed", cfg.route[0][0]),)
            for k, (a, b, e) in enumerate(cfg.route):
                prefix += tuple(("blk", a, i) for i in range(b, e + 1))
                if k < len(cfg.stitches):
                    prefix += (("st", cfg.stitches[k]),)
            last = model.anchors[cfg.route[-1][0]]
            correct[c] += (last.forward_head(last.norm(run(prefix))).argmax(-1) == yb).sum().item()
    model.train(was)
    return {c: correct[c] / len(images) for c in configs}


# ------------------------------------------------------------------------------------------------ training
def fit_snnet(model: SNNetv2, train, *, steps: int, groups: list[list[int]] | None = None,
              flops: list[int] | None = None, gap_fraction: float | None = None, lr: float = 1e-4,
              stitch_lr_scale: float | None = None, weight_decay: float = 0.05, warmup: float = 0.1,
              label_smoothing: float = 0.1, batch_size: int = 64, shift: int = 2, seed: int = 0,
              profile=None, progress: bool = False, desc: str = "snnetv2") -> dict:
    """Joint fine-tune of anchors and stitching layers: ``vitlab.train.fit`` for exactly ``steps`` steps (AdamW,
    warm-up + cosine, label smoothing, ±``shift`` px shifts: pass ``**recipes.finetune_kwargs(P)`` for the
    chapter's recipe), with a ``step_fn`` that trains one configuration per batch, drawn by ``sample_config``
    from FLOPs ``groups`` (default: ``group_by_flops`` of ``flops``, counted if not given, with gap =
    ``gap_fraction`` × the anchors' FLOPs range). The anchors' weights train at ``lr``; the stitching layers at
    ``lr × stitch_lr_scale`` (``DEFAULTS``). Returns fit's history plus ``config`` (one per step) and ``groups``."""
    from vitlab.train import adamw_lr_scaled, fit

    if not isinstance(model, SNNetv2):
        raise TypeError(f"fit_snnet: model must be an SNNetv2, got {type(model).__name__}")
    _check_int(steps, "steps", "fit_snnet")
    gap_fraction = DEFAULTS["gap_fraction"] if gap_fraction is None else gap_fraction
    scale = DEFAULTS["stitch_lr_scale"] if stitch_lr_scale is None else stitch_lr_scale
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
        raise ValueError(f"fit_snnet: stitch_lr_scale must be a positive number, got {scale!r}")
    images = train.images if hasattr(train, "images") else train[0]
    if groups is None:
        flops = config_flops(model, images[:1]) if flops is None else flops
        groups = group_by_flops(flops, gap_fraction * (max(flops) - min(flops)))
    gen = torch.Generator().manual_seed(seed)
    drawn = []

    def step_fn(net, x, y):  # resource-constrained sampling: a FLOPs group, then a configuration in it
        c = sample_config(groups, gen)
        drawn.append(c)
        logits = net(x, config=c)
        return F.cross_entropy(logits.float(), y, label_smoothing=label_smoothing), logits

    # timm's AdamW groups (no decay on norms, biases, tokens; frozen W left out), the stitches at lr × scale
    optimizer = adamw_lr_scaled(lambda net: net.stitch_layers.parameters(), scale)

    hist = fit(model, train, profile=profile, steps=steps, lr=lr, weight_decay=weight_decay, warmup=warmup,
               label_smoothing=label_smoothing, batch_size=batch_size, shift=shift, seed=seed, step_fn=step_fn,
               optimizer=optimizer, progress=progress, desc=desc)
    model.eval()
    return {**hist, "config": drawn, "groups": groups}


def mid_config(flops: list[int], model: SNNetv2, data=None, *, window: float = 0.1) -> int:
    """A mid-FLOPs stitch: among the stitched configurations whose FLOPs lie within ``window`` × (the anchors'
    FLOPs range) of the anchors' midpoint, the most accurate on ``data`` (SN-Net picks a stitch per FLOPs budget
    from the evaluated Pareto front); without ``data``, or if none lies in the window, the closest to the
    midpoint."""
    if len(flops) != len(model.configs):
        raise ValueError(f"mid_config: flops has {len(flops)} entries, model has {len(model.configs)} configs")
    a = [c for c, cfg in enumerate(model.configs) if cfg.kind in ("S", "L")]
    mid, span = (flops[a[0]] + flops[a[1]]) / 2, abs(flops[a[1]] - flops[a[0]])
    stitched = [c for c in range(len(flops)) if c not in a]
    near = [c for c in stitched if abs(flops[c] - mid) <= window * span]
    if data is None or not near:
        return min(stitched, key=lambda c: (abs(flops[c] - mid), c))
    acc = evaluate_configs(model, data, near)
    return max(near, key=lambda c: (acc[c], -abs(flops[c] - mid)))


# ------------------------------------------------------------------------------------------------ comparison entry
def build(small: nn.Module, large: nn.Module, train, *, seed: int = 0) -> SNNetv2:
    """SNNetv2 on copies of the anchors (they are not changed), ``DEFAULTS['lora_r']``, every stitching layer
    fitted by least squares on ``DEFAULTS['ls_images']`` training images drawn with ``seed``."""
    model = SNNetv2(copy.deepcopy(small), copy.deepcopy(large), lora_r=DEFAULTS["lora_r"])
    g = torch.Generator().manual_seed(seed)
    return model.init_stitches(train.images[torch.randperm(len(train.images), generator=g)[:DEFAULTS["ls_images"]]])


def for_compare(base, train, profile, *, seed: int = 0):
    """SN-Netv2 on the chapter's base: S = the zoo's ``SMALL_ANCHOR[profile]`` (``vit_nano_scenes`` offline),
    L = a copy of ``base``; ``build`` (least squares on 64 training images), then the chapter's fine-tune
    (``recipes.finetune_kwargs(profile)``, ``seed``) jointly over all 15 configurations with FLOPs-grouped
    sampling (``fit_snnet``). Returned: ``mid_config``'s stitch, the most accurate on 256 training images among
    those within ±10 % of the anchors' FLOPs range around their mean FLOPs, deployed with its LoRA merged. The
    note names the one chosen."""
    from vitlab import seed_everything, zoo
    from vitlab.methods.efficient.recipes import Reduced, finetune_kwargs
    from vitlab.profiles import profile as get_profile

    P = get_profile(profile)
    _check_model(base, "for_compare")
    _check_int(seed, "seed", "for_compare", low=0)
    seed_everything(seed)
    name = SMALL_ANCHOR.get(P.name, "vit_nano_scenes")
    if name not in zoo.ZOO:
        raise ValueError(f"for_compare: the small anchor {name!r} for profile {P.name!r} is not in the zoo")
    model = build(zoo.get(name, P), base, train, seed=seed)
    flops = config_flops(model, train.images[:1])
    kw = finetune_kwargs(P)
    fit_snnet(model, train, flops=flops, **kw, seed=seed, profile=P)
    pick = torch.randperm(len(train.images), generator=torch.Generator().manual_seed(seed + 1))
    pick = pick[:DEFAULTS["pick_images"]]
    c = mid_config(flops, model, (train.images[pick], train.labels[pick]))
    out = model.extract(c)
    return Reduced(out.eval(), None, None,
                   f"SN-Netv2 stitch {model.configs[c].label} of {name}+base (LS init, {kw['steps']} joint "
                   f"steps over {len(model.configs)} configs)",
                   extra={"config": c, "label": model.configs[c].label})
