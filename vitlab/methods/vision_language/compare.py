"""Chapter 7's comparison: the chapter's ways of changing what a VLM's LM reads, on one task and one budget.

The shared setting is the LLaVA-UHD lesson's (``llava_uhd_v3``): colour and size questions about captioned scenes
at 32 px, a ``TinyVLM`` (course ViT 4 x 64 at patch 4, MLP projector, 2 x 64 ``TinyLM``), one base
``ch7_uhd_base`` (2,500 steps from scratch), and every trained row fine-tuned from that base with one recipe
(``llava_uhd_v3.FT_FIT``, ``STEPS`` = 800 steps, the objective ``"vlm_qa"``, the same data and seeds 0, 1, 2):

    row        what the LM reads                                     entries
    p4         the base's 64 patch tokens (the control)              ch7_uhd_p4_s*        (LLaVA-UHD lesson)
    p8         a plain ViT at patch 8: 16 tokens                     ch7_uhd_p8_s*        (LLaVA-UHD lesson)
    rpe_wtc    LLaVA-UHD v3: patch 2 + two 2 x 2 merges: 16 tokens   ch7_uhd_rpe_wtc_s*   (LLaVA-UHD lesson)
    sp         LLaVA-SP: 6 pooling spatial tokens + the 64: 70       ch7_cmp_sp_s*        (trained here)
    pad        BUS's patch-abstraction decoder: 8 summary tokens     ch7_cmp_pad_s*       (trained here)
    hiprune_k  HiPrune keeps k = 21 or 7 of p4's 64 tokens           training-free on ch7_uhd_p4_s*
    random_k   random k of p4's 64 tokens (HiPrune's control)        training-free on ch7_uhd_p4_s*

``sp`` and ``pad`` start from the base like the LLaVA-UHD variants (``CompareVLM.start_from``): encoder and LM
copied, the base's MLP projector copied into the new projector's patch path, the new parts (LLaVA-SP's pooling
branch, BUS's decoder queries and layer) fresh. Seed 0 of p4, p8, sp and pad is also trained twice as long
(``ch7_cmp_<row>_long_s0``; rpe_wtc's is the LLaVA-UHD lesson's): the plateau check, and the comparison again at
twice the steps.

What is not a row, and why (the notebook says it too):
- **BUS's text-aware selection (TSPS)** scores patches against a text tower's feature; the VLM has none (its LM reads
  the question after the image), so the BUS row is its decoder alone: the summarisation half of the method.
- **FastVLM** (FastViTHD) and **ViTamin** are new encoders: a fair row trains each from scratch with the base's
  budget (2,500 + 800 steps, 3 seeds), which the CPU budget of this comparison does not hold (the gpu profile's job).
- **DAMRO** changes decoding to suppress hallucinated objects, not the visual tokens; it needs the CLS row of the
  encoder's attention, which this ViT (average-pooled, no CLS) lacks.
- **TrajViT** tokenises videos.

Prompt-length, positions and greedy decoding are ``vitlab.vlm``'s; the pruned rows keep each kept token's position
(``hiprune.PrunedVLM``'s default). ``pruning_accuracy`` measures HiPrune and random pruning from one encoder pass per
p4 VLM (``hiprune.encode_scenes``), cached beside the checkpoint by ``zoo.measured`` under ``PRUNE_KEY``.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from vitlab.checks import check_choice, check_int
from vitlab.methods.vision_language import bus as B
from vitlab.methods.vision_language import hiprune as H
from vitlab.methods.vision_language import llava_sp as S
from vitlab.methods.vision_language import llava_uhd_v3 as U
from vitlab.vlm import TinyVLM, VisionProjector

__all__ = ["SEEDS", "KINDS", "TRAINED", "UHD_ROWS", "LONG_HERE", "PRUNE_METHODS", "BUDGETS", "ROWS", "LABELS",
           "PRUNE_KEY", "PADProjector", "CompareVLM", "compare_vlm", "entry_name", "row_vlm", "pruning_accuracy"]

SEEDS = U.SEEDS
KINDS = U.KINDS
UHD_ROWS = ("p4", "p8", "rpe_wtc")  # trained by the LLaVA-UHD lesson
TRAINED = ("sp", "pad")  # trained here, with the LLaVA-UHD fine-tune recipe
LONG_HERE = ("p4", "p8") + TRAINED  # their seed 0 trained twice as long here (rpe_wtc's by the LLaVA-UHD lesson)
PRUNE_METHODS = ("hiprune", "random")
BUDGETS = (21, 7)  # the HiPrune lesson's retentions: 33 % and 11 % of 64 (the paper's 192 and 64 of 576)
ROWS = UHD_ROWS + TRAINED + tuple(f"{m}_{k}" for m in PRUNE_METHODS for k in BUDGETS)
LABELS = {"p4": "ViT/4 (control)", "p8": "ViT/8", "rpe_wtc": "LLaVA-UHD v3 (RPE + WTC)",
          "sp": "LLaVA-SP (pooling)", "pad": "BUS decoder (PAD)",
          **{f"{m}_{k}": f"{'HiPrune' if m == 'hiprune' else 'random'} {k}" for m in PRUNE_METHODS for k in BUDGETS}}
PRUNE_KEY = "ch7cmp-prune-v1"  # zoo.measured's key for pruning_accuracy: change it when that function changes
PAD_QUERIES = 8  # the BUS lesson's


class PADProjector(nn.Module):
    """BUS's patch-abstraction decoder in front of an MLP projector: patch tokens [B, N, Dv] -> ``num_queries``
    learned queries read them (``bus.PatchAbstractionDecoder``) -> [B, num_queries, Dv] -> MLP -> [B, Q, lm_dim]."""

    def __init__(self, vit_dim: int, lm_dim: int, num_queries: int = PAD_QUERIES, num_heads: int = 4):
        super().__init__()
        self.pad = B.PatchAbstractionDecoder(vit_dim, num_queries, num_heads)
        self.patch_proj = VisionProjector(vit_dim, lm_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.patch_proj(self.pad(x))


class CompareVLM(TinyVLM):
    """A TinyVLM whose projector has a ``patch_proj`` (an MLP ``VisionProjector``) beside new parts;
    ``start_from(base)`` copies a base TinyVLM's encoder and LM and its projector into ``patch_proj``."""

    def start_from(self, base) -> None:
        if not isinstance(base, TinyVLM) or not isinstance(base.projector, VisionProjector):
            raise TypeError(f"CompareVLM.start_from: base must be a TinyVLM with a VisionProjector, got "
                            f"{type(base).__name__}")
        self.vision_encoder.load_state_dict(base.vision_encoder.state_dict())
        self.projector.patch_proj.load_state_dict(base.projector.state_dict())
        self.lm.load_state_dict(base.lm.state_dict())


def compare_vlm(row: str = "sp", img_size: int = 32, in_chans: int = 3, num_classes: int = 0) -> CompareVLM:
    """The VLM of a trained row (``TRAINED``) on the LLaVA-UHD base's architecture: "sp" puts LLaVA-SP's pooling
    projector (6 spatial tokens + the 64 MLP-projected patches), "pad" BUS's 8-query decoder before the MLP.
    ``num_classes`` is ignored (the zoo passes the dataset's)."""
    check_choice(row, TRAINED, "row", "compare_vlm")
    base = U.base_vlm(img_size, in_chans)
    dim, lm_dim = U.VIT["embed_dim"], U.LM["dim"]
    if row == "sp":
        projector = S.SpatialProjector(dim, lm_dim, base.vision_encoder.patch_embed.grid_size[0], "pooling")
    else:
        projector = PADProjector(dim, lm_dim, num_heads=U.VIT["num_heads"])
    return CompareVLM(base.vision_encoder, projector, base.lm)


def entry_name(row: str, seed: int, long: bool = False) -> str:
    """The zoo entry of a row trained here, ``ch7_cmp_<row>_s<seed>``, or with ``long=True`` the plateau check
    ``ch7_cmp_<row>_long_s0`` (also for "p4"); an LLaVA-UHD row's own entry (``llava_uhd_v3.entry_name``)."""
    check_choice(row, UHD_ROWS + TRAINED, "row", "entry_name")
    if isinstance(seed, bool) or seed not in (SEEDS[:1] if long else SEEDS):
        raise ValueError(f"entry_name: seed must be one of {SEEDS[:1] if long else SEEDS}, got {seed!r}")
    if long and row in LONG_HERE:
        return f"ch7_cmp_{row}_long_s{seed}"
    if row in UHD_ROWS:
        return U.entry_name(row, seed, long)
    return f"ch7_cmp_{row}_s{seed}"


def row_vlm(row: str, seed: int, profile=None) -> TinyVLM:
    """The trained VLM of any row of ``ROWS`` for ``seed`` (a pruned row: ``hiprune.PrunedVLM`` on p4's VLM, the
    random one seeded by ``seed``)."""
    from vitlab import zoo

    check_choice(row, ROWS, "row", "row_vlm")
    if row in UHD_ROWS + TRAINED:
        return zoo.get(entry_name(row, seed), profile, progress=False)
    method, k = row.rsplit("_", 1)
    return H.PrunedVLM(zoo.get(entry_name("p4", seed), profile, progress=False), method, int(k), seed=seed)


@torch.no_grad()
def pruning_accuracy(vlm: TinyVLM, profile=None, *, seed: int = 0, n: int | None = None) -> dict:
    """Test answer accuracy (``KINDS``, per kind and "all") of ``vlm`` when its LM reads only the tokens each of
    ``PRUNE_METHODS`` keeps at each of ``BUDGETS``: ``{"<method>_<k>_<kind>": accuracy}``. One encoder pass
    (``hiprune.encode_scenes``), then only the LM per budget (``hiprune.kept_accuracy``); random draws from a
    generator seeded by ``seed``. ``n``: the first n test scenes (default all)."""
    from vitlab.vlm import caption_scenes

    fn = "pruning_accuracy"
    if not isinstance(vlm, TinyVLM):
        raise TypeError(f"{fn}: vlm must be a TinyVLM, got {type(vlm).__name__}")
    seed = check_int(seed, "seed", fn, low=0)
    test = caption_scenes("test", seed=U.DATA_SEED, n=None if n is None else check_int(n, "n", fn))
    vlm.eval()
    tokens, scores = H.encode_scenes(vlm, test.images)
    grid = vlm.vision_encoder.grid_size
    out = {}
    for method in PRUNE_METHODS:
        gen = torch.Generator().manual_seed(seed)
        for k in BUDGETS:
            idx = H.select(method, scores, k, grid, generator=gen)
            acc = H.kept_accuracy(vlm, test, tokens, idx, kinds=KINDS, per_kind=True)
            out.update({f"{method}_{k}_{kind}": v for kind, v in acc.items()})
    return out


def _register() -> None:
    from vitlab import zoo
    from vitlab.models.registry import MODELS, register_model

    if "ch7_cmp_vlm_sp" in MODELS:  # re-imported
        return
    for row in TRAINED:
        register_model(f"ch7_cmp_vlm_{row}", compare_vlm, row=row, img_size=32, in_chans=3, num_classes=0)
    common = dict(data="vlm_caption_scenes", data_kwargs=dict(img_size=32), data_seed=U.DATA_SEED,
                  shares={"smoke": "cpu"}, objective="vlm_qa", fit=dict(U.FT_FIT), init=U.BASE_ENTRY)
    runs = [(row, s, False) for row in TRAINED for s in SEEDS] + [(row, 0, True) for row in LONG_HERE]
    for row, seed, long in runs:
        model = U.model_name(row) if row in UHD_ROWS else f"ch7_cmp_vlm_{row}"
        zoo.register(entry_name(row, seed, long), zoo.Recipe(
            model=model, seed=seed,
            per_profile={p: dict(steps=n, max_train=None) for p, n in (U.LONG_STEPS if long else U.STEPS).items()},
            objective_kwargs=dict(data_seed=U.DATA_SEED, kinds=list(KINDS), seed=seed,
                                  eval_every=U.FT_EVAL_EVERY * (2 if long else 1)), **common))


_register()
