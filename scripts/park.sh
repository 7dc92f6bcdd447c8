#!/usr/bin/env bash
# Keeps unfinished training runs in the repository between sessions, and brings them back.
#
#   scripts/park.sh save [RUNS_DIR]            every unfinished run of RUNS_DIR (default
#                                              runs/) into bench/parked/<name>/step-<N>/
#   scripts/park.sh restore NAME [RUNS_DIR]    NAME's newest park back into RUNS_DIR/NAME,
#                                              unless RUNS_DIR/NAME already holds a run
#   scripts/park.sh prune NAME                 remove all but NAME's newest park
#   scripts/park.sh drop NAME                  forget a parked run (once it has finished)
#
# RUNS_DIR is git-ignored and lives only on the machine that trained it; a session may be
# handed a fresh machine, and then an unfinished run is gone (issue 16 lost five that way).
# A park is what `savae train --resume` needs and what `savae eval` reads, in
# bench/parked/<name>/step-<N>/ (N: the optimizer steps of its last.safetensors, 9 digits):
#   last.safetensors.pk   last.safetensors as written (weights, Adam's moments, position:
#                         resume is exact), packed losslessly by scripts/parkpack.py (-15 %);
#   best.safetensors.pk   best.safetensors without Adam's moments (`savae export`), packed;
#   best-is-last          instead of best.safetensors.pk where the export of best equals the
#                         export of last (the run stopped at the end of an epoch that improved,
#                         as the trainer writes both then): restore exports it from last;
#   metrics.jsonl         as written.
# save never rewrites a park: it adds one for the run's current position. A submission's
# size is capped, and a replaced or removed file counts in it like an added one (a PTB park
# written over another was refused, 2026-12-06), so the old park goes in a later submission
# with room for it (prune). restore takes the newest park (the highest N; the first layout,
# last.safetensors and best.safetensors straight in bench/parked/<name>/, counts as oldest).
# A run counts as unfinished while it has no test.json (reproduce.sh writes that last).
# A park over PARK_MAX_MIB (default 160; a MNIST run is under 22 MiB, a PTB one 86 MiB
# stopped at an epoch's end, about 115 MiB elsewhere) is not written. Before a GPU lease, keep
# bench/parked out of the tree that travels (the warning below says how).
# save refuses a run that a `savae train` is still writing: stop it first with SIGTERM
# (it saves its place in last.safetensors and exits), or park an epoch's end that
# scripts/snapshot-epochs.sh copied aside while it trains. reproduce.sh calls restore itself.
# SAVAE (default target/release/savae) is the binary that save and restore use for exports.
set -euo pipefail
cd "$(dirname "$0")/.."
parked=${PARKED_DIR:-bench/parked}
savae=${SAVAE:-target/release/savae}
max_mib=${PARK_MAX_MIB:-160}
pack=(python3 scripts/parkpack.py)

die() {
    echo "park.sh: $*" >&2
    exit 1
}

need_savae() {
    [ -x "$savae" ] || die "$savae: no savae binary (build it: cargo build --release, or set SAVAE)"
}

# training DIR: is a `savae train` writing DIR? (matches --run-dir DIR on its command line;
# the binary may be a renamed copy, e.g. savae-bin-<commit>, kept apart from rebuilds)
training() {
    local dir=${1%/}
    pgrep -f -- "(^|/)savae[^ /]* train .*--run-dir ${dir}( |$)" >/dev/null 2>&1
}

# parks NAME: NAME's parks, oldest first (the first layout's folder itself, then step-*/).
parks() {
    local from=$parked/$1
    [ -f "$from/last.safetensors" ] && echo "$from"
    local g
    for g in "$from"/step-*/; do
        [ -d "$g" ] && echo "${g%/}"
    done
    return 0
}

save() {
    local runs=${1:-runs} n=0
    [ -d "$runs" ] || die "$runs: no such folder of runs"
    need_savae
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
        local step
        step=$("${pack[@]}" step "$dir/last.safetensors") || die "$dir/last.safetensors: no step in its metadata"
        local to
        to=$parked/$name/$(printf 'step-%09d' "$step")
        if [ -d "$to" ]; then
            echo "park.sh: $name is parked at this position already ($to)"
            continue
        fi
        local tmp=$parked/.$name.tmp
        rm -rf "$tmp"
        mkdir -p "$tmp"
        cp "$dir/metrics.jsonl" "$tmp/"
        "${pack[@]}" pack "$dir/last.safetensors" "$tmp/last.safetensors.pk" ||
            die "$dir/last.safetensors: packing failed"
        if [ -f "$dir/best.safetensors" ]; then
            "$savae" export --checkpoint "$dir/best.safetensors" --out "$tmp/best" 2>/dev/null ||
                die "$dir/best.safetensors: savae export failed"
            "$savae" export --checkpoint "$dir/last.safetensors" --out "$tmp/last" 2>/dev/null ||
                die "$dir/last.safetensors: savae export failed"
            if cmp -s "$tmp/best" "$tmp/last"; then
                echo "best.safetensors is the export of last.safetensors" >"$tmp/best-is-last"
            else
                "${pack[@]}" pack "$tmp/best" "$tmp/best.safetensors.pk" ||
                    die "$dir/best.safetensors: packing failed"
            fi
            rm -f "$tmp/best" "$tmp/last"
        fi
        local size
        size=$(du -sm "$tmp" | cut -f1)
        if [ "$size" -gt "$max_mib" ]; then
            rm -rf "$tmp"
            echo "park.sh: $name is $size MiB, over PARK_MAX_MIB ($max_mib): not parked, it stays in $dir only (the tree must fit a GPU lease, and every save adds it to the history again)" >&2
            continue
        fi
        mkdir -p "$parked/$name"
        mv "$tmp" "$to"
        echo "park.sh: parked $name in $to ($(du -sh "$to" | cut -f1))"
        local older
        older=$(parks "$name" | grep -vxF "$to" || true)
        if [ -n "$older" ]; then
            echo "park.sh: $name has older parks, kept: $(echo "$older" | tr '\n' ' ')(park.sh prune $name removes them; a removal counts in a submission's size as much as an addition)"
        fi
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
    local from dir=$runs/$name
    from=$(parks "$name" | tail -n 1)
    [ -n "$from" ] || die "$parked/$name: no parked run of that name"
    if [ -f "$dir/last.safetensors" ]; then
        echo "park.sh: $dir already holds a run: left as it is (the parked copy is not used)"
        return
    fi
    mkdir -p "$dir"
    cp "$from/metrics.jsonl" "$dir/"
    local f
    for f in last best; do
        if [ -f "$from/$f.safetensors.pk" ]; then
            "${pack[@]}" unpack "$from/$f.safetensors.pk" "$dir/$f.safetensors" ||
                die "$from/$f.safetensors.pk: unpacking failed"
        elif [ -f "$from/$f.safetensors" ]; then
            cp "$from/$f.safetensors" "$dir/"
        fi
    done
    if [ -f "$from/best-is-last" ]; then
        need_savae
        "$savae" export --checkpoint "$dir/last.safetensors" --out "$dir/best.safetensors" 2>/dev/null ||
            die "$dir/last.safetensors: savae export failed"
    fi
    echo "park.sh: restored $name from $from into $dir"
}

# prune NAME: remove every park of NAME but the newest.
prune() {
    local name=${1:?park.sh prune: which run?} newest p
    newest=$(parks "$name" | tail -n 1)
    [ -n "$newest" ] || die "$parked/$name: no parked run of that name"
    while read -r p; do
        [ "$p" = "$newest" ] && continue
        if [ "$p" = "$parked/$name" ]; then
            rm -f "$p/last.safetensors" "$p/best.safetensors" "$p/metrics.jsonl"
        else
            rm -rf "$p"
        fi
        echo "park.sh: removed $p"
    done < <(parks "$name")
}

case ${1:-} in
save) save "${2:-runs}" ;;
restore) restore "${2:-}" "${3:-runs}" ;;
prune) prune "${2:-}" ;;
drop)
    [ -n "${2:-}" ] || die "drop: which run?"
    [ -d "$parked/$2" ] || die "$parked/$2: no parked run of that name"
    rm -rf "${parked:?}/$2"
    echo "park.sh: dropped $parked/$2"
    ;;
*) die "usage: scripts/park.sh save [RUNS_DIR] | restore NAME [RUNS_DIR] | prune NAME | drop NAME" ;;
esac
