//! libFuzzer entry for [`checks::address_parse`].
#![no_main]

#[path = "../checks.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::address_parse(data));
