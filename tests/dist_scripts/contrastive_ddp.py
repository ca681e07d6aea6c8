"""Two-rank DDP step of the contrastive loss; run by tests/test_distributed_contrastive.py via torchrun.

Rank 0 saves the loss of every rank, the DDP-averaged parameter gradients and a gather-order probe to
the file named on the command line. ``build_model`` and ``make_batch`` are also imported by the test for
the single-process reference, so both sides start from identical weights and data.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from miles.distributed import all_reduce_mean, barrier, cleanup, gather_with_local_grad, init_distributed
from miles.losses import NormSoftmaxLoss

B_GLOBAL = 8
VIDEO_DIM, TEXT_DIM, EMBED_DIM = 6, 5, 4
TEMPERATURE = 0.05


class TwoTower(nn.Module):
    """Stand-in for the dual encoder: one projection per modality."""

    def __init__(self) -> None:
        super().__init__()
        self.video_proj = nn.Linear(VIDEO_DIM, EMBED_DIM)
        self.text_proj = nn.Linear(TEXT_DIM, EMBED_DIM)

    def forward(self, video: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.video_proj(video), self.text_proj(text)


def build_model() -> TwoTower:
    torch.manual_seed(1234)
    return TwoTower().double()


def make_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(99)
    video = torch.randn(B_GLOBAL, VIDEO_DIM, generator=g, dtype=torch.float64)
    text = torch.randn(B_GLOBAL, TEXT_DIM, generator=g, dtype=torch.float64)
    return video, text


def main(out_path: str) -> None:
    info = init_distributed()
    assert dist.is_initialized() and info.world_size == 2, info
    model = DistributedDataParallel(build_model())
    video, text = make_batch()
    per_rank = B_GLOBAL // info.world_size
    rows = slice(info.rank * per_rank, (info.rank + 1) * per_rank)

    v_emb, t_emb = model(video[rows], text[rows])
    loss = NormSoftmaxLoss(TEMPERATURE)(v_emb, t_emb)
    loss.backward()

    losses = [torch.zeros(1, dtype=torch.float64) for _ in range(info.world_size)]
    dist.all_gather(losses, loss.detach().reshape(1))
    probe = gather_with_local_grad(torch.full((2, 3), float(info.rank)) + torch.arange(2.0)[:, None])
    mean_rank = all_reduce_mean([float(info.rank)])[0]

    if info.rank == 0:
        torch.save(
            {
                "losses": torch.cat(losses),
                "grads": {n: p.grad.detach().clone() for n, p in model.module.named_parameters()},
                "probe": probe,
                "mean_rank": mean_rank,
            },
            out_path,
        )
    barrier()
    cleanup()


if __name__ == "__main__":
    main(sys.argv[1])
