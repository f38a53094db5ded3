"""Procedural grayscale "faces" with a known quality: ViT-FIQA's lesson set (chapter 6).

A face is drawn from its identity's parameters (face ellipse, skin tone, hairline, eye spacing / height / size,
brow angle / length, nose length, mouth width / height / curvature), then every image gets its own nuisances
(shift, small rotation, illumination gain, offset and gradient, background) and one graded degradation whose
strength is a known scalar ``severity`` in [0, 1] (0: clean):

    blur       Gaussian blur, sigma = 2.5 * severity px (at 32 px)
    noise      additive Gaussian noise, std = 0.35 * severity
    downup     down-scale to 32 / (1 + 5 * severity) px (antialiased) and back up (bilinear)
    occlusion  a box of side 20 * severity px (uniform gray) placed over the face

    images, ids, severity = face_images(256, identities=range(64), seed=0)   # [n,1,32,32], [n], [n] in [0,1]
    ds = vitlab.data.load("faces", "train")     # ImageDataset, labels = identity (64 seen identities)
    ds.severity                                  # float [N]: each image's known severity (plain attribute)
    ver = faces_verification(seed=0)             # 32 UNSEEN identities (64..95) for the verification protocol

Splits. ``faces(split)`` is closed-set identity classification over the ``N_SEEN`` = 64 training identities: train
192 / val 8 / test 8 images per identity, each split its own draw. Face recognition verifies people it never
trained on, so the lesson's verification protocol (genuine / impostor pairs, FNMR at fixed FMR, the EDC) runs on
``faces_verification``: identities ``N_SEEN``..``N_SEEN + N_UNSEEN - 1``, disjoint from every split of ``faces``.
An identity's parameters depend only on (``seed``, identity index), so identity k is the same person in every split.
``ImageDataset`` has no slot for a per-image scalar: ``faces`` sets ``ds.severity`` as a plain attribute, which
``subset`` / ``stratified_prefix`` do not carry (call ``face_images`` directly when you need both after a cut).
Deterministic given ``seed`` (torch generators only, no global RNG).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ..checks import check_int
from .dataset import ImageDataset, check_split

__all__ = ["DEGRADATIONS", "N_SEEN", "N_UNSEEN", "FACES_PER_ID", "identity_params", "render_faces", "degrade",
           "face_images", "faces", "faces_verification"]

DEGRADATIONS = ("blur", "noise", "downup", "occlusion")
N_SEEN = 64  # training identities (labels 0..63)
N_UNSEEN = 32  # verification identities 64..95, never trained on
FACES_PER_ID = {"train": 192, "val": 8, "test": 8}
VERIFICATION_PER_ID = 16
# identity parameters: name -> (low, high), drawn uniformly per identity
_PARAMS = {
    "face_rx": (0.52, 0.74), "face_ry": (0.68, 0.9), "skin": (0.55, 0.88), "hair_line": (-0.62, -0.28),
    "hair_tone": (0.05, 0.4), "eye_dx": (0.2, 0.38), "eye_y": (-0.22, 0.0), "eye_r": (0.06, 0.13),
    "brow_angle": (-0.45, 0.45), "brow_len": (0.12, 0.28), "brow_gap": (0.1, 0.2), "nose_len": (0.12, 0.34),
    "mouth_y": (0.32, 0.56), "mouth_w": (0.14, 0.4), "mouth_h": (0.03, 0.08), "mouth_curve": (-0.14, 0.14),
}
_SPLIT_INDEX = {"train": 0, "val": 1, "test": 2, "verification": 3}


def _gen(*keys: int) -> torch.Generator:
    s = 0
    for k in keys:
        s = (s * 1_000_003 + int(k)) % (2 ** 62)
    return torch.Generator().manual_seed(s)


def identity_params(identities, seed: int = 0) -> Tensor:
    """float32 [len(identities), len(_PARAMS)]: each identity's face parameters (columns in ``_PARAMS`` order),
    a function of (seed, identity index) only."""
    seed = check_int(seed, "seed", "identity_params", low=0)
    ids = _check_ids(identities, "identity_params")
    lo = torch.tensor([v[0] for v in _PARAMS.values()])
    hi = torch.tensor([v[1] for v in _PARAMS.values()])
    rows = [lo + (hi - lo) * torch.rand(len(_PARAMS), generator=_gen(seed, 7, k)) for k in ids.tolist()]
    return torch.stack(rows) if rows else torch.zeros(0, len(_PARAMS))


def _check_ids(identities, fn: str) -> Tensor:
    try:
        ids = torch.as_tensor(list(identities) if not isinstance(identities, Tensor) else identities)
    except (TypeError, ValueError):
        raise TypeError(f"{fn}: identities must be a sequence of non-negative ints, got {identities!r}") from None
    if ids.ndim != 1 or (ids.numel() and (ids.dtype.is_floating_point or ids.dtype == torch.bool)):
        raise TypeError(f"{fn}: identities must be a 1-D sequence of non-negative ints, got {identities!r}")
    ids = ids.long()
    if ids.numel() and int(ids.min()) < 0:
        raise ValueError(f"{fn}: identities must be non-negative, got min {int(ids.min())}")
    return ids


def _soft(d: Tensor, sharp: float) -> Tensor:
    """Soft inside-indicator of the region d < 1."""
    return torch.sigmoid(sharp * (1 - d))


def render_faces(params: Tensor, nuisance: Tensor, img_size: int = 32) -> Tensor:
    """Clean faces [n, 1, S, S] in [0, 1]. ``params`` [n, P] (``identity_params`` rows, one per image);
    ``nuisance`` [n, 7]: shift x, shift y (in units of the half-width), rotation (rad), gain, offset, horizontal
    illumination gradient, background level. Drawn at 2x and average-pooled (antialiasing)."""
    n = params.shape[0]
    S2 = 2 * img_size
    t = (torch.arange(S2, dtype=torch.float32) + 0.5) / S2 * 2 - 1
    v, u = torch.meshgrid(t, t, indexing="ij")  # v down, u right, in [-1, 1]
    u, v = u.expand(n, S2, S2), v.expand(n, S2, S2)
    col = {k: params[:, i].view(n, 1, 1) for i, k in enumerate(_PARAMS)}
    dx, dy, rot, gain, off, grad, bg = (nuisance[:, i].view(n, 1, 1) for i in range(7))
    # inverse similarity: the face's own coordinates at each pixel
    uu, vv = u - dx, v - dy
    c, s = torch.cos(rot), torch.sin(rot)
    x, y = c * uu + s * vv, -s * uu + c * vv
    sharp = 40.0
    img = bg.expand(n, S2, S2).clone()
    face = _soft(torch.sqrt((x / col["face_rx"]) ** 2 + ((y - 0.05) / col["face_ry"]) ** 2), sharp)
    img = img * (1 - face) + col["skin"] * face
    hair = face * torch.sigmoid(sharp * (col["hair_line"] - y))
    img = img * (1 - hair) + col["hair_tone"] * hair
    for side in (-1.0, 1.0):
        ex, ey, er = side * col["eye_dx"], col["eye_y"], col["eye_r"]
        eye = _soft(torch.sqrt(((x - ex) / (1.4 * er)) ** 2 + ((y - ey) / er) ** 2), sharp)
        img = img * (1 - eye) + 0.08 * eye
        # brow: a thin bar above the eye, tilted by brow_angle (mirrored between the sides)
        by = ey - er - col["brow_gap"] * 0.6
        a = side * col["brow_angle"]
        bx_, by_ = x - ex, y - by
        along = torch.cos(a) * bx_ + torch.sin(a) * by_
        across = -torch.sin(a) * bx_ + torch.cos(a) * by_
        brow = _soft(torch.maximum((along / col["brow_len"]).abs(), (across / 0.045).abs()), sharp / 2)
        img = img * (1 - brow) + 0.15 * brow
    nose_top, nose_len = col["eye_y"] + 0.05, col["nose_len"]
    nose = _soft(torch.maximum((x / 0.05).abs(), ((y - nose_top - nose_len / 2) / (nose_len / 2)).abs()), sharp / 2)
    img = img * (1 - 0.6 * nose) + 0.6 * nose * (col["skin"] * 0.6)
    mouth_y = col["mouth_y"] - col["mouth_curve"] * (x / col["mouth_w"]) ** 2
    mouth = _soft(torch.sqrt((x / col["mouth_w"]) ** 2 + ((y - mouth_y) / col["mouth_h"]) ** 2), sharp)
    img = img * (1 - mouth) + 0.2 * mouth
    img = img * gain * (1 + grad * u) + off  # illumination: gain, horizontal gradient, offset
    img = F.avg_pool2d(img.unsqueeze(1), 2)
    return img.clamp(0, 1)


def _blur(img: Tensor, sigma: float) -> Tensor:
    if sigma < 0.05:
        return img
    r = max(1, int(math.ceil(3 * sigma)))
    k = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=torch.float32) / sigma) ** 2)
    k = k / k.sum()
    x = F.pad(img[None], (r, r, r, r), mode="replicate")
    x = F.conv2d(x, k.view(1, 1, 1, -1))
    x = F.conv2d(x, k.view(1, 1, -1, 1))
    return x[0]


def degrade(images: Tensor, severity: Tensor, kinds: Tensor, seed: int = 0) -> Tensor:
    """Each image [n, 1, S, S] degraded by its kind (index into ``DEGRADATIONS``) at its severity in [0, 1];
    severity 0 leaves it unchanged. Returns a new tensor clamped to [0, 1]."""
    fn = "degrade"
    if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[1] != 1:
        raise ValueError(f"{fn}: images must be a [n, 1, S, S] tensor, got "
                         f"{tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__}")
    n, _, S, _ = images.shape
    if not isinstance(severity, Tensor) or severity.shape != (n,) or not severity.dtype.is_floating_point:
        raise ValueError(f"{fn}: severity must be a float tensor [{n}], got {severity!r:.80}")
    if (severity < 0).any() or (severity > 1).any():
        raise ValueError(f"{fn}: severity must lie in [0, 1], got {float(severity.min()):g}..{float(severity.max()):g}")
    if not isinstance(kinds, Tensor) or kinds.shape != (n,) or kinds.dtype != torch.int64 \
            or (n and (int(kinds.min()) < 0 or int(kinds.max()) >= len(DEGRADATIONS))):
        raise ValueError(f"{fn}: kinds must be an int64 tensor [{n}] of indices into {DEGRADATIONS}")
    g = _gen(check_int(seed, "seed", fn, low=0), 11)
    out = images.clone()
    for i in range(n):
        s, kind = float(severity[i]), DEGRADATIONS[int(kinds[i])]
        if s == 0:
            continue
        if kind == "blur":
            out[i] = _blur(out[i], 2.5 * s)
        elif kind == "noise":
            out[i] = out[i] + 0.35 * s * torch.randn(out[i].shape, generator=g)
        elif kind == "downup":
            small = max(3, int(round(S / (1 + 5 * s))))
            x = F.interpolate(out[i][None], size=(small, small), mode="bilinear", antialias=True,
                              align_corners=False)
            out[i] = F.interpolate(x, size=(S, S), mode="bilinear", align_corners=False)[0]
        else:  # occlusion: a uniform box over the face's central region
            side = int(round(20 * s * S / 32))
            if side > 0:
                y0 = int(torch.randint(S // 4 - side // 2, max(S // 4 - side // 2 + 1, 3 * S // 4 - side // 2),
                                       (1,), generator=g).clamp(0, S - side))
                x0 = int(torch.randint(S // 4 - side // 2, max(S // 4 - side // 2 + 1, 3 * S // 4 - side // 2),
                                       (1,), generator=g).clamp(0, S - side))
                out[i, :, y0:y0 + side, x0:x0 + side] = float(torch.rand(1, generator=g)) * 0.8 + 0.1
    return out.clamp(0, 1)


def face_images(n: int, identities=range(N_SEEN), *, seed: int = 0, img_size: int = 32, stream: int = 0,
                max_severity: float = 1.0):
    """``n`` degraded faces: (images float32 [n, 1, S, S] in [0, 1], identity int64 [n] (taken in turn from
    ``identities``, then shuffled), severity float32 [n] uniform in [0, ``max_severity``], kind int64 [n] (index
    into ``DEGRADATIONS``, uniform)). ``stream`` separates independent draws (the splits use 0..3). Deterministic
    given (seed, stream)."""
    fn = "face_images"
    n = check_int(n, "n", fn, low=1)
    seed = check_int(seed, "seed", fn, low=0)
    img_size = check_int(img_size, "img_size", fn, low=8)
    stream = check_int(stream, "stream", fn, low=0)
    if isinstance(max_severity, bool) or not isinstance(max_severity, (int, float)) or not 0 <= max_severity <= 1:
        raise ValueError(f"{fn}: max_severity must be a number in [0, 1], got {max_severity!r}")
    ids = _check_ids(identities, fn)
    if ids.numel() == 0:
        raise ValueError(f"{fn}: identities must not be empty")
    g = _gen(seed, 13, stream)
    ident = ids[torch.arange(n) % len(ids)][torch.randperm(n, generator=g)]
    uniq, inverse = torch.unique(ident, return_inverse=True)
    params = identity_params(uniq, seed)[inverse]
    r = torch.rand(n, 7, generator=g)
    nuisance = torch.stack([
        (r[:, 0] - 0.5) * 0.2, (r[:, 1] - 0.5) * 0.2,  # shift +-0.1 half-widths (+-1.6 px at 32)
        (r[:, 2] - 0.5) * math.radians(16),  # rotation +-8 degrees
        0.75 + 0.5 * r[:, 3], (r[:, 4] - 0.5) * 0.2,  # gain 0.75..1.25, offset +-0.1
        (r[:, 5] - 0.5) * 0.5, 0.05 + 0.3 * r[:, 6]], dim=1)  # gradient +-0.25, background 0.05..0.35
    severity = torch.rand(n, generator=g) * float(max_severity)
    kinds = torch.randint(0, len(DEGRADATIONS), (n,), generator=g)
    clean = render_faces(params, nuisance, img_size)
    images = degrade(clean, severity, kinds, seed=seed * 10 + stream)
    return images.float(), ident, severity.float(), kinds


def faces(split: str = "train", *, seed: int = 0, img_size: int = 32, n: int | None = None) -> ImageDataset:
    """Closed-set identity classification over the ``N_SEEN`` training identities: train 192 / val 8 / test 8
    images per identity (each split its own draw), labels = identity, ``ds.severity`` float [N] each image's known
    severity, ``ds.kinds`` its degradation. ``n`` overrides the split's size."""
    check_split(split, "faces")
    seed = check_int(seed, "seed", "faces", low=0)
    n = FACES_PER_ID[split] * N_SEEN if n is None else check_int(n, "n", "faces")
    images, ident, severity, kinds = face_images(n, range(N_SEEN), seed=seed, img_size=img_size,
                                                 stream=_SPLIT_INDEX[split])
    ds = ImageDataset(images, ident, name="faces", split=split, classes=[f"id{k}" for k in range(N_SEEN)])
    ds.severity, ds.kinds = severity, kinds
    return ds


def faces_verification(*, seed: int = 0, img_size: int = 32, per_identity: int = VERIFICATION_PER_ID):
    """The verification set: ``per_identity`` images of each of the ``N_UNSEEN`` identities never trained on
    (indices ``N_SEEN``..``N_SEEN + N_UNSEEN - 1``), as (images, identity, severity, kind) like ``face_images``."""
    per_identity = check_int(per_identity, "per_identity", "faces_verification", low=2)
    return face_images(per_identity * N_UNSEEN, range(N_SEEN, N_SEEN + N_UNSEEN), seed=seed, img_size=img_size,
                       stream=_SPLIT_INDEX["verification"])
