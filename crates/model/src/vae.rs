//! The MLP VAE of savae for binarized 28×28 images.
//!
//! Encoder: 784 → hidden[0] → … → 2d (first half μ, second half log σ²).
//! Decoder: d → hidden[last] → … → hidden[0] → 784 Bernoulli logits.
//! The `svi` training mode has no encoder (λ starts at 0).

use crate::{
    bernoulli_log_lik, gaussian_kl, Activation, ElboTerms, Linear, Mlp, Noise, ParamSet,
    VariationalParams,
};
use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// The architecture, as stored in the checkpoint metadata.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelConfig {
    /// Training mode the model was built for: vae, svi, vae-svi, savae.
    pub kind: String,
    pub latent_dim: usize,
    /// Hidden sizes of the encoder, input side first; the decoder mirrors them.
    pub hidden: Vec<usize>,
    pub activation: String,
    /// Input size (784 for MNIST).
    #[serde(default = "default_input")]
    pub input_dim: usize,
}

fn default_input() -> usize {
    savae_data::PIXELS
}

impl ModelConfig {
    pub fn has_encoder(&self) -> bool {
        self.kind != "svi"
    }
    pub fn validate(&self) -> Result<()> {
        if self.latent_dim == 0 {
            bail!("--latent-dim must be at least 1 (got 0)");
        }
        if self.hidden.contains(&0) {
            bail!("--hidden sizes must be positive (got {:?})", self.hidden);
        }
        Activation::parse(&self.activation)?;
        Ok(())
    }
}

/// An MLP VAE: its parameters and the two networks built on them.
#[derive(Debug, Clone)]
pub struct MlpVae {
    pub config: ModelConfig,
    pub params: ParamSet,
    pub encoder: Option<Mlp>,
    pub decoder: Mlp,
}

impl MlpVae {
    /// A freshly initialised model (weights drawn from `seed`).
    pub fn new(config: &ModelConfig, seed: u64, dtype: DType, device: &Device) -> Result<Self> {
        config.validate()?;
        let act = Activation::parse(&config.activation)?;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut params = ParamSet::new();
        let d = config.latent_dim;
        let encoder = if config.has_encoder() {
            let mut sizes = vec![config.input_dim];
            sizes.extend(&config.hidden);
            sizes.push(2 * d);
            Some(Mlp::init(
                &mut params,
                "encoder",
                &sizes,
                act,
                &mut rng,
                dtype,
                device,
            )?)
        } else {
            None
        };
        let mut sizes = vec![d];
        sizes.extend(config.hidden.iter().rev());
        sizes.push(config.input_dim);
        let decoder = Mlp::init(&mut params, "decoder", &sizes, act, &mut rng, dtype, device)?;
        Ok(Self {
            config: config.clone(),
            params,
            encoder,
            decoder,
        })
    }

    /// Builds the networks on existing parameters (names as in the checkpoint format).
    pub fn from_params(config: &ModelConfig, params: ParamSet) -> Result<Self> {
        let act = Activation::parse(&config.activation)?;
        let net = |prefix: &str| -> Result<Option<Mlp>> {
            let mut layers = Vec::new();
            while let Some(w) = params.get(&format!("{prefix}.layers.{}.weight", layers.len())) {
                let b = params
                    .get(&format!("{prefix}.layers.{}.bias", layers.len()))
                    .ok_or_else(|| {
                        anyhow::anyhow!("{prefix}.layers.{}.bias is missing", layers.len())
                    })?;
                layers.push(Linear {
                    weight: w.as_tensor().clone(),
                    bias: b.as_tensor().clone(),
                });
            }
            Ok((!layers.is_empty()).then_some(Mlp {
                layers,
                activation: act,
            }))
        };
        let encoder = net("encoder")?;
        let decoder = net("decoder")?
            .ok_or_else(|| anyhow::anyhow!("the model has no decoder parameters"))?;
        Ok(Self {
            config: config.clone(),
            params,
            encoder,
            decoder,
        })
    }

    /// A copy with every parameter converted to `dtype` on `device`.
    pub fn to(&self, dtype: DType, device: &Device) -> Result<Self> {
        Self::from_params(&self.config, self.params.to(dtype, device)?)
    }

    /// The dtype of the parameters (f32 when the model has none).
    pub fn dtype(&self) -> DType {
        self.params
            .iter()
            .next()
            .map(|(_, v)| v.dtype())
            .unwrap_or(DType::F32)
    }

    pub fn latent_dim(&self) -> usize {
        self.config.latent_dim
    }

    pub fn encoder_params(&self) -> ParamSet {
        self.params.with_prefix("encoder.")
    }
    pub fn decoder_params(&self) -> ParamSet {
        self.params.with_prefix("decoder.")
    }

    /// Amortized λ0 = enc(x): `[B, 2d]`; zeros when the model has no encoder.
    pub fn encode(&self, x: &Tensor) -> Result<VariationalParams> {
        match &self.encoder {
            Some(enc) => Ok(VariationalParams(enc.forward(x)?)),
            None => {
                let b = x.dim(0)?;
                Ok(VariationalParams(Tensor::zeros(
                    (b, 2 * self.latent_dim()),
                    x.dtype(),
                    x.device(),
                )?))
            }
        }
    }
}

/// ELBO terms of `decoder` for `x: [B, P]`, `λ: [B, 2d]`, `ε: [S, B, d]`, KL weight β.
pub fn elbo(
    decoder: &Mlp,
    x: &Tensor,
    lambda: &VariationalParams,
    eps: &Noise,
    beta: f64,
) -> Result<ElboTerms> {
    let (s, b, d) = eps.0.dims3()?;
    let z = lambda.sample(eps)?.reshape((s * b, d))?;
    let logits = decoder.forward(&z)?;
    let p = logits.dim(1)?;
    let ll = bernoulli_log_lik(&logits.reshape((s, b, p))?, x)?; // [S, B]
    let log_lik = (ll.sum(0)? / s as f64)?;
    let kl = gaussian_kl(lambda)?;
    let elbo = (&log_lik - (&kl * beta)?)?;
    Ok(ElboTerms { log_lik, kl, elbo })
}

/// Importance log-weights log p(x, z_k) − log q(z_k | λ) for `ε: [K, B, d]` → `[K, B]`.
///
/// log p(z) − log q(z) = −½‖z‖² + ½‖ε‖² + ½ Σ log σ² (the 2π terms cancel).
pub fn log_weights(
    decoder: &Mlp,
    x: &Tensor,
    lambda: &VariationalParams,
    eps: &Noise,
) -> Result<Tensor> {
    let (k, b, d) = eps.0.dims3()?;
    let z = lambda.sample(eps)?;
    let logits = decoder.forward(&z.reshape((k * b, d))?)?;
    let p = logits.dim(1)?;
    let ll = bernoulli_log_lik(&logits.reshape((k, b, p))?, x)?;
    let prior_minus_q = ((eps.0.sqr()?.sum(2)? - z.sqr()?.sum(2)?)? * 0.5)?
        .broadcast_add(&(lambda.logvar()?.sum(1)? * 0.5)?)?;
    Ok((ll + prior_minus_q)?)
}
