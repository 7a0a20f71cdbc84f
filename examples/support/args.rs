//! The benchmark examples' command line: `--name value` flags read straight from the arguments,
//! each with its default (no parser dependency for a handful of flags). Every example includes
//! this module and uses what it needs of it.
#![allow(dead_code)]

/// The value after flag `name`, else `default`.
pub fn arg(name: &str, default: &str) -> String {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned().unwrap_or_else(|| default.to_string())
}

/// Flag `name`'s comma-separated values, else `default`'s (an empty list skips a measurement).
pub fn list(name: &str, default: &str) -> Vec<String> {
    arg(name, default).split(',').map(str::trim).filter(|s| !s.is_empty()).map(str::to_string).collect()
}

/// Whether flag `name` is given.
pub fn flag(name: &str) -> bool {
    std::env::args().any(|a| a == name)
}
