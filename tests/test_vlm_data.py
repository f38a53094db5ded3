"""vitlab.vlm.data: scenes and videos whose text is known exactly. Every answer is recomputed here from the object
list (or the pixels), independently of the generator's own helpers."""
import pytest
import torch

from vitlab.vlm import (COLOURS, QUESTION_KINDS, SHAPES, VOCAB, WordTokenizer, caption_scenes,
                        moving_shapes_videos)
from vitlab.vlm import data as D

N = 300  # crosses the 250-scene chunk boundary
CELL = {"left": (1, 0), "right": (1, 2), "top": (0, 1), "bottom": (2, 1), "centre": (1, 1)}
NUMBER = {1: "one", 2: "two", 3: "three"}


@pytest.fixture(scope="module")
def scenes():
    return caption_scenes("train", n=N, seed=3)


@pytest.fixture(scope="module")
def videos():
    return moving_shapes_videos("train", n=40, seed=3)


def test_scenes_are_deterministic_and_prefixes_agree(scenes):
    D._caption_scenes.cache_clear()  # render again, not the cached tensors
    again = caption_scenes("train", n=N, seed=3)
    assert torch.equal(again.images, scenes.images) and again.qa == scenes.qa and again.probes == scenes.probes
    short = caption_scenes("train", n=7, seed=3)
    assert torch.equal(short.images, scenes.images[:7]) and short.captions == scenes.captions[:7]
    assert short.qa == scenes.qa[:7] and torch.equal(short.masks, scenes.masks[:7])
    other = caption_scenes("train", n=7, seed=4)
    assert not torch.equal(other.images, short.images) and other.captions != short.captions
    assert caption_scenes("test", n=7, seed=3).captions != short.captions


def test_scene_tensors(scenes):
    x = scenes.images
    assert x.shape == (N, 3, 32, 32) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    assert scenes.masks.shape == (N, 32, 32) and scenes.masks.dtype == torch.uint8
    assert len(scenes) == len(scenes.objects) == len(scenes.captions) == len(scenes.qa) == len(scenes.probes) == N
    assert caption_scenes("val", n=3, img_size=48).images.shape == (3, 3, 48, 48)


def test_objects_are_drawn_where_and_as_the_list_says(scenes):
    base = {c: torch.tensor(v) for c, v in D._RGB.items()}
    for i in range(40):
        objs = scenes.objects[i]
        assert 1 <= len(objs) <= 3 and int(scenes.masks[i].max()) == len(objs)
        assert len({o.shape for o in objs}) == len(objs) and len({o.position for o in objs}) == len(objs)
        for k, o in enumerate(objs):
            on = scenes.masks[i] == k + 1
            assert on.sum() >= 4, (i, o)
            ys, xs = on.nonzero(as_tuple=True)
            cy, cx = ys.float().mean() / 32, xs.float().mean() / 32
            row, col = CELL[o.position]
            assert abs(cy - (0.2, 0.5, 0.8)[row]) < 0.1 and abs(cx - (0.2, 0.5, 0.8)[col]) < 0.1, (i, o)
            mean = scenes.images[i][:, on].mean(1)
            nearest = min(base, key=lambda c: (base[c] - mean).norm())
            assert nearest == o.colour, (i, o, mean)
        big = [(scenes.masks[i] == k + 1).sum().item() for k, o in enumerate(objs) if o.size == "large"]
        small = [(scenes.masks[i] == k + 1).sum().item() for k, o in enumerate(objs) if o.size == "small"]
        if big and small:
            assert min(big) > max(small) * 0.9


def _relation(o, objs, direction):
    r, c = CELL[o.position]
    hits = [p.shape for p in objs if p != o and {
        "left": CELL[p.position][1] < c, "right": CELL[p.position][1] > c,
        "above": CELL[p.position][0] < r, "below": CELL[p.position][0] > r}[direction]]
    return "nothing" if not hits else hits[0] if len(hits) == 1 else None


def test_answers_agree_with_the_object_list(scenes):
    seen = set()
    for objs, caption, qa in zip(scenes.objects, scenes.captions, scenes.qa):
        by_shape = {o.shape: o for o in objs}
        assert caption.count(" and ") == len(objs) - 1
        for o in objs:
            assert f"a {o.size} {o.colour} {o.shape}" in caption
        for q, a, kind in qa:
            seen.add(kind)
            words = q.split()
            if kind == "count":
                assert a == NUMBER[len(objs)]
            elif kind in ("colour", "size", "position"):
                assert a == getattr(by_shape[words[-1]], kind)
            elif kind == "shape":
                assert a == next(o.shape for o in objs if q.endswith(o.position))
            elif kind == "relation":
                assert a == _relation(by_shape[words[-1]], objs, words[2])
            else:
                assert a == ("yes" if (words[-2], words[-1]) in {(o.colour, o.shape) for o in objs} else "no")
        assert [q.kind for q in qa].count("colour") == len(objs)
    assert seen == set(QUESTION_KINDS)


def test_presence_probes_are_balanced_and_true(scenes):
    kinds = []
    for objs, (yes, no) in zip(scenes.objects, scenes.probes):
        there = {(o.colour, o.shape) for o in objs}
        assert (yes.answer, no.answer) == ("yes", "no") and yes.kind == "present"
        assert tuple(yes.question.split()[3:5]) in there
        colour, shape = no.question.split()[3:5]
        assert (colour, shape) not in there
        if no.kind == "absent_adversarial":
            assert any(colour == o.colour or shape == o.shape for o in objs)
        kinds.append(no.kind)
    assert 0.35 < kinds.count("absent_adversarial") / len(kinds) < 0.65
    assert [a for _, q in scenes.items(source="probes") for a in [q.answer]].count("yes") == N


def test_every_word_is_in_the_vocabulary(scenes, videos):
    tok = WordTokenizer()
    texts = list(scenes.captions) + [t for row in scenes.qa + scenes.probes for q in row for t in q[:2]]
    texts += list(videos.captions)
    words = {w for t in texts for w in tok.split(t)}
    assert words <= set(VOCAB)
    assert {"red", "cross", "centre", "moves", "stays", "three", "nothing"} <= words


def test_items_and_subset(scenes):
    colour = scenes.items("colour")
    assert all(q.kind == "colour" for _, q in colour) and len(colour) == sum(len(o) for o in scenes.objects)
    sub = scenes.subset([5, 2])
    assert torch.equal(sub.images, scenes.images[[5, 2]]) and sub.qa == (scenes.qa[5], scenes.qa[2])
    assert sub.questions[0] == [q.question for q in scenes.qa[5]]


def test_videos(videos):
    assert videos.images.shape == (40, 8, 3, 32, 32) and 0 <= videos.images.min() and videos.images.max() <= 1
    assert videos.masks.shape == (40, 8, 32, 32) and videos.boxes.shape == (40, 3, 8, 4)
    D._moving_shapes.cache_clear()
    again = moving_shapes_videos("train", n=40, seed=3)
    assert torch.equal(again.images, videos.images) and again.captions == videos.captions
    assert torch.equal(moving_shapes_videos("train", n=3, seed=3).boxes, videos.boxes[:3])
    for i, objs in enumerate(videos.objects):
        assert len(videos.captions[i].split(" and ")) == len(objs)
        assert (videos.boxes[i, len(objs):] == 0).all()
        for k, o in enumerate(objs):
            box = videos.boxes[i, k]  # [T,4] (x0, y0, x1, y1)
            assert (box[:, 2] > box[:, 0]).all() and (box[:, 3] > box[:, 1]).all()
            centre = (box[:, :2] + box[:, 2:]) / 2
            step = centre[1] - centre[0]
            axis, sign = {"right": (0, 1), "left": (0, -1), "down": (1, 1), "up": (1, -1), "still": (0, 0)}[o.motion]
            if o.motion == "still":
                assert (box == box[0]).all() and not o.bounces and "stays still" in videos.captions[i]
            else:
                drift = (centre[:, 1 - axis] - centre[0, 1 - axis]).abs().max()
                assert drift <= 1 / 32  # along one axis only (±1 px of aliasing across it)
                moves = f"{o.colour} {o.shape} moves {o.motion}"
                assert moves + (" then" if o.bounces else "") in videos.captions[i]
                if not o.bounces:  # monotonic, at least one pixel in all
                    assert ((centre[1:, axis] - centre[:-1, axis]) * sign >= 0).all() and step[axis] * sign > 0
            for t in range(8):  # visible pixels lie inside the box
                ys, xs = (videos.masks[i, t] == k + 1).nonzero(as_tuple=True)
                if len(ys):
                    assert xs.min() >= box[t, 0] * 32 - 1e-4 and xs.max() + 1 <= box[t, 2] * 32 + 1e-4
                    assert ys.min() >= box[t, 1] * 32 - 1e-4 and ys.max() + 1 <= box[t, 3] * 32 + 1e-4
    assert {o.motion for objs in videos.objects for o in objs} == {"right", "left", "up", "down", "still"}
    assert any(o.bounces for objs in videos.objects for o in objs)
    assert {o.colour for objs in videos.objects for o in objs} == set(COLOURS)
    assert {o.shape for objs in videos.objects for o in objs} == set(SHAPES)


@pytest.mark.parametrize("fn, kwargs, match", [
    (caption_scenes, {"split": "valid"}, "caption_scenes: unknown split 'valid'"),
    (caption_scenes, {"n": 0}, "caption_scenes: n must be an int >= 1"),
    (caption_scenes, {"img_size": 8}, r"caption_scenes: img_size must be an int in \[16, 128\]"),
    (caption_scenes, {"seed": 1.5}, "caption_scenes: seed must be an int"),
    (moving_shapes_videos, {"frames": 0}, r"moving_shapes_videos: frames must be an int in \[1, 64\]"),
    (moving_shapes_videos, {"n": True}, "moving_shapes_videos: n must be an int"),
])
def test_bad_arguments(fn, kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        fn(**kwargs)


def test_bad_kinds_and_indices(scenes):
    with pytest.raises(ValueError, match="kinds must be a non-empty subset"):
        scenes.items("colours")
    with pytest.raises(ValueError, match="source must be 'qa' or 'probes'"):
        scenes.items(source="pope")
    with pytest.raises(ValueError, match="indices must be 1-D ints in 0..299"):
        scenes.subset([300])
