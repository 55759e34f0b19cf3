//! Fuzzes rollout plan parsing as operators and the API feed it: the bytes as a TOML plan
//! (`drover rollout start plan.toml`) and as a JSON body (`POST /v1/rollouts`). Nothing may
//! panic; a plan that parses and validates must answer the engine's questions (wave
//! sizes, shadow coverage, selector matching) for any fleet size without panicking.
#![no_main]

use std::collections::BTreeMap;

use drover_control_plane::rollout::{Plan, Selector};
use libfuzzer_sys::fuzz_target;

fn exercise(p: &Plan) {
    if p.validate().is_err() {
        return;
    }
    for n in [0usize, 1, 2, 3, 10, 1_000, 1_000_000, usize::MAX] {
        for w in &p.waves {
            let _ = w.cumulative(n);
        }
    }
    if let Some(s) = &p.shadow {
        for i in 0..p.waves.len() + 2 {
            let _ = s.covers(i);
        }
    }
    if let Ok(sel) = Selector::parse(&p.selector) {
        let labels = BTreeMap::from([("site".to_string(), "a".to_string())]);
        let _ = sel.matches(&labels, &[("id", Some("gw-1")), ("arch", None)]);
    }
}

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(p) = Plan::from_toml(text) {
            exercise(&p);
        }
    }
    if let Ok(p) = serde_json::from_slice::<Plan>(data) {
        exercise(&p);
    }
});
