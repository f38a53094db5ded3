"""The course's checkpoint file: written atomically, read with ``weights_only=True``, its weights' hash verified.

    payload = {"format": FORMAT, "state_dict": {...}, "sha256": state_hash(state_dict), ...}
    save_checkpoint(path, payload)    # temp file in the same folder, fsync, rename: never half a file at ``path``
    load_checkpoint(path)             # ValueError for anything else: another format, corrupt, truncated

Both ``vitlab.zoo`` (course-trained models) and ``python -m vitlab.train --save`` write this format.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import torch

__all__ = ["FORMAT", "state_hash", "save_checkpoint", "load_checkpoint", "writable"]

FORMAT = 1


def state_hash(state_dict: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the names, shapes, dtypes and bytes of every tensor (order-independent)."""
    h = hashlib.sha256()
    for key in sorted(state_dict):
        t = state_dict[key].detach().cpu().contiguous()
        h.update(f"{key}|{tuple(t.shape)}|{t.dtype}|".encode())
        # flattened first: a 0-dim tensor (BatchNorm's num_batches_tracked) has no last dim to reinterpret; for
        # every other tensor the bytes (and so the hash of existing checkpoints) are the same
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_checkpoint(path: str | os.PathLike, payload: dict) -> Path:
    """Write ``payload`` atomically: a temp file in the same folder, fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a checkpoint is ordinary data
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Load with ``weights_only=True`` (no pickled code runs) and verify the weights' hash."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # not a torch file, truncated, or pickled code that weights_only refuses to run
        raise ValueError(f"{path}: not a readable vitlab checkpoint ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else 'no message'})") from e
    if not isinstance(payload, dict) or payload.get("format") != FORMAT or "state_dict" not in payload:
        raise ValueError(f"{path}: not a vitlab checkpoint (format {FORMAT})")
    if state_hash(payload["state_dict"]) != payload.get("sha256"):
        raise ValueError(f"{path}: weights do not match their stored SHA-256 (corrupt file)")
    return payload


def writable(folder: Path) -> bool:
    """Whether a checkpoint can be written here (tried, not guessed: permissions lie to root)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False
