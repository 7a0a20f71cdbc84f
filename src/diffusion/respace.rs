//! Timestep respacing, mirroring the official `diffusion/respace.py`.
//!
//! `space_timesteps` chooses which of the original steps survive, and `respace_betas` is the
//! beta rebuild done in `SpacedDiffusion.__init__`: the kept steps' cumulative products are
//! preserved exactly, so a respaced step `i` carries the noise level of original step
//! `timestep_map[i]`, and that original index is what the model is fed (`_WrappedModel`).

use candle_core::{bail, Result};

/// `space_timesteps(num_timesteps, section_counts)`: the sorted original timesteps to keep.
///
/// * `"ddimN"`: the DDIM paper's fixed striding, `range(0, num_timesteps, stride)` with the
///   smallest integer stride giving exactly `N` steps.
/// * `"a,b,c"` (or one number): the original process is cut into equal sections
///   (`num_timesteps // len`, the first `num_timesteps % len` sections one step longer) and
///   each section is strided to its count with a fractional stride, positions rounded with
///   Python's `round` (ties to even: "25" keeps 166, not 167).
/// * `""`: the full process. The official `space_timesteps` itself would reject `""`;
///   `create_diffusion` turns `""` into `[diffusion_steps]` before calling it, and this mirrors
///   that, so `""` keeps every step.
///
/// Unlike the official code (which returns a `set`, silently returns nothing for count 0
/// and crashes later), invalid strings are rejected here with an error naming the string:
/// garbage, a ddim count no integer stride reaches, a section asked for more steps than it
/// has, or zero steps in total.
pub fn space_timesteps(num_timesteps: usize, section_counts: &str) -> Result<Vec<usize>> {
    let spec = section_counts.trim();
    if num_timesteps == 0 {
        bail!("space_timesteps({section_counts:?}): the original process has 0 steps");
    }
    if let Some(count) = spec.strip_prefix("ddim") {
        let desired = parse_count(section_counts, count)?;
        // Official: first i in 1..num_timesteps with len(range(0, num_timesteps, i)) == N.
        for stride in 1..num_timesteps {
            if num_timesteps.div_ceil(stride) == desired {
                return Ok((0..num_timesteps).step_by(stride).collect());
            }
        }
        bail!(
            "space_timesteps({section_counts:?}): cannot create exactly {desired} steps out of \
             {num_timesteps} with an integer stride"
        );
    }
    let counts: Vec<usize> = if spec.is_empty() {
        vec![num_timesteps]
    } else {
        spec.split(',')
            .map(|c| parse_count(section_counts, c))
            .collect::<Result<_>>()?
    };
    let size_per = num_timesteps / counts.len();
    let extra = num_timesteps % counts.len();
    let mut start_idx = 0usize;
    let mut all_steps = Vec::new();
    for (i, &section_count) in counts.iter().enumerate() {
        let size = size_per + usize::from(i < extra);
        if size < section_count {
            bail!(
                "space_timesteps({section_counts:?}): cannot divide section {i} of {size} steps \
                 into {section_count}"
            );
        }
        let frac_stride = if section_count <= 1 {
            1.0
        } else {
            (size - 1) as f64 / (section_count - 1) as f64
        };
        // The official loop accumulates the float position (not i * stride); keep the same
        // rounding path, then Python 3 `round` = round-half-to-even.
        let mut cur_idx = 0.0f64;
        for _ in 0..section_count {
            all_steps.push(start_idx + cur_idx.round_ties_even() as usize);
            cur_idx += frac_stride;
        }
        start_idx += size;
    }
    all_steps.sort_unstable();
    all_steps.dedup();
    if all_steps.is_empty() {
        bail!("space_timesteps({section_counts:?}): respacing keeps zero steps");
    }
    Ok(all_steps)
}

/// One section count (or the ddim count): a plain non-negative decimal integer, surrounding
/// whitespace allowed as Python's `int()` allows it.
fn parse_count(section_counts: &str, piece: &str) -> Result<usize> {
    let piece = piece.trim();
    if piece.is_empty() || !piece.bytes().all(|b| b.is_ascii_digit()) {
        bail!(
            "space_timesteps({section_counts:?}): {piece:?} is not a step count (expected \
             \"N\", \"N1,N2,...\", \"ddimN\" or \"\")"
        );
    }
    piece.parse::<usize>().map_err(|e| {
        candle_core::Error::Msg(format!(
            "space_timesteps({section_counts:?}): bad step count {piece:?}: {e}"
        ))
    })
}

/// `SpacedDiffusion.__init__`'s rebuild: walking the base process's `alphas_cumprod`, each kept
/// step `i` gets `beta = 1 - alphas_cumprod[i] / alphas_cumprod[previous kept]` (1.0 before
/// the first), so the respaced process reaches exactly the same cumulative noise levels.
/// Returns `(new_betas, timestep_map)`; `timestep_map[respaced index] = original timestep`.
/// `use_timesteps` must be sorted, unique and in range (as `space_timesteps` returns them).
pub fn respace_betas(
    base_alphas_cumprod: &[f64],
    use_timesteps: &[usize],
) -> Result<(Vec<f64>, Vec<usize>)> {
    if use_timesteps.is_empty() {
        bail!("respace_betas: no timesteps to keep");
    }
    if use_timesteps.windows(2).any(|w| w[0] >= w[1]) {
        bail!("respace_betas: use_timesteps must be strictly increasing, got {use_timesteps:?}");
    }
    let n = base_alphas_cumprod.len();
    if let Some(&last) = use_timesteps.last() {
        if last >= n {
            bail!("respace_betas: timestep {last} out of range for a {n}-step process");
        }
    }
    let mut last_alpha_cumprod = 1.0f64;
    let mut new_betas = Vec::with_capacity(use_timesteps.len());
    for &i in use_timesteps {
        let alpha_cumprod = base_alphas_cumprod[i];
        new_betas.push(1.0 - alpha_cumprod / last_alpha_cumprod);
        last_alpha_cumprod = alpha_cumprod;
    }
    Ok((new_betas, use_timesteps.to_vec()))
}
