"""Rebuild an mtkit Transformer checkpoint as an OpenNMT-py 3.5 checkpoint, for a decoding
comparison on the very same model (same weights, so similar output and BLEU by construction).

Run it with the python of an OpenNMT-py 3.5 environment (e.g. the one `shared/bench/peers`
installs), not mtkit's:

    $PEERS_DIR/onmt/venv/bin/python benchmarks/onmt_from_mtkit.py CKPT --work DIR

It writes into DIR: ``spm.model`` (the checkpoint's sentencepiece model), ``vocab.txt``, a
one-update OpenNMT-py training run that creates a checkpoint with OpenNMT-py's own options and
vocabulary layout, and ``model.pt``: that checkpoint with mtkit's weights put in. OpenNMT-py's
Transformer matches mtkit's ``transformer_small`` layout when configured with pre-norm,
``SinusoidalConcat`` positions, biases on the attention projections and LayerNorm eps 1e-5.
mtkit appends EOS to every source sentence, so the source files given to ``onmt_translate`` must
end each line with ``</s>`` (``--encode`` writes such files). Before saving, teacher-forced
log-probabilities of both models are compared on a few sentences; the script fails if they differ.
"""

from __future__ import annotations

import argparse
import gzip
import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
# OpenNMT-py 3.5 checkpoints pickle argparse.Namespace: torch >= 2.6 refuses them by default
os.environ.setdefault("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
SPECIALS = {"<unk>": "unk", "<blank>": "pad", "<s>": "bos", "</s>": "eos"}  # OpenNMT-py name -> mtkit id name


def load_mtkit(path: str) -> dict:
    sys.path.insert(0, str(REPO))
    from mtkit.checkpoint import load_checkpoint

    return load_checkpoint(path)


def onmt_config(work: Path, m: dict, data: tuple[Path, Path]) -> str:
    return f"""save_data: {work}/onmt
src_vocab: {work}/vocab.txt
share_vocab: true
src_vocab_size: 1000000
tgt_vocab_size: 1000000
vocab_size_multiple: 1
src_words_min_frequency: 0
tgt_words_min_frequency: 0
overwrite: true
data:
  corpus_1:
    path_src: {data[0]}
    path_tgt: {data[1]}
save_model: {work}/init
save_checkpoint_steps: 1
train_steps: 1
valid_steps: 1000000
num_workers: 0
seed: 1
encoder_type: transformer
decoder_type: transformer
enc_layers: {m['encoder_layers']}
dec_layers: {m['decoder_layers']}
hidden_size: {m['d_model']}
word_vec_size: {m['d_model']}
heads: {m['heads']}
transformer_ff: {m['ffn_dim']}
dropout: [0.0]
attention_dropout: [0.0]
position_encoding: true
position_encoding_type: SinusoidalConcat
max_relative_positions: 0
add_qkvbias: true
add_ffnbias: true
norm_eps: 1.0e-5
layer_norm: standard
pos_ffn_activation_fn: {m['activation']}
share_embeddings: true
share_decoder_embeddings: true
optim: adam
learning_rate: 0.0
batch_type: sents
batch_size: 2
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--work", required=True)
    ap.add_argument("--encode", nargs="*", default=[], metavar="SRC[:OUT]",
                    help="also write these source files (plain or .gz) as pieces + </s> for onmt_translate")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)

    import sentencepiece as spm

    ck = load_mtkit(args.checkpoint)
    m, vocab = ck["config"]["model"], ck["vocab"]
    if m["arch"] != "transformer" or not m["pre_norm"] or m["positions"] != "sinusoidal" or not m["tie_embeddings"]:
        raise SystemExit("only pre-norm, sinusoidal, tied-embedding Transformers map onto OpenNMT-py's")
    if ck["spm"]["src"] != ck["spm"]["tgt"]:
        raise SystemExit("only joint vocabularies are supported")
    (work / "spm.model").write_bytes(ck["spm"]["src"])
    sp = spm.SentencePieceProcessor(model_file=str(work / "spm.model"))
    ids = {name: vocab[name] for name in ("pad", "unk", "bos", "eos")}
    special_ids = set(ids.values())
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    with open(work / "vocab.txt", "w", encoding="utf-8") as f:
        for i, p in enumerate(pieces):
            if i not in special_ids:
                f.write(f"{p}\t{10**7 - i}\n")

    def encode(src: str, out: Path) -> None:
        opener = gzip.open if src.endswith(".gz") else open
        with opener(src, "rt", encoding="utf-8") as f, open(out, "w", encoding="utf-8") as g:
            for line in f:
                g.write(" ".join(sp.encode(line.rstrip("\n"), out_type=str) + ["</s>"]) + "\n")

    probe = ["A man is riding a bike.", "Two dogs play in the snow near a small red house."]
    (work / "probe.src").write_text("".join(" ".join(sp.encode(s, out_type=str)) + "\n" for s in probe), encoding="utf-8")
    bin_dir = Path(sys.executable).parent
    if not (work / "init_step_1.pt").exists():  # a one-update run: OpenNMT-py's options and vocabulary layout
        (work / "init.yaml").write_text(onmt_config(work, m, (work / "probe.src", work / "probe.src")), encoding="utf-8")
        res = subprocess.run([str(bin_dir / "onmt_train"), "-config", str(work / "init.yaml")], capture_output=True, text=True)
        if res.returncode != 0:
            raise SystemExit(f"onmt_train failed:\n{res.stderr[-3000:]}")
    onmt_ck = torch.load(work / "init_step_1.pt", map_location="cpu", weights_only=False)

    # vocabulary: OpenNMT-py's order, rows taken from mtkit's by piece (specials by role)
    onmt_tokens = onmt_ck["vocab"]["src"]
    piece_id = {p: i for i, p in enumerate(pieces)}
    rows = torch.tensor([ids[SPECIALS[t]] if t in SPECIALS else piece_id[t] for t in onmt_tokens])
    sd = ck["model"]
    emb = sd["tgt_embed.weight"].float().index_select(0, rows)

    new = {}
    d = m["d_model"]

    def lin(dst: str, w: torch.Tensor, b: torch.Tensor) -> None:
        new[f"{dst}.weight"], new[f"{dst}.bias"] = w.float(), b.float()

    def norm(dst: str, src: str) -> None:
        new[f"{dst}.weight"], new[f"{dst}.bias"] = sd[f"{src}.weight"].float(), sd[f"{src}.bias"].float()

    def self_attn(dst: str, src: str) -> None:
        w, b = sd[f"{src}.qkv.weight"], sd[f"{src}.qkv.bias"]
        for j, name in enumerate(("linear_query", "linear_keys", "linear_values")):
            lin(f"{dst}.{name}", w[j * d : (j + 1) * d], b[j * d : (j + 1) * d])
        lin(f"{dst}.final_linear", sd[f"{src}.out.weight"], sd[f"{src}.out.bias"])

    def ffn(dst: str, src: str, norm_src: str) -> None:
        lin(f"{dst}.w_1", sd[f"{src}.fc1.weight"], sd[f"{src}.fc1.bias"])
        lin(f"{dst}.w_2", sd[f"{src}.fc2.weight"], sd[f"{src}.fc2.bias"])
        norm(f"{dst}.layer_norm", norm_src)

    new["encoder.embeddings.make_embedding.emb_luts.0.weight"] = emb
    new["decoder.embeddings.make_embedding.emb_luts.0.weight"] = emb
    for i in range(m["encoder_layers"]):
        dst, src = f"encoder.transformer.{i}", f"encoder.{i}"
        norm(f"{dst}.layer_norm", f"{src}.sub1.norm")
        self_attn(f"{dst}.self_attn", f"{src}.attn")
        ffn(f"{dst}.feed_forward", f"{src}.ffn", f"{src}.sub2.norm")
    norm("encoder.layer_norm", "enc_norm")
    for i in range(m["decoder_layers"]):
        dst, src = f"decoder.transformer_layers.{i}", f"decoder.{i}"
        norm(f"{dst}.layer_norm_1", f"{src}.sub1.norm")
        self_attn(f"{dst}.self_attn", f"{src}.self_attn")
        norm(f"{dst}.layer_norm_2", f"{src}.sub2.norm")
        wq, bq = sd[f"{src}.cross_attn.q.weight"], sd[f"{src}.cross_attn.q.bias"]
        wkv, bkv = sd[f"{src}.cross_attn.kv.weight"], sd[f"{src}.cross_attn.kv.bias"]
        lin(f"{dst}.context_attn.linear_query", wq, bq)
        lin(f"{dst}.context_attn.linear_keys", wkv[:d], bkv[:d])
        lin(f"{dst}.context_attn.linear_values", wkv[d:], bkv[d:])
        lin(f"{dst}.context_attn.final_linear", sd[f"{src}.cross_attn.out.weight"], sd[f"{src}.cross_attn.out.bias"])
        ffn(f"{dst}.feed_forward", f"{src}.ffn", f"{src}.sub3.norm")
    norm("decoder.layer_norm", "dec_norm")

    model_sd = onmt_ck["model"]
    missing = sorted(set(model_sd) - set(new) - {k for k in model_sd if k.endswith(".pe")})
    unknown = sorted(set(new) - set(model_sd))
    if missing or unknown:
        raise SystemExit(f"parameter names do not line up: missing {missing[:8]}, unknown {unknown[:8]}")
    for k, v in new.items():
        if model_sd[k].shape != v.shape:
            raise SystemExit(f"{k}: OpenNMT-py shape {tuple(model_sd[k].shape)}, mtkit {tuple(v.shape)}")
        model_sd[k] = v
    gen = onmt_ck["generator"]
    gen["weight"] = emb
    if "bias" in gen:
        gen["bias"] = torch.zeros_like(gen["bias"])
    onmt_ck["optim"] = None
    torch.save(onmt_ck, work / "model.pt")
    check(work / "model.pt", ck, onmt_tokens, rows, sp, probe)
    for spec in args.encode:
        src, _, out = spec.partition(":")
        encode(src, Path(out or work / (Path(src).name.removesuffix(".gz") + ".pieces")))
    print(f"wrote {work / 'model.pt'}")


def check(path: Path, ck: dict, onmt_tokens: list[str], rows: torch.Tensor, sp, probe: list[str]) -> None:
    """Teacher-forced log-probs of OpenNMT-py's rebuilt model == mtkit's, on the probe sentences."""
    from onmt.model_builder import load_test_model
    from onmt.opts import translate_opts
    from onmt.utils.parse import ArgumentParser

    from mtkit.checkpoint import build_from_checkpoint

    parser = ArgumentParser()
    translate_opts(parser)
    opt = parser.parse_args(["-model", str(path), "-src", "dummy"])
    _, onmt_model, _ = load_test_model(opt)
    onmt_model.eval()
    mt_model = build_from_checkpoint(ck)[0].eval()
    v = ck["vocab"]
    inv = torch.empty_like(rows)
    inv[rows] = torch.arange(len(rows))  # mtkit id -> OpenNMT-py id
    worst = 0.0
    with torch.no_grad():
        for s in probe:
            src = sp.encode(s) + [v["eos"]]
            tgt = [v["bos"]] + src[:-1]
            mt_lp = mt_model(torch.tensor([src]), torch.tensor([len(src)]), torch.tensor([tgt])).log_softmax(-1)[0]
            o_src = inv[torch.tensor(src)].view(1, -1, 1)
            o_tgt = inv[torch.tensor(tgt + [v["eos"]])].view(1, -1, 1)  # OpenNMT-py drops the last position
            dec_out, _ = onmt_model(o_src, o_tgt, torch.tensor([len(src)]), with_align=False)
            o_lp = onmt_model.generator(dec_out[0]).log_softmax(-1)
            worst = max(worst, float((o_lp[:, inv] - mt_lp).abs().max()))
    print(f"max |log-prob difference| OpenNMT-py vs mtkit: {worst:.2e}")
    if worst > 1e-3:
        raise SystemExit("the rebuilt OpenNMT-py model does not compute what the mtkit model computes")


if __name__ == "__main__":
    main()
