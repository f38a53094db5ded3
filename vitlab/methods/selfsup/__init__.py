"""Chapter 5: self-supervised and generative ViTs (MAE for thorax disease, Uni4Eye, Hi-End-MAE, ViT-VQGAN, HieraTok)."""
