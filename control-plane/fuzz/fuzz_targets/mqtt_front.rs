//! Fuzzes the embedded broker's mutual-TLS front on the device side: the bytes a device
//! sends after the handshake, through the front's packet reading as its relay runs it
//! (`drover_control_plane::broker::fuzz_device_bytes`): the first-packet reader with its
//! CONNECT size cap, the CONNECT re-encoding that replaces the password, then the packet
//! splitter with its ACL checks on PUBLISH and SUBSCRIBE. The first input byte sets how
//! many bytes each simulated read brings, so packets also arrive split. Nothing may
//! panic, and the splitter consumes exactly the bytes it passes on.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    drover_control_plane::broker::fuzz_device_bytes(data);
});
