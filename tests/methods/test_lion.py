"""Lion: the paper's update rule by hand, equality with timm's and lion-pytorch's Lion, half of AdamW's state."""
import pytest
import torch
import timm.optim

from vitlab.methods.training.lion import Lion, lion_for, state_numel
from vitlab.models import create_model


def test_two_steps_by_hand():
    # lr 0.1, wd 0.5: decay factor 1 - 0.1 * 0.5 = 0.95, then every coordinate moves by exactly 0.1 (or 0 if the
    # interpolated momentum is exactly 0)
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64))
    opt = Lion([p], lr=0.1, weight_decay=0.5)
    p.grad = torch.tensor([0.3, -0.1, 0.0], dtype=torch.float64)
    opt.step()
    # decay -> [0.95, -1.9, 0.475]; u = sign(0.1 * g) = [1, -1, 0]; m = 0.01 * g
    torch.testing.assert_close(p.detach(), torch.tensor([0.85, -1.8, 0.475], dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(opt.state[p]["exp_avg"], torch.tensor([0.003, -0.001, 0.0], dtype=torch.float64),
                               rtol=0, atol=1e-12)

    p.grad = torch.tensor([-1.0, 0.005, 2.0], dtype=torch.float64)
    opt.step()
    # decay -> [0.8075, -1.71, 0.45125]; 0.9 m + 0.1 g = [-0.0973, -0.0004, 0.2] -> u = [-1, -1, 1]:
    # in coordinate 1 the momentum outvotes the (positive) gradient
    torch.testing.assert_close(p.detach(), torch.tensor([0.9075, -1.61, 0.35125], dtype=torch.float64),
                               rtol=0, atol=1e-12)
    # m = 0.99 m + 0.01 g
    torch.testing.assert_close(opt.state[p]["exp_avg"], torch.tensor([-0.00703, -0.00094, 0.02], dtype=torch.float64),
                               rtol=0, atol=1e-12)
    assert list(opt.state[p]) == ["exp_avg"]  # one state tensor, no step counter


def _run(make_opt, steps=5):
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in [(7, 5), (5,), (3, 4, 2)]]
    opt = make_opt(params)
    for _ in range(steps):  # the same seeded gradients for every optimizer
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
    return torch.cat([p.detach().flatten() for p in params])


def test_equals_timm_and_lion_pytorch():
    from lion_pytorch import Lion as LucidrainsLion

    ours = _run(lambda ps: Lion(ps, lr=1e-2, weight_decay=0.1))
    theirs = {"timm": _run(lambda ps: timm.optim.Lion(ps, lr=1e-2, weight_decay=0.1)),
              "lion-pytorch": _run(lambda ps: LucidrainsLion(ps, lr=1e-2, weight_decay=0.1))}
    start = _run(lambda ps: Lion(ps, lr=1e-2, weight_decay=0.1), steps=0)
    assert (ours - start).abs().min() > 0  # it moved
    for name, t in theirs.items():
        assert (ours - t).abs().max().item() <= 1e-7, name


def _vit_with_grad(seed=0):
    torch.manual_seed(seed)
    model = create_model("vit_nano", img_size=8, patch_size=4, num_classes=10)
    x = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    model(x).logsumexp(-1).mean().backward()
    return model


def test_lion_for_matches_timm_groups_and_steps():
    a, b = _vit_with_grad(), _vit_with_grad()
    ours = lion_for(a, lr=1e-3, weight_decay=0.5)
    ref = timm.optim.create_optimizer_v2(b, "lion", lr=1e-3, weight_decay=0.5)
    names = {id(p): n for n, p in a.named_parameters()}
    no_decay = {names[id(p)] for g in ours.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    assert {"cls_token", "pos_embed", "blocks.0.norm1.weight", "head.bias"} <= no_decay
    assert "blocks.0.attn.qkv.weight" not in no_decay
    assert [len(g["params"]) for g in ours.param_groups] == [len(g["params"]) for g in ref.param_groups]
    for _ in range(3):
        ours.step()
        ref.step()
    diff = max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))
    assert diff <= 1e-7


def test_state_is_half_of_adamw():
    a, b = _vit_with_grad(), _vit_with_grad()
    lion, adamw = lion_for(a, 1e-3, 0.5), timm.optim.create_optimizer_v2(b, "adamw", lr=1e-3, weight_decay=0.05)
    assert state_numel(lion) == 0
    lion.step()
    adamw.step()
    n = sum(p.numel() for p in a.parameters())
    assert state_numel(lion) == n and state_numel(adamw) == 2 * n


def test_bad_arguments():
    ps = [torch.nn.Parameter(torch.zeros(3))]
    with pytest.raises(ValueError, match="lr"):
        Lion(ps, lr=-1.0)
    with pytest.raises(TypeError, match="lr"):
        Lion(ps, lr="0.1")
    with pytest.raises(ValueError, match="weight_decay"):
        Lion(ps, weight_decay=-0.1)
    with pytest.raises(ValueError, match=r"betas\[0\]"):
        Lion(ps, betas=(1.0, 0.99))
    with pytest.raises(ValueError, match=r"betas\[1\]"):
        Lion(ps, betas=(0.9, -0.1))
    with pytest.raises(TypeError, match="betas"):
        Lion(ps, betas=0.9)
    with pytest.raises(TypeError, match="model"):
        lion_for(ps, 1e-3, 0.1)
    with pytest.raises(ValueError, match="lr"):
        lion_for(torch.nn.Linear(2, 2), float("nan"), 0.1)
    with pytest.raises(TypeError, match="optimizer"):
        state_numel("adamw")
