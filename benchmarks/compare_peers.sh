#!/usr/bin/env bash
# mtkit beside OpenNMT-py, Sockeye, JoeyNMT and CTranslate2, in one run on this machine.
#
#   CKPT=runs/multi30k_en_de_transformer/averaged.pt PEERS_DIR=/tmp/peers bash benchmarks/compare_peers.sh [part ...]
#
# parts (default: all, in this order)
#   peers_setup  install the peers into their own venvs and preprocess (shared/bench/peers/run_all.sh)
#   peers_train  training throughput of OpenNMT-py, Sockeye, JoeyNMT on the reference setup (WARM+MEAS updates;
#                Sockeye, which reports every 50 updates: 50 + MEAS rounded up to 50)
#   mtkit_train  benchmarks/train_speed.py on the same setup: float32, bf16 autocast, float32 with whole-batch
#                passes (train.pass_tokens=0); with BEFORE=<older checkout>, its float32 and bf16 too
#   onmt_decode  CKPT rebuilt as an OpenNMT-py model (benchmarks/onmt_from_mtkit.py), onmt_translate beam 5 / greedy
#   ct2_decode   CKPT exported to CTranslate2 float32/int8 beside mtkit (benchmarks/ct2_vs_mtkit.py)
#   mtkit_decode benchmarks/decode_speed.py on CKPT, length normalisation as above, stopping full and first,
#                and bf16 weights (stopping full); with BEFORE=<older checkout>, its decode_speed.py (stopping full)
#   decode       onmt_decode ct2_decode mtkit_decode, REPEAT times (default 3) into OUT/decode1, decode2, ...
#   table        benchmarks/peers_table.py: every figure and ratio (decoding: medians over the repeats)
# The machine is shared: single decoding figures vary by 10-30% between runs, hence the repeats.
# Decoding everywhere: test_2016_flickr (1000 sentences), batches of 32 sentences, 2 threads, length
# normalisation by |Y| (OpenNMT-py "avg", CTranslate2 length_penalty 1, mtkit "average").
set -eu
REPO=$(cd "$(dirname "$0")/.." && pwd)
PEERS=${PEERS:-$REPO/../shared/bench/peers}
export PEERS_DIR=${PEERS_DIR:-$HOME/.cache/mtkit-peers}
export MTKIT_DATA=${MTKIT_DATA:-$REPO/../shared/data/multi30k}
OUT=${OUT:-$PEERS_DIR/compare}
WARM=${WARM:-30} MEAS=${MEAS:-150}
export OMP_NUM_THREADS=2 MKL_NUM_THREADS=2
mkdir -p "$OUT"
cd "$REPO"
REPEAT=${REPEAT:-3}
DOUT=${DOUT:-$OUT}  # where the decode parts write
parts=${*:-peers_setup peers_train mtkit_train decode table}
for part in $parts; do
  echo "=== $part $(date -u +%FT%TZ)"
  mkdir -p "$DOUT"
  case $part in
    decode)
      for i in $(seq "$REPEAT"); do
        DOUT=$OUT/decode$i OUT=$OUT bash "$REPO/benchmarks/compare_peers.sh" onmt_decode ct2_decode mtkit_decode
      done ;;
    peers_setup) bash "$PEERS/run_all.sh" setup preprocess ;;
    peers_train)
      WARM=$WARM MEAS=$MEAS bash "$PEERS/run_all.sh" tp_onmt tp_joeynmt
      # Sockeye reports every 50 updates: its measured window must start and end on a report
      WARM=50 MEAS=$(( (MEAS + 49) / 50 * 50 )) bash "$PEERS/run_all.sh" tp_sockeye ;;
    mtkit_train)
      run_train() {  # tag, then train_speed.py options
        local tag=$1; shift
        python benchmarks/train_speed.py --data "$MTKIT_DATA" --warmup "$WARM" --updates "$MEAS" "$@" | tee "$OUT/mtkit_train_$tag.txt"
      }
      run_train fp32 --set train.amp=none
      run_train bf16 --set train.amp=bf16
      run_train fp32_whole --set train.amp=none --set train.pass_tokens=0
      if [ -n "${BEFORE:-}" ]; then  # an older checkout, measured in the same run
        for amp in fp32 bf16; do
          (cd "$BEFORE" && PYTHONPATH="$BEFORE" python benchmarks/train_speed.py --data "$MTKIT_DATA" --warmup "$WARM" --updates "$MEAS" \
              --set train.amp=${amp/fp32/none}) | tee "$OUT/mtkit_train_${amp}_before.txt"
        done
      fi ;;
    onmt_decode)
      W=$DOUT/onmt; V=$PEERS_DIR/onmt/venv/bin
      "$V/python" benchmarks/onmt_from_mtkit.py "${CKPT:?set CKPT}" --work "$W" \
          --encode "$MTKIT_DATA/test_2016_flickr.en.gz:$W/test.pieces"
      for beam in 5 1; do
        out=$W/test.beam$beam
        /usr/bin/time -v -o "$out.time" env TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 "$V/onmt_translate" -model "$W/model.pt" \
            -src "$W/test.pieces" -output "$out.pieces" -beam_size $beam -batch_size 32 -batch_type sents \
            -max_length 200 -length_penalty avg -report_time > "$out.log" 2>&1
        python3 "$PEERS/decode_stats.py" --log "$out.log" --time "$out.time" --hyp "$out.pieces" --n 1000 | tee "$out.summary"
        "$V/python" "$PEERS/score.py" --spm "$W/spm.model" --hyp "$out.pieces" --ref "$PEERS_DIR/data/test.de" \
            --out "$out.detok" | tee -a "$out.summary"
      done ;;
    ct2_decode) python benchmarks/ct2_vs_mtkit.py "${CKPT:?set CKPT}" --workdir "$DOUT/ct2" | tee "$DOUT/ct2_vs_mtkit.txt" ;;
    mtkit_decode)
      python benchmarks/decode_speed.py "${CKPT:?set CKPT}" --decode length_penalty=average | tee "$DOUT/mtkit_decode.txt"
      python benchmarks/decode_speed.py "${CKPT:?set CKPT}" --decode length_penalty=average --decode stopping=first \
          | tee -a "$DOUT/mtkit_decode.txt"
      python benchmarks/decode_speed.py "${CKPT:?set CKPT}" --decode length_penalty=average --dtype bfloat16 \
          | tee -a "$DOUT/mtkit_decode.txt"
      if [ -n "${BEFORE:-}" ]; then
        ckpt=$(realpath "$CKPT")
        (cd "$BEFORE" && PYTHONPATH="$BEFORE" python benchmarks/decode_speed.py "$ckpt" --decode length_penalty=average) \
            | tee "$DOUT/mtkit_decode_before.txt"
      fi ;;
    table) python benchmarks/peers_table.py "$OUT" "$OUT"/decode* --peers-dir "$PEERS_DIR" | tee "$OUT/table.md" ;;
    *) echo "unknown part: $part" >&2; exit 2 ;;
  esac
done
