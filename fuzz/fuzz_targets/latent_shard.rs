//! The latent-shard reader on arbitrary bytes: an error naming the file, never a panic, hang or
//! allocation abort; a shard that opens must serve its samples.
#![no_main]
use ditmoe::data::{Dataset, LatentShardDataset};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = std::env::temp_dir().join(format!("ditmoe-fuzz-shard-{}.safetensors", std::process::id()));
    std::fs::write(&path, data).unwrap();
    let names: Vec<String> = (0..10).map(|c| c.to_string()).collect();
    if let Ok(ds) = LatentShardDataset::open(&[path], names) {
        let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(0);
        for i in 0..ds.len().min(4) {
            let _ = ds.get(i, &mut rng);
        }
    }
});
