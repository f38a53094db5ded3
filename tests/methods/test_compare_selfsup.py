"""Chapter 5's comparison setting: one dataset and budget for every method, the fine-tunes' control, and the
representation and reconstruction readers on each kind of model."""
import pytest
import torch

from vitlab import zoo
from vitlab.methods.selfsup import compare as C
from vitlab.models import create_model


def test_every_pretraining_shares_the_dataset_and_budget():
    for method in C.METHODS:
        for seed in C.SEEDS:
            cfg = zoo.ZOO[C.pretrained_name(method, seed)].config("cpu")
            assert cfg["data"] == C.DATA[0] and cfg["data_kwargs"] == C.DATA[1]
            assert cfg["fit"] == {**C.BUDGET, "steps": C.STEPS["cpu"]} and cfg["seed"] == seed
    assert C.pretrained_name("hieratok", 1) == "hieratok_multiscale_digits_s1"  # the lesson's entries, reused


def test_finetunes_differ_only_in_their_start():
    for seed in C.SEEDS:
        cfgs = {s: dict(zoo.ZOO[C.finetuned_name(s, seed)].config("cpu")) for s in (*C.FINETUNED, "scratch")}
        scratch = cfgs.pop("scratch")
        for start, cfg in cfgs.items():
            assert cfg["fit"].pop("layer_decay") == C.LAYER_DECAY  # MAE's fine-tune recipe for pre-trained encoders
            assert cfg == scratch and cfg["max_train"] == C.LABELLED
            assert zoo.ZOO[C.finetuned_name(start, seed)].init == C.pretrained_name(start, seed)


@pytest.mark.parametrize("method", [m for m in C.METHODS if m != "hieratok"])
def test_representation_and_reconstruction_of_each_method(method):
    from vitlab import data as vdata

    x = vdata.load(*C.DATA[:1], "test", **C.DATA[1]).images[:6]
    torch.manual_seed(0)
    model = create_model(C.METHODS[method][0], num_classes=10)
    feats = C.representation(model, x, batch_size=4)
    assert feats.shape == (6, 64) and torch.isfinite(feats).all()
    losses = C.image_losses(model, x, batch_size=4)
    assert list(losses) == (["full"] if method == "vitvq" else ["masked"]) and list(losses.values())[0] > 0


def test_representation_reads_hieratok_before_its_bottleneck():
    from vitlab.models.registry import MODELS
    from vitlab.methods.selfsup.hieratok import hieratok_model

    torch.manual_seed(0)
    model = hieratok_model(**MODELS["hieratok_multiscale_digits"]).eval()
    x = torch.rand(3, 1, 16, 16)
    want = model.encode_tokens(model.embed(x)).mean(dim=1)
    torch.testing.assert_close(C.representation(model, x), want)
    assert list(C.image_losses(model, x)) == ["full"]


def test_bad_input():
    with pytest.raises(ValueError, match="method"):
        C.pretrained_name("simclr", 0)
    with pytest.raises(ValueError, match="start"):
        C.finetuned_name("vitvq", 0)
    with pytest.raises(ValueError, match="images"):
        C.representation(torch.nn.Linear(2, 2), torch.rand(2, 16))
    with pytest.raises(TypeError, match="no encoder known"):
        C.representation(torch.nn.Linear(2, 2), torch.rand(2, 1, 16, 16))


def test_measure_reads_probe_reconstruction_and_codes(monkeypatch):
    import vitlab.probe

    monkeypatch.setattr(vitlab.probe, "linear_probe", lambda *a, **k: {"acc": 0.5})  # the probe has its own tests
    torch.manual_seed(0)
    out = C.measure(create_model(C.METHODS["vitvq"][0], num_classes=10), "smoke")
    assert out["probe"] == 0.5 and set(out) == {"probe", "full", "used", "perplexity"}
    assert set(C.measure(create_model(C.METHODS["mae"][0], num_classes=10), "smoke")) == {"probe", "masked"}
