#!/usr/bin/env python3
"""One line per run of `scripts/reproduce.sh`: how it trained and what it scored.

    scripts/results.py [RUNS_DIR] [--markdown]     (default: runs/)

Reads RUNS_DIR/<name>/metrics.jsonl (epoch lines) and, once the run is done,
RUNS_DIR/<name>/test.json (`savae eval` on the test split). Prints JSON lines, or with
--markdown the rows of the README's results table. Training time is the sum of the epochs'
wall time (validation included; an epoch resumed from a checkpoint written before savae
carried `epoch_stats` counts only from the resume, and so do its counters).
"""
import json
import os
import sys


def epoch_lines(path):
    """The epoch lines of a metrics file, the last of each epoch number (a resumed run
    may repeat none, but be safe)."""
    by_epoch = {}
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            d = json.loads(line)
            if d.get("kind") == "epoch":
                by_epoch[d["epoch"]] = d
    return [by_epoch[e] for e in sorted(by_epoch)]


def summarize(name, run_dir):
    metrics = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(metrics):
        return None
    epochs = epoch_lines(metrics)
    best = [e for e in epochs if e.get("best")]
    heap = [e["step_heap_peak_mib"] for e in epochs if "step_heap_peak_mib" in e]
    row = {
        "run": name,
        "epochs_done": len(epochs),
        "best_epoch": best[-1]["epoch"] if best else None,
        "train_hours": round(sum(e["epoch_seconds"] for e in epochs) / 3600, 2),
        "step_heap_peak_mib": round(max(heap), 1) if heap else None,
        # Examples that took the implicit gradient's non-stationary fallback, per epoch.
        "not_stationary_by_epoch": [e.get("not_stationary", 0) for e in epochs],
        "valid_at_best": None,
        "test": None,
    }
    if best:
        b = best[-1]
        row["valid_at_best"] = {
            k: b.get(k)
            for k in [
                "valid_elbo_amortized",
                "valid_elbo_refined",
                "valid_ppl_bound",
                "valid_kl",
                "valid_mutual_info",
                "valid_active_units",
            ]
        }
    test = os.path.join(run_dir, "test.json")
    if os.path.exists(test):
        with open(test) as f:
            t = json.load(f)
        row["test"] = {
            k: t.get(k)
            for k in [
                "examples",
                "nll_iw",
                "iw_samples",
                "ppl_iw",
                "ppl_bound",
                "elbo_amortized",
                "elbo_refined",
                "kl_amortized",
                "kl_refined",
                "mutual_info",
                "active_units",
                "svi_optimizer",
                "svi_steps",
                "svi_prox",
            ]
        }
    return row


def fmt(x, nd=2):
    return "—" if x is None else f"{x:.{nd}f}"


def markdown(row):
    t = row["test"] or {}
    heap = "—" if row["step_heap_peak_mib"] is None else f"{row['step_heap_peak_mib']:.0f} MiB"
    status = (
        f"{row['epochs_done']} (best {row['best_epoch']})"
        if row["test"]
        else f"{row['epochs_done']} so far (best {row['best_epoch']})"
    )
    return (
        f"| `{row['run']}` | {status} | {fmt(t.get('nll_iw'))} | {fmt(t.get('ppl_iw'), 1)} "
        f"| {fmt(t.get('ppl_bound'), 1)} | {fmt(t.get('elbo_amortized'))} "
        f"| {fmt(t.get('elbo_refined'))} | {fmt(t.get('kl_amortized'))} "
        f"| {fmt(t.get('mutual_info'))} | {t.get('active_units', '—')} "
        f"| {row['train_hours']} h | {heap} |"
    )


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    runs = args[0] if args else "runs"
    md = "--markdown" in sys.argv
    if not os.path.isdir(runs):
        sys.exit(f"results.py: {runs} is not a folder of runs")
    if md:
        print(
            "| run | epochs | test NLL | test PPL (IW) | test PPL bound | ELBO amortized "
            "| ELBO refined | KL | MI | active units | train time | step heap |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name in sorted(os.listdir(runs)):
        row = summarize(name, os.path.join(runs, name))
        if row is None:
            continue
        print(markdown(row) if md else json.dumps(row))


if __name__ == "__main__":
    main()
