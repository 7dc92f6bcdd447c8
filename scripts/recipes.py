#!/usr/bin/env python3
"""Compare SVI refinement recipes on a trained checkpoint, on real training batches.

    scripts/recipes.py CHECKPOINT --beta B [--seconds S] [--lr LR] NAME='FLAGS' [NAME='FLAGS' ...]

For each recipe, runs `savae train --init-from CHECKPOINT --kl-start B --epochs 1
--log-every 1 FLAGS` in a scratch folder for S seconds (then SIGTERM), and prints one JSON
line: seconds per step, examples that took the non-stationary fallback per step, the mean
and largest ‖∇F(λ_K)‖, CG iterations, the Newton solves' Hessian-vector products. Every
recipe sees the same batches in the same order (the same seed and epoch): compare two
recipes on the steps both reached. With the default --lr 1e-7 the weights hardly move, so the
recipes are compared on the checkpoint's own model (Adam restarts under --init-from, and
its first steps at a normal rate would move it). The dataset and the architecture are the
checkpoint's; pass them in FLAGS if they are not the defaults (e.g. --dataset ptb).

Run it with the machine otherwise quiet (or with other runs frozen by SIGSTOP): the seconds
are wall time. SAVAE names the binary (default target/release/savae).
"""
import argparse
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time


def run_recipe(savae, ck, beta, lr, seconds, name, flags):
    with tempfile.TemporaryDirectory(prefix=f"savae-recipe-{name}-") as d:
        cmd = [savae, "train", "--run-dir", d, "--overwrite", "--init-from", ck,
               "--kl-start", str(beta), "--epochs", "1", "--log-every", "1",
               "--lr", str(lr), "--quiet"] + shlex.split(flags)
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            p.wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            p.send_signal(signal.SIGTERM)
            p.wait()
        err = p.stderr.read()
        path = os.path.join(d, "metrics.jsonl")
        lines = []
        if os.path.exists(path):
            with open(path) as f:
                lines = [json.loads(line) for line in f]
        steps = [x for x in lines if x.get("kind") == "step"]
        if not steps:
            return {"recipe": name, "flags": flags, "error": err.strip()[-2000:]}
        cg = [s.get("cg") or {} for s in steps]
        svi = [s.get("svi") or {} for s in steps]
        ns = [c.get("not_stationary") for c in cg]
        return {
            "recipe": name,
            "flags": flags,
            "steps_timed": len(steps),
            "s_per_step_mean": round(statistics.mean(s["step_seconds"] for s in steps), 3),
            "step_seconds": [round(s["step_seconds"], 2) for s in steps],
            "not_stationary": ns,
            "not_stationary_total": sum(n for n in ns if n is not None) if any(
                n is not None for n in ns) else None,
            "grad_norm_final_mean": [round(v.get("final_grad_norm_mean", float("nan")), 3)
                                     for v in svi],
            "grad_norm_final_max": [round(v.get("final_grad_norm_max", float("nan")), 3)
                                    for v in svi],
            "cg_iters_mean": [c.get("iters_mean") for c in cg],
            # Halvings of newton-ls's line search, over examples and steps.
            "backtracks": [v.get("backtracks") for v in svi],
            # Batched Hessian-vector products of the Newton steps' solves (their main cost).
            "hessian_products": [v.get("hessian_products") for v in svi],
            "loss": [round(s["loss"], 2) for s in steps],
            # The model gradient's norm before the clip.
            "grad_norm": [round(s["grad_norm"], 1) for s in steps],
            # What the refinement bought: ELBO at λ_K minus ELBO at λ0, nats per example.
            "refine_gain": [round(s["elbo_refined"] - s["elbo_amortized"], 3)
                            if s.get("elbo_refined") is not None
                            and s.get("elbo_amortized") is not None else None
                            for s in steps],
            "kl": [round(s["kl"], 2) for s in steps],
        }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    ap.add_argument("checkpoint")
    ap.add_argument("recipes", nargs="+", help="NAME='FLAGS'")
    ap.add_argument("--beta", type=float, required=True, help="the KL weight β of the steps")
    ap.add_argument("--seconds", type=float, default=90)
    ap.add_argument("--lr", type=float, default=1e-7)
    a = ap.parse_args()
    savae = os.environ.get("SAVAE", "target/release/savae")
    for r in a.recipes:
        if "=" not in r:
            sys.exit(f"recipes.py: {r!r} is not NAME='FLAGS'")
        name, flags = r.split("=", 1)
        t = time.time()
        out = run_recipe(savae, a.checkpoint, a.beta, a.lr, a.seconds, name, flags)
        out["wall_s"] = round(time.time() - t, 1)
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
