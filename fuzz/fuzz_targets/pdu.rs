//! Fuzz target `pdu`: see `storescp_fuzz::pdu` in src/lib.rs for what it drives and checks.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| storescp_fuzz::pdu(data));
