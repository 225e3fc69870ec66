//! Fuzz target `association`: see `storescp_fuzz::association` in src/lib.rs for what it drives and checks.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| storescp_fuzz::association(data));
