//! Unit tests of the deployment path's failures (issue 24): a command whose acceptance
//! cannot be persisted is not acted on (fault 4); a model the server cannot serve
//! correctly fails after a bounded number of attempts, with the reason (fault 7); a server
//! that holds chunks as long as its coalescer may never trips that rule.

use std::collections::BTreeSet;

use drover_protocol::messages::CHUNK_SERVE_BOUND_MS;

use super::tests::*;
use super::*;

fn deploy_cmd(r: &Rig, seq: u64, m: &TestModel) -> SignedBlob {
    r.command(
        seq,
        Action::Deploy {
            manifest: m.blob.clone(),
            mode: DeployMode::Activate,
        },
    )
}

/// Deploys `m` from an empty store and lets the download start.
fn downloading(r: &mut Rig, seq: u64, m: &TestModel) {
    let cmd = deploy_cmd(r, seq, m);
    r.send_command(cmd);
    r.handle(Input::Opened {
        manifest_digest: m.digest(),
        stored: Stored::Chunks(vec![false; m.manifest.chunk_count() as usize]),
    });
}

fn failed_detail(e: &[Effect]) -> Option<String> {
    progress(e)
        .into_iter()
        .find(|p| p.1 == Phase::Failed)
        .and_then(|p| p.2)
}

#[test]
fn a_command_whose_acceptance_cannot_be_persisted_is_not_acted_on() {
    let mut r = rig();
    let v1 = TestModel::new(&r.signer, "1.0.0", 3000);
    let v2 = TestModel::new(&r.signer, "2.0.0", 3000);
    downloading(&mut r, 1, &v1);
    let before = r.m.state().clone();
    // The driver runs the batch up to the failed write, then answers.
    let e = r.send_command(deploy_cmd(&r, 2, &v2));
    assert!(matches!(e[0], Effect::PersistCommand(_)), "{:?}", names(&e));
    let e = r.handle(Input::PersistFailed {
        error: "No space left on device".into(),
    });
    assert_eq!(
        progress(&e),
        [(
            2,
            Phase::Failed,
            Some("not acted on: cannot persist agent state: No space left on device".into())
        )]
    );
    assert!(events(&e).contains(&&Event::CommandNotPersisted {
        seq: 2,
        error: "No space left on device".into()
    }));
    // Nothing changed: the floor, the pending deployment and the job in flight are v1's.
    assert_eq!(r.m.state().last_command_seq, before.last_command_seq);
    assert_eq!(r.m.state().one().pending, before.one().pending);
    assert!(!names(&e).contains(&"close".to_owned()));
    let e = r.handle(Input::Chunk(v1.chunk(0)));
    assert!(matches!(e[..], [Effect::WriteChunk { index: 0, .. }]));
    // Sent again once the disk has room, the command is accepted (not a replay).
    let e = r.send_command(deploy_cmd(&r, 2, &v2));
    assert_eq!(phases(&e)[..2], [Phase::Received, Phase::Failed]);
    assert_eq!(r.m.state().last_command_seq, 2);
    // A failure reported after an input that accepted no command changes nothing.
    r.tick(0, 0);
    let e = r.handle(Input::PersistFailed { error: "x".into() });
    assert!(e.is_empty());
}

#[test]
fn a_chunk_that_never_verifies_fails_the_deploy_after_n_attempts_with_the_reason() {
    let mut r = rig();
    let m = TestModel::new(&r.signer, "1.0.0", 3000);
    downloading(&mut r, 1, &m);
    // The server's copy is truncated: the last chunk is short.
    let mut bad = m.chunk(2);
    bad.data.truncate(100);
    for _ in 1..MAX_CHUNK_ATTEMPTS {
        let e = r.handle(Input::Chunk(bad.clone()));
        assert!(matches!(
            e[..],
            [Effect::Event(Event::ChunkRefused { index: 2, .. })]
        ));
    }
    let e = r.handle(Input::Chunk(bad));
    let detail = failed_detail(&e).expect("the deploy fails");
    assert!(
        detail.starts_with(&format!(
            "failed after {MAX_CHUNK_ATTEMPTS} attempts: chunk 2: "
        )),
        "{detail}"
    );
    assert_eq!(persisted(&e).unwrap().one().pending, None);
    assert!(names(&e).contains(&"close".to_owned()));
    // Not "downloading" any more: no more requests.
    r.now += CHUNK_RETRY_MS;
    assert!(uplinks(&r.tick(0, 0)).is_empty());
}

#[test]
fn chunks_that_cannot_be_written_fail_the_deploy_after_n_attempts() {
    let mut r = rig();
    let m = TestModel::new(&r.signer, "1.0.0", 3000);
    downloading(&mut r, 1, &m);
    let mut last = Vec::new();
    for _ in 0..MAX_CHUNK_ATTEMPTS {
        last = r.handle(Input::ChunkWriteFailed {
            manifest_digest: m.digest(),
            index: 0,
            error: "No space left on device".into(),
        });
    }
    assert_eq!(
        failed_detail(&last).as_deref(),
        Some("failed after 5 attempts: chunk 0: No space left on device")
    );
}

#[test]
fn a_model_the_server_never_serves_fails_after_n_silent_requests_but_progress_resets_it() {
    let mut r = rig();
    let m = TestModel::new(&r.signer, "1.0.0", 3000);
    downloading(&mut r, 1, &m);
    let mut fail = None;
    let mut requests = 0;
    for round in 0..=MAX_SILENT_REQUESTS {
        r.now += CHUNK_RETRY_MS;
        let e = r.tick(0, 0);
        requests += uplinks(&e)
            .iter()
            .filter(|u| matches!(u, Uplink::ChunkRequest(_)))
            .count();
        if round == 3 {
            // One chunk arrives: the server serves, the count starts again.
            r.handle(Input::Chunk(m.chunk(0)));
            r.handle(Input::ChunkWritten {
                manifest_digest: m.digest(),
                index: 0,
            });
        }
        if let Some(d) = failed_detail(&e) {
            fail = Some((round, d));
            break;
        }
    }
    assert_eq!(fail, None, "progress resets the count");
    for _ in 0..MAX_SILENT_REQUESTS {
        r.now += CHUNK_RETRY_MS;
        let e = r.tick(0, 0);
        if let Some(d) = failed_detail(&e) {
            fail = Some((0, d));
            break;
        }
    }
    let (_, detail) = fail.expect("the deploy fails");
    assert_eq!(
        detail,
        format!("failed after {MAX_SILENT_REQUESTS} attempts: no chunk served (2 of 3 missing)")
    );
    assert!(requests > 0);
}

// The control plane's coalescer may hold a requested chunk up to CHUNK_SERVE_BOUND_MS; a
// publish lost on the way is resent at most that long later again. Twice the bound, and
// the retry that notices it, must stay inside the silent-request rule.
const _: () = assert!(
    2 * CHUNK_SERVE_BOUND_MS + CHUNK_RETRY_MS < MAX_SILENT_REQUESTS as u64 * CHUNK_RETRY_MS
);

/// Runs a download against a server that publishes every requested chunk `delay_ms` after
/// the first request for it (the latest its coalescer may), the first publish of each
/// chunk lost on the way when `lose_first`. Returns the failure detail, if the deploy fails.
fn download_against_a_holding_server(delay_ms: u64, lose_first: bool) -> Option<String> {
    let mut r = rig();
    // Three request batches of 1 KiB chunks.
    let chunks = 2 * CHUNK_BATCH as u32 + 3;
    let m = TestModel::new(&r.signer, "1.0.0", (chunks * 1024) as usize - 100);
    downloading(&mut r, 1, &m);
    let mut due: BTreeMap<u32, u64> = BTreeMap::new();
    let mut lost: BTreeSet<u32> = BTreeSet::new();
    let step = 100;
    for _ in 0..(20 * 60 * 1000 / step) {
        r.now += step;
        let mut effects = r.tick(0, 0);
        let now = r.now;
        let served: Vec<u32> = (due.iter())
            .filter(|(_, t)| **t <= now)
            .map(|(i, _)| *i)
            .collect();
        for ix in served {
            due.remove(&ix);
            if lose_first && lost.insert(ix) {
                continue;
            }
            effects.extend(r.handle(Input::Chunk(m.chunk(ix))));
        }
        let mut i = 0;
        while i < effects.len() {
            if let Effect::WriteChunk { index, .. } = effects[i] {
                let more = r.handle(Input::ChunkWritten {
                    manifest_digest: m.digest(),
                    index,
                });
                effects.extend(more);
            }
            i += 1;
        }
        for u in uplinks(&effects) {
            if let Uplink::ChunkRequest(req) = u {
                for ix in req.indices {
                    due.entry(ix).or_insert(now + delay_ms);
                }
            }
        }
        if let Some(d) = failed_detail(&effects) {
            return Some(d);
        }
        if names(&effects).contains(&"finish".to_owned()) {
            return None;
        }
    }
    Some("neither finished nor failed".into())
}

#[test]
fn a_server_holding_every_chunk_as_long_as_its_coalescer_may_never_fails_the_deploy() {
    assert_eq!(
        download_against_a_holding_server(CHUNK_SERVE_BOUND_MS, false),
        None
    );
    // The worst case: each chunk's first publish lost, its resend a bound later again.
    assert_eq!(
        download_against_a_holding_server(CHUNK_SERVE_BOUND_MS, true),
        None
    );
    // The rule still fails a server that really holds too long.
    let silence = MAX_SILENT_REQUESTS as u64 * CHUNK_RETRY_MS;
    let detail = download_against_a_holding_server(silence + CHUNK_RETRY_MS, false);
    assert!(
        detail
            .as_deref()
            .is_some_and(|d| d.contains("no chunk served")),
        "{detail:?}"
    );
}
