#!/usr/bin/env bash
# Keeps a copy of a training run as it stood at the end of each epoch, while it trains.
#
#   scripts/snapshot-epochs.sh RUN_DIR SNAP_DIR [POLL_SECONDS]   (default poll: 60)
#
# Every POLL_SECONDS it reads RUN_DIR/metrics.jsonl; when a new epoch line has appeared it
# copies RUN_DIR/{last,best}.safetensors and metrics.jsonl (up to that epoch's line) into
# SNAP_DIR/epoch-<E>/<name>/ (name: RUN_DIR's basename), the layout that
# `scripts/park.sh save SNAP_DIR/epoch-<E>` parks. So a run can be parked at an epoch's end
# (86 MiB for PTB, against about 115 MiB mid-epoch, where best is not last) without stopping
# it. The trainer writes last.safetensors (and best, if it improved) before the epoch line,
# each atomically; the copy is kept only if last's step is the epoch line's and best's no
# later (a mid-epoch save, --save-every, or the next epoch's end may have overwritten them
# since: then that epoch is skipped, marked MISSED).
# Runs until RUN_DIR/test.json exists (the run and its evaluation are done), or RUN_DIR is
# gone. Start it detached, beside the training: setsid nohup scripts/snapshot-epochs.sh ... &
set -euo pipefail
pack=$(cd "$(dirname "$0")" && pwd)/parkpack.py
run=${1:?usage: scripts/snapshot-epochs.sh RUN_DIR SNAP_DIR [POLL_SECONDS]}
snap=${2:?usage: scripts/snapshot-epochs.sh RUN_DIR SNAP_DIR [POLL_SECONDS]}
poll=${3:-60}
run=${run%/}
name=$(basename "$run")
mkdir -p "$snap"

# last_epoch: "EPOCH STEP" of metrics.jsonl's last epoch line, or nothing.
last_epoch() {
    [ -f "$run/metrics.jsonl" ] || return 0
    grep '"kind":"epoch"' "$run/metrics.jsonl" | tail -n 1 |
        python3 -c 'import json,sys
for l in sys.stdin:
    r = json.loads(l); print(r["epoch"], r["step"])'
}

# metrics_to EPOCH DST: metrics.jsonl up to and including epoch EPOCH's line (the step lines
# of the next epoch, appended since, are not part of this position).
metrics_to() {
    python3 - "$run/metrics.jsonl" "$1" "$2" <<'PY'
import json, sys
src, epoch, dst = sys.argv[1], int(sys.argv[2]), sys.argv[3]
out = []
for line in open(src):
    out.append(line)
    r = json.loads(line)
    if r.get("kind") == "epoch" and r.get("epoch") == epoch:
        break
else:
    sys.exit(f"{src}: no line for epoch {epoch}")
open(dst, "w").writelines(out)
PY
}

while ! [ -f "$run/test.json" ]; do
    [ -d "$run" ] || {
        echo "snapshot-epochs.sh: $run: no such run folder (any more)" >&2
        exit 1
    }
    read -r epoch step < <(last_epoch; echo) || true
    if [ -n "${epoch:-}" ] && ! [ -d "$snap/epoch-$epoch" ]; then
        tmp=$snap/.epoch-$epoch.tmp
        rm -rf "$tmp"
        mkdir -p "$tmp/$name"
        cp "$run/last.safetensors" "$tmp/$name/"
        [ -f "$run/best.safetensors" ] && cp "$run/best.safetensors" "$tmp/$name/"
        got=$(python3 "$pack" step "$tmp/$name/last.safetensors" || echo none)
        best=$step
        [ -f "$tmp/$name/best.safetensors" ] &&
            best=$(python3 "$pack" step "$tmp/$name/best.safetensors" || echo none)
        if [ "$got" = "$step" ] && [ "$best" != none ] && [ "$best" -le "$step" ] &&
            metrics_to "$epoch" "$tmp/$name/metrics.jsonl"; then
            mv "$tmp" "$snap/epoch-$epoch"
            echo "$(date -u +%FT%TZ) $name: epoch $epoch (step $step) in $snap/epoch-$epoch"
        else
            rm -rf "$tmp"
            mkdir -p "$snap/epoch-$epoch"
            echo "$(date -u +%FT%TZ) $name: epoch $epoch missed (last.safetensors at step $got, best at $best, the epoch line at $step)" |
                tee "$snap/epoch-$epoch/MISSED"
        fi
    fi
    sleep "$poll"
done
echo "$(date -u +%FT%TZ) $name: $run/test.json written; done"
