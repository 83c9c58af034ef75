//! Replays, without libFuzzer, every input kept under `fuzz/regressions/<target>/` (inputs that once
//! broke a fuzz target) and every seed of `fuzz/seeds/` through the same checks the fuzz targets run
//! (`fuzz/checks.rs`), so a fixed crash stays fixed in the normal suite.

#[path = "../fuzz/checks.rs"]
mod checks;

use std::path::Path;

/// The files of `dir` (none when it does not exist), hidden ones left out.
fn inputs(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut files: Vec<(String, Vec<u8>)> = entries
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file() && !p.file_name().unwrap().to_string_lossy().starts_with('.'))
        .map(|p| (p.display().to_string(), std::fs::read(&p).unwrap()))
        .collect();
    files.sort();
    files
}

fn replay(target: &str, check: fn(&[u8])) -> usize {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut count = 0;
    for dir in [fuzz.join("regressions").join(target), fuzz.join("seeds/common"), fuzz.join("seeds").join(target)] {
        for (name, data) in inputs(&dir) {
            // A panic names the input that caused it.
            if std::panic::catch_unwind(|| check(&data)).is_err() {
                panic!("{target} fails on {name}");
            }
            count += 1;
        }
    }
    count
}

#[test]
fn envelope_decode_regressions_and_seeds() {
    assert!(replay("envelope_decode", checks::envelope_decode) > 50);
}

#[test]
fn plan_validate_regressions_and_seeds() {
    assert!(replay("plan_validate", checks::plan_validate) > 50);
}

#[test]
fn address_parse_regressions_and_seeds() {
    assert!(replay("address_parse", checks::address_parse) > 10);
}
