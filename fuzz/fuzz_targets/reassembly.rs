//! Fuzz target `reassembly`: see `storescp_fuzz::reassembly` in src/lib.rs for what it drives and checks.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| storescp_fuzz::reassembly(data));
