"""vitlab.vlm: the shared core of chapter 7 (vision-language), one idea per file.

    tokenizer.py  WordTokenizer over the generators' fixed vocabulary
    lm.py         TinyLM: a causal decoder with a KV cache that reads visual tokens first
    projector.py  VisionProjector: LLaVA's linear / 2-layer GELU MLP
    model.py      TinyVLM: ViT patch tokens -> projector -> TinyLM; answer-only loss, greedy generation, TTFT
    clip.py       TinyCLIP + TextEncoder: symmetric InfoNCE, learnable clamped temperature, zero-shot, retrieval
    data.py       caption_scenes (captions, questions, presence probes, masks), moving_shapes_videos
    train.py      train_vlm / train_clip on vitlab.train.fit; answer_accuracy

    from vitlab.models import VisionTransformer
    from vitlab import vlm
    tok = vlm.WordTokenizer()
    vit = VisionTransformer(img_size=32, patch_size=4, in_chans=3, num_classes=0, embed_dim=64, depth=4)
    model = vlm.TinyVLM(vit, vlm.VisionProjector(64, 64), vlm.TinyLM(len(tok), dim=64, depth=2))
    vlm.train_vlm(model, vlm.caption_scenes("train", n=2000), steps=500)
    vlm.answer_accuracy(model, vlm.caption_scenes("test", n=500), per_kind=True)
"""
from .clip import LOGIT_SCALE_MAX, TextEncoder, TinyCLIP, clip_loss, recall_at_k, zero_shot_classify
from .data import (COLOURS, MOTIONS, POSITIONS, PROBE_KINDS, QA, QUESTION_KINDS, SHAPES, SIZES, VOCAB, CaptionScenes,
                   MovingObject, MovingShapes, SceneObject, caption_scenes, moving_shapes_videos)
from .lm import CausalSelfAttention, DecoderBlock, KVCache, TinyLM, init_fan_in_
from .model import IGNORE, TinyVLM, answer_loss, pack_answers
from .projector import VisionProjector
from .tokenizer import SPECIAL_TOKENS, WordTokenizer
from .train import (QuestionSampler, answer_accuracy, contrastive_objective, predict_answers, qa_objective, qa_tensors,
                    seeded_entry, train_clip, train_vlm)

__all__ = [
    "WordTokenizer", "SPECIAL_TOKENS", "VOCAB",
    "TinyLM", "KVCache", "CausalSelfAttention", "DecoderBlock", "init_fan_in_",
    "VisionProjector",
    "TinyVLM", "pack_answers", "answer_loss", "IGNORE",
    "TinyCLIP", "TextEncoder", "clip_loss", "zero_shot_classify", "recall_at_k", "LOGIT_SCALE_MAX",
    "caption_scenes", "moving_shapes_videos", "CaptionScenes", "MovingShapes", "SceneObject", "MovingObject", "QA",
    "COLOURS", "SHAPES", "SIZES", "POSITIONS", "MOTIONS", "QUESTION_KINDS", "PROBE_KINDS",
    "train_vlm", "train_clip", "predict_answers", "answer_accuracy", "qa_tensors", "QuestionSampler", "seeded_entry",
    "contrastive_objective", "qa_objective",
]
