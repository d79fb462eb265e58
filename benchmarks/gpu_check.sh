#!/usr/bin/env bash
# One prepared check of mtkit on a CUDA GPU: batched beam search, AMP training, DDP, OOM back-off,
# throughput (benchmarks/gpu_check.py says what each check does and prints).
#
#   bash benchmarks/gpu_check.sh                       # on the GPU machine, as it comes
#   bash benchmarks/gpu_check.sh --device cpu          # the whole script on a CPU, tiny sizes
#   bash benchmarks/gpu_check.sh --prepare             # copy the data here, say what travels, stop
#   bash benchmarks/gpu_check.sh --only ddp,oom_backoff   # some checks (and what they need)
#
# Needs no network and no package index: mtkit runs from this checkout (PYTHONPATH), on a Python
# that has torch, sentencepiece, sacrebleu, click, tqdm, pyyaml, numpy and pytest.
# Data: --data-dir DIR (Multi30k train/val/test_2016_flickr .en/.de, plain or .gz), else
# gpu_check/multi30k/ in this checkout (git-ignored), refreshed first from $MTKIT_DATA or
# ../shared/data/multi30k when one of them exists.
# CTranslate2 (optional): when ctranslate2 is not importable, a wheel for this Python in
# gpu_check/wheels/ (or --wheels DIR) is installed offline into a temporary folder; without one
# the CTranslate2 comparison is skipped.
# Results: one JSON line per check and a table on stdout; $OUT/gpu_check/ (or gpu_check/results/,
# or --out-dir) keeps results.jsonl, summary.txt and logs/. Exit status 1 if a check failed.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
store="$repo/gpu_check"
wheels="$store/wheels"
files="train.en.gz train.de.gz val.en.gz val.de.gz test_2016_flickr.en.gz test_2016_flickr.de.gz"
data_dir=""
prepare=0
help=0
args=()

need_value() {
    if [ "$2" -lt 2 ]; then
        echo "error: $1 needs a value" >&2
        exit 2
    fi
}

while [ $# -gt 0 ]; do
    case "$1" in
        --data-dir) need_value "$1" $#; data_dir="$2"; shift 2 ;;
        --data-dir=*) data_dir="${1#*=}"; shift ;;
        --wheels) need_value "$1" $#; wheels="$2"; shift 2 ;;
        --wheels=*) wheels="${1#*=}"; shift ;;
        --prepare) prepare=1; shift ;;
        -h|--help|--list) help=1; args+=("$1"); shift ;;
        *) args+=("$1"); shift ;;
    esac
done

py="${PYTHON:-}"
if [ -z "$py" ]; then
    py="$(command -v python3 || command -v python || true)"
fi
if [ -z "$py" ]; then
    echo "error: no python3 on PATH (set PYTHON=/path/to/python)" >&2
    exit 2
fi
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
cd "$repo"

if [ "$help" = 1 ]; then
    exec "$py" benchmarks/gpu_check.py ${args[@]+"${args[@]}"}
fi

# --- the data: the given folder, or the copy in this checkout (refreshed where the source is) -----
if [ -z "$data_dir" ]; then
    data_dir="$store/multi30k"
    for source in "${MTKIT_DATA:-}" "$repo/../shared/data/multi30k"; do
        if [ -n "$source" ] && [ -f "$source/train.en.gz" ]; then
            mkdir -p "$data_dir"
            for f in $files; do
                if [ -f "$source/$f" ] && ! cmp -s "$source/$f" "$data_dir/$f"; then
                    cp -f "$source/$f" "$data_dir/$f"
                    chmod 644 "$data_dir/$f"
                fi
            done
            break
        fi
    done
    missing=""
    for f in $files; do
        [ -f "$data_dir/$f" ] || missing="$missing $f"
    done
    if [ -n "$missing" ]; then
        echo "error: $data_dir lacks$missing; run this script once where \$MTKIT_DATA or ../shared/data/multi30k" \
             "holds the Multi30k files (or pass --data-dir)" >&2
        exit 2
    fi
fi

if [ "$prepare" = 1 ]; then
    echo "data: $data_dir"
    ls -l "$wheels"/*.whl 2>/dev/null || echo "no wheel in $wheels: the CTranslate2 comparison will be skipped"
    if [ -d "$store" ]; then
        echo "gpu_check/ (git-ignored, send it along): $(du -sk "$store" | cut -f1) KiB"
    fi
    if command -v git >/dev/null && git -C "$repo" rev-parse >/dev/null 2>&1; then
        kib="$(git -C "$repo" ls-files -z | xargs -0 du -ck 2>/dev/null | tail -n 1 | cut -f1 || true)"
        echo "tracked files: about ${kib:-?} KiB (the checkout and gpu_check/ together must stay under 64 MiB)"
    fi
    exit 0
fi

# --- CTranslate2 from a wheel, offline, when it is not installed ---------------------------------
if ! "$py" -c "import ctranslate2" >/dev/null 2>&1; then
    tag="$("$py" -c 'import sys; print("cp%d%d" % sys.version_info[:2])')"
    wheel="$(ls "$wheels"/ctranslate2-*-"$tag"-*.whl 2>/dev/null | head -n 1 || true)"
    if [ -n "$wheel" ]; then
        site="${TMPDIR:-/tmp}/mtkit-gpu-check-site-$tag"
        if [ ! -d "$site/ctranslate2" ]; then
            echo "installing $(basename "$wheel") offline into $site" >&2
            if ! "$py" -m pip install --quiet --no-index --no-deps --upgrade --target "$site" "$wheel" >&2; then
                echo "pip could not install it: unpacking the wheel instead" >&2
                "$py" -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])' "$wheel" "$site"
            fi
        fi
        export PYTHONPATH="$PYTHONPATH:$site"
    elif [ -d "$wheels" ]; then
        echo "no ctranslate2 wheel for $tag in $wheels: the CTranslate2 comparison will be skipped" >&2
    fi
fi

exec "$py" benchmarks/gpu_check.py --data-dir "$data_dir" ${args[@]+"${args[@]}"}
