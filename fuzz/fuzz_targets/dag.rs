#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| turbocat::fuzzing::dag(data));
