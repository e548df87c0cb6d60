#!/usr/bin/env bash
# Download and prepare the corpora in the layout of the original Transformer-XL
# getdata.sh, under one data root:
#
#   enwik8/  text8/  wikitext-2/  wikitext-103/  penn/  pennchar/   train.txt valid.txt test.txt
#   one-billion-words/   1-billion-word-language-modeling-benchmark-r13output/,
#                        valid.txt, test.txt (held-out shard 0), 1b_word_vocab.txt
#
# Usage: bash getdata.sh [CORPUS ...]      CORPUS: enwik8 text8 wt2 wt103 ptb pennchar lm1b
#                                          (default: all of them)
# Environment:
#   DATA_ROOT          where the corpora go (default: ../data, next to this repository, where
#                      the run scripts look: --data ${DATA_ROOT:-../data}/NAME/)
#   GETDATA_MIRROR     base URL(s), space separated, tried instead of the built-in mirrors, e.g.
#                      a local copy: GETDATA_MIRROR=file:///srv/corpora (holding enwik8.zip ...)
#   GETDATA_NO_VERIFY  1: skip the checksums (for a mirror of modified or trimmed archives)
#   GETDATA_PREP_ARGS  extra options for prep_enwik8.py / prep_text8.py, e.g. smaller
#                      "--valid 100000 --test 100000" for a trimmed copy
#   PYTHON             the interpreter for the prep scripts (default: python, else python3)
#
# Every corpus is built in NAME.partial/ and renamed into place when complete, so a
# finished directory is always whole and is skipped on the next run; an interrupted
# download resumes from downloads/FILE.part.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cd "$REPO"
DATA_ROOT=${DATA_ROOT:-../data}
DL="$DATA_ROOT/downloads"
PYTHON=${PYTHON:-$(command -v python || command -v python3 || echo python3)}

CORPORA="enwik8 text8 wt2 wt103 ptb pennchar lm1b"
declare -A DIR=([enwik8]=enwik8 [text8]=text8 [wt2]=wikitext-2 [wt103]=wikitext-103
                [ptb]=penn [pennchar]=pennchar [lm1b]=one-billion-words)

LM1B=1-billion-word-language-modeling-benchmark-r13output
# Mirrors, tried in order. WikiText's original S3 links are dead; Stephen Merity
# serves the same archives (same sha256) from wikitext.smerity.com.
declare -A URLS=(
  [enwik8.zip]="https://mattmahoney.net/dc/enwik8.zip http://mattmahoney.net/dc/enwik8.zip"
  [text8.zip]="https://mattmahoney.net/dc/text8.zip http://mattmahoney.net/dc/text8.zip"
  [wikitext-2-v1.zip]="https://wikitext.smerity.com/wikitext-2-v1.zip
                       https://s3.amazonaws.com/research.metamind.io/wikitext/wikitext-2-v1.zip"
  [wikitext-103-v1.zip]="https://wikitext.smerity.com/wikitext-103-v1.zip
                         https://s3.amazonaws.com/research.metamind.io/wikitext/wikitext-103-v1.zip"
  [simple-examples.tgz]="https://www.fit.vutbr.cz/~imikolov/rnnlm/simple-examples.tgz
                         http://www.fit.vutbr.cz/~imikolov/rnnlm/simple-examples.tgz"
  [$LM1B.tar.gz]="https://www.statmt.org/lm-benchmark/$LM1B.tar.gz
                  http://www.statmt.org/lm-benchmark/$LM1B.tar.gz"
  [1b_word_vocab.txt]="https://raw.githubusercontent.com/rafaljozefowicz/lm/master/1b_word_vocab.txt
                       https://github.com/rafaljozefowicz/lm/raw/master/1b_word_vocab.txt"
)
# sha256 as published by the HuggingFace datasets (enwik8, wikitext, ptb_text_only)
# and TensorFlow Datasets (lm1b) download records. text8.zip and simple-examples.tgz
# have no published sha256: their size and the CRCs inside the archive are checked, and
# PTB's word-level files inside simple-examples.tgz are checked against their sha256.
declare -A SHA256=(
  [enwik8.zip]=547994d9980ebed1288380d652999f38a14fe291a6247c157c3d33d4932534bc
  [wikitext-2-v1.zip]=92675f1d63015c1c8b51f1656a52d5bdbc33aafa60cc47a218a66e7ee817488c
  [wikitext-103-v1.zip]=242ba0f20b329cfdf1ccc61e9e9e5b59becf189db7f7a81cd2a0e2fc31539590
  [$LM1B.tar.gz]=01ba60381110baf7f189dfd2b8374de371e8c9a340835793f190bdae9e90a34e
  [ptb.train.txt]=fcea919f6cf83f35d4d00c6cbf08040d13d4155226340912e2fef9c9c4102cbf
  [ptb.valid.txt]=c9fe6985fe0d4ccb578183407d7668fc6066c20700cb4cf87d8ff1cc34df1bf2
  [ptb.test.txt]=dd65dff31e70846b2a6030a87482edcd5d199130cdcfa1f3dccbb033728deee0
)
declare -A SIZE=([text8.zip]=31344016)

die() { echo "getdata.sh: error: $*" >&2; exit 1; }

# a corpus being built lives in NAME.partial/: removed on any exit but success,
# and rebuilt from scratch by the next run if a SIGKILL left it
STAGE=""
cleanup() { if [[ -n $STAGE ]]; then rm -rf "$STAGE"; fi; }
trap cleanup EXIT
trap 'exit 130' INT TERM

sha256() { if command -v sha256sum >/dev/null; then sha256sum "$1"; else shasum -a 256 "$1"; fi | cut -d' ' -f1; }

# verify NAME FILE: the checksum (or size) recorded for NAME, and an archive's own CRCs
verify() {
  local name=$1 file=$2
  case $name in
    *.zip) unzip -tqq "$file" >/dev/null 2>&1 || { REASON="not a valid zip archive"; return 1; } ;;
    *.tgz|*.tar.gz) gzip -tq "$file" 2>/dev/null || { REASON="not a valid gzip archive"; return 1; } ;;
  esac
  [[ ${GETDATA_NO_VERIFY:-0} == 1 ]] && return 0
  if [[ -n ${SHA256[$name]:-} ]]; then
    local got; got=$(sha256 "$file")
    [[ $got == "${SHA256[$name]}" ]] || { REASON="sha256 $got, expected ${SHA256[$name]}"; return 1; }
  elif [[ -n ${SIZE[$name]:-} ]]; then
    local got; got=$(wc -c <"$file" | tr -d ' ')
    [[ $got == "${SIZE[$name]}" ]] || { REASON="$got bytes, expected ${SIZE[$name]}"; return 1; }
  fi
}

# download URL FILE: continue FILE if it exists; REASON says why on failure
download() {
  local url=$1 out=$2 rc=0 err=/dev/null
  [[ -t 2 ]] || err=$(mktemp)  # on a terminal the progress and any error show as they come
  if command -v curl >/dev/null; then
    local show=-sS; [[ -t 2 ]] && show=-#
    curl -fL $show --connect-timeout 10 --retry 2 -C - -o "$out" "$url" 2>>"$err" || rc=$?
    if [[ $rc == 33 || $rc == 36 ]]; then  # the server cannot resume: start over
      rm -f "$out"; rc=0
      curl -fL $show --connect-timeout 10 --retry 2 -o "$out" "$url" 2>>"$err" || rc=$?
    fi
  else
    wget -q --timeout=10 --tries=2 -c -O "$out" "$url" 2>>"$err" || rc=$?
  fi
  REASON="exit code $rc"
  if [[ $err != /dev/null ]]; then
    [[ -s $err ]] && REASON=$(tail -n 1 "$err" | sed 's/^curl: ([0-9]*) //')
    rm -f "$err"
  fi
  return $rc
}

# fetch NAME: downloads/NAME, verified; only a verified download gets that name
fetch() {
  local name=$1 dest="$DL/$1" urls="" tried="" url
  [[ -f $dest ]] && return 0
  mkdir -p "$DL"
  if [[ -n ${GETDATA_MIRROR:-} ]]; then
    for url in $GETDATA_MIRROR; do urls+=" ${url%/}/$name"; done
  else
    urls=${URLS[$name]}
  fi
  for url in $urls; do
    echo "  downloading $url"
    VERIFIED=""
    if download "$url" "$dest.part"; then
      if verify "$name" "$dest.part"; then
        mv "$dest.part" "$dest"
        return 0
      fi
      VERIFIED=no
    fi
    # a complete but wrong file is deleted; a broken download stays, to be resumed
    [[ $VERIFIED == no ]] && rm -f "$dest.part"
    tried+="${tried:+; }$url ($REASON)"
  done
  die "could not download $name from $tried. Check the network, or set GETDATA_MIRROR to a copy"
}

check_sha256() {  # check_sha256 NAME FILE (for files inside archives)
  [[ ${GETDATA_NO_VERIFY:-0} == 1 ]] && return 0
  local got; got=$(sha256 "$2")
  [[ $got == "${SHA256[$1]}" ]] || die "$1 from simple-examples.tgz has sha256 $got, expected ${SHA256[$1]}"
}

prep_enwik8() { fetch enwik8.zip
  # shellcheck disable=SC2086
  "$PYTHON" prep_enwik8.py --input "$DL/enwik8.zip" --out "$1" ${GETDATA_PREP_ARGS:-}; }
prep_text8() { fetch text8.zip
  # shellcheck disable=SC2086
  "$PYTHON" prep_text8.py --input "$DL/text8.zip" --out "$1" ${GETDATA_PREP_ARGS:-}; }

prep_wikitext() {  # prep_wikitext wikitext-2 OUT
  fetch "$1-v1.zip"
  unzip -q "$DL/$1-v1.zip" -d "$2"
  for split in train valid test; do mv "$2/$1/wiki.$split.tokens" "$2/$split.txt"; done
  rmdir "$2/$1"
}
prep_wt2() { prep_wikitext wikitext-2 "$1"; }
prep_wt103() { prep_wikitext wikitext-103 "$1"; }

prep_penn() {  # prep_penn ptb|ptb.char OUT
  fetch simple-examples.tgz
  tar -xzf "$DL/simple-examples.tgz" -C "$2" simple-examples/data
  for split in train valid test; do
    [[ $1 == ptb ]] && check_sha256 "ptb.$split.txt" "$2/simple-examples/data/ptb.$split.txt"
    mv "$2/simple-examples/data/$1.$split.txt" "$2/$split.txt"
  done
  rm -rf "$2/simple-examples"
}
prep_ptb() { prep_penn ptb "$1"; }
prep_pennchar() { prep_penn ptb.char "$1"; }

prep_lm1b() {
  fetch "$LM1B.tar.gz"
  fetch 1b_word_vocab.txt
  grep -q '^<UNK> ' "$DL/1b_word_vocab.txt" || die "$DL/1b_word_vocab.txt has no <UNK> entry: delete it and run again"
  tar -xzf "$DL/$LM1B.tar.gz" -C "$1"
  local heldout="$1/$LM1B/heldout-monolingual.tokenized.shuffled/news.en.heldout-00000-of-00050"
  cp "$heldout" "$1/valid.txt"
  cp "$heldout" "$1/test.txt"
  cp "$DL/1b_word_vocab.txt" "$1/1b_word_vocab.txt"
}

main() {
  local names=("$@") name
  [[ ${#names[@]} -gt 0 ]] || read -r -a names <<<"$CORPORA"
  for name in "${names[@]}"; do  # all names are checked before anything is written
    [[ -n ${DIR[$name]:-} ]] || { echo "getdata.sh: error: unknown corpus '$name': choose from $CORPORA" >&2; exit 2; }
  done
  echo "=== Acquiring datasets into $DATA_ROOT ==="
  mkdir -p "$DATA_ROOT"
  for name in "${names[@]}"; do
    local final="$DATA_ROOT/${DIR[$name]}"
    if [[ -d $final ]]; then
      echo "- $name: $final exists, skipping (delete it to rebuild)"
      continue
    fi
    echo "- $name"
    STAGE="$final.partial"
    rm -rf "$STAGE"
    mkdir -p "$STAGE"
    "prep_$name" "$STAGE"
    mv "$STAGE" "$final"  # the corpus appears whole, or not at all
    STAGE=""
    echo "  ready: $final"
  done
  echo "---"
  echo "Downloaded archives stay in $DL (delete them to save space)."
  echo "Happy language modeling :)"
}

main "$@"
