//! Byte-level BPE tokenizer (GPT-2 style) behind a small API, stored as a Hugging Face
//! `tokenizer.json` so that any tokenizer from the Hub loads through the same type.
//!
//! Byte-level: text is split GPT-2's way and every UTF-8 byte is a base token, so any string
//! encodes without an unknown token and decodes back exactly. The price is that one character
//! may span several tokens, which [`TokenStream`] deals with when text is produced token by
//! token.
use crate::checkpoint::write_atomic;
use candle_core::{bail, Result};
use std::path::Path;
use tokenizers as hf;
use tokenizers::models::bpe::{BpeTrainer, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::models::TrainerWrapper;
use tokenizers::AddedToken;

/// The document separator of [`Tokenizer::train`]ed tokenizers (GPT-2's), always id 0 there.
pub const END_OF_TEXT: &str = "<|endoftext|>";

/// Names that common tokenizers give their end-of-document token: GPT-2 and ours, Llama 1/2
/// and T5, Llama 3, Gemma. `tokenizer.json` does not say which token that is (Hugging Face
/// keeps it in `tokenizer_config.json`), so [`Tokenizer::eos_id`] looks for these in order.
const END_OF_TEXT_NAMES: [&str; 4] = [END_OF_TEXT, "</s>", "<|end_of_text|>", "<eos>"];

/// Pairs seen fewer times than this are not merged: a merge learnt from a single occurrence
/// spends a vocabulary slot on a string the tokenizer will rarely see again.
const MIN_MERGE_FREQUENCY: u64 = 2;

/// The 256 byte tokens plus [`END_OF_TEXT`]: the smallest vocabulary [`Tokenizer::train`] accepts.
const BASE_VOCAB_SIZE: usize = 257;

fn hf_err(what: impl std::fmt::Display, e: hf::Error) -> candle_core::Error {
    candle_core::Error::Msg(format!("{what}: {e}"))
}

/// A tokenizer: one that [`Tokenizer::train`] made or any Hugging Face `tokenizer.json`.
#[derive(Clone, Debug)]
pub struct Tokenizer {
    inner: hf::Tokenizer,
}

impl Tokenizer {
    /// Trains a byte-level BPE tokenizer of `vocab_size` tokens (at most; fewer if the texts
    /// have fewer pairs worth merging) on `texts`. [`END_OF_TEXT`] is id 0, the 256 byte tokens
    /// follow, then the merges. No prefix space is added, so a text's tokens are the same
    /// whether it starts a document or not.
    pub fn train<S: AsRef<str> + Sync>(texts: &[S], vocab_size: usize) -> Result<Self> {
        if vocab_size < BASE_VOCAB_SIZE {
            bail!(
                "tokenizer: a vocabulary of {vocab_size} is too small: byte-level BPE needs \
                 {BASE_VOCAB_SIZE} (256 bytes and {END_OF_TEXT})"
            );
        }
        let byte_level = ByteLevel::default().add_prefix_space(false);
        let mut inner = hf::Tokenizer::new(BPE::default());
        inner.with_pre_tokenizer(Some(byte_level)).with_decoder(Some(byte_level));
        let mut trainer: TrainerWrapper = BpeTrainer::builder()
            .vocab_size(vocab_size)
            .min_frequency(MIN_MERGE_FREQUENCY)
            .show_progress(false)
            .special_tokens(vec![AddedToken::from(END_OF_TEXT, true)])
            // Every byte, seen in training or not, so that no input is ever unknown.
            .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
            .build()
            .into();
        inner
            .train(&mut trainer, texts.iter())
            .map_err(|e| hf_err("tokenizer: training failed", e))?;
        Ok(Self { inner })
    }

    /// Loads a Hugging Face `tokenizer.json` (ours or any other producer's).
    pub fn load(path: &Path) -> Result<Self> {
        let inner = hf::Tokenizer::from_file(path)
            .map_err(|e| hf_err(format_args!("tokenizer {}", path.display()), e))?;
        Ok(Self { inner })
    }

    /// Writes the tokenizer as a Hugging Face `tokenizer.json`, atomically (a temporary file
    /// in the same folder, then a rename) so a reader never sees half of one.
    pub fn save(&self, path: &Path) -> Result<()> {
        let json = self
            .inner
            .to_string(true)
            .map_err(|e| hf_err(format_args!("tokenizer {}", path.display()), e))?;
        write_atomic(path, json.as_bytes())
    }

    /// The ids of `text`, without any special tokens added around it (a special token written
    /// out in the text, such as [`END_OF_TEXT`], still becomes its id).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self
            .inner
            .encode(text, false)
            .map_err(|e| hf_err("tokenizer: cannot encode", e))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// [`Tokenizer::encode`] of each text, encoded in parallel.
    pub fn encode_batch<S: AsRef<str> + Sync>(&self, texts: &[S]) -> Result<Vec<Vec<u32>>> {
        let inputs: Vec<&str> = texts.iter().map(|t| t.as_ref()).collect();
        let encodings = self
            .inner
            .encode_batch(inputs, false)
            .map_err(|e| hf_err("tokenizer: cannot encode", e))?;
        Ok(encodings.iter().map(|e| e.get_ids().to_vec()).collect())
    }

    /// The text of `ids`, special tokens included, so `decode(encode(t)) == t` for byte-level
    /// tokenizers. Ids that are not in the vocabulary are an error rather than skipped.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        if let Some(&bad) = ids.iter().find(|&&id| self.inner.id_to_token(id).is_none()) {
            bail!(
                "tokenizer: id {bad} is not in the vocabulary ({} tokens)",
                self.vocab_size()
            );
        }
        self.inner
            .decode(ids, false)
            .map_err(|e| hf_err("tokenizer: cannot decode", e))
    }

    /// Number of ids, special tokens included: every id is below it.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The id of the end-of-document token, if the vocabulary has one under a common name
    /// (`<|endoftext|>`, `</s>`, `<|end_of_text|>`, `<eos>`, in that order).
    pub fn eos_id(&self) -> Option<u32> {
        END_OF_TEXT_NAMES
            .iter()
            .find_map(|name| self.inner.token_to_id(name))
    }

    /// A decoder for ids that arrive one at a time, as in generation.
    pub fn stream(&self) -> TokenStream<'_> {
        TokenStream {
            tokenizer: self,
            ids: Vec::new(),
            context_start: 0,
            pending_start: 0,
        }
    }
}

/// Turns ids arriving one by one into text as soon as it is complete.
///
/// With byte-level tokens a character can be split across tokens; decoding such a token alone
/// gives U+FFFD. The stream therefore holds tokens back until their text no longer ends in an
/// incomplete character. Pending tokens are decoded together with the previously emitted ones
/// as context, since some decoders (SentencePiece's leading "▁", WordPiece's "##") render a
/// token differently at the start of a text; the new text is what decoding the pending tokens
/// added. The pieces returned, followed by [`TokenStream::finish`], concatenate to
/// [`Tokenizer::decode`] of all the ids.
pub struct TokenStream<'a> {
    tokenizer: &'a Tokenizer,
    ids: Vec<u32>,
    /// First id decoded as context: the start of the last emitted piece.
    context_start: usize,
    /// First id whose text has not been emitted yet.
    pending_start: usize,
}

impl TokenStream<'_> {
    /// Adds `id`; returns the text it completes, or `None` while a character is still partial
    /// (or the token adds no text).
    pub fn next_token(&mut self, id: u32) -> Result<Option<String>> {
        self.ids.push(id);
        let emitted = self
            .tokenizer
            .decode(&self.ids[self.context_start..self.pending_start])?;
        let all = self.tokenizer.decode(&self.ids[self.context_start..])?;
        match all.strip_prefix(emitted.as_str()) {
            Some(new) if !new.is_empty() && !new.ends_with(char::REPLACEMENT_CHARACTER) => {
                let new = new.to_string();
                self.context_start = self.pending_start;
                self.pending_start = self.ids.len();
                Ok(Some(new))
            }
            _ => Ok(None),
        }
    }

    /// The text of the tokens still held back, with U+FFFD for a character the stream ended
    /// inside of; `None` if nothing is pending.
    pub fn finish(self) -> Result<Option<String>> {
        if self.pending_start == self.ids.len() {
            return Ok(None);
        }
        let emitted = self
            .tokenizer
            .decode(&self.ids[self.context_start..self.pending_start])?;
        let all = self.tokenizer.decode(&self.ids[self.context_start..])?;
        let rest = match all.strip_prefix(emitted.as_str()) {
            Some(rest) => rest.to_string(),
            None => self.tokenizer.decode(&self.ids[self.pending_start..])?,
        };
        Ok(Some(rest).filter(|r| !r.is_empty()))
    }
}
