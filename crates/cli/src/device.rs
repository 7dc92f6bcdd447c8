//! Choosing the compute device: `--device cpu|cuda|cuda:N|auto`.

use anyhow::{bail, Result};
use candle_core::Device;

/// Resolves a device name. `auto` (the default) picks the first CUDA GPU when this binary
/// was built with the `cuda` feature and one answers, else the CPU. A CUDA build says
/// which it took (a CPU-only build has no choice to report).
pub fn resolve(name: &str) -> Result<Device> {
    match name {
        "cpu" => Ok(Device::Cpu),
        "auto" => {
            #[cfg(feature = "cuda")]
            match open_cuda(0) {
                Ok(d) => {
                    eprintln!("savae: using device cuda:0");
                    return Ok(d);
                }
                Err(e) => eprintln!("savae: using device cpu ({e:#})"),
            }
            Ok(Device::Cpu)
        }
        s if s == "cuda" || s.starts_with("cuda:") => {
            let ordinal: usize = match s.strip_prefix("cuda:") {
                None => 0,
                Some(n) => n
                    .parse()
                    .map_err(|_| anyhow::anyhow!("--device {s}: {n:?} is not a GPU number"))?,
            };
            open_cuda(ordinal)
        }
        other => bail!("--device {other:?} is unknown: expected cpu, cuda, cuda:N or auto"),
    }
}

#[cfg(feature = "cuda")]
fn open_cuda(ordinal: usize) -> Result<Device> {
    // cudarc panics instead of returning an error when no driver or GPU answers.
    let prev = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let r = std::panic::catch_unwind(|| Device::new_cuda(ordinal));
    std::panic::set_hook(prev);
    match r {
        Ok(Ok(d)) => Ok(d),
        Ok(Err(e)) => bail!("--device cuda:{ordinal}: no usable NVIDIA GPU ({e})"),
        Err(_) => bail!(
            "--device cuda:{ordinal}: no usable NVIDIA GPU (the CUDA driver library could not be \
             loaded or no GPU answered); use --device cpu"
        ),
    }
}

#[cfg(not(feature = "cuda"))]
fn open_cuda(ordinal: usize) -> Result<Device> {
    bail!(
        "--device cuda:{ordinal}: this savae binary was built without CUDA support; build it \
         with scripts/build-cuda.sh (see README) or use --device cpu"
    )
}

/// A short name of the device for logs and JSON.
pub fn name(d: &Device) -> String {
    match d {
        Device::Cpu => "cpu".into(),
        Device::Cuda(_) => "cuda".into(),
        _ => format!("{d:?}"),
    }
}
