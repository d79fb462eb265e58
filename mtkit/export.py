"""Export a Transformer checkpoint to CTranslate2 through its public model-spec API, as the self-contained
directory of :mod:`mtkit.ct2_dir` (``model.bin``, ``config.json`` and the vocabulary file(s) written by
CTranslate2, plus mtkit's files). Mapping (mtkit -> CTranslate2 ``TransformerSpec``):

- embeddings: ``src_embed`` / ``tgt_embed`` scaled by sqrt(d_model) (``scale_embeddings``);
- positions: the sinusoidal or learned table is written out (``position_encodings.encodings``), so
  CTranslate2's own sinusoid convention never applies; RoPE becomes rotary attention over the whole
  head in the "two halves" layout (``rotary_dim=0, rotary_interleave=False``); ALiBi cannot be
  expressed (the encoder has no ALiBi in CTranslate2) and is refused;
- ``qkv`` -> ``self_attention.linear[0]`` (q, k, v stacked in that order), ``out`` -> ``linear[1]``;
  cross attention ``q`` / ``kv`` / ``out`` -> ``linear[0]`` / ``linear[1]`` / ``linear[2]``;
- ``sub1/sub2/sub3.norm`` -> the sublayers' ``layer_norm`` (pre- or post-norm as trained); ``enc_norm``
  / ``dec_norm`` -> the final norms of a pre-norm model; epsilon 1e-5 (torch's);
- ``output`` -> ``decoder.projection`` (no bias; tied weights are written once);
- vocabularies in sentencepiece id order; ``<s>``/``</s>``/``<unk>`` named after mtkit's bos/eos/unk
  pieces; decoding starts from BOS, and the source gets EOS appended (``add_source_eos``), as in
  mtkit's ``collate_source``."""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from mtkit.ct2_dir import META, SRC_SPM, TGT_SPM, import_ctranslate2
from mtkit.errors import MtkitError

logger = logging.getLogger("mtkit.export")

FORMATS = ("ctranslate2",)
LAYER_NORM_EPS = 1e-5  # torch.nn.LayerNorm's default, used by every mtkit Transformer
ACTIVATIONS = {"relu": "RELU", "gelu": "GELU", "silu": "SWISH"}


def vocabulary(spm) -> list[str]:
    """Pieces in id order (a pad id past the sentencepiece model is ``<pad>``)."""
    tokens = spm.id_to_piece(range(spm.size))
    if len(set(tokens)) != len(tokens):
        dup = next(t for t in tokens if tokens.count(t) > 1)
        raise MtkitError(f"sentencepiece model {spm.name} has the piece '{dup}' twice; CTranslate2 needs unique pieces")
    return tokens


def check_exportable(cfg, path: str | Path) -> None:
    """Refuse what CTranslate2 cannot run faithfully, naming the config key."""
    arch = cfg.model.arch
    if arch != "transformer":
        raise MtkitError(f"checkpoint {path}: model.arch '{arch}' cannot be exported to CTranslate2 (only transformer)")
    if cfg.model.positions == "alibi":
        raise MtkitError(f"checkpoint {path}: model.positions 'alibi' cannot be exported to CTranslate2 "
                         "(its Transformer encoder has no ALiBi)")
    if cfg.model.activation not in ACTIVATIONS:
        raise MtkitError(f"checkpoint {path}: model.activation '{cfg.model.activation}' has no CTranslate2 equivalent")


def _np(t: torch.Tensor):
    return t.detach().to(torch.float32).cpu().contiguous().numpy()


def _linear(spec, module: torch.nn.Linear) -> None:
    spec.weight = _np(module.weight)
    if module.bias is not None:
        spec.bias = _np(module.bias)


def _norm(spec, module: torch.nn.LayerNorm) -> None:
    spec.gamma, spec.beta = _np(module.weight), _np(module.bias)


def _attention(spec, norm: torch.nn.LayerNorm, *linears: torch.nn.Linear) -> None:
    _norm(spec.layer_norm, norm)
    for linear_spec, module in zip(spec.linear, linears):
        _linear(linear_spec, module)


def _ffn(spec, sub, ffn) -> None:
    _norm(spec.layer_norm, sub.norm)
    _linear(spec.linear_0, ffn.fc1)
    _linear(spec.linear_1, ffn.fc2)


def _inputs(spec, embeddings, model, embed: torch.nn.Embedding, final_norm: torch.nn.Module) -> None:
    """A stack's embeddings, scaled as in Transformer.embed (x * sqrt(d_model)), its absolute position
    table (sinusoidal or learned; none for RoPE) and, when pre-norm, its final norm."""
    embeddings.weight = _np(embed.weight)
    spec.scale_embeddings = True
    if model.cfg.positions == "sinusoidal":
        spec.position_encodings.encodings = _np(model.pos_table[: model.cfg.max_positions])
    elif model.cfg.positions == "learned":
        spec.position_encodings.encodings = _np(model.pos_embed.weight)
    elif hasattr(spec, "position_encodings"):  # rope: no absolute positions at all
        del spec.position_encodings
    if model.cfg.pre_norm:
        _norm(spec.layer_norm, final_norm)


def build_spec(model, src_tokens: list[str], tgt_tokens: list[str], specials: dict[str, str]):
    """A validated-ready ``ctranslate2.specs.TransformerSpec`` holding ``model``'s weights."""
    import_ctranslate2()
    from ctranslate2.specs import common_spec, transformer_spec

    cfg = model.cfg
    act = getattr(common_spec.Activation, ACTIVATIONS[cfg.activation])
    rope = {"rotary_dim": 0, "rotary_interleave": False} if cfg.positions == "rope" else {}
    encoder = transformer_spec.TransformerEncoderSpec(
        cfg.encoder_layers, cfg.heads, pre_norm=cfg.pre_norm, activation=act, **rope
    )
    decoder = transformer_spec.TransformerDecoderSpec(  # attention returned = last layer, mean of all heads
        cfg.decoder_layers, cfg.heads, pre_norm=cfg.pre_norm, activation=act,
        alignment_layer=-1, alignment_heads=cfg.heads, **rope
    )
    spec = transformer_spec.TransformerSpec(encoder, decoder)
    for key, value in {"layer_norm_epsilon": LAYER_NORM_EPS, "add_source_eos": True, **specials}.items():
        setattr(spec.config, key, value)

    _inputs(encoder, encoder.embeddings[0], model, model.src_embed, model.enc_norm)
    for layer_spec, layer in zip(encoder.layer, model.encoder):
        _attention(layer_spec.self_attention, layer.sub1.norm, layer.attn.qkv, layer.attn.out)
        _ffn(layer_spec.ffn, layer.sub2, layer.ffn)

    _inputs(decoder, decoder.embeddings, model, model.tgt_embed, model.dec_norm)
    for layer_spec, layer in zip(decoder.layer, model.decoder):
        _attention(layer_spec.self_attention, layer.sub1.norm, layer.self_attn.qkv, layer.self_attn.out)
        cross = layer.cross_attn
        _attention(layer_spec.attention, layer.sub2.norm, cross.q, cross.kv, cross.out)
        _ffn(layer_spec.ffn, layer.sub3, layer.ffn)
    decoder.projection.weight = _np(model.output.weight)

    spec.register_source_vocabulary(src_tokens)
    spec.register_target_vocabulary(tgt_tokens)
    return spec


def _converter(spec):
    from ctranslate2.converters.converter import Converter

    class MtkitConverter(Converter):
        """Hands CTranslate2 an already built spec; ``convert`` validates, quantizes and saves."""

        def _load(self):
            return spec

    return MtkitConverter()


def _output_dir(out_dir: str | Path, force: bool) -> Path:
    """The export's directory: absent, empty, or replaced with ``force``."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise MtkitError(f"export output {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise MtkitError(f"export output directory {out} is not empty (use --force to overwrite)")
    return out


def _metadata(ct2_version: str, ckpt_path: str | Path, quantization: str | None, cfg: Any, src_spm: Any,
              tgt_spm: Any, payload: dict[str, Any]) -> dict[str, Any]:
    """What ``mtkit_export.json`` records of the export."""
    limits = [n for n in (cfg.data.max_src_len, cfg.model.max_positions) if n]
    return {
        "format": "ctranslate2",
        "ctranslate2_version": ct2_version,
        "checkpoint": str(ckpt_path),
        "quantization": quantization or "float32",
        "arch": cfg.model.arch,
        "positions": cfg.model.positions,
        "max_src_len": min(limits) if limits else None,  # source tokens incl. EOS
        "max_positions": cfg.model.max_positions,
        "joint_vocabulary": src_spm.model_bytes == tgt_spm.model_bytes,
        "decode": cfg.to_dict()["decode"],
        "metrics": payload.get("metrics") or {},
    }


def export_ctranslate2(
    ckpt_path: str | Path, out_dir: str | Path, quantization: str | None = None, force: bool = False
) -> dict[str, Any]:
    """Convert an mtkit Transformer checkpoint into a CTranslate2 model directory.
    ``quantization``: None (float32 weights) or any CTranslate2 weight type (int8, int8_float32,
    int8_float16, int8_bfloat16, int16, float16, bfloat16, float32). Returns the metadata that
    is also written to ``out_dir/mtkit_export.json``."""
    ct2 = import_ctranslate2()
    from ctranslate2.specs.model_spec import ACCEPTED_MODEL_TYPES

    from mtkit.checkpoint import build_from_checkpoint, load_checkpoint
    from mtkit.config import config_from_dict

    if quantization is not None and quantization not in ACCEPTED_MODEL_TYPES:
        raise MtkitError(f"unknown quantization '{quantization}'; valid: {', '.join(ACCEPTED_MODEL_TYPES)}")
    out = _output_dir(out_dir, force)

    payload = load_checkpoint(ckpt_path)
    check_exportable(config_from_dict(payload["config"]), ckpt_path)
    model, cfg, src_spm, tgt_spm = build_from_checkpoint(payload, ckpt_path)
    src_tokens, tgt_tokens = vocabulary(src_spm), vocabulary(tgt_spm)
    if len(src_tokens) != model.src_vocab_size or len(tgt_tokens) != model.tgt_vocab_size:
        raise MtkitError(f"checkpoint {ckpt_path}: vocabulary sizes {model.src_vocab_size}/{model.tgt_vocab_size} "
                         f"do not match its sentencepiece models ({len(src_tokens)}/{len(tgt_tokens)})")
    specials = {  # CTranslate2's special pieces, from the target model; source and target must share EOS
        "unk_token": tgt_tokens[tgt_spm.unk] if tgt_spm.unk >= 0 else "<unk>",
        "bos_token": tgt_tokens[tgt_spm.bos],
        "eos_token": tgt_tokens[tgt_spm.eos],
        "decoder_start_token": tgt_tokens[tgt_spm.bos],
    }
    if src_tokens[src_spm.eos] != specials["eos_token"]:
        raise MtkitError(f"checkpoint {ckpt_path}: source and target EOS pieces differ "
                         f"('{src_tokens[src_spm.eos]}' vs '{specials['eos_token']}'); CTranslate2 needs one")
    with torch.no_grad():
        spec = build_spec(model, src_tokens, tgt_tokens, specials)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        staged = tmp / "model"
        try:
            _converter(spec).convert(str(staged), quantization=quantization, force=True)
        except (ValueError, RuntimeError, NotImplementedError) as exc:
            raise MtkitError(f"CTranslate2 rejected the export of {ckpt_path}: {str(exc).splitlines()[0]}") from None
        (staged / SRC_SPM).write_bytes(src_spm.model_bytes)
        (staged / TGT_SPM).write_bytes(tgt_spm.model_bytes)
        meta = _metadata(ct2.__version__, ckpt_path, quantization, cfg, src_spm, tgt_spm, payload)
        (staged / META).write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
        if out.exists():  # replaced only once the new export is complete
            shutil.rmtree(out)
        staged.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("exported %s to %s (CTranslate2 %s, %s)", ckpt_path, out, ct2.__version__, meta["quantization"])
    return meta


def export(fmt: str, ckpt_path: str | Path, out_dir: str | Path, **kwargs: Any) -> dict[str, Any]:
    """Dispatch on the export format (only ``ctranslate2`` so far)."""
    if fmt != "ctranslate2":
        raise MtkitError(f"unknown export format '{fmt}'; valid: {', '.join(FORMATS)}")
    return export_ctranslate2(ckpt_path, out_dir, **kwargs)
