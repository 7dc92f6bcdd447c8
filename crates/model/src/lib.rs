//! Models of savae: MLP Gaussian encoders and Bernoulli MLP decoders for images, LSTM
//! encoders and decoders for sentences, the ELBO, and hand-derived derivatives in λ of
//! the MLP and LSTM decoders' ELBO (gradient, Hessian-vector and mixed products, [`analytic`]).
//!
//! Shapes: a batch of B images is `x: [B, 784]`, of B sentences a [`TokenBatch`]; the variational parameters of a batch
//! are `λ = (μ, log σ²): [B, 2d]` (see [`VariationalParams`]); S noise draws are
//! `ε: [S, B, d]`. Parameters are candle `Var`s named as in the checkpoint format
//! (`encoder.layers.{i}.weight`, ...), held in a [`ParamSet`].

pub mod activation;
pub mod analytic;
pub mod elbo;
pub mod kernels;
pub mod lstm;
pub mod mlp;
pub mod params;
pub mod text;
pub mod vae;

pub use activation::Activation;
pub use analytic::{
    DecoderElbo, ElboPoint, LstmElbo, LstmElboPoint, MlpElbo, MlpElboPoint, Passes,
};
pub use elbo::{bernoulli_log_lik, gaussian_kl, ElboTerms, Noise, VariationalParams};
pub use mlp::{Linear, Mlp, MlpTape};
pub use params::ParamSet;
pub use text::{DropoutMasks, LstmDecoder, LstmEncoder, LstmEncoderTape, TokenBatch};
pub use vae::{elbo, log_weights, Batch, Decoder, Encoder, ModelConfig, ModelKind, Vae};
