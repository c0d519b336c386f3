"""Small models written in the style of real architectures (a nanoGPT decoder, a diffusion
transformer, a ConvNeXt, a U-Net, a Whisper-like encoder-decoder, a ViT), each with switches
that plant one bug a real codebase has shipped. With every switch off, a model is healthy and
must pass every check with its defaults (``tests/test_planted_bugs.py``)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F


@dataclass
class Bugs:
    """The planted bugs; every field off is the healthy model."""

    mask: str = "causal"  # "causal", "none" (forgotten), "shifted" (triu(2): sees one ahead)
    nan_position: bool = False  # a NaN in the learned positional embedding
    eval_dropout: bool = False  # F.dropout(training=True): random in eval mode
    batch_mean_label: bool = False  # DiT: the label embedding averaged over the batch
    label_dropout_in_eval: bool = False  # DiT: the label dropout not gated by self.training
    layer_scale_init: float = 1e-6  # ConvNeXt: 1e3 is a typo that explodes the residual stream
    drop_path_in_eval: bool = False  # stochastic depth not gated by self.training
    dead_bias: float = 0.0  # U-Net: a large negative bias before ReLU kills the channels
    batch_centering: bool = False  # U-Net: x - x.mean(0), a "normalisation" across samples
    detached_bottleneck: bool = False  # U-Net: .detach() left in from debugging
    decoder_conv: bool = False  # Whisper: a centred Conv1d over the decoder's tokens
    seq_first_attention: bool = False  # ViT: batch-first input to a seq-first MultiheadAttention
    init_gain: float = 1.0  # ViT: the MLP weights initialised `init_gain` times too large


class CausalSelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, bugs: Bugs) -> None:
        super().__init__()
        self.heads, self.bugs = heads, bugs
        self.c_attn = nn.Linear(dim, 3 * dim)
        self.c_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, dim = x.shape
        q, k, v = (
            part.view(batch, length, self.heads, -1).transpose(1, 2)
            for part in self.c_attn(x).split(dim, dim=2)
        )
        scores = q @ k.transpose(-2, -1) / math.sqrt(k.shape[-1])
        if self.bugs.mask != "none":
            offset = 2 if self.bugs.mask == "shifted" else 1
            future = torch.ones(length, length, dtype=torch.bool, device=x.device).triu(offset)
            scores = scores.masked_fill(future, float("-inf"))
        weights = F.softmax(scores, dim=-1)
        weights = F.dropout(weights, 0.1, training=self.training or self.bugs.eval_dropout)
        return self.c_proj((weights @ v).transpose(1, 2).reshape(batch, length, dim))


class MLP(nn.Module):
    def __init__(self, dim: int, gain: float = 1.0) -> None:
        super().__init__()
        self.c_fc = nn.Linear(dim, 4 * dim)
        self.c_proj = nn.Linear(4 * dim, dim)
        if gain != 1.0:
            with torch.no_grad():
                self.c_fc.weight.mul_(gain)
                self.c_proj.weight.mul_(gain)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, bugs: Bugs) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim)
        self.attn = CausalSelfAttention(dim, heads, bugs)
        self.ln_2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """nanoGPT's shape: learned positions, pre-norm blocks, a tied head, ``forward(idx,
    targets=None) -> (logits, loss)``."""

    def __init__(self, bugs: Bugs | None = None, vocab: int = 64, dim: int = 32, layers: int = 2) -> None:
        super().__init__()
        bugs = bugs or Bugs()
        self.wte = nn.Embedding(vocab, dim)
        self.wpe = nn.Embedding(16, dim)
        self.blocks = nn.ModuleList(Block(dim, 4, bugs) for _ in range(layers))
        self.ln_f = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.lm_head.weight = self.wte.weight
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                nn.init.normal_(module.weight, std=0.02)
        if bugs.nan_position:
            with torch.no_grad():
                self.wpe.weight[3, 5] = float("nan")

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        positions = torch.arange(idx.shape[1], device=idx.device)
        x = self.wte(idx) + self.wpe(positions)
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        loss = None if targets is None else F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        return logits, loss


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device) / half)
    angles = t.float()[:, None] * freqs[None]
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


class LabelEmbedder(nn.Module):
    """DiT's label embedding with classifier-free-guidance dropout (one extra "null" class)."""

    def __init__(self, classes: int, dim: int, bugs: Bugs) -> None:
        super().__init__()
        self.classes, self.bugs = classes, bugs
        self.table = nn.Embedding(classes + 1, dim)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        if self.training or self.bugs.label_dropout_in_eval:
            drop = torch.rand(labels.shape[0], device=labels.device) < 0.1
            labels = torch.where(drop, self.classes, labels)
        return self.table(labels)


class DiTBlock(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False)
        self.mlp = MLP(dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        nn.init.zeros_(self.adaLN_modulation[1].weight)  # adaLN-Zero: each block starts as the identity
        nn.init.zeros_(self.adaLN_modulation[1].bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c)[:, None].chunk(6, dim=-1)
        h = self.norm1(x) * (1 + scale1) + shift1
        x = x + gate1 * self.attn(h, h, h, need_weights=False)[0]
        h = self.norm2(x) * (1 + scale2) + shift2
        return x + gate2 * self.mlp(h)


class DiT(nn.Module):
    """A diffusion transformer: patches, timestep and label conditioning, adaLN-Zero blocks,
    ``forward(x, t, y)``."""

    def __init__(self, bugs: Bugs | None = None, dim: int = 32, patch: int = 4, classes: int = 10) -> None:
        super().__init__()
        self.bugs = bugs or Bugs()
        self.dim, self.patch = dim, patch
        self.x_embedder = nn.Conv2d(3, dim, patch, stride=patch)
        self.pos_embed = nn.Parameter(torch.randn(1, 16, dim) * 0.02)
        self.t_embedder = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.y_embedder = LabelEmbedder(classes, dim, self.bugs)
        self.blocks = nn.ModuleList(DiTBlock(dim, 4) for _ in range(2))
        self.final_norm = nn.LayerNorm(dim, elementwise_affine=False)
        self.final = nn.Linear(dim, patch * patch * 3)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = x.shape
        h = self.x_embedder(x).flatten(2).transpose(1, 2) + self.pos_embed
        labels = self.y_embedder(y)
        if self.bugs.batch_mean_label:
            labels = labels.mean(0, keepdim=True)
        c = self.t_embedder(timestep_embedding(t, self.dim)) + labels
        for block in self.blocks:
            h = block(h, c)
        out = self.final(self.final_norm(h))
        side = height // self.patch
        out = out.view(batch, side, side, self.patch, self.patch, 3).permute(0, 5, 1, 3, 2, 4)
        return out.reshape(batch, 3, height, width)


class DropPath(nn.Module):
    def __init__(self, p: float, bugs: Bugs) -> None:
        super().__init__()
        self.p, self.bugs = p, bugs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training or self.bugs.drop_path_in_eval):
            return x
        keep = torch.rand(x.shape[0], 1, 1, 1, device=x.device) >= self.p
        return x * keep / (1 - self.p)


class ConvNeXtBlock(nn.Module):
    def __init__(self, dim: int, bugs: Bugs) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), bugs.layer_scale_init))
        self.drop_path = DropPath(0.2, bugs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.dwconv(x).permute(0, 2, 3, 1))
        h = (self.gamma * self.pwconv2(F.gelu(self.pwconv1(h)))).permute(0, 3, 1, 2)
        return x + self.drop_path(h)


class ConvNeXt(nn.Module):
    def __init__(self, bugs: Bugs | None = None, dims: tuple[int, int] = (16, 32), classes: int = 10) -> None:
        super().__init__()
        bugs = bugs or Bugs()
        self.stem = nn.Sequential(nn.Conv2d(3, dims[0], 4, stride=4), nn.GroupNorm(1, dims[0]))
        self.stage1 = nn.Sequential(*(ConvNeXtBlock(dims[0], bugs) for _ in range(2)))
        self.downsample = nn.Sequential(nn.GroupNorm(1, dims[0]), nn.Conv2d(dims[0], dims[1], 2, stride=2))
        self.stage2 = nn.Sequential(*(ConvNeXtBlock(dims[1], bugs) for _ in range(2)))
        self.norm = nn.LayerNorm(dims[1])
        self.head = nn.Linear(dims[1], classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage2(self.downsample(self.stage1(self.stem(x))))
        return self.head(self.norm(x.mean(dim=(2, 3))))


class ConvUnit(nn.Sequential):
    def __init__(self, cin: int, cout: int, bias: float = 0.0) -> None:
        super().__init__(nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(4, cout), nn.ReLU())
        if bias:
            self[1] = nn.Identity()  # the bias only kills what no norm re-centres
            with torch.no_grad():
                self[0].bias.fill_(bias)


class UNet(nn.Module):
    """Two levels down, a bottleneck, two up with concatenated skips."""

    def __init__(self, bugs: Bugs | None = None, width: int = 8) -> None:
        super().__init__()
        self.bugs = bugs or Bugs()
        self.down1 = ConvUnit(3, width)
        self.down2 = ConvUnit(width, 2 * width)
        self.mid = ConvUnit(2 * width, 2 * width, bias=self.bugs.dead_bias)
        self.up2 = ConvUnit(4 * width, width)
        self.up1 = ConvUnit(2 * width, width)
        self.out = nn.Conv2d(width, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip1 = self.down1(x)
        skip2 = self.down2(F.max_pool2d(skip1, 2))
        h = self.mid(F.max_pool2d(skip2, 2))
        if self.bugs.batch_centering:
            h = h - h.mean(0, keepdim=True)
        if self.bugs.detached_bottleneck:
            h = h.detach()
        h = self.up2(torch.cat([F.interpolate(h, scale_factor=2.0), skip2], dim=1))
        h = self.up1(torch.cat([F.interpolate(h, scale_factor=2.0), skip1], dim=1))
        return self.out(h)


class CrossBlock(nn.Module):
    def __init__(self, dim: int, bugs: Bugs) -> None:
        super().__init__()
        self.bugs = bugs
        self.ln_1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, 4, batch_first=True)
        self.ln_2 = nn.LayerNorm(dim)
        self.cross_attn = nn.MultiheadAttention(dim, 4, batch_first=True)
        self.ln_3 = nn.LayerNorm(dim)
        self.mlp = MLP(dim)

    def forward(self, x: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        length = x.shape[1]
        mask = None
        if self.bugs.mask != "none":
            mask = torch.ones(length, length, dtype=torch.bool, device=x.device).triu(1)
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        h = self.ln_2(x)
        x = x + self.cross_attn(h, audio, audio, need_weights=False)[0]
        return x + self.mlp(self.ln_3(x))


class Whisper(nn.Module):
    """An audio encoder (two Conv1d, sinusoidal positions, bidirectional attention) and a text
    decoder (learned positions, causal self-attention, cross-attention), ``forward(mel,
    tokens)``."""

    def __init__(self, bugs: Bugs | None = None, mels: int = 8, dim: int = 32, vocab: int = 50) -> None:
        super().__init__()
        self.bugs = bugs or Bugs()
        self.conv1 = nn.Conv1d(mels, dim, 3, padding=1)
        self.conv2 = nn.Conv1d(dim, dim, 3, stride=2, padding=1)
        self.register_buffer("audio_positions", timestep_embedding(torch.arange(32), dim))
        self.encoder = nn.TransformerEncoderLayer(
            dim, 4, 4 * dim, dropout=0.0, batch_first=True, norm_first=True
        )
        self.ln_post = nn.LayerNorm(dim)
        self.token_embedding = nn.Embedding(vocab, dim)
        self.positional_embedding = nn.Parameter(torch.randn(16, dim) * 0.02)
        self.token_mixer = nn.Conv1d(dim, dim, 3, padding=1) if self.bugs.decoder_conv else None
        self.decoder = nn.ModuleList(CrossBlock(dim, self.bugs) for _ in range(2))
        self.ln = nn.LayerNorm(dim)

    def forward(self, mel: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        audio = F.gelu(self.conv2(F.gelu(self.conv1(mel)))).transpose(1, 2)
        audio = self.ln_post(self.encoder(audio + self.audio_positions[: audio.shape[1]]))
        x = self.token_embedding(tokens) + self.positional_embedding[: tokens.shape[1]]
        if self.token_mixer is not None:
            x = x + self.token_mixer(x.transpose(1, 2)).transpose(1, 2)
        for block in self.decoder:
            x = block(x, audio)
        return self.ln(x) @ self.token_embedding.weight.T


class ViTBlock(nn.Module):
    def __init__(self, dim: int, bugs: Bugs) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim)
        self.self_attention = nn.MultiheadAttention(dim, 4, batch_first=not bugs.seq_first_attention)
        self.ln_2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, gain=bugs.init_gain)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln_1(x)
        x = x + self.self_attention(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class ViT(nn.Module):
    """torchvision's ViT in small: a class token, learned positions, a zero-initialised head."""

    def __init__(
        self, bugs: Bugs | None = None, dim: int = 32, layers: int = 4, classes: int = 10, pool: str = "token"
    ) -> None:
        super().__init__()
        bugs = bugs or Bugs()
        self.pool = pool  # "token" (the class token's output) or "avg" (the mean over tokens)
        self.conv_proj = nn.Conv2d(3, dim, 4, stride=4)
        self.class_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embedding = nn.Parameter(torch.randn(1, 17, dim) * 0.02)
        self.encoder = nn.Sequential(*(ViTBlock(dim, bugs) for _ in range(layers)))
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        patches = self.conv_proj(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), patches], dim=1) + self.pos_embedding
        x = self.ln(self.encoder(x))
        return self.head(x[:, 0] if self.pool == "token" else x.mean(dim=1))
