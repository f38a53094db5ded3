"""Scenes and videos whose text is known exactly: what chapter 7's tiny VLMs learn to describe and answer.

    ds = caption_scenes("train", n=1000)    # images [N,3,H,W], captions, questions with answers, probes, masks
    ds.captions[0]       'a small red circle on the left and a large blue square at the top'
    ds.qa[0][0]          QA(question='what colour is the circle', answer='red', kind='colour')
    vids = moving_shapes_videos("train", n=200)   # images [N,T,3,H,W], captions, boxes [N,3,T,4], masks

A scene holds 1-3 shapes (square, circle, triangle, cross; all different) in red, green, blue or yellow,
small or large, each at its own place (left, right, top, bottom, centre), on a dark plain or lightly
textured background. Because the generator chose every object, every answer is known: colour, size, place
and shape of an object, how many there are, what is left of / right of / above / below it, whether a
(colour, shape) is there. ``probes`` are POPE-style yes/no presence questions for hallucination tests: per
scene one object that is there and one that is not (half "random" absentees, half "adversarial" ones that
share the shape or the colour of an object in the scene), so yes and no are exactly balanced.

Questions end on the word they hinge on, with no "?" ("what colour is the circle"): the answer is predicted at
that word, so the LM finds the object in one attention hop from there. With a trailing "?" it needs two (first
fetch the word, then the object): measured with oracle visual tokens, a 2x32 TinyLM (GPT-2 init) learned the colour
question in ~150 steps instead of >600 (tied head) or ~400 (untied).

Conventions of ``vitlab.data.scenes.cluttered_scenes``: deterministic for (split, seed, img_size); drawn in
chunks of 250 items, each chunk with its own seeded generators, so the first k items do not depend on ``n``;
cached (treat the tensors as read-only). ``VOCAB`` holds every word any caption, question or answer uses.
"""
from __future__ import annotations

import functools
import math
import random
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from vitlab.checks import check_int
from vitlab.data.dataset import SPLITS, check_split
from vitlab.data.procedural import blobs, coverage, one_thread, pixel_grid, seeded_generator, shape_sd

__all__ = ["caption_scenes", "moving_shapes_videos", "CaptionScenes", "MovingShapes", "SceneObject", "MovingObject",
           "QA", "VOCAB", "COLOURS", "SHAPES", "SIZES", "POSITIONS", "MOTIONS", "QUESTION_KINDS", "PROBE_KINDS",
           "SCENE_SIZES", "VIDEO_SIZES"]

COLOURS = ("red", "green", "blue", "yellow")
SHAPES = ("square", "circle", "triangle", "cross")
SIZES = ("small", "large")
POSITIONS = ("left", "right", "top", "bottom", "centre")
MOTIONS = ("right", "left", "up", "down", "still")
NUMBERS = ("one", "two", "three")
QUESTION_KINDS = ("colour", "size", "position", "shape", "count", "relation", "exist")
PROBE_KINDS = ("present", "absent_random", "absent_adversarial")
VOCAB = tuple(dict.fromkeys(
    COLOURS + SHAPES + SIZES + POSITIONS + MOTIONS + NUMBERS
    + ("a", "and", "on", "at", "in", "the", "what", "colour", "size", "shape", "is", "where", "how", "many", "shapes",
       "are", "there", "of", "above", "below", "nothing", "yes", "no", "moves", "up", "down", "then", "stays")))

SCENE_SIZES = {"train": 4000, "val": 500, "test": 1000}
VIDEO_SIZES = {"train": 1000, "val": 200, "test": 400}  # [T,3,H,W] each: 1,000 videos of 8 frames are ~100 MB
_CHUNK = 250
_SALT_SCENES, _SALT_VIDEOS = 7001, 7002  # keep these streams apart from cluttered_scenes' (seed, split, chunk)
_RGB = {"red": (0.9, 0.12, 0.1), "green": (0.1, 0.8, 0.15), "blue": (0.15, 0.3, 1.0), "yellow": (0.95, 0.88, 0.1)}
_HALF = {"small": 0.08, "large": 0.13}  # half-size as a fraction of img_size
_AT = {"left": (0.5, 0.2), "right": (0.5, 0.8), "top": (0.2, 0.5), "bottom": (0.8, 0.5), "centre": (0.5, 0.5)}
_CELL = {"left": (1, 0), "right": (1, 2), "top": (0, 1), "bottom": (2, 1), "centre": (1, 1)}  # (row, col)
_PHRASE = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom",
           "centre": "in the centre"}
_JITTER = 0.015  # of img_size: places never touch
_OPPOSITE = {"right": "left", "left": "right", "up": "down", "down": "up"}


class SceneObject(NamedTuple):
    colour: str
    shape: str
    size: str
    position: str


class MovingObject(NamedTuple):
    colour: str
    shape: str
    size: str
    motion: str  # one of MOTIONS: the direction it starts in
    bounces: bool  # it hit a wall and came back (the caption says "moves right then left")


class QA(NamedTuple):
    question: str
    answer: str  # one word
    kind: str  # one of QUESTION_KINDS, or of PROBE_KINDS for probes


@dataclass(frozen=True)
class CaptionScenes:
    """images float32 [N,3,H,W] in [0,1]; masks uint8 [N,H,W] (0 background, k: ``objects[i][k-1]``'s pixels);
    per scene: its objects, a caption, its questions (``qa``) and two presence probes (one yes, one no)."""
    images: Tensor
    masks: Tensor
    objects: tuple[tuple[SceneObject, ...], ...]
    captions: tuple[str, ...]
    qa: tuple[tuple[QA, ...], ...]
    probes: tuple[tuple[QA, QA], ...]
    split: str

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def questions(self) -> list[list[str]]:
        return [[q.question for q in row] for row in self.qa]

    @property
    def answers(self) -> list[list[str]]:
        return [[q.answer for q in row] for row in self.qa]

    def items(self, kinds=None, *, source: str = "qa") -> list[tuple[int, QA]]:
        """Flat (scene index, QA) pairs of ``source`` ("qa" or "probes"), only ``kinds`` if given."""
        if source not in ("qa", "probes"):
            raise ValueError(f"CaptionScenes.items: source must be 'qa' or 'probes', got {source!r}")
        valid = QUESTION_KINDS if source == "qa" else PROBE_KINDS
        kinds = _check_kinds(kinds, valid, "CaptionScenes.items")
        rows = self.qa if source == "qa" else self.probes
        return [(i, q) for i, row in enumerate(rows) for q in row if q.kind in kinds]

    def subset(self, indices) -> "CaptionScenes":
        idx = _check_indices(indices, len(self), "CaptionScenes.subset")
        return CaptionScenes(self.images[idx], self.masks[idx], *(tuple(t[i] for i in idx.tolist()) for t in (
            self.objects, self.captions, self.qa, self.probes)), split=self.split)


@dataclass(frozen=True)
class MovingShapes:
    """images float32 [N,T,3,H,W] in [0,1]; masks uint8 [N,T,H,W] (0 background, k: object k-1, visible pixels,
    later objects drawn on top); boxes float32 [N,3,T,4]: each object's whole extent (x0, y0, x1, y1) per frame
    in [0,1] image coordinates (zeros for slots past ``len(objects[i])``); a caption per video."""
    images: Tensor
    masks: Tensor
    boxes: Tensor
    objects: tuple[tuple[MovingObject, ...], ...]
    captions: tuple[str, ...]
    split: str

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def num_objects(self) -> Tensor:
        return torch.tensor([len(o) for o in self.objects])

    def subset(self, indices) -> "MovingShapes":
        idx = _check_indices(indices, len(self), "MovingShapes.subset")
        return MovingShapes(self.images[idx], self.masks[idx], self.boxes[idx],
                            *(tuple(t[i] for i in idx.tolist()) for t in (self.objects, self.captions)),
                            split=self.split)


def _check_kinds(kinds, valid, fn: str) -> tuple[str, ...]:
    if kinds is None:
        return tuple(valid)
    kinds = (kinds,) if isinstance(kinds, str) else tuple(kinds)
    bad = [k for k in kinds if k not in valid]
    if bad or not kinds:
        raise ValueError(f"{fn}: kinds must be a non-empty subset of {valid}, got {kinds!r}")
    return kinds


def _check_indices(indices, n: int, fn: str) -> Tensor:
    idx = torch.as_tensor(indices)
    if idx.dtype == torch.bool:
        idx = idx.nonzero().flatten()
    if idx.dim() != 1 or idx.dtype not in (torch.int64, torch.int32) or (len(idx) and not (
            0 <= int(idx.min()) and int(idx.max()) < n)):
        raise ValueError(f"{fn}: indices must be 1-D ints in 0..{n - 1} or a bool mask, got {indices!r}")
    return idx.long()


def _check_args(fn: str, split, seed, img_size, n, default: int) -> int:
    check_split(split, fn)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"{fn}: seed must be an int, got {seed!r}")
    check_int(img_size, "img_size", fn, low=16, high=128)
    return default if n is None else check_int(n, "n", fn)


def _rng(*keys: int) -> random.Random:
    """The discrete choices (layouts, questions) of one chunk: a Python RNG seeded from the same keys."""
    return random.Random(int(np.random.SeedSequence([k % 2**64 for k in keys] + [1]).generate_state(1)[0]))


# ---------------------------------------------------------------------------------------------- drawing
def _signed_distance(shape: str, u: Tensor, v: Tensor, r: Tensor) -> Tensor:
    """Signed distance in px (negative inside) of an upright shape of half-size r centred at u = v = 0."""
    if shape == "square":
        return shape_sd(0, u, v, r, None)
    if shape == "circle":
        return shape_sd(1, u, v, r, None)
    if shape == "triangle":  # circumradius 1.25 r, its box centred: apex up
        big = 1.25 * r
        return shape_sd(3, u, v - big / 4, big, None)
    arm = r / 3  # cross: two bars of half-thickness r/3
    return torch.minimum(torch.maximum(u.abs() - r, v.abs() - arm), torch.maximum(v.abs() - r, u.abs() - arm))


def _alpha(kind: Tensor, cy: Tensor, cx: Tensor, r: Tensor, size: int) -> Tensor:
    """[M,H,W] coverage of shape ``SHAPES[kind]`` centred at (cy, cx) px with half-size r px, all [M]."""
    yy, xx = pixel_grid(size)
    u, v = xx - cx[:, None, None], yy - cy[:, None, None]
    rr = r[:, None, None].expand_as(u)
    sd = torch.empty(len(kind), size, size)
    for k, shape in enumerate(SHAPES):
        i = (kind == k).nonzero().flatten()
        if i.numel():
            sd[i] = _signed_distance(shape, u[i], v[i], rr[i])
    return coverage(sd)


def _background(m: int, size: int, g: torch.Generator) -> Tensor:
    """[m,3,H,W]: dark grey (0-0.3, a slight tint), half of them with a faint texture (amplitude 0.1)."""
    level = 0.3 * torch.rand(m, 1, 1, 1, generator=g) + 0.03 * (torch.rand(m, 3, 1, 1, generator=g) - 0.5)
    texture = (blobs(m, size, g) - 0.5) * 0.1 * (torch.rand(m, 1, 1, 1, generator=g) < 0.5)
    return (level + texture).expand(m, 3, size, size).clamp(0, 1)


def _colours(names, g: torch.Generator) -> Tensor:
    base = torch.tensor([_RGB[c] for c in names]).reshape(-1, 3)
    return (base + 0.1 * (torch.rand(base.shape, generator=g) - 0.5)).clamp(0, 1)


def _draw(img: Tensor, masks: Tensor, slots: list[list[tuple]], size: int, g: torch.Generator) -> Tensor:
    """Composite up to 3 objects per image in slot order. ``slots[s]`` lists (image row, shape, colour, cy, cx, r)
    for slot s; ``masks`` [M,H,W] gets s+1 where slot s covers more than half a pixel. Returns every drawn
    object's whole alpha [M,3,H,W] (occlusion ignored: for boxes)."""
    full = torch.zeros(img.shape[0], 3, size, size)
    for s, objs in enumerate(slots):
        if not objs:
            continue
        row = torch.tensor([o[0] for o in objs])
        kind = torch.tensor([SHAPES.index(o[1]) for o in objs])
        cy, cx, r = (torch.tensor([o[k] for o in objs], dtype=torch.float32) for k in (3, 4, 5))
        alpha = _alpha(kind, cy, cx, r, size)
        colour = _colours([o[2] for o in objs], g)
        img[row] = img[row] * (1 - alpha[:, None]) + colour[:, :, None, None] * alpha[:, None]
        masks[row] = torch.where(alpha > 0.5, s + 1, masks[row]).to(masks.dtype)
        full[row, s] = alpha
    return full


def _grain(img: Tensor, g: torch.Generator) -> Tensor:
    return (img + 0.02 * torch.randn(img.shape, generator=g)).clamp(0, 1)


# ---------------------------------------------------------------------------------------------- scenes
def _layout(rng: random.Random) -> tuple[SceneObject, ...]:
    k = rng.randint(1, 3)
    shapes, places = rng.sample(SHAPES, k), rng.sample(POSITIONS, k)
    return tuple(SceneObject(rng.choice(COLOURS), s, rng.choice(SIZES), p) for s, p in zip(shapes, places))


def _describe(o) -> str:
    return f"a {o.size} {o.colour} {o.shape}"


def _caption(objs) -> str:
    return " and ".join(f"{_describe(o)} {_PHRASE[o.position]}" for o in objs)


def _relation(o: SceneObject, objs, direction: str) -> str | None:
    """The shape of the one other object ``direction`` of ``o`` ("nothing" if none, None if several)."""
    r, c = _CELL[o.position]
    test = {"left": lambda rr, cc: cc < c, "right": lambda rr, cc: cc > c, "above": lambda rr, cc: rr < r,
            "below": lambda rr, cc: rr > r}[direction]
    hits = [p.shape for p in objs if p is not o and test(*_CELL[p.position])]
    return "nothing" if not hits else hits[0] if len(hits) == 1 else None


def _absent(objs, rng: random.Random, adversarial: bool) -> tuple[str, str]:
    """A (colour, shape) not in the scene; adversarial: it shares the colour or the shape of an object there."""
    there = {(o.colour, o.shape) for o in objs}
    pool = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in there]
    if adversarial:
        pool = [(c, s) for c, s in pool if any(c == o.colour or s == o.shape for o in objs)]
    return rng.choice(pool)


def _questions(objs, rng: random.Random) -> tuple[tuple[QA, ...], tuple[QA, QA]]:
    qa = []
    for o in objs:
        qa += [QA(f"what colour is the {o.shape}", o.colour, "colour"),
               QA(f"what size is the {o.shape}", o.size, "size"),
               QA(f"where is the {o.shape}", o.position, "position"),
               QA(f"what shape is {_PHRASE[o.position]}", o.shape, "shape")]
    qa.append(QA("how many shapes are there", NUMBERS[len(objs) - 1], "count"))
    for o in objs:
        direction = rng.choice(("left", "right", "above", "below"))
        answer = _relation(o, objs, direction)
        if answer is not None:
            of = " of" if direction in ("left", "right") else ""
            qa.append(QA(f"what is {direction}{of} the {o.shape}", answer, "relation"))
    here = rng.choice(objs)
    for colour, shape, answer in ((here.colour, here.shape, "yes"), (*_absent(objs, rng, False), "no")):
        qa.append(QA(f"is there a {colour} {shape}", answer, "exist"))
    here, adversarial = rng.choice(objs), rng.random() < 0.5
    absent = _absent(objs, rng, adversarial)
    probes = (QA(f"is there a {here.colour} {here.shape}", "yes", "present"),
              QA(f"is there a {absent[0]} {absent[1]}", "no",
                 "absent_adversarial" if adversarial else "absent_random"))
    return tuple(qa), probes


def _scene_chunk(seed: int, split_id: int, chunk: int, size: int):
    keys = (seed, split_id, chunk, _SALT_SCENES)
    rng, g = _rng(*keys), seeded_generator(*keys)
    layouts = [_layout(rng) for _ in range(_CHUNK)]
    texts = [_questions(objs, rng) for objs in layouts]
    img = _background(_CHUNK, size, g)
    masks = torch.zeros(_CHUNK, size, size, dtype=torch.uint8)
    slots = [[] for _ in range(3)]
    for i, objs in enumerate(layouts):
        for s, o in enumerate(objs):
            fy, fx = (f + _JITTER * (2 * rng.random() - 1) for f in _AT[o.position])
            slots[s].append((i, o.shape, o.colour, fy * size, fx * size, _HALF[o.size] * size))
    _draw(img, masks, slots, size, g)
    return _grain(img, g), masks, layouts, [_caption(o) for o in layouts], texts


@functools.lru_cache(maxsize=8)
def _caption_scenes(split: str, seed: int, size: int, n: int):
    parts = []
    with one_thread():
        for chunk in range(math.ceil(n / _CHUNK)):
            parts.append(_scene_chunk(seed, SPLITS.index(split), chunk, size))
    images, masks = (torch.cat([p[k] for p in parts])[:n].contiguous() for k in (0, 1))
    objects, captions, texts = (tuple(x for p in parts for x in p[k])[:n] for k in (2, 3, 4))
    return images, masks, objects, captions, tuple(t[0] for t in texts), tuple(t[1] for t in texts)


def caption_scenes(split: str = "train", *, seed: int = 0, img_size: int = 32, n: int | None = None
                   ) -> CaptionScenes:
    """Scenes of 1-3 coloured shapes with a templated caption, questions with known answers and presence probes.

    Default sizes: train 4000 / val 500 / test 1000. ``img_size`` in 16..128 (32: a large shape spans ~8 px).
    """
    n = _check_args("caption_scenes", split, seed, img_size, n, SCENE_SIZES.get(split, 0))
    images, masks, objects, captions, qa, probes = _caption_scenes(split, seed, img_size, n)
    return CaptionScenes(images, masks, objects, captions, qa, probes, split)


# ---------------------------------------------------------------------------------------------- videos
def _bounce(x0: float, step: float, lo: float, hi: float, frames: int) -> tuple[list[float], bool]:
    """Positions over ``frames`` of a point moving ``step`` px a frame, reflected at lo and hi."""
    span, out, bounced = hi - lo, [], False
    for t in range(frames):
        x = x0 + step * t
        bounced |= not lo <= x <= hi
        u = (x - lo) % (2 * span)
        out.append(lo + (u if u <= span else 2 * span - u))
    return out, bounced


def _video_layout(rng: random.Random, frames: int, size: int):
    """Objects and their centre tracks [(ys, xs)] for one video."""
    k = rng.randint(1, 3)
    objects, tracks = [], []
    for shape in rng.sample(SHAPES, k):
        colour, sz, motion = rng.choice(COLOURS), rng.choice(SIZES), rng.choice(MOTIONS)
        r = _HALF[sz] * size
        lo, hi = 1.1 * r + 0.5, size - 1.1 * r - 0.5  # the shape stays inside the frame
        y0, x0 = rng.uniform(lo, hi), rng.uniform(lo, hi)
        speed = rng.uniform(1.0, 2.0) * size / 32
        vy, vx = {"right": (0, speed), "left": (0, -speed), "up": (-speed, 0), "down": (speed, 0),
                  "still": (0, 0)}[motion]
        ys, by = _bounce(y0, vy, lo, hi, frames)
        xs, bx = _bounce(x0, vx, lo, hi, frames)
        objects.append(MovingObject(colour, shape, sz, motion, by or bx))
        tracks.append((ys, xs, r))
    return tuple(objects), tracks


def _video_caption(objs) -> str:
    def verb(o):
        if o.motion == "still":
            return "stays still"
        return f"moves {o.motion}" + (f" then {_OPPOSITE[o.motion]}" if o.bounces else "")
    return " and ".join(f"{_describe(o)} {verb(o)}" for o in objs)


def _boxes(alpha: Tensor) -> Tensor:
    """[...,H,W] coverage -> [...,4] normalised (x0, y0, x1, y1) of the pixels over half covered (0 if none)."""
    on = alpha > 0.5
    h, w = on.shape[-2:]
    rows, cols = on.any(-1), on.any(-2)  # [...,H], [...,W]
    y0, x0 = rows.float().argmax(-1), cols.float().argmax(-1)
    y1, x1 = h - rows.flip(-1).float().argmax(-1), w - cols.flip(-1).float().argmax(-1)
    box = torch.stack([x0 / w, y0 / h, x1 / w, y1 / h], dim=-1).float()
    return box * rows.any(-1, keepdim=True)


def _video_chunk(seed: int, split_id: int, chunk: int, frames: int, size: int):
    keys = (seed, split_id, chunk, frames, _SALT_VIDEOS)
    rng, g = _rng(*keys), seeded_generator(*keys)
    layouts = [_video_layout(rng, frames, size) for _ in range(_CHUNK)]
    img = _background(_CHUNK, size, g).repeat_interleave(frames, dim=0)  # a static background per video
    masks = torch.zeros(_CHUNK * frames, size, size, dtype=torch.uint8)
    slots = [[] for _ in range(3)]
    for i, (objs, tracks) in enumerate(layouts):
        for s, (o, (ys, xs, r)) in enumerate(zip(objs, tracks)):
            slots[s] += [(i * frames + t, o.shape, o.colour, ys[t], xs[t], r) for t in range(frames)]
    full = _draw(img, masks, slots, size, g)  # [M*T,3,H,W]
    boxes = _boxes(full).reshape(_CHUNK, frames, 3, 4).transpose(1, 2)  # [M,3,T,4]
    img = _grain(img, g).reshape(_CHUNK, frames, 3, size, size)
    objects = [objs for objs, _ in layouts]
    return img, masks.reshape(_CHUNK, frames, size, size), boxes.contiguous(), objects, \
        [_video_caption(o) for o in objects]


@functools.lru_cache(maxsize=4)
def _moving_shapes(split: str, seed: int, frames: int, size: int, n: int):
    with one_thread():
        parts = [_video_chunk(seed, SPLITS.index(split), c, frames, size) for c in range(math.ceil(n / _CHUNK))]
    images, masks, boxes = (torch.cat([p[k] for p in parts])[:n].contiguous() for k in (0, 1, 2))
    objects, captions = (tuple(x for p in parts for x in p[k])[:n] for k in (3, 4))
    return images, masks, boxes, objects, captions


def moving_shapes_videos(split: str = "train", *, seed: int = 0, frames: int = 8, img_size: int = 32,
                         n: int | None = None) -> MovingShapes:
    """Videos of 1-3 shapes moving in straight lines (right, left, up, down or still; bouncing off the walls),
    with a caption ("a small red square moves right then left and a large blue circle stays still"), per-object
    boxes per frame and per-frame object masks (segments and tracks for TrajViT).

    Default sizes: train 1000 / val 200 / test 400. Speeds are 1-2 px a frame at 32 px (scaled with img_size).
    """
    n = _check_args("moving_shapes_videos", split, seed, img_size, n, VIDEO_SIZES.get(split, 0))
    frames = check_int(frames, "frames", "moving_shapes_videos", low=1, high=64)
    images, masks, boxes, objects, captions = _moving_shapes(split, seed, frames, img_size, n)
    return MovingShapes(images, masks, boxes, objects, captions, split)
