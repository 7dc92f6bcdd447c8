//! The VAEs of savae: an MLP VAE for binarized 28×28 images and the LSTM sentence VAE.
//!
//! MLP — encoder: 784 → hidden[0] → … → 2d (first half μ, second half log σ²);
//! decoder: d → hidden[last] → … → hidden[0] → 784 Bernoulli logits.
//! LSTM — see [`crate::text`]; `hidden[0]` is the LSTM size.
//! The `svi` mode has no encoder (λ starts at 0); the `lm` mode has no latent at all.

use crate::lstm::ParamInit;
use crate::text::{LstmDecoder, LstmEncoder, TokenBatch};
use crate::{
    bernoulli_log_lik, gaussian_kl, Activation, ElboTerms, Mlp, Noise, ParamSet, VariationalParams,
};
use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// Which model is trained: the one table of model names (serialized, and on the command
/// line, as `vae`, `svi`, `vae-svi`, `savae`, `lm`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "kebab-case")]
pub enum ModelKind {
    /// Amortized VAE: the loss at the encoder's λ0.
    Vae,
    /// Stochastic variational inference alone: no encoder, λ refined from 0.
    Svi,
    /// The decoder trained at refined λ*, the encoder on its own ELBO at λ0.
    VaeSvi,
    /// Semi-amortized VAE: the loss at λ*, differentiated through the refinement.
    Savae,
    /// The text decoder alone (no latent): the language-model baseline.
    Lm,
}

impl ModelKind {
    /// The name used in settings, metadata and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Self::Vae => "vae",
            Self::Svi => "svi",
            Self::VaeSvi => "vae-svi",
            Self::Savae => "savae",
            Self::Lm => "lm",
        }
    }
    /// Whether λ is refined from λ0 before the loss (svi, vae-svi, savae).
    pub fn refines(self) -> bool {
        matches!(self, Self::Svi | Self::VaeSvi | Self::Savae)
    }
}

impl std::fmt::Display for ModelKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The architecture, as stored in the checkpoint metadata.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    /// The model it was built for (`svi` has no encoder, `lm` no latent).
    pub kind: ModelKind,
    pub latent_dim: usize,
    /// MLP: hidden sizes of the encoder, input side first (the decoder mirrors them).
    /// LSTM: `[H]`, the LSTM size of encoder and decoder.
    pub hidden: Vec<usize>,
    /// MLP activation (unused by the LSTM).
    pub activation: Activation,
    /// Input size (784 for MNIST; unused by the LSTM).
    #[serde(default = "default_input")]
    pub input_dim: usize,
    /// Vocabulary size; 0 for image models.
    #[serde(default)]
    pub vocab_size: usize,
    /// Word-embedding size (text models).
    #[serde(default)]
    pub embed_dim: usize,
    /// Decoder dropout probability (text models; applied in training only).
    #[serde(default)]
    pub dropout: f64,
}

fn default_input() -> usize {
    savae_data::PIXELS
}

impl ModelConfig {
    pub fn has_encoder(&self) -> bool {
        !matches!(self.kind, ModelKind::Svi | ModelKind::Lm)
    }
    /// False for the language model, whose decoder takes no z.
    pub fn has_latent(&self) -> bool {
        self.kind != ModelKind::Lm
    }
    pub fn is_text(&self) -> bool {
        self.vocab_size > 0
    }
    pub fn validate(&self) -> Result<()> {
        if self.latent_dim == 0 {
            bail!("the latent size must be at least 1 (got 0)");
        }
        if self.hidden.is_empty() || self.hidden.contains(&0) {
            bail!("hidden sizes must be positive (got {:?})", self.hidden);
        }
        if self.is_text() {
            if self.embed_dim == 0 {
                bail!("the embedding size must be at least 1 (got 0)");
            }
            if !(0.0..1.0).contains(&self.dropout) {
                bail!(
                    "the dropout probability must be in [0, 1) (got {})",
                    self.dropout
                );
            }
        }
        Ok(())
    }
}

/// An encoder: x → λ0 `[B, 2d]`.
#[derive(Debug, Clone)]
pub enum Encoder {
    Mlp(Mlp),
    Lstm(LstmEncoder),
}

/// A decoder: log p(x | z).
#[derive(Debug, Clone)]
pub enum Decoder {
    Mlp(Mlp),
    Lstm(LstmDecoder),
}

/// A batch of data: images `[B, 784]` (0/1 values) or equal-length sentences.
#[derive(Debug, Clone)]
pub enum Batch {
    Images(Tensor),
    Text(TokenBatch),
}

impl Batch {
    /// The number of examples B.
    pub fn len(&self) -> usize {
        match self {
            Batch::Images(x) => x.dim(0).unwrap_or(0),
            Batch::Text(t) => t.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Examples `start .. start + len` (sentences with their dropout masks).
    pub fn rows(&self, start: usize, len: usize) -> Result<Batch> {
        Ok(match self {
            Batch::Images(x) => Batch::Images(x.narrow(0, start, len)?),
            Batch::Text(t) => Batch::Text(t.rows(start, len)?),
        })
    }
    /// The examples at `rows` (a `[r]` u32 tensor).
    pub fn select(&self, rows: &Tensor) -> Result<Batch> {
        Ok(match self {
            Batch::Images(x) => Batch::Images(x.index_select(rows, 0)?),
            Batch::Text(t) => Batch::Text(t.select(rows)?),
        })
    }
    /// The images, or an error for text.
    pub fn images(&self) -> Result<&Tensor> {
        match self {
            Batch::Images(x) => Ok(x),
            Batch::Text(_) => bail!("this needs an image batch"),
        }
    }
}

impl Decoder {
    /// log p(x | z) per example: `z: [S, B, d]` → `[S, B]`. `z = None` only for the
    /// language model (→ `[1, B]`).
    pub fn log_lik(&self, x: &Batch, z: Option<&Tensor>) -> Result<Tensor> {
        match (self, x) {
            (Decoder::Mlp(mlp), Batch::Images(x)) => {
                let z = z.ok_or_else(|| anyhow::anyhow!("an MLP decoder needs z"))?;
                let (s, b, d) = z.dims3()?;
                let logits = mlp.forward(&z.reshape((s * b, d))?)?;
                let p = logits.dim(1)?;
                Ok(bernoulli_log_lik(&logits.reshape((s, b, p))?, x)?)
            }
            (Decoder::Lstm(lstm), Batch::Text(x)) => lstm.log_lik(x, z),
            _ => bail!("the batch does not match the model (images vs text)"),
        }
    }
    /// The same decoder with its weights detached (gradients reach the input only).
    pub fn detached(&self) -> Decoder {
        match self {
            Decoder::Mlp(m) => Decoder::Mlp(m.detached()),
            Decoder::Lstm(l) => Decoder::Lstm(l.detached()),
        }
    }
    /// The MLP of an image decoder.
    pub fn as_mlp(&self) -> Result<&Mlp> {
        match self {
            Decoder::Mlp(m) => Ok(m),
            Decoder::Lstm(_) => bail!("this needs an image (MLP) model"),
        }
    }
    /// The LSTM of a text decoder.
    pub fn as_lstm(&self) -> Result<&LstmDecoder> {
        match self {
            Decoder::Lstm(l) => Ok(l),
            Decoder::Mlp(_) => bail!("this needs a text (LSTM) model"),
        }
    }
}

/// A VAE: its parameters and the two networks built on them.
#[derive(Debug, Clone)]
pub struct Vae {
    pub config: ModelConfig,
    pub params: ParamSet,
    pub encoder: Option<Encoder>,
    pub decoder: Decoder,
}

impl Vae {
    /// A freshly initialised model (weights drawn from `seed`).
    pub fn new(config: &ModelConfig, seed: u64, dtype: DType, device: &Device) -> Result<Self> {
        config.validate()?;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut params = ParamSet::new();
        let d = config.latent_dim;
        if config.is_text() {
            let mut init = ParamInit {
                params: &mut params,
                rng: &mut rng,
                bound: crate::text::INIT_BOUND,
                dtype,
                device,
            };
            let (v, e, h) = (config.vocab_size, config.embed_dim, config.hidden[0]);
            let encoder = if config.has_encoder() {
                Some(Encoder::Lstm(LstmEncoder::init(&mut init, (v, e, h, d))?))
            } else {
                None
            };
            let dz = if config.has_latent() { d } else { 0 };
            let decoder = LstmDecoder::init(&mut init, (v, e, h, dz))?;
            return Ok(Self {
                config: config.clone(),
                params,
                encoder,
                decoder: Decoder::Lstm(decoder),
            });
        }
        let act = config.activation;
        let encoder = if config.has_encoder() {
            let mut sizes = vec![config.input_dim];
            sizes.extend(&config.hidden);
            sizes.push(2 * d);
            Some(Encoder::Mlp(Mlp::init(
                &mut params,
                "encoder",
                &sizes,
                act,
                &mut rng,
                dtype,
                device,
            )?))
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
            decoder: Decoder::Mlp(decoder),
        })
    }

    /// A copy with every parameter converted to `dtype` on `device`.
    pub fn to(&self, dtype: DType, device: &Device) -> Result<Self> {
        let m = Self::new(&self.config, 0, dtype, device)?;
        m.params.load_from(&self.params.to_map(), "model")?;
        Ok(m)
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
    pub fn encode(&self, x: &Batch) -> Result<VariationalParams> {
        match (&self.encoder, x) {
            (Some(Encoder::Mlp(enc)), Batch::Images(x)) => Ok(VariationalParams(enc.forward(x)?)),
            (Some(Encoder::Lstm(enc)), Batch::Text(x)) => Ok(VariationalParams(enc.forward(x)?)),
            (Some(_), _) => bail!("the batch does not match the model (images vs text)"),
            (None, x) => {
                let device = match x {
                    Batch::Images(t) => t.device(),
                    Batch::Text(t) => t.targets.device(),
                };
                Ok(VariationalParams(Tensor::zeros(
                    (x.len(), 2 * self.latent_dim()),
                    self.dtype(),
                    device,
                )?))
            }
        }
    }
}

/// ELBO terms of `decoder` for a batch of B examples, `λ: [B, 2d]`, `ε: [S, B, d]`, KL weight β.
pub fn elbo(
    decoder: &Decoder,
    x: &Batch,
    lambda: &VariationalParams,
    eps: &Noise,
    beta: f64,
) -> Result<ElboTerms> {
    let s = eps.0.dim(0)?;
    let z = lambda.sample(eps)?;
    let ll = decoder.log_lik(x, Some(&z))?; // [S, B]
    let log_lik = (ll.sum(0)? / s as f64)?;
    let kl = gaussian_kl(lambda)?;
    let elbo = (&log_lik - (&kl * beta)?)?;
    Ok(ElboTerms { log_lik, kl, elbo })
}

/// Importance log-weights log p(x, z_k) − log q(z_k | λ) for `ε: [K, B, d]` → `[K, B]`.
///
/// log p(z) − log q(z) = −½‖z‖² + ½‖ε‖² + ½ Σ log σ² (the 2π terms cancel).
pub fn log_weights(
    decoder: &Decoder,
    x: &Batch,
    lambda: &VariationalParams,
    eps: &Noise,
) -> Result<Tensor> {
    let z = lambda.sample(eps)?;
    let ll = decoder.log_lik(x, Some(&z))?;
    let prior_minus_q = ((eps.0.sqr()?.sum(2)? - z.sqr()?.sum(2)?)? * 0.5)?
        .broadcast_add(&(lambda.logvar()?.sum(1)? * 0.5)?)?;
    Ok((ll + prior_minus_q)?)
}
