//! `ditmoe presets`: every official size with total and activated parameter counts.
use ditmoe::presets;

pub fn run() -> anyhow::Result<()> {
    println!("{:<22} {:>5} {:>6} {:>5} {:>5} {:>8} {:>14} {:>14}", "preset", "depth", "hidden", "heads", "patch", "attn", "params", "activated");
    for p in presets::all() {
        let c = &p.config;
        let (total, active) = c.param_counts();
        println!(
            "{:<22} {:>5} {:>6} {:>5} {:>5} {:>8} {:>13.1}M {:>13.1}M",
            p.name,
            c.depth,
            c.hidden_size,
            c.num_heads,
            c.patch_size,
            if c.use_flash_attn { "flash" } else { "timm" },
            total as f64 / 1e6,
            active as f64 / 1e6
        );
    }
    Ok(())
}
