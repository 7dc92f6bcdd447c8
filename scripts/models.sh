# The training flags of each from-scratch model of the README's results table, declared once:
# scripts/reproduce.sh trains and evaluates them, scripts/gpu-check.sh times them on a GPU.
# Sourced, not run. The data, epochs and early stopping are the caller's; these are the model
# and its gradient.
#
#   model_flags NAME   sets the array FLAGS to NAME's flags (fails on an unknown NAME)

model_flags() {
    case $1 in
    mnist-vae) FLAGS=(--model vae) ;;
    # Refinements hold 8 draws fixed: with 1 or 4 the refined posteriors fit their draws
    # and score worse than the amortized ones on fresh draws (README, Status).
    mnist-vae-svi) FLAGS=(--model vae-svi --svi-steps 10 --samples 8) ;;
    mnist-savae-unrolled) FLAGS=(--model savae --grad unrolled --svi-steps 10 --samples 8) ;;
    # Newton refinement: SGD's K steps do not reach the stationary point the implicit
    # gradient needs; 6 steps, because 3 fell behind the moving decoder (README, Status).
    # With the line search: on the unrolled run's weights after 4 epochs, plain Newton left
    # 7 % of the images non-stationary, newton-ls 0.3 % at 1.15× the cost (bench/results/
    # cpu-mnist-savae-newton-ls-2026-12-03.jsonl).
    # The encoder on its own ELBO: through the refinement it fell behind (README, Results).
    mnist-savae-implicit)
        FLAGS=(--model savae --grad implicit --svi-optimizer newton-ls --svi-steps 6 --samples 8
            --encoder-loss amortized)
        ;;
    ptb-lm) FLAGS=(--model lm) ;;
    ptb-vae) FLAGS=(--model vae) ;;
    # The decoder trained on refined posteriors (the encoder on its own ELBO), issue 16's
    # cheap row between the VAE and SA-VAE.
    ptb-vae-svi) FLAGS=(--model vae-svi --svi-steps 10) ;;
    # 3 line-searched Newton steps on 1 draw at γ = 20, adjoint CG to 1e-3. On 1 draw a
    # step costs a sixth of 3 Newton steps on 4 draws at γ = 1 (bench/results/
    # cpu-2core-ptb-savae-recipes-real-batches-2026-12-03.jsonl). Plain Newton (no line
    # search) stopped being stationary as the KL grew: 2 steps at γ = 5 left 47 % of the
    # examples non-stationary by step 1 781 (bench/results/
    # cpu-ptb-savae-newton-stationarity-2026-12-03.jsonl), at γ = 20 19 % by step 2 351.
    # On those batches at step 2 351, 2 line-searched steps left 8 % and 3 left 2 %, and
    # the refinement gained twice as much (bench/results/
    # cpu-ptb-savae-newton-ls-2026-12-03.jsonl). But 3 fixed steps lost stationarity as the
    # KL grew (8 % of epoch 2's examples, 8.3 % at step 2 824), so each batch refined
    # until every example's ‖∇F‖ < 0.5, at most 6 steps: at step 2 824 that left none
    # non-stationary at 1.55x the cost of 3 steps; 4 fixed steps left 2.7 % (the first 14
    # batches, bench/results/cpu-ptb-savae-adaptive-steps-epoch3-2026-12-05.jsonl). Now
    # each example stops on its own once its ‖∇F‖ < 0.1 (at most 6 steps), and only the
    # examples still moving are evaluated: on the same batches no example non-stationary,
    # mean ‖∇F(λ_K)‖ 0.020 (the batch-wide stop at 0.5: 0.009) at about 0.75x the batch-wide
    # stop's step (bench/results/cpu-ptb-savae-per-example-newton-epoch3-2026-12-05.jsonl).
    # At most 12 steps: the 6-step cap bound again as the KL grew (2.75 % of epoch 3's
    # examples non-stationary; on its weights at epoch 4, 4.2 % of 45 batches with 6
    # steps, 0.6 % with 8, 0.07 % with 10 or 12, at +0-3 % seconds per step: bench/results/
    # cpu-ptb-savae-step-cap-epoch4-2026-12-06.jsonl). The cap only costs where it binds.
    # Inexact Newton solves: with the per-example stop and that cap, on the same weights
    # and batches, 0.80x the exact solves' step (3.74 against 4.66 s), the same
    # non-stationary count (1 of 2 080) and refinement gain (bench/results/
    # cpu-ptb-savae-newton-solve-epoch4-2026-12-06.jsonl); at 3 fixed steps they had cost
    # stationarity (README, Status), which the stop at 0.1 now guards.
    ptb-savae-implicit)
        FLAGS=(--model savae --grad implicit --svi-optimizer newton-ls --svi-steps 12 --svi-tol 0.1
            --newton-solve inexact --samples 1 --prox 20 --cg-tol 1e-3)
        ;;
    # SA-VAE's own refinement, SGD K = 10 (2.9 s per step on 2 cores, 1.1 h per epoch),
    # with its code's cap on the reverse pass (optim_n2n.py: 5 after every reverse step).
    # The exact unrolled gradient exploded: in epoch 2 the model gradient's norm had a
    # median of 435 and a maximum of 6.8e6 over the logged steps (the implicit run's: 13
    # and 26), the refinement stopped converging (final ‖∇F‖ median 17 against 0.04) and
    # the encoder fell 35 nats behind it; its epoch 1 ended at validation bound PPL 773
    # (bench/results/ptb-savae-unrolled-exact-scratch-metrics.jsonl).
    ptb-savae-unrolled) FLAGS=(--model savae --grad unrolled --svi-steps 10 --unrolled-clip 5) ;;
    *)
        echo "scripts/models.sh: no model named '$1'" >&2
        return 1
        ;;
    esac
}
