#!/usr/bin/env bash
# Keeps unfinished training runs in the repository between sessions, and brings them back.
#
#   scripts/park.sh save [RUNS_DIR]            every unfinished run of RUNS_DIR (default
#                                              runs/) into bench/parked/<name>/
#   scripts/park.sh restore NAME [RUNS_DIR]    bench/parked/NAME back into RUNS_DIR/NAME,
#                                              unless RUNS_DIR/NAME already holds a run
#   scripts/park.sh drop NAME                  forget a parked run (once it has finished)
#
# RUNS_DIR is git-ignored and lives only on the machine that trained it; a session may be
# handed a fresh machine, and then an unfinished run is gone (issue 16 lost two that way:
# the PTB implicit SA-VAE after 1.3 epochs and the MNIST unrolled SA-VAE after 12). A
# parked run is what `savae train --resume` needs and what `savae eval` reads:
#   last.safetensors   as written (weights, Adam's moments, position): resume is exact;
#   best.safetensors   weights and metadata only (`savae export`: training never reads
#                      it back, eval and report do), a third of the full file's size;
#   metrics.jsonl      as written.
# A run counts as unfinished while it has no test.json (reproduce.sh writes that last).
# A run over PARK_MAX_MIB (default 160; a MNIST run is 22 MiB, a PTB one 135) is not parked.
# Until 2026-12-06 the default was 40, which kept PTB runs out of the repository: a GPU lease
# carries at most 64 MiB of working tree, and each save adds the run to the history again.
# Then a session was handed a fresh machine and three PTB runs went with the old one (the
# implicit SA-VAE after 6.9 epochs, the unrolled one after 3, vae-svi after 17: some 30
# core-hours), which costs more than 135 MiB of history a session. Before a GPU lease,
# keep bench/parked out of the tree that travels (the warning below says how).
# save refuses a run that a `savae train` is still writing: stop it first with SIGTERM
# (it saves its place in last.safetensors and exits). reproduce.sh calls restore itself.
# SAVAE (default target/release/savae) is the binary that save uses for the export.
set -euo pipefail
cd "$(dirname "$0")/.."
parked=${PARKED_DIR:-bench/parked}
savae=${SAVAE:-target/release/savae}
max_mib=${PARK_MAX_MIB:-160}

die() {
    echo "park.sh: $*" >&2
    exit 1
}

# training DIR: is a `savae train` writing DIR? (matches --run-dir DIR on its command line)
training() {
    local dir=${1%/}
    pgrep -f -- "savae train .*--run-dir ${dir}( |$)" >/dev/null 2>&1
}

save() {
    local runs=${1:-runs} n=0
    [ -d "$runs" ] || die "$runs: no such folder of runs"
    [ -x "$savae" ] || die "$savae: no savae binary (build it: cargo build --release, or set SAVAE)"
    for dir in "$runs"/*/; do
        dir=${dir%/}
        local name
        name=$(basename "$dir")
        [ -f "$dir/last.safetensors" ] || continue
        if [ -f "$dir/test.json" ]; then
            echo "park.sh: $name is finished ($dir/test.json): not parked"
            continue
        fi
        training "$dir" && die "$dir: a savae train is still writing it; stop it with SIGTERM first"
        local to=$parked/$name tmp=$parked/.$name.tmp
        rm -rf "$tmp"
        mkdir -p "$tmp"
        cp "$dir/last.safetensors" "$dir/metrics.jsonl" "$tmp/"
        if [ -f "$dir/best.safetensors" ]; then
            "$savae" export --checkpoint "$dir/best.safetensors" --out "$tmp/best.safetensors" 2>/dev/null ||
                die "$dir/best.safetensors: savae export failed"
        fi
        local size
        size=$(du -sm "$tmp" | cut -f1)
        if [ "$size" -gt "$max_mib" ]; then
            rm -rf "$tmp"
            echo "park.sh: $name is $size MiB, over PARK_MAX_MIB ($max_mib): not parked, it stays in $dir only (the tree must fit a GPU lease, and every save adds it to the history again)" >&2
            continue
        fi
        rm -rf "$to"
        mv "$tmp" "$to"
        echo "park.sh: parked $name in $to ($(du -sh "$to" | cut -f1))"
        n=$((n + 1))
    done
    echo "park.sh: $n run(s) parked; commit $parked to keep them"
    # A GPU lease carries the working tree and the CUDA binary (about 8 MiB compressed), 64 MiB
    # in all: warn when parking pushes the tree past what leaves room for the binary.
    local mib
    mib=$( (
        git ls-files -z 2>/dev/null | grep -zv "^${parked#./}/" | xargs -0 -r stat -c %s 2>/dev/null
        find "$parked" -type f -exec stat -c %s {} + 2>/dev/null
    ) | awk '{s += $1} END {printf "%d", s / 1048576}') || mib=0
    if [ "$mib" -gt 56 ]; then
        echo "park.sh: warning: the working tree is now $mib MiB with $parked; a GPU lease carries 64 MiB with the binary: before one, untrack it for the call (git rm -r -q --cached $parked; echo /$parked/ >> .git/info/exclude; afterwards remove that line and git add $parked), or drop finished runs (park.sh drop NAME)" >&2
    fi
}

restore() {
    local name=${1:?park.sh restore: which run (a folder name under $parked)?} runs=${2:-runs}
    local from=$parked/$name dir=$runs/$name
    [ -f "$from/last.safetensors" ] || die "$from: no parked run of that name"
    if [ -f "$dir/last.safetensors" ]; then
        echo "park.sh: $dir already holds a run: left as it is (the parked copy is not used)"
        return
    fi
    mkdir -p "$dir"
    cp "$from"/* "$dir/"
    echo "park.sh: restored $name from $from into $dir"
}

case ${1:-} in
save) save "${2:-runs}" ;;
restore) restore "${2:-}" "${3:-runs}" ;;
drop)
    [ -n "${2:-}" ] || die "drop: which run?"
    [ -d "$parked/$2" ] || die "$parked/$2: no parked run of that name"
    rm -rf "${parked:?}/$2"
    echo "park.sh: dropped $parked/$2"
    ;;
*) die "usage: scripts/park.sh save [RUNS_DIR] | restore NAME [RUNS_DIR] | drop NAME" ;;
esac
