"""A zoo entry small enough to train in a second, for tests (also imported by child processes)."""
import os
from pathlib import Path

from vitlab import zoo

NAME = "test_vit_digits8"
if NAME not in zoo.ZOO:
    zoo.register(NAME, zoo.Recipe(model="vit_nano", data="digits8",
                                  fit=dict(epochs=1, lr=1e-3, shift=0, batch_size=64)))
    _train = zoo._train

    def _counting_train(name, recipe, P, progress):  # leaves a mark per training run, for the race test
        log = os.environ.get("ZOO_TRAIN_LOG")
        if log:
            with open(log, "a") as f:
                f.write(f"{os.getpid()}\n")
        return _train(name, recipe, P, progress)

    zoo._train = _counting_train


def get_in_child(checkpoints: str, log: str) -> str:
    os.environ["VITLAB_CHECKPOINTS"] = checkpoints
    os.environ["ZOO_TRAIN_LOG"] = log
    model = zoo.get(NAME, "smoke", progress=False)
    return zoo.state_hash(model.state_dict())


def checkpoint(tmp: Path) -> Path:
    return tmp / f"{NAME}-smoke.pt"
