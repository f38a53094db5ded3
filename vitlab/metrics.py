"""Metrics beyond accuracy: ``mean_auc`` for multi-label findings (the thorax lessons' mAUC) and ``miou`` for
segmentation (mean IoU from one confusion matrix)."""
from __future__ import annotations

import numpy as np
import torch

from .checks import check_int

__all__ = ["mean_auc", "miou"]


def _as_2d(x, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().float().cpu().numpy()
    if not isinstance(x, np.ndarray):
        try:
            x = np.asarray(x, dtype=np.float64)
        except (TypeError, ValueError):
            raise TypeError(f"mean_auc: {name} must be a tensor or array [N,K], got {type(x).__name__}") from None
    if x.ndim == 1:
        x = x[:, None]
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"mean_auc: {name} must have shape [N,K] with N, K >= 1, got {tuple(x.shape)}")
    x = x.astype(np.float64)
    if not np.isfinite(x).all():
        raise ValueError(f"mean_auc: {name} holds NaN or infinite values")
    return x


def mean_auc(scores, labels, *, classes=None) -> tuple[float, list[float]]:
    """(mean over findings, per-finding list) of ROC AUC, ``sklearn.metrics.roc_auc_score`` column by column.

    scores: [N,K] logits or probabilities (any monotone score); labels: [N,K] of 0/1 (bool, int or float).
    A 1-D pair counts as one finding. Every finding needs both a positive and a negative in ``labels``: AUC is
    undefined otherwise, and this raises ValueError naming the finding (by ``classes`` when given).
    """
    from sklearn.metrics import roc_auc_score

    s, y = _as_2d(scores, "scores"), _as_2d(labels, "labels")
    if s.shape != y.shape:
        raise ValueError(f"mean_auc: scores and labels must have the same shape, got {s.shape} and {y.shape}")
    if not np.isin(y, (0.0, 1.0)).all():
        raise ValueError("mean_auc: labels must be 0/1 (multi-hot), got values "
                         f"{np.unique(y)[:6].tolist()}")
    if classes is not None and (isinstance(classes, str) or len(classes) != y.shape[1]):
        raise ValueError(f"mean_auc: classes must name the {y.shape[1]} findings, got {classes!r}")
    names = list(classes) if classes is not None else [f"column {k}" for k in range(y.shape[1])]
    aucs = []
    for k in range(y.shape[1]):
        positives = int(y[:, k].sum())
        if positives in (0, y.shape[0]):
            only = "positive" if positives else "negative"
            raise ValueError(f"mean_auc: finding {names[k]!r} has only {only} labels ({y.shape[0]} samples); "
                             "AUC needs both classes: use more samples")
        aucs.append(float(roc_auc_score(y[:, k], s[:, k])))
    return float(np.mean(aucs)), aucs


def miou(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> float:
    """Mean intersection over union over all pixels given: per class |P ∩ T| / |P ∪ T| from one confusion matrix
    (summed over the batch, not per image), averaged over the classes present in ``pred`` or ``target``.
    ``pred``: class ids shaped as ``target``, or logits with the class axis at dim 1 ([B, K, H, W]);
    ``target``: integer or bool class ids in [0, num_classes)."""
    fn = "miou"
    K = check_int(num_classes, "num_classes", fn, low=1)
    for name, t in (("pred", pred), ("target", target)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{fn}: {name} must be a tensor, got {type(t).__name__}")
    if pred.ndim == target.ndim + 1 and pred.is_floating_point():
        if pred.shape[1] != K:
            raise ValueError(f"{fn}: pred looks like logits {tuple(pred.shape)} but has {pred.shape[1]} classes at "
                             f"dim 1, expected num_classes={K}")
        pred = pred.argmax(dim=1)
    if pred.shape != target.shape or target.numel() == 0:
        raise ValueError(f"{fn}: pred {tuple(pred.shape)} and target {tuple(target.shape)} must have the same "
                         "non-empty shape (or pred be logits [B, K, ...])")
    for name, t in (("pred", pred), ("target", target)):
        if t.is_floating_point() or t.is_complex():
            raise TypeError(f"{fn}: {name} must hold integer class ids, got {t.dtype} (use .long())")
        t = t.long()
        if t.min() < 0 or t.max() >= K:
            raise ValueError(f"{fn}: {name} has class ids in [{t.min().item()}, {t.max().item()}], expected "
                             f"[0, {K}) (num_classes={K})")
    conf = torch.bincount((target.long() * K + pred.long()).flatten(), minlength=K * K).reshape(K, K)
    inter = conf.diag().double()
    union = conf.sum(0).double() + conf.sum(1).double() - inter
    present = union > 0
    return (inter[present] / union[present]).mean().item()
