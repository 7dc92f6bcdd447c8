//! Models of savae: MLP Gaussian encoders, Bernoulli MLP decoders and the ELBO.
//!
//! Shapes: a batch of B images is `x: [B, 784]`; the variational parameters of a batch
//! are `λ = (μ, log σ²): [B, 2d]` (see [`VariationalParams`]); S noise draws are
//! `ε: [S, B, d]`. Parameters are candle `Var`s named as in the checkpoint format
//! (`encoder.layers.{i}.weight`, ...), held in a [`ParamSet`].

pub mod activation;
pub mod elbo;
pub mod mlp;
pub mod params;
pub mod vae;

pub use activation::Activation;
pub use elbo::{bernoulli_log_lik, gaussian_kl, ElboTerms, Noise, VariationalParams};
pub use mlp::{Linear, Mlp};
pub use params::ParamSet;
pub use vae::{elbo, log_weights, MlpVae, ModelConfig};
