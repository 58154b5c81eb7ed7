//! Fuzzes the API's request body parsers with arbitrary bytes. Nothing may panic, and a create
//! body that is accepted must survive the trip `GET /api/v1/vm/info` → `PUT /api/v1/vm/create`:
//! the configuration's JSON parses back to the same configuration.

#![no_main]

use libfuzzer_sys::fuzz_target;
use vmm::api::body;

fuzz_target!(|data: &[u8]| {
    if let Ok(config) = body::parse_create(data) {
        let json = serde_json::to_vec(&config).expect("an accepted configuration serializes");
        assert_eq!(body::parse_create(&json), Ok(config));
    }
    let _ = body::parse_shutdown(data);
    let _ = body::parse_snapshot(data);
    let _ = body::parse_restore(data);
    let _ = body::parse_no_body(data);
});
