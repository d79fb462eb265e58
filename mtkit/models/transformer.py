"""The Transformer (Vaswani et al. 2017) behind the Seq2Seq contract, in one file: embeddings scaled by
sqrt(d_model); sinusoidal, learned, rotary (RoPE) or ALiBi positions; ``F.scaled_dot_product_attention``;
pre- or post-norm layers. Incremental decoding keeps a per-layer self-attention key/value cache in
``state`` and the encoder's cross-attention keys/values in ``enc`` (computed once by :meth:`encode`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from mtkit.config_fields import ModelConfig, any_value, choice, number
from mtkit.errors import MtkitError
from mtkit.kernels.dropout import add_dropout, dropout
from mtkit.kernels.linear import Linear
from mtkit.models.base import Seq2Seq, State

ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu}


@dataclass
class Config(ModelConfig):
    arch: str = any_value("transformer")
    d_model: int = number(512, low=1)
    heads: int = number(8, low=1)
    encoder_layers: int = number(6, low=0)  # 0: the decoder reads the source embeddings
    decoder_layers: int = number(6, low=1)
    ffn_dim: int = number(2048, low=1)
    dropout: float = number(0.1, low=0, high=1)  # on embeddings and every residual branch
    attention_dropout: float = number(0.0, low=0, high=1)  # on attention weights
    activation_dropout: float = number(0.0, low=0, high=1)  # inside the feed-forward block
    activation: str = choice("relu", *ACTIVATIONS)
    pre_norm: bool = False  # LayerNorm before each block (plus a final one) instead of after
    positions: str = choice("sinusoidal", "sinusoidal", "learned", "rope", "alibi")
    max_positions: int = number(1024, low=1)  # longest source/target (learned positions need a table this long)
    tie_embeddings: bool = True  # output projection = target embedding (and = source when sizes match)
    grad_checkpointing: bool = False  # recompute layer activations in backward to save memory

    @property
    def width(self) -> int:
        return self.d_model

    def check(self, section: str) -> None:
        if self.d_model % self.heads:
            raise MtkitError(
                f"config key '{section}.d_model': {self.d_model} is not allowed; must be divisible by "
                f"{section}.heads ({self.heads})"
            )
        if self.positions == "rope" and (self.d_model // self.heads) % 2:
            raise MtkitError(
                f"config key '{section}.positions': rope needs an even head size ({section}.d_model / "
                f"{section}.heads), got {self.d_model // self.heads}"
            )


# --- positions --------------------------------------------------------------------------------
def sinusoid_table(n: int, d: int) -> torch.Tensor:
    """(n, d) sin in the first half of the channels, cos in the second (tensor2tensor layout)."""
    half = d // 2
    freq = torch.exp(torch.arange(half, dtype=torch.float32) * -(math.log(10000.0) / max(half - 1, 1)))
    angles = torch.arange(n, dtype=torch.float32)[:, None] * freq[None, :]
    table = torch.cat([angles.sin(), angles.cos()], dim=1)
    return F.pad(table, (0, d - 2 * half))


def rope_tables(n: int, dh: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables (n, dh) for rotary embeddings over the two halves of each head."""
    inv = 1.0 / (10000.0 ** (torch.arange(0, dh, 2, dtype=torch.float32) / dh))
    angles = torch.arange(n, dtype=torch.float32)[:, None] * inv[None, :]  # (n, dh/2)
    angles = torch.cat([angles, angles], dim=1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, Dh); cos/sin broadcastable to it."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def alibi_slopes(heads: int) -> torch.Tensor:
    """Geometric slopes 2^(-8 i / H) (Press et al. 2022), (H,)."""
    return torch.tensor([2.0 ** (-8.0 * (i + 1) / heads) for i in range(heads)])


# --- blocks -----------------------------------------------------------------------------------
class Attention(nn.Module):
    """Multi-head attention; ``self_attn`` fuses the q/k/v projections into one matmul."""

    def __init__(self, cfg: Config, self_attn: bool):
        super().__init__()
        d = cfg.d_model
        self.heads, self.dh = cfg.heads, d // cfg.heads
        if self_attn:
            self.qkv = Linear(d, 3 * d)
        else:
            self.q = Linear(d, d)
            self.kv = Linear(d, 2 * d)
        self.out = Linear(d, d)
        self.p_drop = cfg.attention_dropout

    def split(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, H*Dh) -> (B, H, T, Dh)
        return x.view(x.size(0), x.size(1), self.heads, self.dh).transpose(1, 2)

    def project_qkv(self, x: torch.Tensor, rope: tuple | None) -> tuple[torch.Tensor, ...]:
        """Self-attention queries, keys and values (B, H, T, Dh); q and k rotated when ``rope`` is given."""
        q, k, v = (self.split(t) for t in self.qkv(x).chunk(3, dim=-1))
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        return q, k, v

    def project_kv(self, mem: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-attention keys/values (B, H, S, Dh), contiguous: every decoding step reads them."""
        k, v = self.kv(mem).chunk(2, dim=-1)
        return self.split(k).contiguous(), self.split(v).contiguous()

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, causal: bool = False) -> torch.Tensor:
        p = self.p_drop if self.training else 0.0
        if q.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
            # CPU bf16 SDPA backward is slower than fp32: attention stays fp32, the matmuls around it bf16
            with torch.autocast("cpu", enabled=False):
                y = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, dropout_p=p, is_causal=causal)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, is_causal=causal)
        return self.out(y.transpose(1, 2).flatten(2))  # heads merged: (B, T, H*Dh)

    def attend_with_weights(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Explicit attention that also returns the head-averaged weights (B, T, S)."""
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(self.dh)  # (B, H, T, S)
        weights = scores.masked_fill(~mask, float("-inf")).softmax(-1)
        y = dropout(weights, self.p_drop, self.training) @ v
        return self.out(y.transpose(1, 2).flatten(2)), weights.mean(1)


class FeedForward(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.fc1, self.fc2 = Linear(cfg.d_model, cfg.ffn_dim), Linear(cfg.ffn_dim, cfg.d_model)
        self.act, self.p_drop = ACTIVATIONS[cfg.activation], cfg.activation_dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1.activated(x, self.act)
        return self.fc2(dropout(h, self.p_drop, self.training))


class Sublayer(nn.Module):
    """Residual wrapper: x + drop(f(norm(x))) in pre-norm, norm(x + drop(f(x))) in post-norm."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.norm, self.pre_norm, self.p_drop = nn.LayerNorm(cfg.d_model), cfg.pre_norm, cfg.dropout

    def forward(self, x: torch.Tensor, fn) -> torch.Tensor:
        if self.pre_norm:
            return add_dropout(x, fn(self.norm(x)), self.p_drop, self.training)
        return self.norm(add_dropout(x, fn(x), self.p_drop, self.training))


class EncoderLayer(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.attn, self.ffn = Attention(cfg, self_attn=True), FeedForward(cfg)
        self.sub1, self.sub2 = Sublayer(cfg), Sublayer(cfg)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, rope: tuple | None) -> torch.Tensor:
        x = self.sub1(x, lambda h: self.attn.attend(*self.attn.project_qkv(h, rope), mask))
        return self.sub2(x, self.ffn)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.self_attn, self.cross_attn = Attention(cfg, self_attn=True), Attention(cfg, self_attn=False)
        self.ffn = FeedForward(cfg)
        self.sub1, self.sub2, self.sub3 = Sublayer(cfg), Sublayer(cfg), Sublayer(cfg)

    def forward(self, x, mem_k, mem_v, mem_mask, self_mask, rope, cache=None, need_weights=False):
        """x (B, T, D). ``cache`` (k, v) of earlier positions when decoding step by step;
        returns (x, (k, v) of all positions so far, cross-attention weights or None)."""
        new_cache, weights = None, None

        def self_attention(h: torch.Tensor) -> torch.Tensor:
            nonlocal new_cache
            q, k, v = self.self_attn.project_qkv(h, rope)
            if cache is not None:
                k, v = torch.cat([cache[0], k], dim=2), torch.cat([cache[1], v], dim=2)
            new_cache = (k, v)
            return self.self_attn.attend(q, k, v, self_mask, causal=cache is None and self_mask is None)

        def cross_attention(h: torch.Tensor) -> torch.Tensor:
            nonlocal weights
            q = self.cross_attn.split(self.cross_attn.q(h))  # (N, H, T, Dh)
            n, b = q.size(0), mem_k.size(0)
            if n != b:  # beam search, k = n / b hypotheses per sentence and T = 1: (b, H, k, Dh)
                q = q.view(b, n // b, self.cross_attn.heads, self.cross_attn.dh).transpose(1, 2).contiguous()
            if need_weights:
                y, weights = self.cross_attn.attend_with_weights(q, mem_k, mem_v, mem_mask)
                weights = weights.reshape(n, -1, weights.size(-1))  # (b, k, S) -> (N, 1, S)
            else:
                y = self.cross_attn.attend(q, mem_k, mem_v, mem_mask)
            return y.reshape(n, -1, y.size(-1))  # (b, k, D) -> (N, 1, D)

        x = self.sub2(self.sub1(x, self_attention), cross_attention)
        return self.sub3(x, self.ffn), new_cache, weights


# --- the model --------------------------------------------------------------------------------
class Transformer(Seq2Seq):
    Config = Config
    beam_shares_enc = True  # the k hypotheses of a sentence query its cross-attention keys at once

    def __init__(self, cfg: Config, src_vocab_size: int, tgt_vocab_size: int, pad_id: int):
        super().__init__(cfg, src_vocab_size, tgt_vocab_size, pad_id)
        d, dh = cfg.d_model, cfg.d_model // cfg.heads
        self.tgt_embed = nn.Embedding(tgt_vocab_size, d, padding_idx=pad_id)
        share_src = cfg.tie_embeddings and src_vocab_size == tgt_vocab_size
        self.src_embed = self.tgt_embed if share_src else nn.Embedding(src_vocab_size, d, padding_idx=pad_id)
        for emb in {id(self.src_embed): self.src_embed, id(self.tgt_embed): self.tgt_embed}.values():
            nn.init.normal_(emb.weight, 0.0, d**-0.5)
            nn.init.zeros_(emb.weight[pad_id])
        self.output = Linear(d, tgt_vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tgt_embed.weight
        if cfg.positions == "learned":
            self.pos_embed = nn.Embedding(cfg.max_positions, d)
            nn.init.normal_(self.pos_embed.weight, 0.0, d**-0.5)
        elif cfg.positions == "sinusoidal":
            self.register_buffer("pos_table", sinusoid_table(cfg.max_positions, d), persistent=False)
        elif cfg.positions == "rope":
            for name, table in zip(("rope_cos", "rope_sin"), rope_tables(cfg.max_positions, dh)):
                self.register_buffer(name, table, persistent=False)
        else:
            self.register_buffer("slopes", alibi_slopes(cfg.heads), persistent=False)
        self.encoder = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.encoder_layers))
        self.decoder = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.decoder_layers))
        self.enc_norm = nn.LayerNorm(d) if cfg.pre_norm else nn.Identity()
        self.dec_norm = nn.LayerNorm(d) if cfg.pre_norm else nn.Identity()
        self.scale = math.sqrt(d)
        for name, p in self.named_parameters():
            if p.dim() == 2 and "embed" not in name and name != "output.weight":
                nn.init.xavier_uniform_(p)
        if not cfg.tie_embeddings:
            nn.init.normal_(self.output.weight, 0.0, d**-0.5)

    def max_positions(self) -> int | None:
        return self.cfg.max_positions

    # -- helpers -------------------------------------------------------------------------------
    def embed(self, table: nn.Embedding, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """tokens (B, T), pos (B, T) absolute positions -> (B, T, D)."""
        x = table(tokens) * self.scale
        if self.cfg.positions == "learned":
            x = x + self.pos_embed(pos)
        elif self.cfg.positions == "sinusoidal":
            x = x + self.pos_table[pos]
        return dropout(x, self.cfg.dropout, self.training)

    def rope(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """pos (B, T) -> cos/sin (B, 1, T, Dh) for RoPE, else None."""
        if self.cfg.positions != "rope":
            return None
        return self.rope_cos[pos].unsqueeze(1), self.rope_sin[pos].unsqueeze(1)

    def alibi(self, q_pos: torch.Tensor, k_len: int, causal: bool) -> torch.Tensor:
        """Float bias (1, H, T, S): -slope * distance; -inf on future keys when causal."""
        dist = q_pos[:, None] - torch.arange(k_len, device=q_pos.device)[None, :]  # (T, S)
        bias = -self.slopes[:, None, None] * dist.abs()[None].float()
        if causal:
            bias = bias.masked_fill(dist[None] < 0, float("-inf"))
        return bias.unsqueeze(0)

    def run(self, layer: nn.Module, *args):
        if self.cfg.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(layer, *args, use_reentrant=False)
        return layer(*args)

    # -- the contract --------------------------------------------------------------------------
    def encode(self, src: torch.Tensor, src_len: torch.Tensor) -> State:
        B, S = src.shape
        if S > self.cfg.max_positions:
            raise MtkitError(f"source of {S} tokens exceeds model.max_positions {self.cfg.max_positions}")
        pos = torch.arange(S, device=src.device).expand(B, S)
        key_ok = torch.arange(S, device=src.device)[None, :] < src_len[:, None]  # (B, S)
        mask = key_ok[:, None, None, :]  # (B, 1, 1, S): True = attend
        if self.cfg.positions == "alibi":
            mask = self.alibi(pos[0], S, causal=False).masked_fill(~mask, float("-inf"))
        x, rope = self.embed(self.src_embed, src, pos), self.rope(pos)
        for layer in self.encoder:
            x = self.run(layer, x, mask, rope)
        mem = self.enc_norm(x)
        enc: State = {"src_mask": key_ok}
        for i, layer in enumerate(self.decoder):
            enc[f"cross_k{i}"], enc[f"cross_v{i}"] = layer.cross_attn.project_kv(mem)  # (B, H, S, Dh)
        return enc

    def decode(self, tgt: torch.Tensor, pos: torch.Tensor, enc: State, caches: list | None, need_weights: bool = False):
        """Decoder stack over tgt (B, T) at positions pos (B, T) -> (hidden (B, T, D), caches, attn)."""
        mem_mask = enc["src_mask"][:, None, None, :]
        T = tgt.size(1)
        past = 0 if caches is None else caches[0][0].size(2)
        self_mask = None
        if self.cfg.positions == "alibi":
            self_mask = self.alibi(torch.arange(past, past + T, device=tgt.device), past + T, causal=True)
        elif caches is not None and T > 1:
            raise ValueError("incremental decoding takes one position at a time")
        x, rope = self.embed(self.tgt_embed, tgt, pos), self.rope(pos)
        new_caches, attn = [], None
        last = len(self.decoder) - 1
        for i, layer in enumerate(self.decoder):
            cache = None if caches is None else caches[i]
            args = (x, enc[f"cross_k{i}"], enc[f"cross_v{i}"], mem_mask, self_mask, rope, cache, need_weights and i == last)
            x, kv, w = self.run(layer, *args) if caches is None else layer(*args)
            new_caches.append(kv)
            attn = w if w is not None else attn
        return self.dec_norm(x), new_caches, attn

    def output_projection(self) -> nn.Linear:
        return self.output

    def features(self, src: torch.Tensor, src_len: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        B, T = tgt_in.shape
        if T > self.cfg.max_positions:
            raise MtkitError(f"target of {T} tokens exceeds model.max_positions {self.cfg.max_positions}")
        enc = self.encode(src, src_len)
        pos = torch.arange(T, device=tgt_in.device).expand(B, T)
        return self.decode(tgt_in, pos, enc, None)[0]  # (B, T, D)

    def init_state(self, enc: State) -> State:
        B = enc["src_mask"].size(0)  # per sentence: search expands it
        state: State = {"pos": torch.zeros(B, dtype=torch.long, device=enc["src_mask"].device)}
        empty = enc["cross_k0"].new_zeros(B, self.cfg.heads, 0, self.cfg.d_model // self.cfg.heads)
        return state | {f"self_{kv}{i}": empty for i in range(len(self.decoder)) for kv in "kv"}

    def attention_label(self) -> str:
        return f"cross-attention of decoder layer {self.cfg.decoder_layers} (the last), mean of {self.cfg.heads} heads"

    def step(
        self, prev_tokens: torch.Tensor, enc: State, state: State, need_attn: bool = True
    ) -> tuple[torch.Tensor, State, torch.Tensor | None]:
        pos = state["pos"]
        if state["self_k0"].size(2) >= self.cfg.max_positions:  # cache length, no host sync
            raise MtkitError(f"output longer than model.max_positions {self.cfg.max_positions}")
        caches = [(state[f"self_k{i}"], state[f"self_v{i}"]) for i in range(len(self.decoder))]
        h, caches, attn = self.decode(prev_tokens[:, None], pos[:, None], enc, caches, need_weights=need_attn)
        log_probs = F.log_softmax(self.output(h[:, -1]).float(), dim=-1)  # last position only
        new_state: State = {"pos": pos + 1}
        new_state |= {f"self_{kv}{i}": t for i, cache in enumerate(caches) for kv, t in zip("kv", cache)}
        return log_probs, new_state, None if attn is None else attn[:, -1]
