//! Fused elementwise kernels of the analytic passes, for tensors on the CPU.
//!
//! candle's CPU ops map one element at a time through libm's scalar `exp`/`ln` and each
//! op is its own pass over memory with its own allocation; the analytic passes spend most
//! of their non-matmul time there (the Bernoulli logits, the hidden layers' softplus and
//! σ', the text decoder's softmax over the vocabulary). Here each kernel is one pass
//! (rows in parallel with rayon) whose loops the compiler vectorizes, with an `f32` exp
//! built only from additions, multiplications and bit operations (Cephes' `expf`
//! polynomial, about 1 ulp) and `ln(1 + e)` for `e ∈ [0, 1]` by `2 atanh(e / (2 + e))`.
//! The loops run compiled for AVX2 when the processor has it (detected at run time); the
//! arithmetic is plain IEEE operations (no fused multiply-add), so every instruction set
//! gives the same bits. `f64` uses libm, so the f64 agreement tests see the usual
//! functions.
//!
//! Every kernel falls back to the same math in candle ops for other devices (CUDA) and
//! dtypes. The autograd reference path does not use these kernels: its arithmetic, and
//! so the bit-exact resumption of runs made on it, is unchanged.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Storage, Tensor, WithDType, D};
use rayon::prelude::*;

/// The floating-point types the kernels run on: `exp`, `ln` and `ln(1 + e)` on `[0, 1]`.
pub(crate) trait Real:
    WithDType
    + Copy
    + Send
    + Sync
    + PartialOrd
    + std::ops::Add<Output = Self>
    + std::ops::Sub<Output = Self>
    + std::ops::Mul<Output = Self>
    + std::ops::Div<Output = Self>
    + std::ops::Neg<Output = Self>
    + std::ops::AddAssign
    + std::ops::MulAssign
{
    const ZERO: Self;
    const ONE: Self;
    fn exp(self) -> Self;
    fn ln(self) -> Self;
    /// ln(1 + e) for `e ∈ [0, 1]`.
    fn ln_1p_unit(self) -> Self;
    fn abs(self) -> Self;
    /// max(self, 0) (NaN stays NaN).
    fn relu(self) -> Self;
    fn sqrt(self) -> Self;
}

/// `Real` for a float type, with its exp and ln(1 + e) on [0, 1].
macro_rules! real {
    ($t:ty, $exp:path, $ln_1p_unit:path) => {
        impl Real for $t {
            const ZERO: Self = 0.0;
            const ONE: Self = 1.0;
            #[inline(always)]
            fn exp(self) -> Self {
                $exp(self)
            }
            #[inline(always)]
            fn ln(self) -> Self {
                <$t>::ln(self)
            }
            #[inline(always)]
            fn ln_1p_unit(self) -> Self {
                $ln_1p_unit(self)
            }
            #[inline(always)]
            fn abs(self) -> Self {
                <$t>::abs(self)
            }
            #[inline(always)]
            fn sqrt(self) -> Self {
                <$t>::sqrt(self)
            }
            #[inline(always)]
            fn relu(self) -> Self {
                if self < 0.0 {
                    0.0
                } else {
                    self
                }
            }
        }
    };
}

real!(f32, exp_f32, ln_1p_unit_f32);
real!(f64, f64::exp, f64::ln_1p);

/// eˣ in f32 without a branch or a library call, so that loops over it vectorize:
/// x = n ln 2 + r with n = round(x log₂e) and |r| ≤ ln 2 / 2 (ln 2 in two parts), eʳ by
/// Cephes' degree-7 polynomial, 2ⁿ written into the exponent bits. Inputs are clamped to
/// [−87.3, 88] (results from 1.2e-38 to 1.7e38: the tails saturate instead of reaching 0
/// or ∞); NaN stays NaN. Relative error about 1e-7 (tested).
#[inline(always)]
pub(crate) fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5 · 2²³: adding it rounds to an integer, which then sits in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.3, 88.0);
    let t = x * LOG2E + ROUND;
    let n = t - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 1.666_666_5e-1)
        * r
        + 0.5;
    let er = p * (r * r) + r + 1.0;
    let scale = ((t.to_bits() as i32 - 0x4B40_0000 + 127) << 23) as u32;
    er * f32::from_bits(scale)
}

/// ln(1 + e) for `e ∈ [0, 1]`: 2 atanh(t) with t = e / (2 + e) ∈ [0, 1/3], by its series
/// to t¹⁵ (truncation below 3e-9 relative), accurate for tiny e where 1 + e rounds.
#[inline(always)]
fn ln_1p_unit_f32(e: f32) -> f32 {
    let t = e / (2.0 + e);
    let t2 = t * t;
    let s = ((((((t2 * (1.0 / 15.0) + 1.0 / 13.0) * t2 + 1.0 / 11.0) * t2 + 1.0 / 9.0) * t2
        + 1.0 / 7.0)
        * t2
        + 1.0 / 5.0)
        * t2
        + 1.0 / 3.0)
        * t2
        + 1.0;
    2.0 * t * s
}

/// softplus(a), σ(a) and σ(a)(1 − σ(a)) from one e = e^{−|a|}: softplus = max(a, 0) +
/// ln(1 + e), σ = 1/(1 + e) for a ≥ 0 and e/(1 + e) below, σ(1 − σ) = e/(1 + e)² (accurate
/// in both tails, where 1 − σ would round to 0).
#[inline(always)]
fn softplus_parts<T: Real>(a: T) -> (T, T, T) {
    let e = (-a.abs()).exp();
    let q = T::ONE / (T::ONE + e);
    let sigma = if a < T::ZERO { e * q } else { q };
    (a.relu() + e.ln_1p_unit(), sigma, e * q * q)
}

/// Runs `f` compiled for AVX2 where the processor has it, so that the loops it inlines
/// vectorize 8 lanes wide (the baseline x86-64 build vectorizes 4 wide).
#[inline(always)]
fn simd<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2")]
        unsafe fn avx2<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the processor supports AVX2 (checked just above).
            return unsafe { avx2(f) };
        }
    }
    f()
}

/// Elements per chunk of the elementwise kernels.
const CHUNK: usize = 8192;

/// Fewest elements per parallel task. Smaller inputs run on the calling thread: a
/// parallel iterator that splits hands its work to rayon's pool and waits for it, which
/// costs more than the work itself on small tensors.
const PAR_MIN: usize = 32 * 1024;

/// Chunks (or rows) of `len` elements per parallel task.
fn min_tasks(len: usize) -> usize {
    PAR_MIN.div_ceil(len.max(1))
}

/// Independent partial sums of the row reductions: wide enough for the vector unit, and
/// combined in a fixed order, so a reduction gives the same bits on every machine.
const LANES: usize = 16;

/// The fixed-order total of the lane sums and the tail.
#[inline(always)]
fn total<T: Real>(acc: [T; LANES], tail: T) -> T {
    let mut a = acc;
    let mut w = LANES / 2;
    while w > 0 {
        for k in 0..w {
            a[k] += a[k + w];
        }
        w /= 2;
    }
    a[0] + tail
}

/// Σ_k f(a_k, b_k) over two equally long slices, in [`LANES`] partial sums.
#[inline(always)]
fn sum_zip<T: Real>(a: &[T], b: &[T], f: impl Fn(T, T) -> T) -> T {
    let mut acc = [T::ZERO; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (ca, cb) in ca.zip(cb) {
        for k in 0..LANES {
            acc[k] += f(ca[k], cb[k]);
        }
    }
    let mut tail = T::ZERO;
    for (&a, &b) in ra.iter().zip(rb) {
        tail += f(a, b);
    }
    total(acc, tail)
}

/// max_k a_k in [`LANES`] partial maxima (NaN entries are skipped: they reach the
/// results through the sums that use them).
#[inline(always)]
fn max_of<T: Real>(a: &[T]) -> T {
    let mut acc = [a[0]; LANES];
    let ca = a.chunks_exact(LANES);
    let ra = ca.remainder();
    for c in ca {
        for k in 0..LANES {
            acc[k] = if c[k] > acc[k] { c[k] } else { acc[k] };
        }
    }
    let mut m = a[0];
    for &x in acc.iter().chain(ra) {
        m = if x > m { x } else { m };
    }
    m
}

/// Whether `t` can take the CPU kernels: on the CPU, f32 or f64.
fn on_cpu(t: &Tensor) -> bool {
    t.device().is_cpu() && matches!(t.dtype(), DType::F32 | DType::F64)
}

/// Calls `f` with the elements of the CPU tensor `t` in row-major order, borrowed when
/// `t` is contiguous.
fn with_slice<T: Real, R>(t: &Tensor, f: impl FnOnce(&[T]) -> R) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    if let (Storage::Cpu(cpu), Some((start, end))) = (&*storage, layout.contiguous_offsets()) {
        let all: &[T] = cpu.as_slice::<T>()?;
        return Ok(f(&all[start..end]));
    }
    drop(storage);
    let v = t.flatten_all()?.to_vec1::<T>()?;
    Ok(f(&v))
}

/// Writes `f(x)` for each `x` of `src` into `row` (as long as `src`) and returns the row,
/// now initialised, for reading.
#[inline(always)]
fn write_row<'a, T: Real>(
    row: &'a mut [std::mem::MaybeUninit<T>],
    src: &[T],
    f: impl Fn(T) -> T,
) -> &'a mut [T] {
    assert_eq!(
        row.len(),
        src.len(),
        "a row and its source differ in length"
    );
    for (o, &x) in row.iter_mut().zip(src) {
        o.write(f(x));
    }
    // SAFETY: every element of `row` was written just above (the lengths are equal), and
    // MaybeUninit<T> has T's layout.
    unsafe { &mut *(row as *mut [std::mem::MaybeUninit<T>] as *mut [T]) }
}

fn tensor_of<T: Real>(
    v: Vec<T>,
    like: &Tensor,
    shape: impl Into<candle_core::Shape>,
) -> Result<Tensor> {
    Ok(Tensor::from_vec(v, shape, like.device())?)
}

/// `σ(x) = 1 / (1 + e^{−x})`, forward only. (CPU: one parallel, vectorized pass.)
pub fn sigmoid(x: &Tensor) -> Result<Tensor> {
    if !on_cpu(x) {
        return Ok(candle_nn::ops::sigmoid(x)?);
    }
    fn run<T: Real>(x: &Tensor) -> Result<Tensor> {
        let out = with_slice::<T, _>(x, |v| {
            let mut out = vec![T::ZERO; v.len()];
            out.par_chunks_mut(CHUNK)
                .zip(v.par_chunks(CHUNK))
                .with_min_len(min_tasks(CHUNK))
                .for_each(|(o, v)| {
                    simd(|| {
                        for (o, &x) in o.iter_mut().zip(v) {
                            *o = T::ONE / (T::ONE + (-x).exp());
                        }
                    })
                });
            out
        })?;
        tensor_of(out, x, x.shape())
    }
    match x.dtype() {
        DType::F32 => run::<f32>(x),
        _ => run::<f64>(x),
    }
}

/// softplus(a) = log(1 + eᵃ) and its derivative σ(a), in one pass (one exp and one log
/// per element): with e = e^{−|a|}, softplus = max(a, 0) + ln(1 + e) and
/// σ(a) = 1/(1 + e) for a ≥ 0, e/(1 + e) below. Forward only. Returns `(softplus, σ)`.
pub fn softplus_and_sigmoid(a: &Tensor) -> Result<(Tensor, Tensor)> {
    if !on_cpu(a) {
        let h = crate::activation::softplus(a)?;
        return Ok((h, candle_nn::ops::sigmoid(a)?));
    }
    fn run<T: Real>(a: &Tensor) -> Result<(Tensor, Tensor)> {
        let (h, s) = with_slice::<T, _>(a, |v| {
            let mut h = vec![T::ZERO; v.len()];
            let mut s = vec![T::ZERO; v.len()];
            h.par_chunks_mut(CHUNK)
                .zip(s.par_chunks_mut(CHUNK))
                .zip(v.par_chunks(CHUNK))
                .with_min_len(min_tasks(CHUNK))
                .for_each(|((h, s), v)| {
                    simd(|| {
                        for ((h, s), &a) in h.iter_mut().zip(s.iter_mut()).zip(v) {
                            (*h, *s, _) = softplus_parts(a);
                        }
                    })
                });
            (h, s)
        })?;
        Ok((tensor_of(h, a, a.shape())?, tensor_of(s, a, a.shape())?))
    }
    match a.dtype() {
        DType::F32 => run::<f32>(a),
        _ => run::<f64>(a),
    }
}

/// The Bernoulli likelihood of binary `x` under logits `o`, and what its derivatives use.
pub struct BernoulliTerms {
    /// Σ_p [x_p o_p − softplus(o_p)] per row: `[N]`.
    pub log_lik: Tensor,
    /// ∂/∂o = x − σ(o): `[N, P]`.
    pub delta: Tensor,
    /// ∂²/∂o² = −σ(o)(1 − σ(o)), kept as σ(1 − σ) = e^{−|o|}/(1 + e^{−|o|})² (when asked
    /// for): `[N, P]`.
    pub sig_var: Option<Tensor>,
}

/// [`BernoulliTerms`] of logits `o: [S·B, P]` (rows sample-major) for `x: [B, P]`, in one
/// pass over the logits.
pub fn bernoulli_terms(o: &Tensor, x: &Tensor, with_var: bool) -> Result<BernoulliTerms> {
    let (n, p) = o.dims2()?;
    let (b, px) = x.dims2()?;
    if px != p || b == 0 || n % b != 0 {
        bail!("logits {:?} do not match images {:?}", o.dims(), x.dims());
    }
    let s = n / b;
    if !on_cpu(o) || x.dtype() != o.dtype() {
        let o3 = o.reshape((s, b, p))?;
        let log_lik = (o3.broadcast_mul(x)? - crate::activation::softplus(&o3)?)?
            .sum(D::Minus1)?
            .flatten_all()?;
        let sig = candle_nn::ops::sigmoid(o)?;
        let delta = x.broadcast_sub(&sig.reshape((s, b, p))?)?.reshape((n, p))?;
        let sig_var = with_var.then(|| &sig * (1.0 - &sig)?).transpose()?;
        return Ok(BernoulliTerms {
            log_lik,
            delta,
            sig_var,
        });
    }
    /// One row: δ = x − σ(o) into `d`, σ(1 − σ) into `v`, and the row's log-likelihood.
    #[inline(always)]
    fn row<T: Real>(o: &[T], x: &[T], d: &mut [T], v: Option<&mut [T]>) -> T {
        // x o − softplus(o), x − σ(o) and σ(o)(1 − σ(o)).
        #[inline(always)]
        fn terms<T: Real>(o: T, x: T) -> (T, T, T) {
            let (softplus, sigma, var) = softplus_parts(o);
            (x * o - softplus, x - sigma, var)
        }
        simd(|| {
            let full = o.len() / LANES * LANES;
            let (d_full, d_tail) = d.split_at_mut(full);
            let (mut v_full, mut v_tail) = match v {
                Some(v) => {
                    let (a, b) = v.split_at_mut(full);
                    (Some(a.chunks_exact_mut(LANES)), Some(b))
                }
                None => (None, None),
            };
            let mut acc = [T::ZERO; LANES];
            for ((dc, oc), xc) in d_full
                .chunks_exact_mut(LANES)
                .zip(o.chunks_exact(LANES))
                .zip(x.chunks_exact(LANES))
            {
                let mut vk = [T::ZERO; LANES];
                for k in 0..LANES {
                    let (l, dk, var) = terms(oc[k], xc[k]);
                    acc[k] += l;
                    dc[k] = dk;
                    vk[k] = var;
                }
                if let Some(vc) = v_full.as_mut().and_then(|it| it.next()) {
                    vc.copy_from_slice(&vk);
                }
            }
            let mut tail = T::ZERO;
            for (j, ((d, &o), &x)) in d_tail
                .iter_mut()
                .zip(&o[full..])
                .zip(&x[full..])
                .enumerate()
            {
                let (l, dk, var) = terms(o, x);
                tail += l;
                *d = dk;
                if let Some(v) = v_tail.as_deref_mut() {
                    v[j] = var;
                }
            }
            total(acc, tail)
        })
    }
    fn run<T: Real>(o: &Tensor, x: &Tensor, b: usize, with_var: bool) -> Result<BernoulliTerms> {
        let (n, p) = o.dims2()?;
        let (ll, delta, var) = with_slice::<T, _>(x, |xs| {
            with_slice::<T, _>(o, |os| {
                let mut ll = vec![T::ZERO; n];
                let mut delta = vec![T::ZERO; n * p];
                let x_of = |r: usize| &xs[(r % b) * p..(r % b + 1) * p];
                let rows = ll
                    .par_iter_mut()
                    .zip(delta.par_chunks_mut(p))
                    .zip(os.par_chunks(p))
                    .with_min_len(min_tasks(p))
                    .enumerate();
                if with_var {
                    let mut var = vec![T::ZERO; n * p];
                    rows.zip(var.par_chunks_mut(p))
                        .for_each(|((r, ((l, d), o)), v)| *l = row(o, x_of(r), d, Some(v)));
                    (ll, delta, Some(var))
                } else {
                    rows.for_each(|(r, ((l, d), o))| *l = row(o, x_of(r), d, None));
                    (ll, delta, None)
                }
            })
        })??;
        Ok(BernoulliTerms {
            log_lik: tensor_of(ll, o, n)?,
            delta: tensor_of(delta, o, (n, p))?,
            sig_var: var.map(|v| tensor_of(v, o, (n, p))).transpose()?,
        })
    }
    match o.dtype() {
        DType::F32 => run::<f32>(o, x, b, with_var),
        _ => run::<f64>(o, x, b, with_var),
    }
}

/// The categorical log-likelihood of `targets: [R]` (u32) under logits `[R, V]`:
/// `p = softmax(ℓ)` per row and `log p[y] = ℓ_y − max ℓ − ln Σ e^{ℓ − max ℓ}`, in one
/// pass over each row after its maximum. Returns `(p: [R, V], log p[y]: [R])`.
pub fn softmax_and_log_prob(logits: &Tensor, targets: &Tensor) -> Result<(Tensor, Tensor)> {
    let (r, v) = logits.dims2()?;
    if v == 0 {
        bail!("logits over an empty vocabulary");
    }
    if targets.dims1()? != r {
        bail!("{} targets for {r} rows of logits", targets.dims1()?);
    }
    if !on_cpu(logits) || targets.dtype() != DType::U32 {
        let p = candle_nn::ops::softmax_last_dim(logits)?;
        let ly = logits.gather(&targets.unsqueeze(1)?, 1)?;
        // log softmax(ℓ)[y] = ℓ_y − max ℓ + log max p (max p = 1 / Σ e^{ℓ − max ℓ}).
        let logp = ((ly - logits.max_keepdim(1)?)? + p.max_keepdim(1)?.log()?)?.squeeze(1)?;
        return Ok((p, logp));
    }
    let ys = targets.to_vec1::<u32>()?;
    if let Some(&y) = ys.iter().find(|&&y| y as usize >= v) {
        bail!("target {y} is outside the vocabulary of {v} words");
    }
    fn run<T: Real>(logits: &Tensor, ys: &[u32], v: usize) -> Result<(Tensor, Tensor)> {
        let r = ys.len();
        let (p, logp) = with_slice::<T, _>(logits, |ls| {
            // p is not zeroed first (`[R, V]` is tens of MB on a 10 001-word layer): each
            // row is written whole before it is read.
            let mut p: Vec<T> = Vec::with_capacity(r * v);
            let mut logp = vec![T::ZERO; r];
            p.spare_capacity_mut()[..r * v]
                .par_chunks_mut(v)
                .zip(logp.par_iter_mut())
                .zip(ls.par_chunks(v))
                .zip(ys.par_iter())
                .with_min_len(min_tasks(v))
                .for_each(|(((p, lp), l), &y)| {
                    *lp = simd(|| {
                        let m = max_of(l);
                        let p = write_row(p, l, |x| (x - m).exp());
                        let sum = sum_zip(p, p, |e, _| e);
                        let inv = T::ONE / sum;
                        for p in p.iter_mut() {
                            *p *= inv;
                        }
                        l[y as usize] - m - sum.ln()
                    });
                });
            // SAFETY: the r rows of v elements were each written whole by `write_row`.
            unsafe { p.set_len(r * v) };
            (p, logp)
        })?;
        Ok((tensor_of(p, logits, (r, v))?, tensor_of(logp, logits, r)?))
    }
    match logits.dtype() {
        DType::F32 => run::<f32>(logits, &ys, v),
        _ => run::<f64>(logits, &ys, v),
    }
}

/// The tangent of δℓ = onehot(y) − softmax(ℓ) along ℓ': `δℓ' = p (pᵀℓ') − p ⊙ ℓ'` per row,
/// `p, ℓ': [R, V]`, in one pass.
pub fn softmax_tangent(p: &Tensor, lt: &Tensor) -> Result<Tensor> {
    let (r, v) = p.dims2()?;
    if lt.dims() != p.dims() {
        bail!(
            "tangent {:?} does not match probabilities {:?}",
            lt.dims(),
            p.dims()
        );
    }
    if !on_cpu(p) || lt.dtype() != p.dtype() {
        let plt = (p * lt)?;
        return Ok((p.broadcast_mul(&plt.sum_keepdim(1)?)? - plt)?);
    }
    fn run<T: Real>(p: &Tensor, lt: &Tensor, r: usize, v: usize) -> Result<Tensor> {
        let out = with_slice::<T, _>(p, |ps| {
            with_slice::<T, _>(lt, |ls| {
                // Not zeroed first: each row is written whole (see softmax_and_log_prob).
                let mut out: Vec<T> = Vec::with_capacity(r * v);
                out.spare_capacity_mut()[..r * v]
                    .par_chunks_mut(v)
                    .zip(ps.par_chunks(v))
                    .zip(ls.par_chunks(v))
                    .with_min_len(min_tasks(v))
                    .for_each(|((o, p), l)| {
                        simd(|| {
                            let d = sum_zip(p, l, |p, l| p * l);
                            for ((o, &p), &l) in o.iter_mut().zip(p).zip(l) {
                                o.write(p * (d - l));
                            }
                        })
                    });
                // SAFETY: the r rows of v elements were each written whole above (every
                // row of `out` is zipped with a row of p and of ℓ', both v long).
                unsafe { out.set_len(r * v) };
                out
            })
        })??;
        tensor_of(out, p, (r, v))
    }
    match p.dtype() {
        DType::F32 => run::<f32>(p, lt, r, v),
        _ => run::<f64>(p, lt, r, v),
    }
    .context("softmax tangent")
}

/// The scalars of one Adam update (each is rounded to the tensor's type, as candle's
/// scalar ops round them).
#[derive(Debug, Clone, Copy)]
pub struct AdamScalars {
    pub beta1: f64,
    pub beta2: f64,
    /// lr / (1 − β1ᵗ) and 1 / (1 − β2ᵗ).
    pub lr_c1: f64,
    pub c2: f64,
    pub eps: f64,
}

/// One Adam update of a parameter in one pass: with g its gradient,
///   m' = β1 m + (1 − β1) g,   v' = β2 v + (1 − β2) g²,
///   θ' = θ − (lr c1) m' / (√(c2 v') + ε);
/// returns (θ', m', v'). The arithmetic is, operation for operation, that of the candle
/// ops it replaces (`m * β1 + g * (1 − β1)`, …, each scalar product written as candle's
/// affine `x · a + 0`), so results are bit-identical to them; on the CPU it is one
/// parallel pass instead of about fourteen. Elsewhere: those candle ops.
pub fn adam_update(
    theta: &Tensor,
    m: &Tensor,
    v: &Tensor,
    g: &Tensor,
    s: AdamScalars,
) -> Result<(Tensor, Tensor, Tensor)> {
    let same = |t: &Tensor| t.shape() == theta.shape() && t.dtype() == theta.dtype();
    if !(on_cpu(theta) && same(m) && same(v) && same(g)) {
        let m2 = ((m * s.beta1)? + (g * (1.0 - s.beta1))?)?;
        let v2 = ((v * s.beta2)? + (g.sqr()? * (1.0 - s.beta2))?)?;
        let upd = ((&m2 * s.lr_c1)? / ((&v2 * s.c2)?.sqrt()? + s.eps)?)?;
        return Ok(((theta - upd)?, m2, v2));
    }
    fn run<T: Real>(
        theta: &Tensor,
        m: &Tensor,
        v: &Tensor,
        g: &Tensor,
        s: AdamScalars,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let c = |x: f64| T::from_f64(x);
        let (b1, omb1, b2, omb2) = (c(s.beta1), c(1.0 - s.beta1), c(s.beta2), c(1.0 - s.beta2));
        let (lr_c1, c2, eps) = (c(s.lr_c1), c(s.c2), c(s.eps));
        let (zero, one) = (T::ZERO, T::ONE);
        let n = theta.elem_count();
        let (mut t2, mut m2, mut v2) = (vec![zero; n], vec![zero; n], vec![zero; n]);
        // The four inputs borrowed at once (each `with_slice` adds a Result level).
        with_slice::<T, _>(theta, |th| {
            with_slice::<T, _>(m, |m| {
                with_slice::<T, _>(v, |v| {
                    with_slice::<T, _>(g, |g| {
                        t2.par_chunks_mut(CHUNK)
                            .zip(m2.par_chunks_mut(CHUNK))
                            .zip(v2.par_chunks_mut(CHUNK))
                            .zip(
                                th.par_chunks(CHUNK)
                                    .zip(m.par_chunks(CHUNK))
                                    .zip(v.par_chunks(CHUNK))
                                    .zip(g.par_chunks(CHUNK)),
                            )
                            .with_min_len(min_tasks(CHUNK))
                            .for_each(|(((t2, m2), v2), (((th, m), v), g))| {
                                simd(|| {
                                    for k in 0..t2.len() {
                                        let gk = g[k];
                                        let mk = (m[k] * b1 + zero) + (gk * omb1 + zero);
                                        let vk = (v[k] * b2 + zero) + ((gk * gk) * omb2 + zero);
                                        let den = (vk * c2 + zero).sqrt() * one + eps;
                                        t2[k] = th[k] - (mk * lr_c1 + zero) / den;
                                        m2[k] = mk;
                                        v2[k] = vk;
                                    }
                                })
                            });
                    })
                })
            })
        })????;
        let shape = theta.shape();
        Ok((
            tensor_of(t2, theta, shape)?,
            tensor_of(m2, theta, shape)?,
            tensor_of(v2, theta, shape)?,
        ))
    }
    match theta.dtype() {
        DType::F32 => run::<f32>(theta, m, v, g, s),
        _ => run::<f64>(theta, m, v, g, s),
    }
}

/// Σ_k x_k² of a tensor in f64, summed in index order: the bits of candle's
/// `x.to_dtype(F64)?.sqr()?.sum_all()` (a sequential f64 sum on the CPU) in one pass
/// without its two temporaries. Elsewhere: those candle ops.
pub fn sum_sq_f64(x: &Tensor) -> Result<f64> {
    if !on_cpu(x) {
        return Ok(x
            .to_dtype(DType::F64)?
            .sqr()?
            .sum_all()?
            .to_scalar::<f64>()?);
    }
    fn run<T: Real>(x: &Tensor) -> Result<f64> {
        with_slice::<T, _>(x, |xs| {
            let mut s = 0.0f64;
            for &a in xs {
                let d = a.to_f64();
                s += d * d;
            }
            s
        })
    }
    match x.dtype() {
        DType::F32 => run::<f32>(x),
        _ => run::<f64>(x),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn values(t: &Tensor) -> Vec<f64> {
        let t = t.to_dtype(DType::F64).unwrap();
        t.flatten_all().unwrap().to_vec1::<f64>().unwrap()
    }

    /// max |a − b| / (|b| + floor) over all elements.
    fn rel_err(a: &Tensor, b: &Tensor, floor: f64) -> f64 {
        let (a, b) = (values(a), values(b));
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(&b)
            .map(|(a, b)| (a - b).abs() / (b.abs() + floor))
            .fold(0.0, f64::max)
    }

    /// max |a − b| / max |b|.
    fn norm_err(a: &Tensor, b: &Tensor) -> f64 {
        let (a, b) = (values(a), values(b));
        let scale = b.iter().fold(0.0f64, |m, b| m.max(b.abs()));
        a.iter()
            .zip(&b)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max)
            / scale
    }

    /// `t` in f64: the reference computations below run on the same inputs in f64.
    fn f64_of(t: &Tensor) -> Tensor {
        t.to_dtype(DType::F64).unwrap()
    }

    /// Values from −120 to 120 (beyond exp's f32 range on both sides), including 0 and
    /// tiny magnitudes, as `[rows, cols]`.
    fn inputs(rows: usize, cols: usize, dtype: DType) -> Tensor {
        let n = rows * cols;
        let v: Vec<f64> = (0..n)
            .map(|i| {
                let u = i as f64 / (n - 1) as f64;
                match i % 5 {
                    0 => 240.0 * u - 120.0,
                    1 => (12.0 * u - 6.0).powi(3) * 1e-3,
                    2 => 0.0,
                    _ => 30.0 * (7.3 * i as f64).sin(),
                }
            })
            .collect();
        Tensor::from_vec(v, (rows, cols), &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
    }

    #[test]
    fn exp_is_accurate_to_about_one_ulp_and_saturates_in_the_tails() {
        let mut worst = 0.0f64;
        for i in 0..=200_000 {
            let x = -87.0 + 175.0 * i as f64 / 200_000.0;
            let (got, want) = (exp_f32(x as f32) as f64, (x as f32 as f64).exp());
            worst = worst.max((got - want).abs() / want);
        }
        assert!(worst < 2.5e-7, "{worst}");
        assert!(exp_f32(-200.0) > 0.0 && exp_f32(-200.0) < 2e-38);
        assert!(exp_f32(200.0).is_finite() && exp_f32(200.0) > 1e38);
        assert!(exp_f32(f32::NAN).is_nan());
        assert_eq!(exp_f32(0.0), 1.0);
        let mut worst = 0.0f64;
        for i in 0..=100_000 {
            let e = i as f64 / 100_000.0 * (1.0 + 1e-3 * (i % 7) as f64) / 1.006;
            let e = if i % 3 == 0 { e * 1e-6 } else { e };
            let (got, want) = (ln_1p_unit_f32(e as f32) as f64, (e as f32 as f64).ln_1p());
            worst = worst.max((got - want).abs() / want.max(1e-300));
        }
        assert!(worst < 3e-7, "{worst}");
    }

    #[test]
    fn elementwise_kernels_match_f64_candle_ops() {
        // Element by element against the f64 ops on the same inputs (relative to 1e-30:
        // f32's exp saturates at 1.2e-38 instead of reaching 0).
        for (dtype, tol) in [(DType::F64, 1e-15), (DType::F32, 4e-7)] {
            let a = inputs(37, 411, dtype);
            let sig = candle_nn::ops::sigmoid(&f64_of(&a)).unwrap();
            let e = rel_err(&sigmoid(&a).unwrap(), &sig, 1e-30);
            assert!(e < tol, "{dtype:?} sigmoid {e}");
            let (h, s) = softplus_and_sigmoid(&a).unwrap();
            let want = crate::activation::softplus(&f64_of(&a)).unwrap();
            let e = rel_err(&h, &want, 1e-30);
            assert!(e < 2.0 * tol, "{dtype:?} softplus {e}");
            let e = rel_err(&s, &sig, 1e-30);
            assert!(e < tol, "{dtype:?} softplus' {e}");
        }
        let nan = Tensor::new(&[[f32::NAN, 1.0]], &Device::Cpu).unwrap();
        let (h, s) = softplus_and_sigmoid(&nan).unwrap();
        assert!(h.to_vec2::<f32>().unwrap()[0][0].is_nan());
        assert!(s.to_vec2::<f32>().unwrap()[0][0].is_nan());
    }

    #[test]
    fn bernoulli_terms_match_the_composed_ops() {
        for (dtype, tol) in [(DType::F64, 1e-14), (DType::F32, 1e-6)] {
            let (s, b, p) = (3, 4, 203);
            let o = (inputs(s * b, p, dtype) * 0.2).unwrap();
            let x = inputs(b, p, dtype)
                .gt(0.0)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let got = bernoulli_terms(&o, &x, true).unwrap();
            let (o, x) = (f64_of(&o), f64_of(&x));
            let o3 = o.reshape((s, b, p)).unwrap();
            let ll = (o3.broadcast_mul(&x).unwrap() - crate::activation::softplus(&o3).unwrap())
                .unwrap()
                .sum(D::Minus1)
                .unwrap()
                .flatten_all()
                .unwrap();
            let sig = candle_nn::ops::sigmoid(&o).unwrap();
            let delta = x
                .broadcast_sub(&sig.reshape((s, b, p)).unwrap())
                .unwrap()
                .reshape((s * b, p))
                .unwrap();
            // σ(o) σ(−o): no cancellation in either tail.
            let var = (&sig * candle_nn::ops::sigmoid(&o.neg().unwrap()).unwrap()).unwrap();
            let e = norm_err(&got.log_lik, &ll);
            assert!(e < tol, "{dtype:?} log-likelihood {e}");
            let e = norm_err(&got.delta, &delta);
            assert!(e < tol, "{dtype:?} delta {e}");
            // σ(1 − σ) element by element: from σ itself, not from 1 − δ.
            let e = rel_err(got.sig_var.as_ref().unwrap(), &var, 1e-30);
            assert!(e < 4.0 * tol, "{dtype:?} variance {e}");
            let x = x.to_dtype(dtype).unwrap();
            let o = o.to_dtype(dtype).unwrap();
            assert!(bernoulli_terms(&o, &x, false).unwrap().sig_var.is_none());
        }
    }

    #[test]
    fn softmax_kernels_match_the_composed_ops() {
        for (dtype, tol) in [(DType::F64, 1e-14), (DType::F32, 1e-6)] {
            let (r, v) = (9, 1031);
            let l = inputs(r, v, dtype);
            let y: Vec<u32> = (0..r as u32).map(|i| (i * 113) % v as u32).collect();
            let y = Tensor::new(y.as_slice(), &Device::Cpu).unwrap();
            let (p, logp) = softmax_and_log_prob(&l, &y).unwrap();
            let l64 = f64_of(&l);
            let want_p = candle_nn::ops::softmax_last_dim(&l64).unwrap();
            let want_logp = candle_nn::ops::log_softmax(&l64, D::Minus1)
                .unwrap()
                .gather(&y.unsqueeze(1).unwrap(), 1)
                .unwrap()
                .squeeze(1)
                .unwrap();
            let e = rel_err(&p, &want_p, 1e-30);
            assert!(e < 4.0 * tol, "{dtype:?} softmax {e}");
            let e = rel_err(&logp, &want_logp, 1.0);
            assert!(e < tol, "{dtype:?} log p {e}");
            let lt = (inputs(r, v, dtype) * 0.01).unwrap();
            let p64 = f64_of(&p);
            let plt = (&p64 * f64_of(&lt)).unwrap();
            let want = (p64.broadcast_mul(&plt.sum_keepdim(1).unwrap()).unwrap() - plt).unwrap();
            // (δℓ' is a difference of terms up to 1e3 times larger: a looser bound.)
            let e = norm_err(&softmax_tangent(&p, &lt).unwrap(), &want);
            assert!(e < 10.0 * tol, "{dtype:?} tangent {e}");
        }
        let l = Tensor::zeros((2, 3), DType::F32, &Device::Cpu).unwrap();
        let bad = Tensor::new(&[0u32, 3], &Device::Cpu).unwrap();
        let err = softmax_and_log_prob(&l, &bad).unwrap_err().to_string();
        assert!(err.contains("target 3") && err.contains("3 words"), "{err}");
    }

    /// The fused Adam update and the f64 sum of squares give exactly the bits of the
    /// candle ops they replace (f32 and f64, 100 000 elements: several parallel chunks,
    /// signed zeros and large moments included).
    #[test]
    fn adam_update_and_sum_of_squares_are_bit_identical_to_candle_ops() {
        for dtype in [DType::F32, DType::F64] {
            let (rows, cols) = (100, 1000);
            let theta = inputs(rows, cols, dtype);
            let g = (inputs(rows, cols, dtype).sin().unwrap() * 3.0).unwrap();
            let m = (inputs(rows, cols, dtype).cos().unwrap() * 0.1).unwrap();
            let v = (inputs(rows, cols, dtype).sqr().unwrap() * 1e-3).unwrap();
            let s = AdamScalars {
                beta1: 0.9,
                beta2: 0.999,
                lr_c1: 1e-3 / (1.0 - 0.9f64.powi(7)),
                c2: 1.0 / (1.0 - 0.999f64.powi(7)),
                eps: 1e-8,
            };
            let (t2, m2, v2) = adam_update(&theta, &m, &v, &g, s).unwrap();
            let m_ref = ((&m * s.beta1).unwrap() + (&g * (1.0 - s.beta1)).unwrap()).unwrap();
            let v_ref =
                ((&v * s.beta2).unwrap() + (g.sqr().unwrap() * (1.0 - s.beta2)).unwrap()).unwrap();
            let den = ((&v_ref * s.c2).unwrap().sqrt().unwrap() + s.eps).unwrap();
            let t_ref = (&theta - ((&m_ref * s.lr_c1).unwrap() / den).unwrap()).unwrap();
            let bits = |t: &Tensor| -> Vec<u64> { values(t).iter().map(|x| x.to_bits()).collect() };
            assert_eq!(bits(&t2), bits(&t_ref), "{dtype:?}: θ");
            assert_eq!(bits(&m2), bits(&m_ref), "{dtype:?}: m");
            assert_eq!(bits(&v2), bits(&v_ref), "{dtype:?}: v");
            let want = g
                .to_dtype(DType::F64)
                .unwrap()
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap();
            assert_eq!(
                sum_sq_f64(&g).unwrap().to_bits(),
                want.to_bits(),
                "{dtype:?}"
            );
        }
    }
}
