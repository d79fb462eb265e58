#!/usr/bin/env bash
# mtkit's recurrent attention model beside OpenNMT-py's, on one recurrent reference setup, in one run.
#
#   PEERS_DIR=/work/peers bash benchmarks/compare_rnn_peers.sh [part ...]
#
# parts (default: onmt_setup train onmt_model mtkit_model decode table)
#   onmt_setup    OpenNMT-py venv (shared/bench/peers/setup_venvs.sh onmt) and the shared SentencePiece data
#                 (run_all.sh preprocess), each only if missing
#   mtkit_data    the same pieces binarized for mtkit (`mtkit preprocess --spm PEERS_DIR/data/spm.model`),
#                 into OUT/mtkit_data, only if missing (the mtkit parts run it themselves when needed)
#   onmt_train    training throughput: WARM untimed then MEAS timed updates of onmt_train, target tokens/s
#                 from its timestamped log (shared/bench/peers/parse_train_log.py)
#   mtkit_train   the same with benchmarks/train_speed.py
#   joey_train    the same with JoeyNMT's recurrent model (venv: shared/bench/peers/setup_venvs.sh joeynmt), whose
#                 trainer has no length bucketing: its token batches carry more padding than the other two
#   onmt_model    onmt_train for TRAIN_MIN minutes from its first update, then SIGINT (OpenNMT-py saves no
#                 checkpoint on SIGINT: it saves every ONMT_SAVE_STEPS updates and the last one is decoded)
#   mtkit_model   mtkit train for TRAIN_MIN minutes of training steps (train.max_time_minutes)
#   onmt_decode   onmt_translate of the OpenNMT-py model          } beam 5, batches of 32 sentences, 2 threads,
#   mtkit_decode  benchmarks/decode_speed.py on the mtkit model   } length normalisation by |Y|, translation
#                 (once per MTKIT_STOPPING rule)                  } time only, target pieces/s, sacreBLEU
#   train         the training parts REPEAT times (TRAIN_PEERS, then mtkit_train; order alternating) into OUT/train1, ...
#   decode        onmt_decode and mtkit_decode REPEAT times (order alternating) into OUT/decode1, decode2, ...
#   split         both decoders once more under torch's profiler (benchmarks/time_split.py, each toolkit with its
#                 own interpreter): seconds in matrix products, fused RNN kernels, other operations and outside
#                 any operation, into OUT/split_onmt.json and OUT/split_mtkit.json (profiled: slower than decode)
#   table         benchmarks/rnn_peers_table.py: JSON with every figure and the mtkit / OpenNMT-py ratios
#                 (training and decoding: medians over the repeats); also written to OUT/table.json
#
# Knobs: OUT (default PEERS_DIR/compare_rnn), WARM (30), MEAS (150), TRAIN_MIN (8), REPEAT (3), LINES (1000
# test lines decoded), ONMT_SAVE_STEPS (50), MTKIT_STOPPING ("first full"), TIE (1: tied embeddings on both
# sides; 0: untied on both, for an mtkit without rnn_attention's model.tie_embeddings), MTKIT_SET (more mtkit
# overrides, space-separated), ONMT_CKPT / MTKIT_CKPT (decode these checkpoints instead).
#
# Recurrent reference setup, both toolkits: Multi30k En->De, the shared joint SentencePiece BPE 8k model
# (shared/bench/peers/preprocess.py; mtkit reuses it, so both train and decode the same pieces); 2+2 layer
# LSTMs, bidirectional encoder, Luong global "general" attention with input feeding, embeddings 256,
# decoder hidden 256, dropout 0.2, uniform(-0.1, 0.1) init, tied embeddings; Adam(0.9, 0.999, eps 1e-8),
# constant lr 1e-3 (no warmup), gradient norm clipped at 1.0, label smoothing 0.1, loss normalised by target
# tokens, batches of 2048 tokens (both count sentences x longest side incl. padding), 2 threads.
# Tied embeddings: mtkit's model.tie_embeddings shares the target embedding with the output layer and, with a
# joint vocabulary, with the source embedding, so OpenNMT-py gets share_decoder_embeddings + share_embeddings.
# Differences left:
# - OpenNMT-py splits hidden_size over the brnn directions (128 each, memory 256); mtkit gets the same shape
#   with model.encoder_hidden_dim=128 (its hidden_dim is per direction unless that is set).
# - OpenNMT-py's vocabulary holds the pieces seen in training (~7.8k), mtkit's the whole spm model (8k + pad).
# - mtkit sets LSTM forget-gate biases to model.forget_bias (1.0) after the uniform init; OpenNMT-py does not.
# - mtkit's encoder final states reach the decoder through its bridge (tanh(W s)); OpenNMT-py's (bridge:
#   false) are passed on as they are.
# - Output length caps: OpenNMT-py min(200, 1.25 x the batch's longest source + 5); mtkit 1.2 x source + 10.
set -eu
REPO=$(cd "$(dirname "$0")/.." && pwd)
PEERS=${PEERS:-$REPO/../shared/bench/peers}
export PEERS_DIR=${PEERS_DIR:-$HOME/.cache/mtkit-peers}
export DATA=${DATA:-$PEERS_DIR/data}
export MTKIT_DATA=${MTKIT_DATA:-$REPO/../shared/data/multi30k}  # raw files: decode_speed.py's test set
OUT=${OUT:-$PEERS_DIR/compare_rnn}
export WARM=${WARM:-30} MEAS=${MEAS:-150}
TRAIN_MIN=${TRAIN_MIN:-8} REPEAT=${REPEAT:-3} LINES=${LINES:-1000} TIE=${TIE:-1}
ONMT_SAVE_STEPS=${ONMT_SAVE_STEPS:-50} MTKIT_STOPPING=${MTKIT_STOPPING:-first full}
TRAIN_PEERS=${TRAIN_PEERS:-onmt_train joey_train}
source "$PEERS/common.sh"  # THREADS=2, OMP/MKL threads, TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD, run_timed
V=$PEERS_DIR/onmt/venv/bin
JV=$PEERS_DIR/joeynmt/venv/bin
DOUT=${DOUT:-$OUT}  # where the decode parts write
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$REPO"

# mtkit overrides of the luong_small preset that make the setup above (some restate the preset)
MTKIT_OVR=(model.bidirectional=true model.encoder_hidden_dim=128 model.encoder_layers=2 model.decoder_layers=2 model.embed_dim=256
  model.hidden_dim=256 model.cell=lstm model.attention=general model.window=global model.input_feed=true
  model.dropout=0.2 model.init_scale=0.1
  train.optimizer=adam train.lr=0.001 train.lr_scheduler=constant train.warmup_updates=0 "train.adam_betas=[0.9,0.999]"
  train.adam_eps=1e-8 train.clip_norm=1.0 train.label_smoothing=0.1 train.max_tokens=2048 train.update_freq=1
  train.num_threads=$THREADS train.amp=none train.pass_tokens=0)
if [ "$TIE" = 1 ]; then MTKIT_OVR+=(model.tie_embeddings=true)
elif python -c "from mtkit.config import load_config; load_config('luong_small', ['model.tie_embeddings=false'])" 2>/dev/null
then MTKIT_OVR+=(model.tie_embeddings=false)  # the preset may tie; an mtkit without the key never does
fi
for o in ${MTKIT_SET:-}; do MTKIT_OVR+=("$o"); done
mtkit_sets() { for o in "${MTKIT_OVR[@]}"; do printf -- '--set\n%s\n' "$o"; done; }

mtkit_check() {  # fail before any long run if this mtkit does not know an override (e.g. tie_embeddings)
  python - "${MTKIT_OVR[@]}" <<'PY' || { echo "mtkit rejects an override (see above); TIE=0 runs both sides untied" >&2; exit 2; }
import sys
from mtkit.config import load_config
try:
    load_config("luong_small", sys.argv[1:])
except Exception as e:
    sys.exit(f"mtkit config error: {e}")
PY
}

# onmt_translate's settings (decode and split parts): max_length 200 as in onmt.sh; OpenNMT-py also caps
# at 1.25 x the batch's longest source + 5 (default)
ONMT_DECODE=(-beam_size 5 -batch_size 32 -batch_type sents -max_length 200 -length_penalty avg -gpu -1)
onmt_ckpt() { echo "${ONMT_CKPT:-$(sed -n 's/^checkpoint: //p' "$OUT/onmt_model.summary")}"; }

mtkit_data() {
  [ -s "$OUT/mtkit_data/manifest.json" ] && return 0
  # the shared pieces: same spm model; no length/ratio filter (OpenNMT-py trains on all 29,000 pairs)
  python -m mtkit preprocess -s en -t de --train "$DATA/train" --valid "$DATA/val" --spm "$DATA/spm.model" \
      --max-len 250 --max-ratio 0 --workers "$THREADS" -o "$OUT/mtkit_data" --force > "$OUT/mtkit_data.log" 2>&1 \
    || { tail -20 "$OUT/mtkit_data.log"; exit 1; }
}

onmt_cfg() {  # $1 yaml, $2 save_model prefix, $3 train_steps, $4 save_checkpoint_steps, $5 report_every
  local share=false; [ "$TIE" = 1 ] && share=true
  cat > "$1" <<YAML
save_data: $OUT/onmt/data
src_vocab: $OUT/onmt/vocab.shared
share_vocab: true
src_vocab_size: 10000
tgt_vocab_size: 10000
overwrite: true
data:
  corpus_1:
    path_src: $DATA/train.sp.en
    path_tgt: $DATA/train.sp.de
save_model: $2
save_checkpoint_steps: $4
keep_checkpoint: 2
seed: 1234
train_steps: $3
valid_steps: 10000000
report_every: $5
num_workers: 0
# model: 2+2 LSTM, brnn encoder (hidden_size split over directions: 128 each), Luong general attention
encoder_type: brnn
decoder_type: rnn
rnn_type: LSTM
enc_layers: 2
dec_layers: 2
hidden_size: 256
word_vec_size: 256
global_attention: general
global_attention_function: softmax
input_feed: 1
bridge: false
dropout: [0.2]
share_decoder_embeddings: $share
share_embeddings: $share   # mtkit's tie_embeddings with a joint vocabulary ties the source embedding too
param_init: 0.1
param_init_glorot: false
# optimisation
label_smoothing: 0.1
optim: adam
adam_beta1: 0.9
adam_beta2: 0.999
learning_rate: 0.001
decay_method: none
start_decay_steps: 10000000
max_grad_norm: 1.0
batch_type: tokens
batch_size: 2048
normalization: tokens
accum_count: [1]
model_dtype: fp32
YAML
  [ -s "$OUT/onmt/vocab.shared" ] || "$V/onmt_build_vocab" -config "$1" -n_sample -1 > "$OUT/onmt/build_vocab.log" 2>&1
}

joey_cfg() {  # $1 yaml, $2 model_dir, $3 updates, $4 logging_freq: the recurrent reference setup in JoeyNMT 2.3
  local tied=false; [ "$TIE" = 1 ] && tied=true
  cat > "$1" <<YAML
name: "multi30k_rnn_bench"
joeynmt_version: "2.3.0"
model_dir: "$2"
use_cuda: False
fp16: False
random_seed: 1234
data:
  train: "$DATA/train.sp"
  dev: "$DATA/val.sp"
  test: "$DATA/test.sp"
  dataset_type: "plain"
  sample_dev_subset: -1
  src: {lang: "en", max_length: 250, lowercase: False, normalize: False, level: "word",
        voc_file: "$OUT/joey/vocab.txt", tokenizer_type: "none"}
  trg: {lang: "de", max_length: 250, lowercase: False, normalize: False, level: "word",
        voc_file: "$OUT/joey/vocab.txt", tokenizer_type: "none"}
testing:
  n_best: 1
  beam_size: 5
  beam_alpha: 1.0
  batch_size: 32
  batch_type: "sentence"
  max_output_length: 200
  eval_metrics: ["bleu"]
training:
  random_seed: 1234
  optimizer: "adam"
  adam_betas: [0.9, 0.999]
  scheduling: "exponential" # with decrease_factor 1: a constant lr (its plateau scheduler fails with this torch)
  decrease_factor: 1.0
  learning_rate: 0.001
  learning_rate_min: 1.0e-8
  clip_grad_norm: 1.0
  label_smoothing: 0.1
  loss: "crossentropy"
  batch_size: 2048
  batch_type: "token"
  batch_multiplier: 1
  normalization: "tokens"
  updates: $3
  epochs: 1000
  validation_freq: 100000000
  logging_freq: $4
  early_stopping_metric: "ppl"
  model_dir: "$2"
  overwrite: True
  shuffle: True
  use_cuda: False
  keep_best_ckpts: 1
  num_workers: 0
model:
  initializer: "uniform"
  init_weight: 0.1
  bias_initializer: "zeros"
  embed_initializer: "uniform"
  embed_init_weight: 0.1
  tied_embeddings: $tied
  tied_softmax: $tied
  encoder:   # hidden_size per direction: 128 each, memory 256 (as OpenNMT-py's brnn 256)
    type: "recurrent"
    rnn_type: "lstm"
    bidirectional: True
    num_layers: 2
    hidden_size: 128
    embeddings: {embedding_dim: 256, dropout: 0.2}
    dropout: 0.2
  decoder:
    type: "recurrent"
    rnn_type: "lstm"
    attention: "luong"      # general (bilinear) score
    input_feeding: True
    init_hidden: "bridge"
    num_layers: 2
    hidden_size: 256
    embeddings: {embedding_dim: 256, dropout: 0.2}
    dropout: 0.2
    hidden_dropout: 0.2
YAML
}

alternate() {  # $1 name, $2 peer parts, $3 mtkit part: REPEAT runs into OUT/<name>1, ..., the order alternating
  local i order
  for i in $(seq "$REPEAT"); do
    order="$2 $3"; [ $((i % 2)) = 0 ] && order="$3 $2"
    DOUT=$OUT/$1$i OUT=$OUT bash "$REPO/benchmarks/compare_rnn_peers.sh" $order
  done
}

exit_status() { grep 'Exit status' "$1" | awk '{print $NF}'; }

parts=${*:-onmt_setup train onmt_model mtkit_model decode table}
for part in $parts; do
  echo "=== $part $(date -u +%FT%TZ)"
  mkdir -p "$DOUT"
  case $part in
    train) alternate train "$TRAIN_PEERS" mtkit_train ;;
    decode) alternate decode onmt_decode mtkit_decode ;;
    onmt_setup)
      [ -x "$V/onmt_train" ] || bash "$PEERS/setup_venvs.sh" onmt
      [ -s "$DATA/spm.model" ] && [ -s "$DATA/test.sp.en" ] || bash "$PEERS/run_all.sh" preprocess ;;
    mtkit_data) mtkit_check; mtkit_data ;;
    onmt_train)
      mkdir -p "$OUT/onmt" "$DOUT/onmt"
      every=10; [ $((WARM % 10)) = 0 ] && [ $((MEAS % 10)) = 0 ] || every=1
      onmt_cfg "$DOUT/onmt/throughput.yaml" "$DOUT/onmt/throughput/model" $((WARM + MEAS + every)) 10000000 $every
      run_timed "$DOUT/onmt/throughput" "$V/onmt_train" -config "$DOUT/onmt/throughput.yaml"
      [ "$(exit_status "$DOUT/onmt/throughput.time")" = 0 ] || { tail -20 "$DOUT/onmt/throughput.log"; exit 1; }
      python3 "$PEERS/parse_train_log.py" --kind onmt --log "$DOUT/onmt/throughput.log" --time "$DOUT/onmt/throughput.time" \
          --warm "$WARM" --meas "$MEAS" | tee "$DOUT/onmt_train.summary"
      grep -o 'number of parameters: [0-9]*' "$DOUT/onmt/throughput.log" | tail -1 | sed 's/number of //' >> "$DOUT/onmt_train.summary" ;;
    joey_train)
      [ -x "$JV/python" ] || bash "$PEERS/setup_venvs.sh" joeynmt
      mkdir -p "$OUT/joey" "$DOUT/joey"
      [ -s "$OUT/joey/vocab.txt" ] || python3 "$PEERS/make_vocab.py" "$OUT/joey/vocab.txt" "$DATA/train.sp.en" "$DATA/train.sp.de"
      joey_cfg "$DOUT/joey/throughput.yaml" "$DOUT/joey/throughput" $((WARM + MEAS + 10)) 1
      run_timed "$DOUT/joey/throughput" "$JV/python" -m joeynmt train "$DOUT/joey/throughput.yaml" --skip-test
      [ "$(exit_status "$DOUT/joey/throughput.time")" = 0 ] || { tail -20 "$DOUT/joey/throughput.log"; exit 1; }
      python3 "$PEERS/parse_train_log.py" --kind joeynmt --log "$DOUT/joey/throughput.log" \
          --time "$DOUT/joey/throughput.time" --warm "$WARM" --meas "$MEAS" | tee "$DOUT/joey_train.summary"
      grep -io 'total params: *[0-9]*' "$DOUT/joey/throughput.log" | tail -1 | tr -dc '0-9\n' \
          | sed 's/^/parameters: /' >> "$DOUT/joey_train.summary" ;;
    mtkit_train)
      mtkit_check; mtkit_data
      mapfile -t sets < <(mtkit_sets)
      python benchmarks/train_speed.py --config luong_small --cache "$OUT/mtkit_data" --threads "$THREADS" \
          --max-tokens 2048 --warmup "$WARM" --updates "$MEAS" "${sets[@]}" | tee "$DOUT/mtkit_train.txt"
      python - "$OUT/mtkit_data" "${MTKIT_OVR[@]}" <<'PY' | tee -a "$DOUT/mtkit_train.txt"
import json, sys
from mtkit.config import load_config
from mtkit.models import build_model
vocab = json.load(open(sys.argv[1] + "/manifest.json"))["vocab"]
cfg = load_config("luong_small", sys.argv[2:])
model = build_model(cfg.model, vocab["src_size"], vocab["tgt_size"], vocab["pad"])
print(json.dumps({"parameters": sum(p.numel() for p in model.parameters()), "model": cfg.to_dict()["model"]}))
PY
      ;;
    onmt_model)
      rm -rf "$OUT/onmt/model"; mkdir -p "$OUT/onmt/model"
      budget=$(python3 -c "print(max(1, round(float('$TRAIN_MIN') * 60)))")
      onmt_cfg "$OUT/onmt/model.yaml" "$OUT/onmt/model/model" 10000000 "$ONMT_SAVE_STEPS" 1
      # the clock starts at the first logged update, as mtkit's train.max_time_minutes counts training steps
      # only (OpenNMT-py first spends ~20 s filling its bucket); then SIGINT, as onmt.sh's BUDGET_S does. The
      # pid file holds the pid of `timeout` (a hard stop at 3 x budget + 10 min), which passes SIGINT on.
      rm -f "$OUT/onmt/model.pid"
      run_timed "$OUT/onmt/model" sh -c 'echo $$ > "$0"; exec "$@"' "$OUT/onmt/model.pid" \
          timeout --signal=INT $((3 * budget + 600)) "$V/onmt_train" -config "$OUT/onmt/model.yaml" &
      runner=$!
      while kill -0 $runner 2>/dev/null && ! grep -q ' Step ' "$OUT/onmt/model.log" 2>/dev/null; do sleep 1; done
      start=$(date +%s)
      while kill -0 $runner 2>/dev/null && [ $(($(date +%s) - start)) -lt "$budget" ]; do sleep 1; done
      [ -s "$OUT/onmt/model.pid" ] && kill -INT "$(cat "$OUT/onmt/model.pid")" 2>/dev/null || true
      wait $runner || true
      ckpt=$(ls "$OUT"/onmt/model/model_step_*.pt 2>/dev/null | sort -V | tail -1)
      [ -n "$ckpt" ] || { echo "onmt_model: no checkpoint within ${budget}s (lower ONMT_SAVE_STEPS)"; tail -5 "$OUT/onmt/model.log"; exit 1; }
      last=$(grep -o 'Step *[0-9]*/' "$OUT/onmt/model.log" | tail -1 | tr -dc 0-9)
      { echo "checkpoint: $ckpt"; echo "updates: $(basename "$ckpt" .pt | tr -dc 0-9)"; echo "last_logged_update: ${last:-?}"
        echo "budget_s: $budget"; grep 'Elapsed (wall' "$OUT/onmt/model.time" | sed 's/.*: /wall: /'; } | tee "$OUT/onmt_model.summary" ;;
    mtkit_model)
      mtkit_check; mtkit_data
      rm -rf "$OUT/mtkit_model"
      mapfile -t sets < <(mtkit_sets)
      # no validation while training (as OpenNMT-py's run); one loss-only validation at the end
      python -m mtkit train "$OUT/mtkit_data" -c luong_small --save-dir "$OUT/mtkit_model" --device cpu "${sets[@]}" \
          --set train.max_time_minutes="$TRAIN_MIN" --set train.max_updates=0 --set train.max_epochs=0 \
          --set train.validate_interval_updates=10000000 --set train.save_interval_updates=10000000 \
          --set train.valid_bleu=false --set train.patience=0 \
          > "$OUT/mtkit_model.json" 2> "$OUT/mtkit_model.log" || { tail -20 "$OUT/mtkit_model.log"; exit 1; }
      cat "$OUT/mtkit_model.json" ;;
    onmt_decode)
      ckpt=$(onmt_ckpt)
      W=$DOUT/onmt; mkdir -p "$W"
      head -n "$LINES" "$DATA/test.sp.en" > "$W/test.sp.en"; head -n "$LINES" "$DATA/test.de" > "$W/test.de"
      out=$W/test.beam5
      /usr/bin/time -v -o "$out.time" "$V/onmt_translate" -model "$ckpt" -src "$W/test.sp.en" -output "$out.pieces" \
          "${ONMT_DECODE[@]}" -report_time > "$out.log" 2>&1 || { tail -20 "$out.log"; exit 1; }
      { python3 "$PEERS/decode_stats.py" --log "$out.log" --time "$out.time" --hyp "$out.pieces" --n "$LINES"
        "$V/python" "$PEERS/score.py" --spm "$DATA/spm.model" --hyp "$out.pieces" --ref "$W/test.de" --out "$out.detok"
        echo "checkpoint: $ckpt"; } | tee "$out.summary" ;;
    mtkit_decode)
      ckpt=${MTKIT_CKPT:-$OUT/mtkit_model/checkpoint_last.pt}
      for rule in $MTKIT_STOPPING; do
        python benchmarks/decode_speed.py "$ckpt" --only beam5:batch32 --threads "$THREADS" --lines "$LINES" \
            --decode length_penalty=average --decode stopping="$rule" | tee "$DOUT/mtkit_beam5_$rule.json"
      done ;;
    split)
      ckpt=$(onmt_ckpt)
      W=$OUT/split; mkdir -p "$W"
      head -n "$LINES" "$DATA/test.sp.en" > "$W/test.sp.en"
      gunzip -c "$MTKIT_DATA/test_2016_flickr.en.gz" | head -n "$LINES" > "$W/test.en"
      THREADS=$THREADS "$V/python" benchmarks/time_split.py onmt.bin.translate:main -- -model "$ckpt" -src "$W/test.sp.en" \
          -output "$W/onmt.pieces" "${ONMT_DECODE[@]}" 2> "$W/onmt.log" | tee "$OUT/split_onmt.json"
      THREADS=$THREADS python benchmarks/time_split.py mtkit.cli:main -- translate -m "${MTKIT_CKPT:-$OUT/mtkit_model/checkpoint_last.pt}" \
          -i "$W/test.en" -o "$W/mtkit.out" --beam 5 --batch-size 32 --lenpen average --stopping first --device cpu \
          2> "$W/mtkit.log" | tee "$OUT/split_mtkit.json" ;;
    table) python benchmarks/rnn_peers_table.py "$OUT" | tee "$OUT/table.json" ;;
    *) echo "unknown part: $part" >&2; exit 2 ;;
  esac
done
