//! The LSTM sentence VAE of SA-VAE (Kim et al. 2018, after Bowman et al. 2016).
//!
//! Encoder: embeddings of `w1 … wn </s>` → LSTM → final hidden state → linear → λ: `[B, 2d]`.
//! Decoder: reads `<s> w1 … wn`; at every step its input is `[emb(w_t); z]`, its initial
//! state is `h0 = W_z z + b`, `c0 = 0`; a linear layer and log-softmax over the
//! vocabulary predict `w1 … wn </s>`:
//!   log p(x | z) = Σ_{t=1}^{n+1} log softmax(W_o h_t + b_o)[x_t].
//! The language-model baseline (`lm`) is the same decoder without z (`h0 = 0`).
//! Sentences of a batch have equal length, so nothing is padded or masked.

use crate::lstm::{Lstm, ParamInit};
use crate::Linear;
use anyhow::{bail, Result};
use candle_core::{Tensor, D};
use rand::Rng;

/// Initialisation bound of every text-model weight (SA-VAE's uniform ±0.1).
pub const INIT_BOUND: f64 = 0.1;

/// Fixed dropout masks of one training step (entries 0 or 1/(1−p)), held constant during
/// the step's refinement like the noise ε, so that the refined objective is deterministic.
#[derive(Debug, Clone)]
pub struct DropoutMasks {
    /// On the decoder's word embeddings: `[B, T, E]`.
    pub embed: Tensor,
    /// On the decoder's hidden states before the output layer: `[B, T, H]`.
    pub output: Tensor,
}

/// A batch of `B` sentences of equal length `n` (`T = n + 1`).
#[derive(Debug, Clone)]
pub struct TokenBatch {
    /// Decoder inputs `<s> w1 … wn`: `[B, T]` u32.
    pub inputs: Tensor,
    /// Targets `w1 … wn </s>` (also what the encoder reads): `[B, T]` u32.
    pub targets: Tensor,
    pub dropout: Option<DropoutMasks>,
}

impl TokenBatch {
    /// Sentences `start .. start + len` (with their dropout masks).
    pub fn rows(&self, start: usize, len: usize) -> candle_core::Result<TokenBatch> {
        Ok(TokenBatch {
            inputs: self.inputs.narrow(0, start, len)?,
            targets: self.targets.narrow(0, start, len)?,
            dropout: match &self.dropout {
                Some(m) => Some(DropoutMasks {
                    embed: m.embed.narrow(0, start, len)?,
                    output: m.output.narrow(0, start, len)?,
                }),
                None => None,
            },
        })
    }

    pub fn len(&self) -> usize {
        self.targets.dim(0).unwrap_or(0)
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Tokens per sentence (`T`).
    pub fn steps(&self) -> usize {
        self.targets.dim(1).unwrap_or(0)
    }
}

/// The encoder: `encoder.embed.weight: [V, E]`, `encoder.lstm.*`, `encoder.out.*` (H → 2d).
#[derive(Debug, Clone)]
pub struct LstmEncoder {
    pub embed: Tensor,
    pub lstm: Lstm,
    pub out: Linear,
}

impl LstmEncoder {
    pub fn init(
        init: &mut ParamInit<'_, impl Rng>,
        (vocab, embed, hidden, latent): (usize, usize, usize, usize),
    ) -> Result<Self> {
        Ok(Self {
            embed: init.tensor("encoder.embed.weight", &[vocab, embed])?,
            lstm: Lstm::init(init, "encoder.lstm", embed, hidden)?,
            out: init.linear("encoder.out", hidden, 2 * latent)?,
        })
    }

    /// λ0 = W h_T + b: `[B, 2d]`.
    pub fn forward(&self, x: &TokenBatch) -> candle_core::Result<Tensor> {
        let (b, t) = x.targets.dims2()?;
        let e = self.embed.dim(1)?;
        let emb = self
            .embed
            .index_select(&x.targets.flatten_all()?, 0)?
            .reshape((b, t, e))?;
        let gx = self.lstm.project_inputs(&emb, e)?;
        let h = self.lstm.hidden_size();
        let zeros = Tensor::zeros((b, h), gx.dtype(), gx.device())?;
        let hs = self.lstm.run(&gx, &zeros, &zeros)?;
        self.out.forward(&hs.narrow(1, t - 1, 1)?.squeeze(1)?)
    }
}

/// The decoder: `decoder.embed.weight: [V, E]`, `decoder.lstm.*` (input E + d, or E for
/// the language model), `decoder.init.*` (d → H, absent for the language model),
/// `decoder.out.*` (H → V).
#[derive(Debug, Clone)]
pub struct LstmDecoder {
    pub embed: Tensor,
    pub lstm: Lstm,
    pub init: Option<Linear>,
    pub out: Linear,
}

impl LstmDecoder {
    /// `latent == 0` builds the language model (no z).
    pub fn init(
        init: &mut ParamInit<'_, impl Rng>,
        (vocab, embed, hidden, latent): (usize, usize, usize, usize),
    ) -> Result<Self> {
        let embed_t = init.tensor("decoder.embed.weight", &[vocab, embed])?;
        let lstm = Lstm::init(init, "decoder.lstm", embed + latent, hidden)?;
        let z_init = if latent > 0 {
            Some(init.linear("decoder.init", latent, hidden)?)
        } else {
            None
        };
        Ok(Self {
            embed: embed_t,
            lstm,
            init: z_init,
            out: init.linear("decoder.out", hidden, vocab)?,
        })
    }

    pub fn vocab_size(&self) -> usize {
        self.embed.dim(0).unwrap_or(0)
    }

    /// The decoder's hidden states at every position (dropout applied): `z: [S, B, d]`
    /// (None for the language model, S = 1) → (`[S·B, T, H]` sample-major, S).
    fn hidden_states(&self, x: &TokenBatch, z: Option<&Tensor>) -> Result<(Tensor, usize)> {
        let (b, t) = x.inputs.dims2()?;
        let e = self.embed.dim(1)?;
        let h = self.lstm.hidden_size();
        let mut emb = self
            .embed
            .index_select(&x.inputs.flatten_all()?, 0)?
            .reshape((b, t, e))?;
        if let Some(m) = &x.dropout {
            emb = emb.mul(&m.embed)?;
        }
        let xe = self.lstm.project_inputs(&emb, e)?; // [B, T, 4H]
        let (s, gx, h0) = match (z, &self.init) {
            (Some(z), Some(init)) => {
                let (s, bz, d) = z.dims3()?;
                if bz != b {
                    bail!("z has {bz} rows for a batch of {b} sentences");
                }
                let zf = z.reshape((s * b, d))?;
                let w_z = self.lstm.weight_ih.narrow(1, e, d)?;
                let zw = zf.matmul(&w_z.t()?)?.reshape((s, b, 1, 4 * h))?;
                let gx = xe
                    .unsqueeze(0)?
                    .broadcast_add(&zw)?
                    .reshape((s * b, t, 4 * h))?;
                (s, gx, init.forward(&zf)?)
            }
            (None, None) => (1, xe, Tensor::zeros((b, h), emb.dtype(), emb.device())?),
            (Some(_), None) => bail!("the language model takes no z"),
            (None, Some(_)) => bail!("this decoder needs z"),
        };
        let c0 = h0.zeros_like()?;
        let mut hs = self.lstm.run(&gx, &h0, &c0)?; // [S·B, T, H]
        if let Some(m) = &x.dropout {
            hs = hs
                .reshape((s, b, t, h))?
                .broadcast_mul(&m.output)?
                .reshape((s * b, t, h))?;
        }
        Ok((hs, s))
    }

    /// log p(x | z) per sentence: `z: [S, B, d]` → `[S, B]` (None: the language model's
    /// log p(x), `[1, B]`).
    pub fn log_lik(&self, x: &TokenBatch, z: Option<&Tensor>) -> Result<Tensor> {
        let (b, t) = x.targets.dims2()?;
        let (hs, s) = self.hidden_states(x, z)?;
        let h = hs.dim(2)?;
        let logits = self.out.forward(&hs.reshape((s * b * t, h))?)?;
        let logp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
        let targets = x
            .targets
            .unsqueeze(0)?
            .broadcast_as((s, b, t))?
            .contiguous()?
            .reshape((s * b * t, 1))?;
        Ok(logp.gather(&targets, 1)?.reshape((s, b, t))?.sum(2)?)
    }

    /// Log-probabilities of the next word after `prefix: [N, t]` (starting with `<s>`)
    /// given `z: [N, d]`: `[N, V]`. Runs the whole prefix (generation is short).
    pub fn next_log_probs(&self, prefix: &Tensor, z: Option<&Tensor>) -> Result<Tensor> {
        let (n, t) = prefix.dims2()?;
        let x = TokenBatch {
            inputs: prefix.clone(),
            targets: prefix.clone(),
            dropout: None,
        };
        let z3 = z.map(|z| z.unsqueeze(0)).transpose()?;
        let (hs, _) = self.hidden_states(&x, z3.as_ref())?;
        let last = hs.narrow(1, t - 1, 1)?.reshape((n, hs.dim(2)?))?;
        Ok(candle_nn::ops::log_softmax(
            &self.out.forward(&last)?,
            D::Minus1,
        )?)
    }

    pub fn detached(&self) -> LstmDecoder {
        let lin = |l: &Linear| Linear {
            weight: l.weight.detach(),
            bias: l.bias.detach(),
        };
        LstmDecoder {
            embed: self.embed.detach(),
            lstm: self.lstm.detached(),
            init: self.init.as_ref().map(lin),
            out: lin(&self.out),
        }
    }
}
