"""The MILES dual encoder and its pre-training objective.

Module names follow the released model (`video_model`, `text_model`, `vid_proj`, `txt_proj`) so that
released checkpoints map onto ours by prefix stripping and one rename (MILES' `text_proj`): see
miles/released.py.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn as nn

from miles.config import Config
from miles.losses import NormSoftmaxLoss
from miles.predictor import MaskedFeaturePredictor
from miles.pretrained import load_video_weights
from miles.released import load_whole, read_checkpoint_file
from miles.targets import ENCODER_TARGETS, target_dim
from miles.text_encoder import build_text_encoder, text_cls
from miles.video_encoder import SpaceTimeTransformer
from miles_kernels import ops


@dataclass
class StepOutput:
    loss: torch.Tensor
    contrastive: torch.Tensor
    mvm: torch.Tensor


def without_starting_weights(cfg: Config) -> Config:
    """The config's model shape without its starting files (`model.init_checkpoint`, `video_weights`):
    for a model whose every weight comes from a checkpoint next."""
    shape = copy.deepcopy(cfg)
    shape.model.init_checkpoint = shape.model.video_weights = ""
    return shape


class MilesModel(nn.Module):
    def __init__(self, cfg: Config) -> None:
        super().__init__()
        m, v = cfg.model, cfg.mvm
        self.video_model = SpaceTimeTransformer(
            img_size=m.img_size,
            patch_size=m.patch_size,
            embed_dim=m.embed_dim,
            depth=m.depth,
            num_heads=m.num_heads,
            mlp_ratio=m.mlp_ratio,
            num_frames=m.num_frames,
            drop_path_rate=m.drop_path,
            time_init=m.time_init,
            attention=m.attention,
            temporal_attention=m.temporal_attention,
        )
        if m.video_weights:
            load_video_weights(self.video_model, m.video_weights)
        self.text_model, self.tokenizer, text_dim = build_text_encoder(m.text_model)
        if m.grad_checkpointing:
            self.video_model.grad_checkpointing = True
            if not getattr(self.text_model, "supports_gradient_checkpointing", False):
                raise ValueError(f"model.grad_checkpointing: text model {m.text_model} does not support it")
            kwargs = {"use_reentrant": False}
            if hasattr(self.text_model, "activation_checkpointing_enable"):  # newer transformers
                self.text_model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                self.text_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        self.txt_proj = nn.Sequential(nn.ReLU(), nn.Linear(text_dim, m.projection_dim))
        self.vid_proj = nn.Sequential(nn.Linear(m.embed_dim, m.projection_dim))
        self.predictor = (
            MaskedFeaturePredictor(
                m.embed_dim,
                v.predictor_dim,
                v.predictor_depth,
                v.predictor_heads,
                self.video_model.patches_per_frame,
                m.num_frames,
                target_dim=target_dim(v.target, m.embed_dim, m.patch_size),
                attention=m.attention,
            )
            if v.enabled
            else None
        )
        if not v.enabled or v.mask_ratio == 0 or v.mode == "drop":
            self.video_model.mask_token.requires_grad_(
                False
            )  # never used: DDP needs every trained param used
        self.contrastive = NormSoftmaxLoss(cfg.train.temperature)
        self.mvm_cfg = v
        if m.init_checkpoint:  # after every part exists, so the load is checked against all of them
            load_whole(self, read_checkpoint_file(m.init_checkpoint), allow_partial=m.allow_partial_init)

    def encode_video(self, video: torch.Tensor) -> torch.Tensor:
        """Projected clip embedding (not normalised), [B, projection_dim]."""
        return self.vid_proj(self.video_model(video))

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.txt_proj(text_cls(self.text_model, input_ids, attention_mask))

    def forward(
        self,
        video: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        mask: torch.Tensor | None = None,
        targets: torch.Tensor | None = None,
        visible: torch.Tensor | None = None,
    ) -> StepOutput:
        """One pre-training step's losses.

        `mask` [B, N] hides tubes, the same positions in every frame; `visible` [B, K] lists the others
        (`bert` mode also takes per-frame masks, [B, F, N] with visible [B, F, K]: `ops.mvm_mask`).
        `bert` mode puts a mask token at hidden patches and runs the full grid through the encoder;
        `drop` mode runs only the visible tubes and lets the predictor restore the grid. The contrastive
        loss takes the CLS of the unmasked clip from a second pass (`mvm.contrastive_input=full`, what
        evaluation sees) or of the masked pass itself (`masked`, FLIP-style: no extra pass, but a
        train/test gap). `targets` [B, F, N, C] are what MVM reconstructs (`mvm.target`: the snapshot's
        features of the unmasked video, normalised pixels or HOG; miles/targets.py).
        """
        impl = self.mvm_cfg.kernels
        if mask is not None and visible is None:
            raise ValueError("a mask needs its visible positions too (ops.tube_mask returns both)")
        drop = mask is not None and self.mvm_cfg.mode == "drop"
        if drop and mask.ndim != 2:
            raise ValueError(
                "drop mode needs a tube mask [B, N]: a per-frame mask leaves no common positions"
            )
        if drop:
            features = self.video_model.forward_visible(video, visible, impl)
        else:
            features = self.video_model.forward_features(video, mask)
        clip = features.cls
        if mask is not None and self.mvm_cfg.contrastive_input == "full":
            clip = self.video_model(video)  # a second pass on the unmasked clip, as at evaluation
        contrastive = self.contrastive(self.vid_proj(clip), self.encode_text(input_ids, attention_mask))
        mvm = contrastive.new_zeros(())
        if self.predictor is not None and mask is not None and targets is not None:
            b, n = mask.shape[0], mask.shape[-1]
            on_grid = visible if drop else torch.arange(n, device=mask.device).expand(b, n)
            pred = self.predictor(features, on_grid, impl)  # [B, F, N, D]
            if mask.ndim == 3:  # a mask per frame: each (sample, frame) is one row of M hidden positions
                pred, targets = pred.flatten(0, 1)[:, None], targets.flatten(0, 1)[:, None]
                mask, visible = mask.flatten(0, 1), visible.flatten(0, 1)
            hidden = ops.hidden_indices(mask, n - visible.shape[1])  # [rows, M]
            mvm = ops.masked_feature_loss(
                pred,
                targets,
                hidden,
                kind=self.mvm_cfg.loss,
                # pixel and HOG targets are normalised by their own definition (miles/targets.py)
                normalize_target=self.mvm_cfg.normalize_target and self.mvm_cfg.target in ENCODER_TARGETS,
                impl=impl,
            )
        loss = contrastive + self.mvm_cfg.weight * mvm
        return StepOutput(loss=loss, contrastive=contrastive.detach(), mvm=mvm.detach())
