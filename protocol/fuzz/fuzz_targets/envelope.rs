//! Fuzzes every envelope decoder with arbitrary bytes: none may panic, and whatever
//! decodes must re-encode to bytes that decode and re-encode identically (compared as
//! bytes, since float payloads may hold NaN, which is not equal to itself).
#![no_main]

use drover_protocol::envelope::*;
use drover_protocol::{DeviceId, DeviceKey};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let key = DeviceKey([7u8; 32]);
    let dev = DeviceId::new("fuzz-device").unwrap();
    let _ = open_uplink(data, &dev, &key);
    let _ = open_downlink(data, &dev, &key);
    if let Ok(f) = decode_uplink_unauthenticated(data) {
        let once = seal_uplink(&key, &f);
        let back = open_uplink(&once, &f.device, &key).unwrap();
        assert_eq!(seal_uplink(&key, &back), once);
    }
    if let Ok(f) = decode_downlink_unauthenticated(data) {
        let once = seal_downlink(&key, &f);
        let back = open_downlink(&once, &f.device, &key).unwrap();
        assert_eq!(seal_downlink(&key, &back), once);
    }
    if let Ok(c) = decode_chunk(data) {
        assert_eq!(decode_chunk(&encode_chunk(&c)).unwrap(), c);
    }
    if let Ok(k) = decode_keyring(data) {
        assert_eq!(decode_keyring(&encode_keyring(&k)).unwrap(), k);
    }
});
