//! The LSTM text decoder's passes (`../shared/design/second-order-passes.md`, the
//! categorical and LSTM sections); the λ part is [`super::latent`].
//!
//! Rows n = (s, b) are the S draws of the B sentences (N = S·B, sample-major), T steps.
//! With the decoder's (dropped-out) embeddings e_t, z entering every step through
//! W_z = W_ih[:, E..] and the initial state h_0 = z W_initᵀ + b_init, c_0 = 0:
//!   γ_t = e_t W_eᵀ + b + z W_zᵀ + h_{t−1} W_hhᵀ = (γ_i, γ_f, γ_g, γ_o),
//!   i, f, o = sigmoid(γ_·), g = tanh(γ_g), c_t = f c_{t−1} + i g, h_t = o tanh(c_t),
//!   ℓ_t = (h_t ⊙ m_t) W_oᵀ + b_o,   log p(x | z) = Σ_t log softmax(ℓ_t)[y_t].
//! Reverse (BPTT), with p_t = softmax(ℓ_t): δℓ_t = onehot(y_t) − p_t,
//! ∂h_t = (δℓ_t W_o) ⊙ m_t + ∂γ_{t+1} W_hh, ∂c_t = ∂c_{t+1} ⊙ f_{t+1} + ∂h_t ⊙ o (1 − tanh² c_t),
//! and the gates' ∂γ_t from ∂i = ∂c g, ∂f = ∂c c_{t−1}, ∂g = ∂c i, ∂o = ∂h tanh c_t through σ' and tanh';
//! g_z = (Σ_t ∂γ_t) W_z + ∂h_0 W_init.
//! A Hessian-vector product pushes the tangent z' forward through the same recurrence (the
//! R-operator: every product rule, the gates through σ'(γ) γ'), the logits' tangent ℓ'
//! through the softmax (δℓ' = −p ⊙ (ℓ' − pᵀℓ')), and then the tangent of every line of
//! the reverse pass backwards in time (its second-derivative terms: σ'' = σ'(1 − 2σ),
//! tanh'' = −2 tanh · tanh'); g'_z = (Σ_t ∂γ'_t) W_z + ∂h'_0 W_init. Dropout masks are
//! constants of the step. The mixed product ∇_θ(vᵀ∇_λ f) is the tangent of each weight
//! gradient (∂/∂W_hh = Σ ∂γ_tᵀ h_{t−1} ⇒ Σ ∂γ'_tᵀ h_{t−1} + ∂γ_tᵀ h'_{t−1}, and so on).
//! No parameter-gradient matmul is formed for the refinement's gradients or the products.

use super::latent::{LatentCurvature, Reparam};
use crate::lstm::inputs_of_steps;
use crate::text::{sum_at_words, LstmDecoder, TokenBatch};
use crate::Noise;
use anyhow::{bail, Result};
use candle_core::Tensor;

/// The ELBO of a fixed LSTM decoder as a function of λ (weights are constants).
pub struct LstmElbo<'a> {
    /// The decoder, detached; it must take z (not the language model).
    pub decoder: &'a LstmDecoder,
    pub x: &'a TokenBatch,
    /// `ε: [S, B, d]`.
    pub eps: &'a Noise,
    pub beta: f64,
}

/// The ELBO at one λ with what its Hessian-vector products reuse.
pub struct LstmElboPoint {
    /// f_b(λ_b): `[B]`.
    pub values: Tensor,
    /// ∇_λ Σ_b f_b: `[B, 2d]`.
    pub grad: Tensor,
    cache: Option<LstmCache>,
}

/// The decoder's weights as the passes use them (contiguous; transposes precomputed).
struct Weights {
    /// W_hh: `[4H, H]` and its transpose.
    w_hh: Tensor,
    w_hh_t: Tensor,
    /// W_z = W_ih[:, E..]: `[4H, d]` and its transpose.
    w_z: Tensor,
    w_z_t: Tensor,
    /// W_e = W_ih[:, ..E]: `[4H, E]`.
    w_e: Tensor,
    /// W_init: `[H, d]` and its transpose.
    w_init: Tensor,
    w_init_t: Tensor,
    /// W_o: `[V, H]` (its transpose is used as a view: copying it per point cost more
    /// than the strided matmul saves).
    w_o: Tensor,
}

impl Weights {
    /// The weights, and the layer h_0 = z W_initᵀ + b_init.
    fn of(dec: &LstmDecoder, latent: usize) -> Result<(Self, &crate::Linear)> {
        let Some(init) = &dec.init else {
            bail!("the language model has no latent: there is no λ to differentiate in");
        };
        let e = dec.embed.dim(1)?;
        let w_ih = &dec.lstm.weight_ih;
        let inputs = w_ih.dim(1)?;
        if inputs != e + latent {
            bail!("the decoder's LSTM takes {inputs} inputs, expected {e} + {latent}");
        }
        let w_z = w_ih.narrow(1, e, latent)?.contiguous()?;
        let w = Self {
            w_hh: dec.lstm.weight_hh.contiguous()?,
            w_hh_t: dec.lstm.weight_hh.t()?.contiguous()?,
            w_z_t: w_z.t()?.contiguous()?,
            w_z,
            w_e: w_ih.narrow(1, 0, e)?.contiguous()?,
            w_init: init.weight.contiguous()?,
            w_init_t: init.weight.t()?.contiguous()?,
            w_o: dec.out.weight.contiguous()?,
        };
        Ok((w, init))
    }
}

/// What a step's tangent passes reuse: the forward's gates and the reverse's ∂h_t, ∂c_t,
/// folded into the coefficients of the tangent equations. `[N, H]` each.
struct CellCurvature {
    i: Tensor,
    f: Tensor,
    g: Tensor,
    o: Tensor,
    c_prev: Tensor,
    tc: Tensor,
    /// σ'(γ) of the sigmoid gates: i(1 − i), f(1 − f), o(1 − o); tanh'(γ_g) = 1 − g².
    di: Tensor,
    df: Tensor,
    dg: Tensor,
    do_: Tensor,
    /// tanh'(c_t) = 1 − tanh² c_t.
    dtc: Tensor,
    /// ∂h_t and ∂c_t of the reverse pass.
    gh: Tensor,
    gc: Tensor,
    /// ∂h_t tanh'(c_t), o tanh'(c_t), −2 ∂h_t o tanh(c_t).
    gh_dtc: Tensor,
    o_dtc: Tensor,
    k_tc: Tensor,
    /// The gates' second-derivative terms, as coefficients of their own tangents
    /// (σ'' = σ'(1 − 2σ), tanh'' = −2 tanh · tanh'): (∂c g)(1 − 2i), (∂c c_{t−1})(1 − 2f),
    /// (∂h tanh c)(1 − 2o), −2 (∂c i) g.
    si: Tensor,
    sf: Tensor,
    so: Tensor,
    sg: Tensor,
}

struct LstmCache {
    w: Weights,
    cells: Vec<CellCurvature>,
    latent: LatentCurvature,
    /// z: `[N, d]`.
    z: Tensor,
    /// h_0, …, h_{T−1} inputs of each step (h_{t−1}): `[N·T, H]`.
    h_prev: Tensor,
    /// h_t ⊙ m_t: `[N·T, H]`.
    hd: Tensor,
    /// softmax(ℓ_t): `[N·T, V]`.
    p: Tensor,
    /// ∂γ_t: `[N, T, 4H]`; ∂h_0: `[N, H]`.
    dgamma: Tensor,
    dh0: Tensor,
    /// The embeddings after dropout, `[B·T, E]`, the decoder's inputs `[B·T]` and the
    /// targets repeated over the draws `[N·T]`.
    emb: Tensor,
    inputs: Tensor,
    targets: Tensor,
    /// Output dropout mask `[B, T, H]`; embedding mask `[B·T, E]`.
    out_mask: Option<Tensor>,
    embed_mask: Option<Tensor>,
    /// S, B, T, H.
    dims: (usize, usize, usize, usize),
}

impl LstmCache {
    /// The gradients of the embedding table `[V, E]` and of W_ih's word columns
    /// `[4H, E]` for `dg_flat: [N·T, 4H]`, ∂γ or its tangent (the embeddings do not depend
    /// on λ): the draws share the embeddings, so ∂γ is summed over them first; the table's
    /// rows get (∂γ W_e) ⊙ mask at each input word.
    fn embedding_grads(&self, dg_flat: &Tensor) -> Result<(Tensor, Tensor)> {
        let (s, b, t, h) = self.dims;
        let dg_sb = dg_flat.reshape((s, b * t, 4 * h))?.sum(0)?; // [B·T, 4H]
        let mut g_emb = dg_sb.matmul(&self.w.w_e)?; // [B·T, E]
        if let Some(m) = &self.embed_mask {
            g_emb = g_emb.mul(m)?;
        }
        let (vocab, e) = (self.w.w_o.dim(0)?, self.w.w_e.dim(1)?);
        let embed = Tensor::zeros((vocab, e), g_emb.dtype(), g_emb.device())?.index_add(
            &self.inputs,
            &g_emb,
            0,
        )?;
        Ok((embed, dg_sb.t()?.matmul(&self.emb)?))
    }

    /// onehot(y)ᵀ x for `x: [N·T, …]`: the rows of x added up at their target words,
    /// `[V, …]`.
    fn onehot_t(&self, x: &Tensor) -> Result<Tensor> {
        sum_at_words(&self.targets, x, self.w.w_o.dim(0)?)
    }

    /// The decoder's parameter gradients of the draws' sum, divided by S.
    fn mean_over_draws(&self, grads: [Tensor; 8]) -> Result<Vec<Tensor>> {
        let inv_s = 1.0 / self.dims.0 as f64;
        grads.into_iter().map(|g| Ok((g * inv_s)?)).collect()
    }
}

/// `t: [S·B, T, H]` (or `[S·B·T, H]`) times a mask `[B, T, H]` broadcast over the draws.
fn masked(
    t: &Tensor,
    mask: Option<&Tensor>,
    (s, b, tt, h): (usize, usize, usize, usize),
) -> Result<Tensor> {
    Ok(match mask {
        Some(m) => t
            .reshape((s, b, tt, h))?
            .broadcast_mul(m)?
            .reshape((s * b * tt, h))?,
        None => t.reshape((s * b * tt, h))?,
    })
}

impl<'a> LstmElbo<'a> {
    /// [`LstmElbo::at`] for the sentences `start .. start + len` alone (`lambda` holds
    /// their rows; the dropout masks are cut with them).
    pub fn rows_at(
        &self,
        start: usize,
        len: usize,
        lambda: &Tensor,
        for_hessian: bool,
    ) -> Result<LstmElboPoint> {
        let x = self.x.rows(start, len)?;
        let eps = Noise(self.eps.0.narrow(1, start, len)?);
        LstmElbo {
            x: &x,
            eps: &eps,
            ..*self
        }
        .at(lambda, for_hessian)
    }

    /// The value and gradient at `lambda: [B, 2d]`, and with `for_hessian` what
    /// [`LstmElboPoint::hvp`] needs.
    pub fn at(&self, lambda: &Tensor, for_hessian: bool) -> Result<LstmElboPoint> {
        let dec = self.decoder;
        let (reparam, z) = Reparam::new(lambda, self.eps, self.beta)?;
        let (s, b, d) = reparam.dims;
        let n = s * b;
        let (bx, t) = self.x.inputs.dims2()?;
        if bx != b {
            bail!("λ has {b} rows for a batch of {bx} sentences");
        }
        let (w, init) = Weights::of(dec, d)?;
        let e = dec.embed.dim(1)?;
        let h = dec.lstm.hidden_size();
        let inputs = self.x.inputs.flatten_all()?;
        let mut emb = dec.embed.index_select(&inputs, 0)?;
        let embed_mask = match &self.x.dropout {
            Some(m) => Some(m.embed.reshape((b * t, e))?),
            None => None,
        };
        if let Some(m) = &embed_mask {
            emb = emb.mul(m)?;
        }
        let out_mask = self.x.dropout.as_ref().map(|m| m.output.clone());
        // Forward.
        let xe = emb
            .matmul(&w.w_e.t()?)?
            .broadcast_add(&dec.lstm.bias)?
            .reshape((1, b, t, 4 * h))?;
        let zw = z.matmul(&w.w_z_t)?.reshape((s, b, 1, 4 * h))?;
        let gx = xe.broadcast_add(&zw)?.reshape((n, t, 4 * h))?;
        let h0 = init.forward(&z)?;
        let (hs, tape) = dec.lstm.run_taped(&gx, &h0, &h0.zeros_like()?)?; // [N, T, H]
        let cells = tape.gates;
        let dims = (s, b, t, h);
        let hd = masked(&hs, out_mask.as_ref(), dims)?;
        let logits = dec.out.forward(&hd)?; // [N·T, V]
        let targets = self
            .x
            .targets
            .unsqueeze(0)?
            .broadcast_as((s, b, t))?
            .contiguous()?
            .flatten_all()?;
        // p = softmax(ℓ) and log p[y], one fused pass per row.
        let (p, logp) = crate::kernels::softmax_and_log_prob(&logits, &targets)?;
        let values = reparam.values(&logp.reshape((s, b, t))?.sum(2)?)?;
        // Reverse: ∂(h_t ⊙ m_t) = W_o[y_t] − p_t W_o.
        let ghd = (w.w_o.index_select(&targets, 0)? - p.matmul(&w.w_o)?)?;
        let gh_out = masked(&ghd, out_mask.as_ref(), dims)?.reshape((n, t, h))?;
        let mut gh_next = h0.zeros_like()?;
        let mut gc_next = h0.zeros_like()?;
        let mut dgammas = Vec::with_capacity(t);
        let mut curv = Vec::with_capacity(if for_hessian { t } else { 0 });
        for step in (0..t).rev() {
            let cell = &cells[step];
            let gh = (gh_out.narrow(1, step, 1)?.squeeze(1)? + &gh_next)?;
            let dtc = (1.0 - cell.tc.sqr()?)?;
            let o_dtc = (&cell.o * &dtc)?;
            let gc = (&gc_next + (&gh * &o_dtc)?)?;
            let gi = (&gc * &cell.g)?;
            let gf = (&gc * &cell.c_prev)?;
            let gg = (&gc * &cell.i)?;
            let go = (&gh * &cell.tc)?;
            let di = (&cell.i * (1.0 - &cell.i)?)?;
            let df = (&cell.f * (1.0 - &cell.f)?)?;
            let do_ = (&cell.o * (1.0 - &cell.o)?)?;
            let dg = (1.0 - cell.g.sqr()?)?;
            let dgamma = Tensor::cat(
                &[(&gi * &di)?, (&gf * &df)?, (&gg * &dg)?, (&go * &do_)?],
                1,
            )?;
            gc_next = (&gc * &cell.f)?;
            gh_next = dgamma.matmul(&w.w_hh)?;
            if for_hessian {
                let one_minus_2 = |x: &Tensor| -> Result<Tensor> { Ok((1.0 - (x * 2.0)?)?) };
                curv.push(CellCurvature {
                    si: (&gi * one_minus_2(&cell.i)?)?,
                    sf: (&gf * one_minus_2(&cell.f)?)?,
                    so: (&go * one_minus_2(&cell.o)?)?,
                    sg: ((&gg * &cell.g)? * -2.0)?,
                    gh_dtc: (&gh * &dtc)?,
                    k_tc: (((&gh * &cell.o)? * &cell.tc)? * -2.0)?,
                    o_dtc,
                    i: cell.i.clone(),
                    f: cell.f.clone(),
                    g: cell.g.clone(),
                    o: cell.o.clone(),
                    c_prev: cell.c_prev.clone(),
                    tc: cell.tc.clone(),
                    di,
                    df,
                    dg,
                    do_,
                    dtc,
                    gh,
                    gc,
                });
            }
            dgammas.push(dgamma);
        }
        dgammas.reverse();
        curv.reverse();
        let dgamma = Tensor::stack(&dgammas, 1)?; // [N, T, 4H]
        let dh0 = gh_next;
        let gz = (dgamma.sum(1)?.matmul(&w.w_z)? + dh0.matmul(&w.w_init)?)?;
        let (grad, latent) = reparam.grad(&gz, for_hessian)?;
        let cache = match latent {
            Some(latent) => {
                let h_prev = inputs_of_steps(&h0, &hs)?;
                Some(LstmCache {
                    w,
                    cells: curv,
                    latent,
                    z,
                    h_prev,
                    hd,
                    p,
                    dgamma,
                    dh0,
                    emb,
                    inputs,
                    targets,
                    out_mask,
                    embed_mask,
                    dims,
                })
            }
            None => None,
        };
        Ok(LstmElboPoint {
            values,
            grad,
            cache,
        })
    }
}

impl LstmElboPoint {
    /// ∇_θ Σ_b f_b for the decoder's parameters in `decoder.*` order (embed,
    /// lstm.weight_ih, lstm.weight_hh, lstm.bias, init.weight, init.bias, out.weight,
    /// out.bias), from the reverse pass this point kept: ∂/∂W_hh = Σ ∂γ_tᵀ h_{t−1},
    /// ∂/∂W_ih = Σ ∂γ_tᵀ (e_t, z), ∂/∂E[x_t] = (∂γ_t W_e) ⊙ mask, ∂/∂W_init = ∂h_0ᵀ z,
    /// ∂/∂W_o = δℓᵀ (h ⊙ m) with δℓ = onehot(y) − p, each bias the sum of its δ — the
    /// first-order half of [`LstmElboPoint::hvp_and_mixed`]. Needs a point made with
    /// `for_hessian`.
    pub fn weight_grads(&self) -> Result<Vec<Tensor>> {
        let Some(c) = &self.cache else {
            bail!("this ELBO point was evaluated without its cache");
        };
        let (s, b, t, h) = c.dims;
        let dg_flat = c.dgamma.reshape((s * b * t, 4 * h))?;
        let (embed, w_ih_e) = c.embedding_grads(&dg_flat)?;
        let w_ih_z = c.dgamma.sum(1)?.t()?.matmul(&c.z)?; // [4H, d]
        let w_ih = Tensor::cat(&[&w_ih_e, &w_ih_z], 1)?;
        let w_hh = dg_flat.t()?.matmul(&c.h_prev)?;
        let bias = dg_flat.sum(0)?;
        let w_init = c.dh0.t()?.matmul(&c.z)?; // [H, d]
        let b_init = c.dh0.sum(0)?;
        // δℓ = onehot(y) − p.
        let w_out = (c.onehot_t(&c.hd)? - c.p.t()?.matmul(&c.hd)?)?;
        let ones = Tensor::ones(c.targets.dim(0)?, c.p.dtype(), c.p.device())?;
        let b_out = (c.onehot_t(&ones)? - c.p.sum(0)?)?;
        c.mean_over_draws([embed, w_ih, w_hh, bias, w_init, b_init, w_out, b_out])
    }

    /// H v for `v: [B, 2d]`. Needs a point made with `for_hessian`.
    pub fn hvp(&self, v: &Tensor) -> Result<Tensor> {
        Ok(self.products(v, false)?.0)
    }

    /// H v and the mixed product ∇_θ(vᵀ∇_λ f) for the decoder's parameters in
    /// `decoder.*` order: embed, lstm.weight_ih, lstm.weight_hh, lstm.bias, init.weight,
    /// init.bias, out.weight, out.bias.
    pub fn hvp_and_mixed(&self, v: &Tensor) -> Result<(Tensor, Vec<Tensor>)> {
        self.products(v, true)
    }

    fn products(&self, v: &Tensor, mixed: bool) -> Result<(Tensor, Vec<Tensor>)> {
        let Some(c) = &self.cache else {
            bail!("this ELBO point was evaluated without its Hessian cache");
        };
        let w = &c.w;
        let (s, b, t, h) = c.dims;
        let n = s * b;
        // Forward tangent.
        let zt = c.latent.tangent(v)?;
        let zwt = zt.matmul(&w.w_z_t)?;
        let h0t = zt.matmul(&w.w_init_t)?;
        let mut ht = h0t.clone();
        let mut ct = ht.zeros_like()?;
        let mut hts = Vec::with_capacity(t);
        let mut gates = Vec::with_capacity(t);
        for cell in &c.cells {
            let gt = (&zwt + ht.matmul(&w.w_hh_t)?)?;
            let it = (gt.narrow(1, 0, h)? * &cell.di)?;
            let ft = (gt.narrow(1, h, h)? * &cell.df)?;
            let ggt = (gt.narrow(1, 2 * h, h)? * &cell.dg)?;
            let ot = (gt.narrow(1, 3 * h, h)? * &cell.do_)?;
            let c_new = ((((&ft * &cell.c_prev)? + (&cell.f * &ct)?)? + (&it * &cell.g)?)?
                + (&cell.i * &ggt)?)?;
            let tct = (&c_new * &cell.dtc)?;
            let h_new = ((&ot * &cell.tc)? + (&cell.o * &tct)?)?;
            gates.push((it, ft, ggt, ot, ct, tct));
            hts.push(h_new.clone());
            ht = h_new;
            ct = c_new;
        }
        let h_out_t = Tensor::stack(&hts, 1)?; // [N, T, H]
        let hdt = masked(&h_out_t, c.out_mask.as_ref(), c.dims)?;
        // ℓ' = hd' W_oᵀ: [N·T, V]; δℓ' = −p ⊙ (ℓ' − pᵀℓ') = p (pᵀℓ') − p ⊙ ℓ'.
        let lt = hdt.matmul(&w.w_o.t()?)?;
        let dlt = crate::kernels::softmax_tangent(&c.p, &lt)?;
        let ghdt = dlt.matmul(&w.w_o)?;
        let gh_out_t = masked(&ghdt, c.out_mask.as_ref(), c.dims)?.reshape((n, t, h))?;
        // Reverse tangent.
        let mut gh_next = ct.zeros_like()?;
        let mut gc_next = ct.zeros_like()?;
        let mut dgts = Vec::with_capacity(t);
        for step in (0..t).rev() {
            let cell = &c.cells[step];
            let (it, ft, ggt, ot, ct_prev, tct) = &gates[step];
            let ght = (gh_out_t.narrow(1, step, 1)?.squeeze(1)? + &gh_next)?;
            let gct = (((&gc_next + (&ght * &cell.o_dtc)?)? + (ot * &cell.gh_dtc)?)?
                + (tct * &cell.k_tc)?)?;
            let git = ((&gct * &cell.g)? + (&cell.gc * ggt)?)?;
            let gft = ((&gct * &cell.c_prev)? + (&cell.gc * ct_prev)?)?;
            let ggt2 = ((&gct * &cell.i)? + (&cell.gc * it)?)?;
            let got = ((&ght * &cell.tc)? + (&cell.gh * tct)?)?;
            gc_next = ((&gct * &cell.f)? + (&cell.gc * ft)?)?;
            let dgt = Tensor::cat(
                &[
                    ((&git * &cell.di)? + (&cell.si * it)?)?,
                    ((&gft * &cell.df)? + (&cell.sf * ft)?)?,
                    ((&ggt2 * &cell.dg)? + (&cell.sg * ggt)?)?,
                    ((&got * &cell.do_)? + (&cell.so * ot)?)?,
                ],
                1,
            )?;
            gh_next = dgt.matmul(&w.w_hh)?;
            dgts.push(dgt);
        }
        dgts.reverse();
        let dgammat = Tensor::stack(&dgts, 1)?; // [N, T, 4H]
        let dh0t = gh_next;
        let gzt = (dgammat.sum(1)?.matmul(&w.w_z)? + dh0t.matmul(&w.w_init)?)?;
        let hv = c.latent.hvp(v, &gzt)?;
        if !mixed {
            return Ok((hv, Vec::new()));
        }
        let h_prev_t = inputs_of_steps(&h0t, &h_out_t)?;
        let g4 = 4 * h;
        let dg_flat = c.dgamma.reshape((n * t, g4))?;
        let dgt_flat = dgammat.reshape((n * t, g4))?;
        // The embeddings do not depend on λ: their terms take ∂γ' alone.
        let (embed, w_ih_e) = c.embedding_grads(&dgt_flat)?;
        let dgt_sum = dgammat.sum(1)?; // [N, 4H]
        let dg_sum = c.dgamma.sum(1)?;
        let w_ih_z = (dgt_sum.t()?.matmul(&c.z)? + dg_sum.t()?.matmul(&zt)?)?; // [4H, d]
        let w_ih = Tensor::cat(&[&w_ih_e, &w_ih_z], 1)?;
        let w_hh = (dgt_flat.t()?.matmul(&c.h_prev)? + dg_flat.t()?.matmul(&h_prev_t)?)?;
        let bias = dgt_flat.sum(0)?;
        let w_init = (dh0t.t()?.matmul(&c.z)? + c.dh0.t()?.matmul(&zt)?)?; // [H, d]
        let b_init = dh0t.sum(0)?;
        // ∂/∂W_o = δℓᵀ hd, δℓ = onehot(y) − p: tangent δℓ'ᵀ hd + onehotᵀ hd' − pᵀ hd'.
        let w_out = ((dlt.t()?.matmul(&c.hd)? + c.onehot_t(&hdt)?)? - c.p.t()?.matmul(&hdt)?)?;
        let b_out = dlt.sum(0)?;
        let grads = c.mean_over_draws([embed, w_ih, w_hh, bias, w_init, b_init, w_out, b_out])?;
        Ok((hv, grads))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn softmax_identity_for_log_probabilities() -> anyhow::Result<()> {
        use candle_core::{Device, Tensor};
        // log softmax(ℓ)[y] = ℓ_y − max ℓ + log max p, as the fallback (non-CPU) forward
        // computes it.
        let l = Tensor::new(
            &[[1.0f64, -3.0, 2.5, 0.0], [-50.0, 40.0, 39.0, 0.5]],
            &Device::Cpu,
        )?;
        let p = candle_nn::ops::softmax_last_dim(&l)?;
        let via = l
            .broadcast_sub(&l.max_keepdim(1)?)?
            .broadcast_add(&p.max_keepdim(1)?.log()?)?;
        let direct = candle_nn::ops::log_softmax(&l, candle_core::D::Minus1)?;
        let err = (via - direct)?.abs()?.max_all()?.to_scalar::<f64>()?;
        assert!(err < 1e-14, "{err}");
        Ok(())
    }
}
