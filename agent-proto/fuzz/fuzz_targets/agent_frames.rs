//! Fuzzes the guest agent's framing and request parsing with arbitrary bytes: nothing may
//! panic, the decoder never reads past its input, and an accepted request survives a round
//! trip through the encoder.

#![no_main]

use agent_proto::frame;
use agent_proto::RequestFrame;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(Some((body, used))) = frame::decode(data) {
        assert!(used <= data.len());
        if let Ok(req) = serde_json::from_slice::<RequestFrame>(body) {
            let mut again = Vec::new();
            frame::write(&mut again, &req).expect("an accepted request encodes");
            let back: RequestFrame = frame::read(&mut &again[..]).expect("and decodes");
            assert_eq!(back, req);
        }
    }
    let _ = frame::read::<_, RequestFrame>(&mut &data[..]);
});
