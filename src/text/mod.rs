//! Text for language models: a byte-level BPE tokenizer that reads and writes Hugging Face
//! `tokenizer.json`, and the State of the Union corpus tokenized into document shards.
pub mod corpus;
pub mod tokenizer;

pub use corpus::{
    prepare_sotu, read_sotu, split_sotu, Address, SotuSplit, SotuSummary, SplitCounts, TokenShard,
    VALIDATION_EVERY,
};
pub use tokenizer::{TokenStream, Tokenizer, END_OF_TEXT};
