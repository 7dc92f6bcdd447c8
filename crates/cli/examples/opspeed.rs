use candle_core::{DType, Device, Tensor};
use std::time::Instant;
fn t<F: Fn() -> anyhow::Result<()>>(name: &str, n: usize, f: F) -> anyhow::Result<()> {
    f()?;
    let s = Instant::now();
    for _ in 0..n {
        f()?;
    }
    println!(
        "{name}: {:.3} ms",
        s.elapsed().as_secs_f64() * 1e3 / n as f64
    );
    Ok(())
}
fn main() -> anyhow::Result<()> {
    savae_implicit::enable_second_order();
    let d = Device::Cpu;
    let x = Tensor::randn(0f32, 1., (100, 784), &d)?;
    let w = Tensor::randn(0f32, 1., (512, 784), &d)?;
    let h = Tensor::randn(0f32, 1., (100, 512), &d)?;
    t("matmul 100x784 @ 784x512", 50, || {
        x.matmul(&w.t()?)?;
        Ok(())
    })?;
    t("matmul 100x512 @ 512x784", 50, || {
        h.matmul(&w)?;
        Ok(())
    })?;
    t("softplus [100,784]", 50, || {
        savae_model::activation::softplus(&x)?;
        Ok(())
    })?;
    t("sigmoid [100,784]", 50, || {
        candle_nn::ops::sigmoid(&x)?;
        Ok(())
    })?;
    t("exp [100,784]", 50, || {
        x.exp()?;
        Ok(())
    })?;
    t("mul [100,784]", 50, || {
        (&x * &x)?;
        Ok(())
    })?;
    t("add [100,784]", 50, || {
        (&x + &x)?;
        Ok(())
    })?;
    t("sum(1) [100,784]", 50, || {
        x.sum(1)?;
        Ok(())
    })?;
    t("broadcast_add bias", 50, || {
        h.broadcast_add(&h.get(0)?)?;
        Ok(())
    })?;
    let cfg = savae_model::ModelConfig {
        kind: "savae".into(),
        latent_dim: 32,
        hidden: vec![512, 512],
        activation: "softplus".into(),
        input_dim: 784,
    };
    let m = savae_model::MlpVae::new(&cfg, 0, DType::F32, &d)?;
    let dec = m.decoder.detached();
    let xb = (Tensor::rand(0f32, 1., (100, 784), &d)?.ge(0.8)?).to_dtype(DType::F32)?;
    let eps = savae_model::Noise(Tensor::randn(0f32, 1., (1, 100, 32), &d)?);
    let lam = Tensor::randn(0f32, 0.1, (100, 64), &d)?;
    t("elbo fwd", 20, || {
        savae_model::elbo(
            &dec,
            &xb,
            &savae_model::VariationalParams(lam.clone()),
            &eps,
            1.0,
        )?;
        Ok(())
    })?;
    t("elbo value_and_grad", 20, || {
        savae_implicit::value_and_grad(
            |l| {
                Ok(savae_model::elbo(
                    &dec,
                    &xb,
                    &savae_model::VariationalParams(l.clone()),
                    &eps,
                    1.0,
                )?
                .elbo)
            },
            &lam,
        )?;
        Ok(())
    })?;
    let vg = savae_implicit::value_and_grad(
        |l| {
            Ok(savae_model::elbo(
                &dec,
                &xb,
                &savae_model::VariationalParams(l.clone()),
                &eps,
                1.0,
            )?
            .elbo)
        },
        &lam,
    )?;
    let op = savae_implicit::ExactHvp {
        lambda: vg.lambda.clone(),
        grad: vg.grad.clone(),
    };
    use savae_implicit::BatchedOperator;
    t("hvp", 20, || {
        op.apply(&lam)?;
        Ok(())
    })?;
    Ok(())
}
