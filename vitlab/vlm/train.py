"""Training and scoring the chapter-7 models, on ``vitlab.train.fit`` (AdamW, warm-up + cosine, grad clipping,
seeding, tqdm, time budgets) through its ``step_fn`` hook.

    hist = train_vlm(vlm, caption_scenes("train", n=2000), steps=600, kinds=("colour", "count"))
    answer_accuracy(vlm, caption_scenes("test", n=500), kinds=("colour", "count"), per_kind=True)
    hist = train_clip(clip, caption_scenes("train"), seconds=40)

How fit is driven: its "labels" are item indices (scene or video numbers). ``train_vlm``'s step draws one of
each scene's questions at random (a seeded generator); ``train_clip``'s step pairs each item with its caption.
fit reports training accuracy as argmax(logits) == label, so the step hands it logits whose argmax is the label
exactly when the item was right: every answer token under teacher forcing (VLM), the image's top text in the
batch is its own caption (CLIP). Videos [N,T,C,H,W] travel through fit as [N,T*C,H,W] and are unfolded again.

Reference points (one CPU core; ViT patch 8 depth 2 width 32, TinyLM 2x32, 2,000 train / 300 test scenes, seed 0):
  colour questions only, from scratch, 600 steps (37 s): 60 % test (chance 25 %).
  all seven kinds at once, from scratch, 1,500 steps: 39 %, no better than answering each template's most
    frequent answer: the vision tower gets too little signal.
  train_clip first (600 steps, 16 s: test R@1 0.62 i2t / 0.68 t2i, zero-shot colour of 1-object scenes 100 %),
    then all kinds for 1,500 steps: 47 % (colour 59, exist 66, count 37; position and shape still at chance).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from vitlab.checks import check_int
from vitlab.train import fit
from .clip import TinyCLIP, clip_loss
from .data import CaptionScenes, MovingShapes
from .model import TinyVLM, answer_loss, pack_answers
from .tokenizer import WordTokenizer

__all__ = ["train_vlm", "train_clip", "predict_answers", "answer_accuracy", "qa_tensors", "contrastive_objective",
           "qa_objective", "seeded_entry"]


def _fit_logits(correct: torch.Tensor, labels: torch.Tensor, n: int) -> torch.Tensor:
    """[B, n + 1] logits with argmax == labels where ``correct``, else the spare column n."""
    logits = torch.zeros(len(labels), n + 1, device=labels.device)
    logits[torch.arange(len(labels), device=labels.device), torch.where(correct, labels, n)] = 1.0
    return logits


def _tokenizer(tokenizer, model_vocab: int | None, fn: str) -> WordTokenizer:
    tok = WordTokenizer() if tokenizer is None else tokenizer
    if not isinstance(tok, WordTokenizer):
        raise TypeError(f"{fn}: tokenizer must be a WordTokenizer, got {type(tok).__name__}")
    if model_vocab is not None and len(tok) > model_vocab:
        raise ValueError(f"{fn}: the tokenizer has {len(tok)} tokens but the model's vocab_size is {model_vocab}")
    return tok


def _fit_defaults(kw: dict, desc: str) -> dict:
    # label smoothing has no meaning here; the step calls the model itself, so torch.compile is opt-in
    return {"label_smoothing": 0.0, "compile": False, "desc": desc, **kw}


def qa_tensors(data: CaptionScenes, tokenizer: WordTokenizer, kinds=None):
    """Every (scene, question, answer) of ``kinds`` as tensors: scene [M], text [M, L] (prompt then answer +
    <eos>) and labels [M, L] (the answer and <eos>; ``IGNORE`` elsewhere), ready for ``answer_loss``."""
    items = data.items(kinds)
    if not items:
        raise ValueError(f"qa_tensors: no questions of kinds {kinds!r} in these {len(data)} scenes")
    prompts, _ = tokenizer.batch_encode([q.question for _, q in items])
    answers, _ = tokenizer.batch_encode([q.answer for _, q in items], eos=True)
    text, labels = pack_answers(prompts, answers, tokenizer.pad_id)
    return torch.tensor([i for i, _ in items]), text, labels


class QuestionSampler:
    """One random question of ``kinds`` for each scene of a batch: the step every chapter-7 VLM trains with.

    ``sampler(idx)`` -> (text [B, L], labels [B, L]) for scene indices ``idx`` into ``data``. The draws come from the
    sampler's own generator (seeded with ``seed``), so they follow the batches and nothing else. ``scenes``: the
    scenes that have a question of ``kinds``; asking for any other raises."""

    def __init__(self, data: CaptionScenes, tokenizer: WordTokenizer | None = None, kinds=None, *, seed: int = 0):
        if not isinstance(data, CaptionScenes):
            raise TypeError(f"QuestionSampler: data must be CaptionScenes, got {type(data).__name__}")
        seed = check_int(seed, "seed", "QuestionSampler", low=0)
        scene, self.text, self.labels = qa_tensors(data, tokenizer or WordTokenizer(), kinds)
        self.kinds = kinds
        self.scenes = torch.unique(scene)
        self.start = torch.searchsorted(scene, torch.arange(len(data)))  # items are grouped by scene, in order
        self.count = torch.bincount(scene, minlength=len(data))
        self.gen = torch.Generator().manual_seed(seed)

    def __call__(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        i = idx.cpu()
        if (self.count[i] == 0).any():
            raise ValueError(f"QuestionSampler: scenes {i[self.count[i] == 0][:5].tolist()} have no question of kinds "
                             f"{self.kinds!r}")
        j = self.start[i] + (torch.rand(len(i), generator=self.gen) * self.count[i]).long()
        return self.text[j], self.labels[j]


def train_vlm(model: TinyVLM, data: CaptionScenes, *, steps: int | None = None, lr: float = 1e-3,
              batch_size: int = 64, seed: int = 0, kinds=None, tokenizer: WordTokenizer | None = None,
              **fit_kwargs) -> dict:
    """Train on ``data``'s questions of ``kinds`` (default: all), each step one random question per scene of the
    batch. ``fit_kwargs`` go to ``vitlab.train.fit`` (``seconds=``, ``weight_decay=``, ``warmup=``, ``device=``,
    ``progress=``...). Returns fit's history (train_acc = teacher-forced exact answers)."""
    if not isinstance(model, TinyVLM):
        raise TypeError(f"train_vlm: model must be a TinyVLM, got {type(model).__name__}")
    if not isinstance(data, CaptionScenes):
        raise TypeError(f"train_vlm: data must be CaptionScenes (vitlab.vlm.caption_scenes), got {type(data).__name__}")
    tok = _tokenizer(tokenizer, model.lm.vocab_size, "train_vlm")
    questions = QuestionSampler(data, tok, kinds, seed=check_int(seed, "seed", "train_vlm", low=0) + 1)
    keep = questions.scenes  # scenes with at least one question of these kinds

    def step(net: nn.Module, images: torch.Tensor, idx: torch.Tensor):
        text, labels = questions(keep[idx.cpu()])
        logits = net(images, text.to(images.device))
        loss, correct = answer_loss(logits, labels.to(images.device), return_correct=True)
        return loss, _fit_logits(correct, idx, len(keep))

    return fit(model, (data.images[keep], torch.arange(len(keep))), steps=steps, lr=lr, batch_size=batch_size,
               seed=seed, step_fn=step, **_fit_defaults(fit_kwargs, "vlm"))


def train_clip(model: TinyCLIP, data, *, steps: int | None = None, lr: float = 1e-3, batch_size: int = 64,
               seed: int = 0, tokenizer: WordTokenizer | None = None, **fit_kwargs) -> dict:
    """Contrastive training on (image or video, caption) pairs of ``CaptionScenes`` or ``MovingShapes``.
    ``fit_kwargs`` go to ``vitlab.train.fit``. Returns fit's history (train_acc = in-batch image->text top-1)."""
    if not isinstance(model, TinyCLIP):
        raise TypeError(f"train_clip: model must be a TinyCLIP, got {type(model).__name__}")
    if not isinstance(data, (CaptionScenes, MovingShapes)):
        raise TypeError(f"train_clip: data must be CaptionScenes or MovingShapes, got {type(data).__name__}")
    tok = _tokenizer(tokenizer, getattr(model.text_encoder, "vocab_size", None), "train_clip")
    text, _ = tok.batch_encode(list(data.captions), eos=True)
    shape = data.images.shape[1:]
    images = data.images.flatten(1, 2) if data.images.ndim == 5 else data.images  # fit wants [N, C, H, W]

    def step(net: nn.Module, x: torch.Tensor, idx: torch.Tensor):
        logits = net(x.view(-1, *shape), text[idx.cpu()].to(x.device))
        correct = logits.argmax(1) == torch.arange(len(idx), device=x.device)
        return clip_loss(logits), _fit_logits(correct, idx, len(images))

    return fit(model, (images, torch.arange(len(images))), steps=steps, lr=lr, batch_size=batch_size, seed=seed,
               step_fn=step, **_fit_defaults(fit_kwargs, "clip"))


@torch.no_grad()
def predict_answers(model: TinyVLM, data: CaptionScenes, *, kinds=None, source: str = "qa",
                    tokenizer: WordTokenizer | None = None, batch_size: int = 256) -> tuple[list, list[str]]:
    """Greedy answers to ``data``'s questions (``source``: "qa" or "probes"; only ``kinds`` if given):
    (items [(scene, QA)], predicted strings). Questions are batched by token length (no padding in prompts)."""
    if not isinstance(model, TinyVLM):
        raise TypeError(f"predict_answers: model must be a TinyVLM, got {type(model).__name__}")
    if not isinstance(data, CaptionScenes):
        raise TypeError(f"predict_answers: data must be CaptionScenes, got {type(data).__name__}")
    check_int(batch_size, "batch_size", "predict_answers")
    tok = _tokenizer(tokenizer, model.lm.vocab_size, "predict_answers")
    items = data.items(kinds, source=source)
    if not items:
        raise ValueError(f"predict_answers: no questions of kinds {kinds!r} in these {len(data)} scenes")
    prompts = [tok.encode(q.question) for _, q in items]
    max_new = max(len(tok.encode(q.answer)) for _, q in items) + 1  # the answer, then <eos>
    device = next(model.parameters()).device
    preds: list[str] = [""] * len(items)
    by_len: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_len.setdefault(len(p), []).append(i)
    was = model.training
    model.eval()
    for rows in by_len.values():
        for b in range(0, len(rows), batch_size):
            part = rows[b:b + batch_size]
            images = data.images[[items[i][0] for i in part]].to(device)
            ids = torch.tensor([prompts[i] for i in part], device=device)
            out = model.generate(images, ids, max_new).cpu().tolist()
            for i, seq in zip(part, out):
                seq = seq[:seq.index(tok.eos_id)] if tok.eos_id in seq else seq
                preds[i] = tok.decode(seq)
    model.train(was)
    return items, preds


def answer_accuracy(model: TinyVLM, data: CaptionScenes, *, kinds=None, source: str = "qa", per_kind: bool = False,
                    tokenizer: WordTokenizer | None = None, batch_size: int = 256):
    """Exact-match accuracy of greedy answers in [0, 1]; ``per_kind``: a dict {kind: acc, ..., "all": acc}."""
    items, preds = predict_answers(model, data, kinds=kinds, source=source, tokenizer=tokenizer,
                                   batch_size=batch_size)
    hits = [p == q.answer for (_, q), p in zip(items, preds)]
    overall = sum(hits) / len(hits)
    if not per_kind:
        return overall
    out = {}
    for kind in dict.fromkeys(q.kind for _, q in items):
        h = [hit for (_, q), hit in zip(items, hits) if q.kind == kind]
        out[kind] = sum(h) / len(h)
    return {**out, "all": overall}



def contrastive_objective(train_text, validate, measure, *, eval_every: int, curve: tuple[str, ...]):
    """A zoo objective for a ``TinyCLIP``-like model: each step CLIP's symmetric InfoNCE (``clip_loss``) of every
    item of the batch with its caption, the dataset's labels being item indices into ``train_text(images)`` (token
    ids [N_train, L], built once, on the first step). Every ``eval_every`` steps ``validate(model)`` gives one float
    per name of ``curve`` (the plateau curve). The checkpoint stores ``measure(model, split)`` for "test" and "val"
    (``test_*``, ``val_*``), the learned temperature ``logit_scale`` and the curve (``val_curve_step``,
    ``val_curve_<name>``)."""
    from vitlab import zoo

    eval_every = check_int(eval_every, "eval_every", "contrastive_objective")
    for name, f in (("train_text", train_text), ("validate", validate), ("measure", measure)):
        if not callable(f):
            raise TypeError(f"contrastive_objective: {name} must be callable, got {type(f).__name__}")
    state = {"step": 0, "curve": []}

    def val_point(net):
        values = tuple(validate(net))
        if len(values) != len(curve):
            raise ValueError(f"contrastive_objective: validate gave {len(values)} values for the curve {curve}")
        state["curve"].append((state["step"], *values))

    def step_fn(net, images, idx):
        if "text" not in state:
            state["text"] = train_text(images)
        if state["step"] % eval_every == 0:
            was = net.training
            val_point(net)
            net.train(was)
        state["step"] += 1
        return clip_loss(net(images, state["text"][idx.cpu()].to(images.device))), None

    def metrics(model, train, val, test):
        val_point(model)
        v, t = measure(model, "val"), measure(model, "test")
        points = state["curve"]
        return {**{f"test_{k}": x for k, x in t.items()}, **{f"val_{k}": x for k, x in v.items()},
                "logit_scale": float(model.scale.detach()), "val_curve_step": [c[0] for c in points],
                **{f"val_curve_{name}": [c[j + 1] for c in points] for j, name in enumerate(curve)}}

    return zoo.Objective(step_fn=step_fn, metrics=metrics)


def qa_objective(kinds, *, data_seed: int, seed: int, eval_every: int, validate, measure, logits=None):
    """A zoo objective for a ``TinyVLM`` answering ``caption_scenes`` questions, as ``train_vlm`` trains one: each
    step one random question of ``kinds`` per scene of the batch (a ``QuestionSampler`` over
    ``caption_scenes("train", seed=data_seed)`` at the batch's image size, drawing with ``seed + 1``; the dataset's
    labels are scene indices) and answer-only cross-entropy (``answer_loss``) of
    ``logits(net, images, text, labels, idx)`` (default ``net(images, text)``). Every ``eval_every`` steps, and once
    at the end, ``validate(model, img_size)`` (the model unwrapped; its training mode restored after) adds a point to
    the curve; the checkpoint stores ``measure(model, train, curve)`` (curve: [(step, value)])."""
    from vitlab import zoo
    from vitlab.train import unwrap
    from .data import caption_scenes

    fn = "qa_objective"
    data_seed, seed = check_int(data_seed, "data_seed", fn, low=0), check_int(seed, "seed", fn, low=0)
    eval_every = check_int(eval_every, "eval_every", fn)
    for name, f in (("validate", validate), ("measure", measure)):
        if not callable(f):
            raise TypeError(f"{fn}: {name} must be callable, got {type(f).__name__}")
    if logits is not None and not callable(logits):
        raise TypeError(f"{fn}: logits must be callable or None, got {type(logits).__name__}")
    state = {"step": 0, "curve": []}

    def step_fn(net, images, idx):
        if "questions" not in state:
            cs = caption_scenes("train", seed=data_seed, img_size=images.shape[-1])
            state["questions"] = QuestionSampler(cs, WordTokenizer(), kinds, seed=seed + 1)
            if len(state["questions"].scenes) < len(cs):
                raise ValueError(f"{fn}: {len(cs) - len(state['questions'].scenes)} training scenes have no question "
                                 f"of kinds {tuple(kinds)}")
        if state["step"] % eval_every == 0:
            model = unwrap(net)
            was = model.training
            state["curve"].append((state["step"], validate(model, images.shape[-1])))
            model.train(was)
        state["step"] += 1
        text, labels = state["questions"](idx)
        text, labels = text.to(images.device), labels.to(images.device)
        out = net(images, text) if logits is None else logits(net, images, text, labels, idx)
        return answer_loss(out, labels), None

    def metrics(model, train, val, test):
        state["curve"].append((state["step"], validate(model, train.images.shape[-1])))
        return measure(model, train, state["curve"])

    return zoo.Objective(step_fn=step_fn, metrics=metrics)


def seeded_entry(prefix: str, seed: int, seeds, long: bool = False, fn: str = "entry_name") -> str:
    """A chapter-7 zoo entry: ``<prefix>_s<seed>`` for a seed in ``seeds``, or with ``long=True`` the plateau check
    ``<prefix>_long_s<seed>``, which exists for the first seed only (seed 0 trained twice as long). ``fn`` names
    the caller in the error a wrong seed gets."""
    allowed = tuple(seeds)[:1] if long else tuple(seeds)
    if isinstance(seed, bool) or seed not in allowed:
        raise ValueError(f"{fn}: seed must be one of {allowed}, got {seed!r}")
    return f"{prefix}_long_s{seed}" if long else f"{prefix}_s{seed}"
