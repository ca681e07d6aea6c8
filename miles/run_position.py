"""Where a run is in its data and its random streams: the batch stream over epochs that a resume restarts
mid-epoch, and the RNG states a checkpoint holds, so a resumed run sees the batches and masks an
uninterrupted one would."""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from data_dali.reference_loader import set_loader_epoch


@dataclass
class DataPosition:
    epoch: int = 0
    batches: int = 0  # batches of this epoch already consumed


class BatchStream:
    """Endless batches over epochs from a loader whose sampler supports `set_start_batch` for resume."""

    def __init__(self, loader: torch.utils.data.DataLoader, position: DataPosition) -> None:
        self.loader = loader
        self.position = position
        self._iter: Iterator | None = None

    def _start_epoch(self) -> None:
        set_loader_epoch(self.loader, self.position.epoch, start_batch=self.position.batches)
        rng = torch.get_rng_state()  # DataLoader draws its worker seed from the global RNG: keep it out
        self._iter = iter(self.loader)
        torch.set_rng_state(rng)

    def next(self) -> dict[str, Any]:
        while True:
            if self._iter is None:
                self._start_epoch()
            try:
                batch = next(self._iter)  # type: ignore[arg-type]
            except StopIteration:
                if self.position.batches == 0:
                    raise RuntimeError(
                        "an epoch of the training loader yielded no batch: the manifest has fewer clips "
                        "per process than train.batch_size"
                    ) from None
                self._iter = None
                self.position.epoch += 1
                self.position.batches = 0
                continue
            self.position.batches += 1
            return batch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        # numpy's key array as a tensor: checkpoints then load with weights_only=True and no numpy types
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.asarray(keys).astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
