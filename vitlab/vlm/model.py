"""A LLaVA-style VLM: image -> vision encoder -> projector -> visual tokens in front of the text of a causal LM.

    image ─ViT.forward_features→ patch tokens [B,N,Dv] ─projector→ [B,N,D] ┐
    prompt "what colour is the circle" ─ embed ────────────────────────────┴→ TinyLM → "red <eos>"

Training (LLaVA's recipe): cross-entropy on the answer tokens only; the visual tokens and the prompt are
context, never targets. Generation: one prefill over [visual tokens; prompt] fills the KV cache, then one token
at a time. Time to first token (TTFT, FastVLM's metric) = vision encoding + projector + prefill.

To change what the LM sees (extra spatial tokens, pruned or merged tokens), subclass and override
``visual_prefix(images)``: loss, generation and TTFT all go through it.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from vitlab.checks import check_int, check_model, check_ndim, check_number
from .lm import KVCache, TinyLM

__all__ = ["TinyVLM", "pack_answers", "answer_loss", "IGNORE"]

IGNORE = -100  # F.cross_entropy's ignore_index: positions that are not targets


def _check_ids(ids, name: str, fn: str) -> torch.Tensor:
    check_ndim(ids, 2, name, fn)
    if ids.dtype != torch.long:
        raise TypeError(f"{fn}: {name} must be int64 token ids, got {ids.dtype}")
    return ids


def pack_answers(prompt_ids: torch.Tensor, answer_ids: torch.Tensor, pad_id: int = 0
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded prompts [B, Tp] and answers [B, Ta] -> text [B, L] = prompt then answer, packed with no pad
    between them (as at generation), right-padded; labels [B, L] = the answer tokens, ``IGNORE`` elsewhere."""
    fn = "pack_answers"
    _check_ids(prompt_ids, "prompt_ids", fn)
    _check_ids(answer_ids, "answer_ids", fn)
    if prompt_ids.shape[0] != answer_ids.shape[0]:
        raise ValueError(f"{fn}: prompt_ids has {prompt_ids.shape[0]} rows, answer_ids {answer_ids.shape[0]}")
    rows = []
    for p, a in zip(prompt_ids, answer_ids):
        p, a = p[p != pad_id], a[a != pad_id]
        if not len(a):
            raise ValueError(f"{fn}: every row of answer_ids needs at least one token (not {pad_id} = pad)")
        rows.append((p, a))
    L = max(len(p) + len(a) for p, a in rows)
    text = torch.full((len(rows), L), pad_id, dtype=torch.long, device=prompt_ids.device)
    labels = torch.full_like(text, IGNORE)
    for i, (p, a) in enumerate(rows):
        text[i, :len(p) + len(a)] = torch.cat([p, a])
        labels[i, len(p):len(p) + len(a)] = a
    return text, labels


def answer_loss(logits: torch.Tensor, labels: torch.Tensor, *, return_correct: bool = False):
    """Mean cross-entropy over the answer tokens. logits [B, P + L, V] from ``TinyVLM.forward`` (P >= 1 visual
    tokens, then L text tokens); labels [B, L] (``IGNORE`` where no target). logits[:, P + j - 1] predicts text
    token j, so only the logits right before answer tokens count. ``return_correct``: also, per row, whether every
    answer token is the argmax (teacher-forced exact match)."""
    check_ndim(logits, 3, "logits", "answer_loss")
    check_ndim(labels, 2, "labels", "answer_loss")
    L = labels.shape[1]
    if logits.shape[0] != labels.shape[0] or logits.shape[1] < L + 1:
        raise ValueError(f"answer_loss: logits {tuple(logits.shape)} must be [B, P + L, V] with P >= 1 for labels "
                         f"{tuple(labels.shape)}")
    pred = logits[:, -L - 1:-1].float()  # the logit before each text token
    loss = F.cross_entropy(pred.flatten(0, 1), labels.flatten(), ignore_index=IGNORE)
    if not return_correct:
        return loss
    target = labels != IGNORE
    correct = ((pred.argmax(-1) == labels) | ~target).all(dim=1)
    return loss, correct


class _FirstToken(nn.Module):
    """``measure.latency`` times a module's forward: this one is the VLM's path to its first token."""

    def __init__(self, vlm: "TinyVLM"):
        super().__init__()
        self.vlm = vlm

    def forward(self, images: torch.Tensor, prompt_ids: torch.Tensor) -> torch.Tensor:
        return self.vlm.prefill(images, prompt_ids)[0].argmax(-1)


class TinyVLM(nn.Module):
    """vision_encoder (a vitlab ``VisionTransformer``, or any module whose ``forward_features`` gives tokens
    [B, N, Dv] or a feature map [B, Dv, h, w]) -> projector -> ``TinyLM``.

    use_cls: keep the ViT's CLS (and register) tokens among the visual tokens (LLaVA drops CLS; default).
    """

    def __init__(self, vision_encoder: nn.Module, projector: nn.Module, lm: TinyLM, *, use_cls: bool = False,
                 pad_id: int = 0, eos_id: int = 2):
        super().__init__()
        check_model(vision_encoder, "TinyVLM")
        check_model(projector, "TinyVLM")
        if not isinstance(lm, TinyLM):
            raise TypeError(f"TinyVLM: lm must be a vitlab.vlm.TinyLM, got {type(lm).__name__}")
        if not hasattr(vision_encoder, "forward_features"):
            raise TypeError(f"TinyVLM: vision_encoder must have forward_features(images), got "
                            f"{type(vision_encoder).__name__}")
        self.vision_encoder, self.projector, self.lm = vision_encoder, projector, lm
        self.use_cls = bool(use_cls)
        self.pad_id = check_int(pad_id, "pad_id", "TinyVLM", low=0, high=lm.vocab_size - 1)
        self.eos_id = check_int(eos_id, "eos_id", "TinyVLM", low=0, high=lm.vocab_size - 1)

    # ------------------------------------------------------------------------------------------ vision side
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Visual features [B, N, Dv]: the encoder's tokens (prefix tokens dropped unless ``use_cls``)."""
        check_ndim(images, 4, "images", "TinyVLM")
        feats = self.vision_encoder.forward_features(images)
        if feats.ndim == 4:  # a conv feature map (hybrid encoders): one token per position
            return feats.flatten(2).transpose(1, 2)
        return feats if self.use_cls else feats[:, getattr(self.vision_encoder, "num_prefix_tokens", 0):]

    def visual_prefix(self, images: torch.Tensor) -> torch.Tensor:
        """What the LM reads before the text: [B, P, lm.dim]."""
        return self.projector(self.encode_images(images))

    # ------------------------------------------------------------------------------------------ training
    def forward(self, images: torch.Tensor, text_ids: torch.Tensor) -> torch.Tensor:
        """Logits [B, P + L, V] over [visual tokens; text]."""
        _check_ids(text_ids, "text_ids", "TinyVLM")
        return self.lm(text_ids, prefix_embeds=self.visual_prefix(images))

    def loss(self, images: torch.Tensor, prompt_ids: torch.Tensor, answer_ids: torch.Tensor, *,
             return_correct: bool = False):
        """Cross-entropy of the answers given image and prompt (prompts and answers right-padded with pad_id)."""
        text, labels = pack_answers(prompt_ids, answer_ids, self.pad_id)
        return answer_loss(self(images, text), labels, return_correct=return_correct)

    # ------------------------------------------------------------------------------------------ generation
    def check_prompt(self, images: torch.Tensor, prompt_ids: torch.Tensor) -> None:
        """Raise a clear error unless ``images`` [B, C, H, W] and ``prompt_ids`` [B, L] (int64, no <pad>) can be
        prefilled together: what ``prefill``, ``ttft`` and every lesson's timing or decoding helper check first."""
        _check_ids(prompt_ids, "prompt_ids", "TinyVLM")
        check_ndim(images, 4, "images", "TinyVLM")
        if images.shape[0] != prompt_ids.shape[0]:
            raise ValueError(f"TinyVLM: images has {images.shape[0]} rows, prompt_ids {prompt_ids.shape[0]}")
        if (prompt_ids == self.pad_id).any():
            raise ValueError("TinyVLM: prompt_ids must not contain <pad>: generate a batch of prompts of one length "
                             "(answer_accuracy groups questions by length)")

    @torch.no_grad()
    def prefill(self, images: torch.Tensor, prompt_ids: torch.Tensor, kv_cache: KVCache | None = None
                ) -> tuple[torch.Tensor, KVCache]:
        """Run [visual tokens; prompt] once: the next-token logits [B, V] and the filled cache."""
        self.check_prompt(images, prompt_ids)
        cache = KVCache() if kv_cache is None else kv_cache
        logits = self.lm(prompt_ids, prefix_embeds=self.visual_prefix(images), kv_cache=cache)
        return logits[:, -1], cache

    @torch.no_grad()
    def generate(self, images: torch.Tensor, prompt_ids: torch.Tensor, max_new_tokens: int = 4, *,
                 greedy: bool = True, temperature: float = 1.0, generator: torch.Generator | None = None
                 ) -> torch.Tensor:
        """New tokens [B, <= max_new_tokens]: argmax (or samples at ``temperature``) one at a time with the KV
        cache; a row that emitted <eos> continues with <pad>, and generation stops when every row has."""
        check_int(max_new_tokens, "max_new_tokens", "TinyVLM.generate")
        check_number(temperature, "temperature", "TinyVLM.generate", low=0, low_open=True)
        logits, cache = self.prefill(images, prompt_ids)
        done = torch.zeros(len(prompt_ids), dtype=torch.bool, device=prompt_ids.device)
        out = []
        for t in range(max_new_tokens):
            if greedy:
                nxt = logits.argmax(-1)
            else:
                probs = (logits.float() / temperature).softmax(-1)
                nxt = torch.multinomial(probs, 1, generator=generator)[:, 0]
            nxt = torch.where(done, torch.full_like(nxt, self.pad_id), nxt)
            out.append(nxt)
            done |= nxt == self.eos_id
            if done.all() or t == max_new_tokens - 1:
                break
            logits = self.lm(nxt[:, None], kv_cache=cache)[:, -1]
        return torch.stack(out, dim=1)

    def ttft(self, images: torch.Tensor, prompt_ids: torch.Tensor, *, warmup: int = 2, repeats: int = 10) -> float:
        """Time to first token in ms (median of ``repeats`` after ``warmup``): vision encoding + projector + LM
        prefill over [visual tokens; prompt], timed by ``vitlab.measure.latency`` (CUDA events on GPU)."""
        from vitlab.measure import latency

        self.check_prompt(images, prompt_ids)
        timed = _FirstToken(self).train(self.training)  # latency restores the wrapper's mode: make it ours
        return latency(timed, (images, prompt_ids), warmup=warmup, repeats=repeats)["median_ms"]
