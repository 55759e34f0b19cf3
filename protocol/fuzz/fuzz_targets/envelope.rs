//! Fuzzes every envelope decoder with arbitrary bytes: none may panic, and whatever
//! decodes must re-encode and decode to the same value.
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
        let again = seal_uplink(&key, &f);
        assert_eq!(open_uplink(&again, &f.device, &key).unwrap(), f);
    }
    if let Ok(f) = decode_downlink_unauthenticated(data) {
        let again = seal_downlink(&key, &f);
        assert_eq!(open_downlink(&again, &f.device, &key).unwrap(), f);
    }
    if let Ok(c) = decode_chunk(data) {
        assert_eq!(decode_chunk(&encode_chunk(&c)).unwrap(), c);
    }
    if let Ok(k) = decode_keyring(data) {
        assert_eq!(decode_keyring(&encode_keyring(&k)).unwrap(), k);
    }
});
