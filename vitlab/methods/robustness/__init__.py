"""Chapter 6: robustness and interpretability of ViTs (patch perturbations, attention analytics, ...)."""
