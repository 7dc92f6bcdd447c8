//! `savae sample`: sentences from a text model — samples from the prior, reconstructions
//! of given sentences (decoded at the amortized and at the refined posterior mean), and
//! interpolations between the posterior means of two sentences.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use savae_data::text::{BOS, EOS};
use savae_data::Vocab;
use savae_model::{Batch, LstmDecoder, Vae};
use savae_train::batch::{noise, token_batch};
use std::path::PathBuf;

#[derive(clap::Args, Debug, Clone)]
pub struct SampleArgs {
    /// A text checkpoint written by `savae train --dataset ptb|text:DIR`.
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Sentences to draw from the prior z ~ N(0, I).
    #[arg(long, default_value_t = 5)]
    pub prior: usize,
    /// A sentence to reconstruct (repeatable; whitespace tokens, unknown words → <unk>).
    #[arg(long)]
    pub reconstruct: Vec<String>,
    /// Two sentences to interpolate between (give the flag twice).
    #[arg(long, num_args = 1)]
    pub interpolate: Vec<String>,
    /// Points on the interpolation path, ends included.
    #[arg(long, default_value_t = 5)]
    pub steps: usize,
    /// greedy (argmax) | sample.
    #[arg(long, default_value = "greedy")]
    pub decode: String,
    /// Softmax temperature of --decode sample.
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f64,
    /// Stop a sentence after this many words.
    #[arg(long, default_value_t = 40)]
    pub max_words: usize,
    /// SVI steps of the refined posterior (default: the checkpoint's).
    #[arg(long)]
    pub svi_steps: Option<usize>,
    /// Seed of the prior draws and of --decode sample.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    #[command(flatten)]
    pub device: crate::flags::DeviceFlag,
}

/// How the next word is chosen.
#[derive(Debug, Clone, Copy)]
pub enum Decoding {
    Greedy,
    Sample { temperature: f64 },
}

/// Decodes one sentence per row of `z: [N, d]` (None: the language model, `n` sentences).
pub fn decode(
    dec: &LstmDecoder,
    z: Option<&Tensor>,
    n: usize,
    how: Decoding,
    max_words: usize,
    rng: &mut impl Rng,
    device: &Device,
) -> Result<Vec<Vec<u32>>> {
    let mut seqs: Vec<Vec<u32>> = vec![vec![BOS]; n];
    let mut done = vec![false; n];
    for _ in 0..=max_words {
        let flat: Vec<u32> = seqs.iter().flatten().copied().collect();
        let prefix = Tensor::from_vec(flat, (n, seqs[0].len()), device)?;
        let logp = dec
            .next_log_probs(&prefix, z)?
            .to_dtype(DType::F64)?
            .to_vec2::<f64>()?;
        for (i, row) in logp.iter().enumerate() {
            let next = if done[i] {
                EOS
            } else {
                match how {
                    Decoding::Greedy => argmax(row),
                    Decoding::Sample { temperature } => sample_row(row, temperature, rng),
                }
            };
            done[i] |= next == EOS;
            seqs[i].push(next);
        }
        if done.iter().all(|&d| d) {
            break;
        }
    }
    Ok(seqs.into_iter().map(|s| s[1..].to_vec()).collect())
}

fn argmax(row: &[f64]) -> u32 {
    row.iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map_or(EOS, |(i, _)| i as u32)
}

fn sample_row(row: &[f64], temperature: f64, rng: &mut impl Rng) -> u32 {
    let m = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let w: Vec<f64> = row.iter().map(|v| ((v - m) / temperature).exp()).collect();
    let total: f64 = w.iter().sum();
    let mut u = rng.random::<f64>() * total;
    for (i, wi) in w.iter().enumerate() {
        u -= wi;
        if u <= 0.0 {
            return i as u32;
        }
    }
    (w.len() - 1) as u32
}

/// The amortized and refined posterior means `[N, d]` of `sentences` (refined with the
/// checkpoint's SVI settings on 8 fixed noise draws, as `savae eval` does).
fn posterior_means(
    model: &Vae,
    vocab: &Vocab,
    sentences: &[String],
    svi: &savae_inference::SviConfig,
    seed: u64,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let dtype = model.dtype();
    let mut mu0 = Vec::new();
    let mut mur = Vec::new();
    let dec = model.decoder.detached();
    for (i, s) in sentences.iter().enumerate() {
        let ids = vocab.encode(s);
        if ids.is_empty() {
            bail!("sentence {} ({s:?}) has no words", i + 1);
        }
        let mut rng = ChaCha8Rng::seed_from_u64(seed.wrapping_add(i as u64));
        let x = Batch::Text(token_batch(&[&ids], &mut rng, dtype, device, None)?);
        let lambda0 = model.encode(&x)?.0.detach();
        let eps = noise(&mut rng, 8, 1, model.latent_dim(), dtype, device)?;
        let r = savae_train::step::refine_elbo(
            &dec,
            &x,
            &eps,
            1.0,
            &lambda0,
            svi,
            false,
            savae_model::Passes::Analytic,
        )?;
        let d = model.latent_dim();
        mu0.push(lambda0.narrow(1, 0, d)?);
        mur.push(r.lambda.narrow(1, 0, d)?);
    }
    Ok((Tensor::cat(&mu0, 0)?, Tensor::cat(&mur, 0)?))
}

fn unknown_words(vocab: &Vocab, s: &str) -> Vec<String> {
    s.split_whitespace()
        .filter(|w| vocab.id(w) == savae_data::text::UNK && *w != "<unk>")
        .map(|w| w.to_string())
        .collect()
}

pub fn run(a: SampleArgs) -> Result<()> {
    let device = a.device.resolve()?;
    let ck = savae_train::checkpoint::load(&a.checkpoint)?;
    let vocab = ck.vocab(&a.checkpoint)?.with_context(|| {
        format!(
            "{}: savae sample draws sentences; this is an image checkpoint (use savae report)",
            a.checkpoint.display()
        )
    })?;
    let model = ck.model(&a.checkpoint, ck.meta.config.dtype(), &device)?;
    let dec = model.decoder.detached();
    let dec = dec.as_lstm()?;
    let how = match a.decode.as_str() {
        "greedy" => Decoding::Greedy,
        "sample" => {
            if !(a.temperature.is_finite() && a.temperature > 0.0) {
                bail!("--temperature must be positive (got {})", a.temperature);
            }
            Decoding::Sample {
                temperature: a.temperature,
            }
        }
        other => bail!("--decode {other:?} is unknown: expected greedy or sample"),
    };
    if !a.interpolate.is_empty() && a.interpolate.len() != 2 {
        bail!(
            "--interpolate needs exactly two sentences (got {})",
            a.interpolate.len()
        );
    }
    if a.steps < 2 {
        bail!("--steps must be at least 2 (the two ends)");
    }
    let latent = model.config.has_latent();
    if !latent && (!a.reconstruct.is_empty() || !a.interpolate.is_empty()) {
        bail!(
            "{} is a language model (no latent): it can only draw --prior samples",
            a.checkpoint.display()
        );
    }
    let mut svi = ck.meta.config.svi_config();
    if let Some(k) = a.svi_steps {
        svi.steps = k;
    }
    let dtype = model.dtype();
    let d = model.latent_dim();
    let mut rng = ChaCha8Rng::seed_from_u64(a.seed);
    // An empty sentence (</s> first, common for greedy decoding of a briefly trained
    // model) is marked rather than printed as a blank line.
    let show = |ids: &[u32]| {
        let text = vocab.decode(ids);
        if text.trim().is_empty() {
            "(empty sentence: </s> came first)".to_string()
        } else {
            text
        }
    };
    if a.prior > 0 {
        println!(
            "# {} sentences from the {} ({} decoding)",
            a.prior,
            if latent {
                "prior z ~ N(0, I)"
            } else {
                "language model"
            },
            a.decode
        );
        let z = if latent {
            Some(
                noise(&mut rng, 1, a.prior, d, dtype, &device)?
                    .0
                    .squeeze(0)?,
            )
        } else {
            None
        };
        for (i, s) in decode(
            dec,
            z.as_ref(),
            a.prior,
            how,
            a.max_words,
            &mut rng,
            &device,
        )?
        .iter()
        .enumerate()
        {
            println!("{}. {}", i + 1, show(s));
        }
    }
    if !a.reconstruct.is_empty() {
        let (mu0, mur) = posterior_means(&model, &vocab, &a.reconstruct, &svi, a.seed, &device)?;
        let n = a.reconstruct.len();
        let r0 = decode(dec, Some(&mu0), n, how, a.max_words, &mut rng, &device)?;
        let rr = decode(dec, Some(&mur), n, how, a.max_words, &mut rng, &device)?;
        for (i, s) in a.reconstruct.iter().enumerate() {
            println!("\n# reconstruction {}", i + 1);
            let unk = unknown_words(&vocab, s);
            if !unk.is_empty() {
                println!("(not in the vocabulary, read as <unk>: {})", unk.join(" "));
            }
            println!("input:      {}", show(&vocab.encode(s)));
            if model.encoder.is_some() {
                println!("amortized:  {}", show(&r0[i]));
            }
            println!("refined:    {}   ({} SVI steps)", show(&rr[i]), svi.steps);
        }
    }
    if a.interpolate.len() == 2 {
        let (_, mur) = posterior_means(&model, &vocab, &a.interpolate, &svi, a.seed, &device)?;
        let (z1, z2) = (mur.narrow(0, 0, 1)?, mur.narrow(0, 1, 1)?);
        let ts: Vec<f64> = (0..a.steps)
            .map(|i| i as f64 / (a.steps - 1) as f64)
            .collect();
        let zs = ts
            .iter()
            .map(|&t| Ok(((&z1 * (1.0 - t))? + (&z2 * t)?)?))
            .collect::<Result<Vec<_>>>()?;
        let z = Tensor::cat(&zs, 0)?;
        println!(
            "\n# interpolation between the refined posterior means of\n#   {}\n#   {}",
            a.interpolate[0], a.interpolate[1]
        );
        for (t, s) in ts.iter().zip(decode(
            dec,
            Some(&z),
            a.steps,
            how,
            a.max_words,
            &mut rng,
            &device,
        )?) {
            println!("{t:.2}  {}", show(&s));
        }
    }
    Ok(())
}
