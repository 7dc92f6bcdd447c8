//! ELBO and KL against hand-computed values; ∇_λ ELBO against central differences (f64).

use candle_core::{DType, Device, Tensor, Var};
use savae_model::{
    elbo, gaussian_kl, Activation, Batch, Decoder, Linear, Mlp, Noise, VariationalParams,
};

fn t(v: &[f64], shape: &[usize]) -> Tensor {
    Tensor::from_vec(v.to_vec(), shape, &Device::Cpu).unwrap()
}

fn softplus(x: f64) -> f64 {
    (1.0 + x.exp()).ln()
}

/// A 1-latent, 2-pixel linear decoder: logits = w z + b.
fn tiny_decoder() -> Mlp {
    Mlp {
        layers: vec![Linear {
            weight: t(&[0.5, -1.5], &[2, 1]),
            bias: t(&[0.25, 0.1], &[2]),
        }],
        activation: Activation::Tanh,
    }
}

#[test]
fn kl_matches_the_closed_form() {
    let lam = VariationalParams(t(&[0.3, -0.2, 0.5, -1.0], &[1, 4]));
    let kl = gaussian_kl(&lam).unwrap().to_vec1::<f64>().unwrap()[0];
    let want = 0.5 * ((0.09 + 0.5f64.exp() - 1.0 - 0.5) + (0.04 + (-1.0f64).exp() - 1.0 + 1.0));
    assert!((kl - want).abs() < 1e-12, "{kl} vs {want}");
}

#[test]
fn elbo_matches_hand_computation() {
    let dec = tiny_decoder();
    let x = t(&[1.0, 0.0], &[1, 2]);
    let lam = VariationalParams(t(&[0.4, -0.6], &[1, 2]));
    let eps = Noise(t(&[0.7, -1.2], &[2, 1, 1]));
    let beta = 0.3;
    let e = elbo(&Decoder::Mlp(dec), &Batch::Images(x), &lam, &eps, beta).unwrap();
    let sigma = (-0.3f64).exp();
    let mut ll = 0.0;
    for ep in [0.7, -1.2] {
        let z = 0.4 + sigma * ep;
        let (l1, l2) = (0.5 * z + 0.25, -1.5 * z + 0.1);
        ll += (l1 - softplus(l1)) + (0.0 - softplus(l2));
    }
    ll /= 2.0;
    let kl = 0.5 * (0.16 + (-0.6f64).exp() - 1.0 + 0.6);
    let got = e.elbo.to_vec1::<f64>().unwrap()[0];
    assert!((e.log_lik.to_vec1::<f64>().unwrap()[0] - ll).abs() < 1e-12);
    assert!((e.kl.to_vec1::<f64>().unwrap()[0] - kl).abs() < 1e-12);
    assert!(
        (got - (ll - beta * kl)).abs() < 1e-12,
        "{got} vs {}",
        ll - beta * kl
    );
}

#[test]
fn elbo_gradient_wrt_lambda_matches_central_differences() {
    for act in ["softplus", "tanh", "relu", "elu"] {
        let mut params = savae_model::ParamSet::new();
        let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(5);
        let dec = Mlp::init(
            &mut params,
            "decoder",
            &[3, 7, 10],
            Activation::parse(act).unwrap(),
            &mut rng,
            DType::F64,
            &Device::Cpu,
        )
        .unwrap();
        let x = t(
            &(0..20)
                .map(|i| (i % 3 == 0) as u8 as f64)
                .collect::<Vec<_>>(),
            &[2, 10],
        );
        let eps = Noise(t(
            &(0..12).map(|i| (i as f64 * 1.3).cos()).collect::<Vec<_>>(),
            &[2, 2, 3],
        ));
        let lam0: Vec<f64> = (0..12).map(|i| (i as f64 * 0.37).sin() * 0.8).collect();
        let var = Var::from_tensor(&t(&lam0, &[2, 6])).unwrap();
        let (dec, x) = (Decoder::Mlp(dec), Batch::Images(x));
        let f = |l: &Tensor| {
            elbo(&dec, &x, &VariationalParams(l.clone()), &eps, 0.8)
                .unwrap()
                .elbo
                .sum_all()
                .unwrap()
        };
        let g = f(var.as_tensor())
            .backward()
            .unwrap()
            .get(var.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let h = 1e-6;
        for j in 0..12 {
            let mut p = lam0.clone();
            p[j] += h;
            let mut m = lam0.clone();
            m[j] -= h;
            let fp = f(&t(&p, &[2, 6])).to_scalar::<f64>().unwrap();
            let fm = f(&t(&m, &[2, 6])).to_scalar::<f64>().unwrap();
            let fd = (fp - fm) / (2.0 * h);
            assert!(
                (fd - g[j]).abs() <= 1e-6 * (1.0 + fd.abs()),
                "{act} coordinate {j}: autodiff {} vs fd {fd}",
                g[j]
            );
        }
    }
}
