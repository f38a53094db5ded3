"""The ViT with its Triton kernels switched on (interpreter on CPU, compiled on CUDA) equals the PyTorch path."""
import pytest
import torch

from vitlab.kernels._dispatch import use_triton
from vitlab.models import create_model

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not use_triton(torch.empty(1, device=DEVICE)), reason="needs CUDA or TRITON_INTERPRET=1")


def test_kernels_on_equals_kernels_off_forward_backward_and_side_outputs():
    torch.manual_seed(0)
    ref = create_model("vit_nano", depth=1, use_kernels=False).to(DEVICE)
    fused = create_model("vit_nano", depth=1, use_kernels=True).to(DEVICE)
    fused.load_state_dict(ref.state_dict())
    x = torch.rand(2, 1, 28, 28, device=DEVICE)
    out_ref, side_ref = ref.forward_with_attention(x, side=("cls", "colsum"))
    out_fused, side_fused = fused.forward_with_attention(x, side=("cls", "colsum"))
    assert torch.allclose(out_fused, out_ref, atol=1e-4)
    for key in ("cls", "colsum"):
        assert torch.allclose(side_fused[0][key].float(), side_ref[0][key].float(), atol=1e-5)
    out_ref.square().sum().backward()
    out_fused.square().sum().backward()
    for (name, p_ref), p_fused in zip(ref.named_parameters(), fused.parameters()):
        assert torch.allclose(p_fused.grad, p_ref.grad, atol=1e-4, rtol=1e-3), name


def test_set_kernels_turns_them_off():
    m = create_model("vit_nano", use_kernels=True).set_kernels(False)
    assert not any(getattr(mod, "use_kernels", False) for mod in m.modules())


def test_blocks_use_the_fused_add_layernorm(monkeypatch):
    """Each block's "x + attention branch, then norm2" is one add+LayerNorm kernel call (with the residual)."""
    import vitlab.kernels.layernorm as LN

    calls = []
    real = LN.layer_norm

    def spy(x, weight, bias, eps=1e-6, residual=None):
        calls.append(residual is not None)
        return real(x, weight, bias, eps=eps, residual=residual)

    monkeypatch.setattr(LN, "layer_norm", spy)
    model = create_model("vit_nano", depth=2, use_kernels=True).to(DEVICE)
    model(torch.rand(2, 1, 28, 28, device=DEVICE))
    assert calls.count(True) == 2  # one fused add+norm per block (norm1 and the final norm are plain)
