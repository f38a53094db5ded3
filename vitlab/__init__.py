"""ViT Lab: the shared code behind the course's notebooks.

    import vitlab
    P = vitlab.profile()                      # smoke / cpu / gpu
    train = vitlab.data.load("mnist5k", "train", P)
    model = vitlab.models.create_model("vit_tiny", data=train)
    vitlab.train.fit(model, train, val, profile=P)
"""
import warnings
from importlib import import_module

# tqdm.auto asks for ipywidgets to draw HTML bars; its text bars work in every notebook, so the nag is noise
warnings.filterwarnings("ignore", message="IProgress not found")

from .profiles import PROFILES, Profile, device, profile

__version__ = "0.1.0"
__all__ = ["Profile", "PROFILES", "profile", "device", "seed_everything"]

_SUBMODULES = {"data", "models", "kernels", "train", "zoo", "measure", "viz", "results", "augment", "methods",
               "stats", "tokens", "quant", "checks"}


def __getattr__(name):  # `vitlab.data` etc. import on first use, so `import vitlab` stays light (no torch)
    if name in _SUBMODULES:
        return import_module(f".{name}", __name__)
    if name == "seed_everything":
        from .seed import seed_everything

        return seed_everything
    raise AttributeError(f"module 'vitlab' has no attribute {name!r}")
