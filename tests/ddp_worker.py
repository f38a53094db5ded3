"""Run by tests/test_train.py, alone or under torchrun: train a tiny ViT on fixed data, dump the history."""
import json
import sys

import torch

from vitlab.models import create_model
from vitlab.seed import seed_everything
from vitlab.train import fit

if __name__ == "__main__":
    g = torch.Generator().manual_seed(123)
    x, y = torch.rand(256, 1, 8, 8, generator=g), torch.randint(0, 10, (256,), generator=g)
    seed_everything(0)
    model = create_model("vit_nano", img_size=8, depth=2)
    hist = fit(model, (x, y), None, profile="smoke", epochs=3, batch_size=64, lr=3e-3, seed=0, progress=False)
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    if rank == 0:
        with open(sys.argv[1], "w") as f:
            json.dump(hist["train_loss"], f)
    if torch.distributed.is_initialized():
        # tear gloo down together: a rank that exits while the other still holds the pair aborts
        # ("terminate called without an active exception", seen under load in CI)
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
