"""Bad input across the rest of the public API (measure, viz, stats, data, tokens, results, zoo, quant, kernels,
chapter 2's recipes and both CLIs): each raises a ValueError/TypeError (RuntimeError for a use-before-set-up) whose
message names the argument. Together with ``test_bad_input.py`` (models, forward, fit/evaluate, data loading) this
is the course's list of guarded mistakes; a new public function adds its rows here."""
import contextlib
import io
import warnings

import pytest
import torch

from vitlab import data, measure, quant, results, stats, tokens, viz, zoo
from vitlab.cli import course_parser, train_parser
from vitlab.data import ImageDataset, cluttered_scenes, long_tail_counts, long_tailed, patch_mask
from vitlab.kernels import gather, layer_norm, linear_gelu, merge
from vitlab.kernels.attention import attention, grid_coords
from vitlab.kernels.fake_quant import fake_quant
from vitlab.kernels.linear_attention import linear_attention
from vitlab.methods.efficient import recipes
from vitlab.models import create_model

X, Y = torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,))
DS = ImageDataset(X, Y, name="t", split="train", classes=[str(i) for i in range(10)])
q = torch.rand(1, 2, 8, 16)


def tiny():
    return create_model("vit_nano", depth=1)


def cli(parser, argv):
    """argparse's one-line error as a ValueError (argparse itself exits with status 2)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            parser().parse_args(argv)
        except SystemExit:
            raise ValueError(err.getvalue().strip().splitlines()[-1]) from None
    return "accepted"


CASES = [
    # measure
    ("accuracy model None", lambda: measure.accuracy(None, DS), TypeError, "model"),
    ("accuracy data junk", lambda: measure.accuracy(tiny(), "mnist"), TypeError, "data"),
    ("accuracy batch 0", lambda: measure.accuracy(tiny(), DS, batch_size=0), ValueError, "batch_size"),
    ("predict batch str", lambda: measure.predict(tiny(), DS, batch_size="8"), ValueError, "batch_size"),
    ("per_class num_classes 0", lambda: measure.per_class_accuracy(tiny(), DS, num_classes=0),
     ValueError, "num_classes"),
    ("count_params junk", lambda: measure.count_params("m"), TypeError, "model"),
    ("flops inputs list", lambda: measure.flops(tiny(), [1,2]), TypeError, "inputs"),
    ("flops wrong shape", lambda: measure.flops(tiny(), torch.rand(2,1,32,32)), ValueError, "img_size"),
    ("latency repeats 0", lambda: measure.latency(tiny(), X, repeats=0), ValueError, "repeats"),
    ("latency warmup -1", lambda: measure.latency(tiny(), X, warmup=-1), ValueError, "warmup"),
    ("token_cost n_dense 0", lambda: measure.token_cost([10,10], 0), ValueError, "n_dense"),
    ("token_cost empty", lambda: measure.token_cost([], 65), ValueError, "tokens_per_block"),
    ("token_cost mlp_ratio neg", lambda: measure.token_cost([10], 65, mlp_ratio=-1), ValueError, "mlp_ratio"),
    # viz
    ("image_grid 2d", lambda: viz.image_grid(torch.rand(8,8)), ValueError, "images"),
    ("image_grid ncols 0", lambda: viz.image_grid(X, ncols=0), ValueError, "ncols"),
    ("image_grid labels len", lambda: viz.image_grid(X, Y[:3]), ValueError, "labels"),
    ("image_grid titles len", lambda: viz.image_grid(X, titles=["a"]), ValueError, "titles"),
    ("attention_maps patch", lambda: viz.attention_maps(X, torch.rand(8, 16), patch_size=5), ValueError, "patch_size"),
    ("attention_maps count", lambda: viz.attention_maps(X, torch.rand(8, 15), patch_size=7), ValueError, "attn"),
    ("attention_maps alpha", lambda: viz.attention_maps(X, torch.rand(8, 16), patch_size=7, alpha=2),
     ValueError, "alpha"),
    ("attention_maps mode", lambda: viz.attention_maps(X, torch.rand(8, 16), patch_size=7, mode="cubic"),
     ValueError, "mode"),
    ("attention_maps label", lambda: viz.attention_maps(X, torch.rand(8, 16), patch_size=7, label=3),
     TypeError, "label"),
    ("training_curves junk", lambda: viz.training_curves("h"), TypeError, "history"),
    ("training_curves key", lambda: viz.training_curves({"epoch":[1],"train_loss":[1.0]}, keys=["val_acc"]),
     ValueError, "val_acc"),
    ("bar empty", lambda: viz.bar({}, ylabel="y"), TypeError, "values"),
    ("bar neg std", lambda: viz.bar({"a": (1, -1)}, ylabel="y"), ValueError, "values"),
    ("bar ylabel", lambda: viz.bar({"a": 1}, ylabel=3), TypeError, "ylabel"),
    ("pareto dup", lambda: viz.pareto([dict(name="a",x=1,y=1), dict(name="a",x=2,y=2)]), ValueError, "unique"),
    ("pareto inf", lambda: viz.pareto([dict(name="a",x=float("inf"),y=1)]), ValueError, "x=inf"),
    # stats
    ("spread empty", lambda: stats.spread([]), ValueError, "values"),
    ("spread nan", lambda: stats.spread([1, float("nan")]), ValueError, "values"),
    ("spread str", lambda: stats.spread(["a"]), ValueError, "values"),
    ("paired lengths", lambda: stats.paired_gap([1,2],[1]), ValueError, "one value per seed"),
    ("paired none", lambda: stats.paired_gap(None,[1]), TypeError, "method"),
    # data
    ("scenes split", lambda: cluttered_scenes("dev"), ValueError, "split"),
    ("scenes img_size", lambda: cluttered_scenes("test", img_size=7), ValueError, "img_size"),
    ("scenes in_chans", lambda: cluttered_scenes("test", in_chans=2), ValueError, "in_chans"),
    ("scenes n 0", lambda: cluttered_scenes("train", n=0), ValueError, "n"),
    ("scenes n str", lambda: cluttered_scenes("train", n="5"), ValueError, "n"),
    ("long_tail_counts imbalance", lambda: long_tail_counts(100, 10, 0.5), ValueError, "imbalance"),
    ("long_tail_counts classes", lambda: long_tail_counts(100, 0, 10), ValueError, "num_classes"),
    ("long_tailed ds", lambda: long_tailed("mnist", 10), TypeError, "ds"),
    ("patch_mask patch", lambda: patch_mask(torch.zeros(2, 28, 28, dtype=torch.bool), 5), ValueError, "patch_size"),
    ("patch_mask dims", lambda: patch_mask(torch.zeros(28, 28, dtype=torch.bool), 7), TypeError, "masks"),
    ("ImageDataset lengths", lambda: ImageDataset(X, Y[:3], name="t", split="train", classes=list("0123456789")),
     TypeError, "labels"),
    ("ImageDataset split", lambda: ImageDataset(X, Y, name="t", split="dev", classes=list("0123456789")),
     ValueError, "split"),
    ("ImageDataset 3d", lambda: ImageDataset(X[:,0], Y, name="t", split="train", classes=list("0123456789")),
     TypeError, "images"),
    ("subset out of range", lambda: DS.subset(torch.tensor([0, 99])), ValueError, "0..7"),
    ("load kwarg", lambda: data.load("mnist5k", "train", wings=1), TypeError, "wings"),
    ("load seed", lambda: data.load("mnist5k", "train", seed="0"), TypeError, "seed"),
    ("load allow_download", lambda: data.load("mnist5k", "train", allow_download="yes"), TypeError, "allow_download"),
    ("corrupt images type", lambda: data.corrupt([1,2], "blur", 1), TypeError, "images"),
    # tokens
    ("keep_top_k k 0", lambda: tokens.keep_top_k(torch.rand(2,5), 0), ValueError, "k"),
    ("keep_top_k k big", lambda: tokens.keep_top_k(torch.rand(2,5), 6), ValueError, "k"),
    ("keep_top_k 1d", lambda: tokens.keep_top_k(torch.rand(5), 2), ValueError, "scores"),
    ("gather idx float", lambda: tokens.gather_tokens(torch.rand(2,5,3), torch.rand(2,2)), ValueError, "idx"),
    ("gather batch", lambda: tokens.gather_tokens(torch.rand(2,5,3), torch.zeros(3,2, dtype=torch.long)),
     ValueError, "idx"),
    ("bsm r neg", lambda: tokens.bipartite_soft_matching(torch.rand(1,9,4), -1), ValueError, "r"),
    ("bsm 2d", lambda: tokens.bipartite_soft_matching(torch.rand(9,4), 2), ValueError, "metric"),
    ("merge_tokens dst", lambda: tokens.merge_tokens(torch.rand(1,5,3), None, torch.tensor([[0,1,9]]), 2),
     ValueError, "dst_index"),
    ("proportional_bias neg", lambda: tokens.proportional_bias(torch.tensor([[[-1.0]]])), ValueError, "size"),
    # results
    ("record claim", lambda: results.record("lesson_x", 3), ValueError, "claim"),
    # zoo
    ("zoo get profile", lambda: zoo.get("vit_tiny_scenes", "laptop"), ValueError, "profile"),
    ("zoo get name type", lambda: zoo.get(3), TypeError, "name"),
    ("zoo register dup", lambda: zoo.register("vit_tiny_scenes", zoo.ZOO["vit_tiny_scenes"]),
     ValueError, "already registered"),
    ("zoo load garbage", lambda: zoo.load_checkpoint(__file__), ValueError, "checkpoint"),
    ("zoo path_for", lambda: zoo.path_for("nope"), ValueError, "valid names"),
    # quant
    ("FakeQuantizer bits 0", lambda: quant.FakeQuantizer(bits=0), ValueError, "bits"),
    ("FakeQuantizer bits 33", lambda: quant.FakeQuantizer(bits=33), ValueError, "bits"),
    ("FakeQuantizer mode", lambda: quant.FakeQuantizer(mode="float"), ValueError, "mode"),
    ("FakeQuantizer method", lambda: quant.FakeQuantizer(method="best"), ValueError, "method"),
    ("FakeQuantizer uncalibrated", lambda: quant.FakeQuantizer()(torch.rand(3)), RuntimeError, "not calibrated"),
    ("range_params lo>hi", lambda: quant.range_params(torch.tensor(1.0), torch.tensor(0.0), 8), ValueError, "lo"),
    ("minmax bits", lambda: quant.minmax_params(torch.rand(4), 1.5), ValueError, "bits"),
    ("percentile q", lambda: quant.percentile_params(torch.rand(4), 8, q=1.5), ValueError, "q"),
    ("quantize_model w_bits", lambda: quant.quantize_model(tiny(), w_bits=0), ValueError, "w_bits"),
    ("quantize_model a_bits", lambda: quant.quantize_model(tiny(), a_bits="8"), ValueError, "a_bits"),
    ("quantize_model softmax", lambda: quant.quantize_model(tiny(), softmax_mode="exp"), ValueError, "softmax_mode"),
    ("quantize_model layer", lambda: quant.quantize_model(tiny(), layer_bits={"nope": (4,4)}), ValueError, "nope"),
    ("quantize_model model", lambda: quant.quantize_model("m"), TypeError, "model"),
    ("calibrate method", lambda: quant.calibrate_model(quant.quantize_model(tiny()), X, method="best"),
     ValueError, "method"),
    ("calibrate images", lambda: quant.calibrate_model(quant.quantize_model(tiny()), "x"), TypeError, "images"),
    ("calibrate float model", lambda: quant.calibrate_model(tiny(), X), ValueError, "quantize_model"),
    ("set_quant_state", lambda: quant.set_quant_state(quant.quantize_model(tiny()), weights="on"),
     TypeError, "weights"),
    ("QuantLinear bits", lambda: quant.QuantLinear(4, 4, w_bits=0), ValueError, "w_bits"),
    # kernels
    ("attention rank", lambda: attention(torch.rand(2,8,16), torch.rand(2,8,16), torch.rand(2,8,16)), ValueError, "q"),
    ("attention shapes", lambda: attention(q, torch.rand(1,2,8,8), torch.rand(1,2,8,16)), ValueError, "k"),
    ("attention dtype mix", lambda: attention(q, q.double(), q), TypeError, "dtype"),
    ("attention scale", lambda: attention(q, q, q, scale=-1.0), ValueError, "scale"),
    ("attention bias shape", lambda: attention(q, q, q, bias=torch.rand(3,3)), ValueError, "bias"),
    ("grid_coords", lambda: grid_coords(0, 4), ValueError, "grid_h"),
    ("layer_norm weight", lambda: layer_norm(torch.rand(2,8), torch.ones(4), torch.zeros(8)), ValueError, "weight"),
    ("layer_norm eps", lambda: layer_norm(torch.rand(2,8), torch.ones(8), torch.zeros(8), eps=-1), ValueError, "eps"),
    ("linear_gelu shape", lambda: linear_gelu(torch.rand(2,8), torch.rand(4,7)), ValueError, "weight"),
    ("merge num_dst", lambda: merge(torch.rand(1,5,3), None, torch.tensor([[0,1,2,0,1]]), 0), ValueError, "num_dst"),
    ("gather index", lambda: gather(torch.rand(1,3,3), torch.tensor([[0,5]])), ValueError, "dst_index"),
    ("fake_quant bits", lambda: fake_quant(torch.rand(4), 0.1, 0, 0), ValueError, "bits"),
    ("fake_quant mode", lambda: fake_quant(torch.rand(4), 0.1, 0, 8, mode="float"), ValueError, "mode"),
    ("fake_quant scale", lambda: fake_quant(torch.rand(4), -0.1, 0, 8), ValueError, "scale"),
    ("fake_quant axis", lambda: fake_quant(torch.rand(4,3), torch.ones(3), torch.zeros(3), 8, axis=5),
     ValueError, "axis"),
    ("linear_attention shapes", lambda: linear_attention(torch.rand(1,2,8,4), torch.rand(1,2,7,4), torch.rand(1,2,8,4)),
     ValueError, "k"),
    ("linear_attention eps", lambda: linear_attention(q, q, q, eps=0), ValueError, "eps"),
    # recipes (chapter 2)
    ("recipes method", lambda: recipes.method_entry("tome"), ValueError, "unknown method"),
    ("recipes measure_row", lambda: recipes.measure_row("x", "model", DS), TypeError, "Reduced"),
    ("recipes profile", lambda: recipes.finetune_steps("laptop"), ValueError, "profile"),
    # CLIs
    ("train cli model", lambda: cli(train_parser, ["--model", "vit_huge"]), ValueError, "--model"),
    ("train cli data", lambda: cli(train_parser, ["--data", "imagenet"]), ValueError, "--data"),
    ("train cli profile", lambda: cli(train_parser, ["--profile", "laptop"]), ValueError, "--profile"),
    ("train cli epochs 0", lambda: cli(train_parser, ["--epochs", "0"]), ValueError, "--epochs"),
    ("train cli steps str", lambda: cli(train_parser, ["--steps", "ten"]), ValueError, "--steps"),
    ("train cli seconds neg", lambda: cli(train_parser, ["--seconds", "-1"]), ValueError, "--seconds"),
    ("train cli two budgets", lambda: cli(train_parser, ["--epochs", "1", "--steps", "2"]),
     ValueError, "not allowed with"),
    ("train cli lr 0", lambda: cli(train_parser, ["--lr", "0"]), ValueError, "--lr"),
    ("train cli lr nan", lambda: cli(train_parser, ["--lr", "nan"]), ValueError, "--lr"),
    ("train cli wd neg", lambda: cli(train_parser, ["--weight-decay", "-1"]), ValueError, "--weight-decay"),
    ("train cli warmup neg", lambda: cli(train_parser, ["--warmup", "-0.1"]), ValueError, "--warmup"),
    ("train cli schedule", lambda: cli(train_parser, ["--schedule", "step"]), ValueError, "--schedule"),
    ("train cli optimizer", lambda: cli(train_parser, ["--optimizer", "adam2"]), ValueError, "--optimizer"),
    ("train cli batch 0", lambda: cli(train_parser, ["--batch-size", "0"]), ValueError, "--batch-size"),
    ("train cli ls", lambda: cli(train_parser, ["--label-smoothing", "-1"]), ValueError, "--label-smoothing"),
    ("train cli shift str", lambda: cli(train_parser, ["--shift", "x"]), ValueError, "--shift"),
    ("train cli seed str", lambda: cli(train_parser, ["--seed", "x"]), ValueError, "--seed"),
    ("train cli unknown", lambda: cli(train_parser, ["--wings", "2"]), ValueError, "--wings"),
    ("course cli profile", lambda: cli(course_parser, ["run", "--profile", "laptop"]), ValueError, "--profile"),
    ("course cli timeout", lambda: cli(course_parser, ["run", "--timeout", "0"]), ValueError, "--timeout"),
    ("course cli command", lambda: cli(course_parser, ["fly"]), ValueError, "fly"),
]


@pytest.mark.parametrize("call, exc, match", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_raises_a_clear_error(call, exc, match):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(exc, match=match):
            call()


def test_the_two_tables_hold_at_least_150_distinct_cases():
    import test_bad_input

    names = [c[0] for c in CASES + test_bad_input.CASES]
    assert len(set(names)) == len(names), "every case has its own name"
    assert len(CASES) + len(test_bad_input.CASES) >= 150
