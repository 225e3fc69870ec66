//! Fuzz target `sniff`: see `storescp_fuzz::sniff` in src/lib.rs for what it drives and checks.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| storescp_fuzz::sniff(data));
