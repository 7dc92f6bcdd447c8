//! The LSTM sentence VAE of SA-VAE (Kim et al. 2018, after Bowman et al. 2016).
//!
//! Encoder: embeddings of `w1 … wn </s>` → LSTM → final hidden state → linear → λ: `[B, 2d]`.
//! Decoder: reads `<s> w1 … wn`; at every step its input is `[emb(w_t); z]`, its initial
//! state is `h0 = W_z z + b`, `c0 = 0`; a linear layer and log-softmax over the
//! vocabulary predict `w1 … wn </s>`:
//!   log p(x | z) = Σ_{t=1}^{n+1} log softmax(W_o h_t + b_o)[x_t].
//! The language-model baseline (`lm`) is the same decoder without z (`h0 = 0`).
//! Sentences of a batch have equal length, so nothing is padded or masked.

use crate::lstm::{inputs_of_steps, Lstm, LstmTape, ParamInit};
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

    /// The sentences at `rows` (a `[r]` u32 tensor), with their dropout masks.
    pub fn select(&self, rows: &Tensor) -> candle_core::Result<TokenBatch> {
        Ok(TokenBatch {
            inputs: self.inputs.index_select(rows, 0)?,
            targets: self.targets.index_select(rows, 0)?,
            dropout: match &self.dropout {
                Some(m) => Some(DropoutMasks {
                    embed: m.embed.index_select(rows, 0)?,
                    output: m.output.index_select(rows, 0)?,
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
        // contiguous: CUDA's matmul takes a row-strided slice of hs neither as it is
        // nor transposed (the backward's hᵀ), the CPU's does.
        self.out
            .forward(&hs.narrow(1, t - 1, 1)?.squeeze(1)?.contiguous()?)
    }
}

/// `Σ` of the rows of `x: [N, …]` at their words `words: [N]`: `[vocab, …]` (onehot(w)ᵀ x).
pub(crate) fn sum_at_words(words: &Tensor, x: &Tensor, vocab: usize) -> Result<Tensor> {
    let mut dims = x.dims().to_vec();
    dims[0] = vocab;
    Ok(Tensor::zeros(dims, x.dtype(), x.device())?.index_add(words, x, 0)?)
}

/// The gradients of an LSTM that reads embedded words, from its ∂γ `dg: [B·T, 4H]`, the
/// words `[B·T]`, their (dropped-out) embeddings `emb: [B·T, E]`, the embedding dropout
/// mask and the states the steps read `h_prev: [B·T, H]`: (embedding table, W_ih, W_hh,
/// bias) = (rows of the words read get (∂γ W_ih) ⊙ mask, ∂γᵀ e, ∂γᵀ h_prev, Σ ∂γ).
fn word_lstm_grads(
    table: &Tensor,
    lstm: &Lstm,
    words: &Tensor,
    emb: &Tensor,
    mask: Option<&Tensor>,
    h_prev: &Tensor,
    dg: &Tensor,
) -> Result<[Tensor; 4]> {
    let mut g_emb = dg.matmul(&lstm.weight_ih)?;
    if let Some(m) = mask {
        g_emb = g_emb.mul(m)?;
    }
    let embed = sum_at_words(words, &g_emb, table.dim(0)?)?;
    Ok([
        embed,
        dg.t()?.matmul(emb)?,
        dg.t()?.matmul(h_prev)?,
        dg.sum(0)?,
    ])
}

/// What [`LstmEncoder::forward_taped`] keeps for [`LstmEncoder::backward`].
#[derive(Debug, Clone)]
pub struct LstmEncoderTape {
    /// The words read, `[B·T]`, and their embeddings `[B·T, E]`.
    words: Tensor,
    emb: Tensor,
    lstm: LstmTape,
    /// h_0 … h_{T−1}, the state each step reads: `[B·T, H]`; h_T: `[B, H]`.
    h_prev: Tensor,
    h_last: Tensor,
}

impl LstmEncoder {
    /// [`LstmEncoder::forward`] with the weights as constants, taped for the hand
    /// [`LstmEncoder::backward`].
    pub fn forward_taped(&self, x: &TokenBatch) -> Result<(Tensor, LstmEncoderTape)> {
        let (b, t) = x.targets.dims2()?;
        let (e, h) = (self.embed.dim(1)?, self.lstm.hidden_size());
        let words = x.targets.flatten_all()?;
        let emb = self.embed.index_select(&words, 0)?;
        let gx = self.lstm.project_inputs(&emb.reshape((b, t, e))?, e)?;
        let zeros = Tensor::zeros((b, h), gx.dtype(), gx.device())?;
        let (hs, lstm) = self.lstm.run_taped(&gx, &zeros, &zeros)?;
        // contiguous for CUDA's matmul, here and in the backward's upstreamᵀ h_last.
        let h_last = hs.narrow(1, t - 1, 1)?.squeeze(1)?.contiguous()?;
        let lambda0 = self.out.forward(&h_last)?;
        let h_prev = inputs_of_steps(&zeros, &hs)?;
        Ok((
            lambda0,
            LstmEncoderTape {
                words,
                emb,
                lstm,
                h_prev,
                h_last,
            },
        ))
    }

    /// The parameter gradients of Σ (upstream ⊙ λ0) for `upstream: [B, 2d]`, in
    /// `encoder.*` order (embed, lstm.weight_ih, lstm.weight_hh, lstm.bias, out.weight,
    /// out.bias), by hand: ∂h_T = upstream W_out, BPTT to ∂γ_t ([`Lstm::backward_taped`]),
    /// ∂/∂W_ih = Σ_t ∂γ_tᵀ e_t, ∂/∂W_hh = Σ_t ∂γ_tᵀ h_{t−1}, ∂/∂b = Σ ∂γ_t, and the
    /// embedding table's row of each word read gets ∂γ_t W_ih.
    pub fn backward(&self, tape: &LstmEncoderTape, upstream: &Tensor) -> Result<Vec<Tensor>> {
        let (b, h) = tape.h_last.dims2()?;
        let t = tape.lstm.gates.len();
        let w_out = upstream.t()?.matmul(&tape.h_last)?;
        let b_out = upstream.sum(0)?;
        let gh_last = upstream.matmul(&self.out.weight)?.unsqueeze(1)?;
        let gh_out = if t > 1 {
            let zeros = Tensor::zeros((b, t - 1, h), gh_last.dtype(), gh_last.device())?;
            Tensor::cat(&[&zeros, &gh_last], 1)?
        } else {
            gh_last
        };
        let (dgamma, _) = self.lstm.backward_taped(&tape.lstm, &gh_out)?;
        let dg = dgamma.reshape((b * t, 4 * h))?;
        let [embed, w_ih, w_hh, bias] = word_lstm_grads(
            &self.embed,
            &self.lstm,
            &tape.words,
            &tape.emb,
            None,
            &tape.h_prev,
            &dg,
        )?;
        Ok(vec![embed, w_ih, w_hh, bias, w_out, b_out])
    }

    pub fn detached(&self) -> LstmEncoder {
        LstmEncoder {
            embed: self.embed.detach(),
            lstm: self.lstm.detached(),
            out: self.out.detached(),
        }
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
                let w_z = self.lstm.weight_ih.narrow(1, e, d)?.contiguous()?;
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

    /// The language model's log p(x) per sentence `[B]` and the gradients of
    /// Σ_b log p(x_b) for its parameters in `decoder.*` order (embed, lstm.weight_ih,
    /// lstm.weight_hh, lstm.bias, out.weight, out.bias), by hand at constant weights:
    /// one taped forward, δℓ = onehot(y) − softmax(ℓ), ∂(h ⊙ m) = δℓ W_o, BPTT to ∂γ_t
    /// ([`Lstm::backward_taped`]), then ∂/∂W_o = δℓᵀ (h ⊙ m), ∂/∂W_ih = Σ ∂γ_tᵀ e_t,
    /// ∂/∂W_hh = Σ ∂γ_tᵀ h_{t−1}, ∂/∂b = Σ ∂γ_t, and each input word's embedding row gets
    /// (∂γ_t W_ih) ⊙ mask. The weights must be detached (no graph is wanted).
    pub fn lm_log_lik_and_grads(&self, x: &TokenBatch) -> Result<(Tensor, Vec<Tensor>)> {
        if self.init.is_some() {
            bail!("this decoder takes z: it is not a language model");
        }
        let (b, t) = x.inputs.dims2()?;
        let (e, h) = (self.embed.dim(1)?, self.lstm.hidden_size());
        let inputs = x.inputs.flatten_all()?;
        let mut emb = self.embed.index_select(&inputs, 0)?; // [B·T, E]
        let embed_mask = match &x.dropout {
            Some(m) => Some(m.embed.reshape((b * t, e))?),
            None => None,
        };
        if let Some(m) = &embed_mask {
            emb = emb.mul(m)?;
        }
        let gx = self.lstm.project_inputs(&emb.reshape((b, t, e))?, e)?;
        let zeros = Tensor::zeros((b, h), gx.dtype(), gx.device())?;
        let (hs, tape) = self.lstm.run_taped(&gx, &zeros, &zeros)?;
        let out_masked = |t3: Tensor| -> Result<Tensor> {
            Ok(match &x.dropout {
                Some(m) => t3.mul(&m.output)?,
                None => t3,
            })
        };
        let hd = out_masked(hs.clone())?.reshape((b * t, h))?;
        let logits = self.out.forward(&hd)?;
        let targets = x.targets.flatten_all()?;
        let (p, logp) = crate::kernels::softmax_and_log_prob(&logits, &targets)?;
        let log_lik = logp.reshape((b, t))?.sum(1)?;
        let w_o = &self.out.weight;
        let ghd = (w_o.index_select(&targets, 0)? - p.matmul(w_o)?)?;
        let gh_out = out_masked(ghd.reshape((b, t, h))?)?;
        let (dgamma, _) = self.lstm.backward_taped(&tape, &gh_out)?;
        let dg = dgamma.reshape((b * t, 4 * h))?;
        let h_prev = inputs_of_steps(&zeros, &hs)?;
        let [embed, w_ih, w_hh, bias] = word_lstm_grads(
            &self.embed,
            &self.lstm,
            &inputs,
            &emb,
            embed_mask.as_ref(),
            &h_prev,
            &dg,
        )?;
        // ∂/∂W_o = onehot(y)ᵀ hd − pᵀ hd; ∂/∂b_o = counts of y − Σ p.
        let vocab = w_o.dim(0)?;
        let w_out = (sum_at_words(&targets, &hd, vocab)? - p.t()?.matmul(&hd)?)?;
        let ones = Tensor::ones(b * t, p.dtype(), p.device())?;
        let b_out = (sum_at_words(&targets, &ones, vocab)? - p.sum(0)?)?;
        Ok((log_lik, vec![embed, w_ih, w_hh, bias, w_out, b_out]))
    }

    pub fn detached(&self) -> LstmDecoder {
        LstmDecoder {
            embed: self.embed.detach(),
            lstm: self.lstm.detached(),
            init: self.init.as_ref().map(Linear::detached),
            out: self.out.detached(),
        }
    }
}
