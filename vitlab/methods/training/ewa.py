"""EWA: Experts Weights Averaging (Huang et al., 2023, arXiv:2308.06093), written from the paper's description.

Train a ViT with some FFNs turned into a Mixture-of-Experts, then fold every MoE back into one FFN, so the
deployed model is exactly the original ViT (same parameters, same FLOPs):

    build     each chosen FFN → E experts, each an exact copy of the FFN           moeify(model, blocks, E)
    route     Random Uniform Partition (RUP): the batch's T tokens are shuffled and dealt to the experts in
              turn, so every expert gets ⌊T/E⌋ or ⌈T/E⌉ tokens; no router, no balancing loss
    step      after every optimizer step, with share rate β, for every expert tensor W_e:
                  W_e ← (1 − β)·W_e + β·W̄,   W̄ = (1/E)·Σ_j W_j                   average_experts_(model, β)
    deploy    each MoE → one FFN with the mean weights W̄                          collapse(model)

    model = moeify(create_model("vit_nano", data=train), num_experts=4)
    history = fit_ewa(model, train, val, share_rate=0.3, profile=P)
    deployed = collapse(model)        # a plain VisionTransformer: the base model's keys and parameter count

Why it can help: the experts see disjoint random token subsets (a multi-branch, dropout-like ensemble), and
EWA keeps pulling them together, so the mean they collapse to stays a good model (averaging experts that
drifted apart gives a poor one). The mean of the experts is unchanged by EWA: only their spread shrinks,
by (1 − β) every step.

Our reading of the paper (no official code; the abstract and the course curriculum are what we checked):
- The averaging form. We pull each expert toward the mean of *all* E experts, so β = 0 does nothing and
  β = 1 makes all experts equal. The same update written toward the mean of the *other* E − 1 experts,
  W_e ← (1 − β')·W_e + β'·mean_{j≠e} W_j, is this one with β' = β·(E − 1)/E (both keep the mean and
  shrink every expert's deviation from it by the same factor), so a β taken from the paper may need that
  conversion.
- RUP deals out all tokens of the batch (CLS included), not each image's tokens separately.
- The optimizer's state (AdamW moments) is per expert and is not averaged; only the weights are.
- Which FFNs: every other block by default (blocks 1, 3, ...), E = 4, as the curriculum plans.
- At eval the MoE model (before collapse) routes with RUP from a fixed seed, so evaluation is deterministic;
  ``eval_routing="mean"`` uses the mean expert instead (the collapsed FFN's output).
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F
from vitlab.checks import check_number, check_int as _check_int, check_model as _check_model

__all__ = ["ExpertLinear", "EWAMoE", "random_uniform_partition", "moeify", "moe_layers", "average_experts_",
           "expert_divergence", "collapse", "ewa_optimizer", "fit_ewa", "DEFAULTS"]

EVAL_ROUTING = ("random", "mean")

# The lesson's cpu recipe (notebooks/4_training/ewa.ipynb), for the chapter's compare to share: a nano ViT with
# 7-px patches (16 tokens) on mnist5k, no augmentation, AdamW; every other FFN a RUP-MoE of num_experts experts,
# averaged with share_rate after every step. The plain ViT trained with the same arguments is the control.
DEFAULTS = dict(model_kw=dict(patch_size=7), epochs=9, batch_size=48, lr=2e-3, num_experts=4, share_rate=0.3)


# ------------------------------------------------------------------------------------------------ checks

# ------------------------------------------------------------------------------------------------ routing
def random_uniform_partition(num_tokens: int, num_experts: int, *, generator: torch.Generator | None = None
                             ) -> torch.Tensor:
    """RUP: a random order of the tokens, ``perm`` [T]; token ``perm[k]`` goes to expert ``k % num_experts``.

    Dealing the shuffled tokens out in turn gives every expert ⌊T/E⌋ or ⌈T/E⌉ tokens. Drawn on the CPU (from
    ``generator``, else the global RNG) so the same seed gives the same partition on any device.
    """
    _check_int(num_tokens, "num_tokens", "random_uniform_partition")
    _check_int(num_experts, "num_experts", "random_uniform_partition")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"random_uniform_partition: generator must be a torch.Generator or None, "
                        f"got {type(generator).__name__}")
    return torch.randperm(num_tokens, generator=generator)


# ------------------------------------------------------------------------------------------------ modules
class ExpertLinear(nn.Module):
    """E linear layers side by side: weight [E, out, in], bias [E, out]; ``forward`` maps [E, m, in] → [E, m, out]
    with one batched matmul. The names end in ``weight``/``bias`` as nn.Linear's do, so timm's optimizer
    factory still exempts the biases from weight decay."""

    def __init__(self, num_experts: int, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(num_experts, out_features)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, num_experts: int) -> "ExpertLinear":
        """E exact copies of ``linear``."""
        out = cls(num_experts, linear.in_features, linear.out_features, bias=linear.bias is not None)
        out.to(device=linear.weight.device, dtype=linear.weight.dtype)
        with torch.no_grad():
            out.weight.copy_(linear.weight.expand_as(out.weight))
            if linear.bias is not None:
                out.bias.copy_(linear.bias.expand_as(out.bias))
        return out

    def mean_linear(self) -> nn.Linear:
        """One nn.Linear whose weight and bias are the experts' means (the collapsed layer)."""
        E, out_f, in_f = self.weight.shape
        lin = nn.Linear(in_f, out_f, bias=self.bias is not None, device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            lin.weight.copy_(self.weight.mean(0))
            if self.bias is not None:
                lin.bias.copy_(self.bias.mean(0))
        return lin

    def mean_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The mean expert applied to x [..., in] (what the collapsed layer computes)."""
        return F.linear(x, self.weight.mean(0), None if self.bias is None else self.bias.mean(0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.bmm(x, self.weight.transpose(1, 2))  # [E, m, in] @ [E, in, out] -> [E, m, out]
        return y if self.bias is None else y + self.bias[:, None, :]

    def extra_repr(self) -> str:
        E, out_f, in_f = self.weight.shape
        return f"experts={E}, in_features={in_f}, out_features={out_f}, bias={self.bias is not None}"


class EWAMoE(nn.Module):
    """A timm ``Mlp`` turned into ``num_experts`` copies with Random Uniform Partition routing.

    fc1/fc2 hold the stacked expert weights (``ExpertLinear``); the activation, dropouts and the (usually
    Identity) norm between fc1 and fc2 are the FFN's own, shared by all experts.
    """

    def __init__(self, mlp: nn.Module, num_experts: int = 4, *, eval_routing: str = "random", eval_seed: int = 0):
        super().__init__()
        if not isinstance(mlp, nn.Module) or not all(hasattr(mlp, a) for a in ("fc1", "act", "fc2")):
            raise TypeError(f"EWAMoE: mlp must be a timm Mlp (fc1, act, fc2), got {type(mlp).__name__}")
        if not (isinstance(mlp.fc1, nn.Linear) and isinstance(mlp.fc2, nn.Linear)):
            raise TypeError(f"EWAMoE: mlp.fc1 and mlp.fc2 must be nn.Linear (use_conv=False), got "
                            f"{type(mlp.fc1).__name__} and {type(mlp.fc2).__name__}")
        _check_int(num_experts, "num_experts", "EWAMoE", low=2)
        if eval_routing not in EVAL_ROUTING:
            raise ValueError(f"EWAMoE: eval_routing must be one of {EVAL_ROUTING}, got {eval_routing!r}")
        _check_int(eval_seed, "eval_seed", "EWAMoE", low=0)
        self.num_experts, self.eval_routing, self.eval_seed = num_experts, eval_routing, eval_seed
        self.fc1 = ExpertLinear.from_linear(mlp.fc1, num_experts)
        self.act = copy.deepcopy(mlp.act)
        self.drop1 = copy.deepcopy(getattr(mlp, "drop1", nn.Identity()))
        self.norm = copy.deepcopy(getattr(mlp, "norm", nn.Identity()))
        self.fc2 = ExpertLinear.from_linear(mlp.fc2, num_experts)
        self.drop2 = copy.deepcopy(getattr(mlp, "drop2", nn.Identity()))
        self.last_perm: torch.Tensor | None = None  # the latest partition, for inspection

    def _experts(self, x: torch.Tensor) -> torch.Tensor:  # [E, m, D] -> [E, m, D]
        return self.drop2(self.fc2(self.norm(self.drop1(self.act(self.fc1(x))))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape, D, E = x.shape, x.shape[-1], self.num_experts
        tokens = x.reshape(-1, D)  # [T, D]: all tokens of the batch are partitioned together
        T = tokens.shape[0]
        if not self.training and self.eval_routing == "mean":
            return self.drop2(self.fc2.mean_forward(self.norm(self.drop1(self.act(self.fc1.mean_forward(x))))))
        gen = None if self.training else torch.Generator().manual_seed(self.eval_seed)  # eval: same split each call
        perm = random_uniform_partition(T, E, generator=gen).to(x.device)
        self.last_perm = perm
        m = -(-T // E)  # tokens per expert, rounded up; the last few slots are zero padding
        pad = m * E - T
        if pad:
            tokens = torch.cat([tokens, tokens.new_zeros(pad, D)])
            perm = torch.cat([perm, torch.arange(T, T + pad, device=x.device)])
        grouped = tokens[perm].view(m, E, D).transpose(0, 1)  # slot k = (row k // E, expert k % E) -> [E, m, D]
        y = self._experts(grouped).transpose(0, 1).reshape(m * E, -1)  # back to slot order [m*E, D]
        inverse = torch.empty_like(perm)
        inverse[perm] = torch.arange(len(perm), device=x.device)
        return y[inverse[:T]].view(*shape[:-1], -1)  # every token back in its place

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, routing=random_uniform_partition, eval_routing={self.eval_routing!r}"


# ------------------------------------------------------------------------------------------------ model surgery
def moe_layers(model: nn.Module) -> list[tuple[str, EWAMoE]]:
    """The (name, module) of every EWAMoE in ``model``."""
    _check_model(model, "moe_layers")
    return [(name, m) for name, m in model.named_modules() if isinstance(m, EWAMoE)]


def moeify(model: nn.Module, blocks=None, num_experts: int = 4, *, eval_routing: str = "random") -> nn.Module:
    """Replace ``model.blocks[i].mlp`` by an ``EWAMoE`` of ``num_experts`` copies, for i in ``blocks``
    (default: every other block, 1, 3, 5, ...). In place; returns ``model``.

    The blocks turned into MoEs stop using the Triton FFN kernel (it expects a dense fc1); ``collapse``
    restores their setting.
    """
    _check_model(model, "moeify")
    if not isinstance(getattr(model, "blocks", None), nn.Sequential) or not all(hasattr(b, "mlp") for b in model.blocks):
        raise TypeError(f"moeify: model must be a ViT whose .blocks hold an .mlp each, got {type(model).__name__}")
    depth = len(model.blocks)
    if blocks is None:
        blocks = tuple(range(1, depth, 2)) or (0,)
    if isinstance(blocks, int) and not isinstance(blocks, bool):
        blocks = (blocks,)
    if not isinstance(blocks, (list, tuple, range)) or len(blocks) == 0:
        raise TypeError(f"moeify: blocks must be a non-empty sequence of block indices, got {blocks!r}")
    for i in blocks:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < depth:
            raise ValueError(f"moeify: blocks must hold ints in [0, {depth}), got {i!r} in {blocks!r}")
    if len(set(blocks)) != len(blocks):
        raise ValueError(f"moeify: blocks has repeated indices: {blocks!r}")
    _check_int(num_experts, "num_experts", "moeify", low=2)
    for i in blocks:
        if isinstance(model.blocks[i].mlp, EWAMoE):
            raise ValueError(f"moeify: blocks[{i}].mlp is already an EWAMoE")
    for i in blocks:
        blk = model.blocks[i]
        moe = EWAMoE(blk.mlp, num_experts, eval_routing=eval_routing)
        moe.block_use_kernels = getattr(blk, "use_kernels", False)
        if hasattr(blk, "use_kernels"):
            blk.use_kernels = False
        blk.mlp = moe
    return model


@torch.no_grad()
def average_experts_(model: nn.Module, share_rate: float) -> nn.Module:
    """EWA, in place: every expert tensor W_e ← (1 − β)·W_e + β·mean_j W_j, in every EWAMoE of ``model``.

    β = 0 leaves the experts alone; β = 1 sets them all to their mean. The mean never changes.
    """
    beta = check_number(share_rate, "share_rate", "average_experts_", low=0, high=1)
    layers = [model] if isinstance(model, EWAMoE) else [m for _, m in moe_layers(model)]
    if not layers:
        raise ValueError("average_experts_: model has no EWAMoE layers; call moeify(model) first")
    if beta == 0.0:
        return model
    for moe in layers:
        for p in (moe.fc1.weight, moe.fc1.bias, moe.fc2.weight, moe.fc2.bias):
            if p is not None:
                p.lerp_(p.mean(0, keepdim=True).expand_as(p), beta)  # [E, ...] toward the expert mean
    return model


@torch.no_grad()
def expert_divergence(model: nn.Module) -> float:
    """How far the experts have drifted apart: RMS over experts of ‖W_e − W̄‖ / ‖W̄‖ for the fc1 and fc2
    weights, averaged over tensors and MoE layers (0 when all experts are equal)."""
    layers = [model] if isinstance(model, EWAMoE) else [m for _, m in moe_layers(model)]
    if not layers:
        raise ValueError("expert_divergence: model has no EWAMoE layers; call moeify(model) first")
    values = []
    for moe in layers:
        for w in (moe.fc1.weight, moe.fc2.weight):
            mean = w.mean(0, keepdim=True)
            spread = (w - mean).flatten(1).norm(dim=1).pow(2).mean().sqrt()
            values.append((spread / mean.norm().clamp_min(1e-12)).item())
    return sum(values) / len(values)


@torch.no_grad()
def collapse(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Every EWAMoE → a timm ``Mlp`` with the experts' mean weights: the original architecture, for inference.

    Returns a copy (``inplace=False``) or ``model`` itself. The result has the base model's state-dict keys,
    shapes and parameter count.
    """
    from timm.layers import Mlp

    layers = moe_layers(model)
    if not layers:
        raise ValueError("collapse: model has no EWAMoE layers; nothing to collapse")
    if not isinstance(inplace, bool):
        raise TypeError(f"collapse: inplace must be a bool, got {type(inplace).__name__}")
    out = model if inplace else copy.deepcopy(model)
    for name, _ in layers:
        parent_name, _, attr = name.rpartition(".")
        parent = out.get_submodule(parent_name) if parent_name else out
        moe: EWAMoE = getattr(parent, attr)
        fc1, fc2 = moe.fc1.mean_linear(), moe.fc2.mean_linear()
        mlp = Mlp(fc1.in_features, fc1.out_features, fc2.out_features,
                  bias=(fc1.bias is not None, fc2.bias is not None),
                  device=fc1.weight.device, dtype=fc1.weight.dtype)
        mlp.fc1, mlp.act, mlp.drop1, mlp.norm, mlp.fc2, mlp.drop2 = fc1, moe.act, moe.drop1, moe.norm, fc2, moe.drop2
        mlp.train(moe.training)
        setattr(parent, attr, mlp)
        if hasattr(parent, "use_kernels"):
            parent.use_kernels = getattr(moe, "block_use_kernels", parent.use_kernels)
    return out


# ------------------------------------------------------------------------------------------------ training
def ewa_optimizer(share_rate: float, base="adamw", *, on_step=None):
    """An ``optimizer=`` callable for ``vitlab.train.fit``: the usual optimizer (``base``: a name or another
    such callable) with EWA run right after each of its steps (a step post-hook), and then ``on_step(model)``
    if given (e.g. to log the experts' divergence)."""
    beta = check_number(share_rate, "share_rate", "ewa_optimizer", low=0, high=1)
    if on_step is not None and not callable(on_step):
        raise TypeError(f"ewa_optimizer: on_step must be callable or None, got {type(on_step).__name__}")

    def make(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
        from vitlab.train import make_optimizer

        if not moe_layers(model):
            raise ValueError("ewa_optimizer: model has no EWAMoE layers; call moeify(model) first")
        opt = make_optimizer(model, base, lr, weight_decay)

        def after_step(optimizer, args, kwargs):
            average_experts_(model, beta)
            if on_step is not None:
                on_step(model)

        opt.register_step_post_hook(after_step)
        return opt

    return make


def fit_ewa(model: nn.Module, train, val=None, *, share_rate: float, optimizer="adamw", **fit_kwargs) -> dict:
    """``vitlab.train.fit`` with EWA after every step. The history gains ``divergence``: the experts'
    ``expert_divergence`` after each step (after the averaging). ``share_rate=0`` trains a plain RUP-MoE."""
    from vitlab.train import fit

    _check_model(model, "fit_ewa")
    if not moe_layers(model):
        raise ValueError("fit_ewa: model has no EWAMoE layers; call moeify(model) first")
    divergence: list[float] = []
    opt = ewa_optimizer(share_rate, optimizer, on_step=lambda m: divergence.append(expert_divergence(m)))
    history = fit(model, train, val, optimizer=opt, **fit_kwargs)
    history["divergence"] = divergence[len(divergence) - history["step"][-1]:]  # drop fit's timing probe, if any
    return history
