//! The newest command about the model wins: unit tests of the redeploy race (issue 24,
//! fault 3) and a property test over random interleavings of commands, chunk arrivals,
//! time and SIGKILLs anywhere in an effect batch (the machine rebuilt from the record
//! persisted so far, as the agent's boot does).

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;

use super::tests::*;
use super::*;

fn deploy_cmd(r: &Rig, seq: u64, m: &TestModel, mode: DeployMode) -> SignedBlob {
    r.command(
        seq,
        Action::Deploy {
            manifest: m.blob.clone(),
            mode,
        },
    )
}

/// Deploys `m` from an empty store and lets the download start (nothing held yet).
fn downloading(r: &mut Rig, seq: u64, m: &TestModel) {
    let cmd = deploy_cmd(r, seq, m, DeployMode::Activate);
    r.send_command(cmd);
    r.handle(Input::Opened {
        manifest_digest: m.digest(),
        stored: Stored::Chunks(vec![false; m.manifest.chunk_count() as usize]),
    });
}

/// Installs `m` (its file in the store) and ends its probation cleanly.
fn healthy(r: &mut Rig, seq: u64, m: &TestModel) {
    let cmd = deploy_cmd(r, seq, m, DeployMode::Activate);
    r.send_command(cmd);
    r.handle(Input::Opened {
        manifest_digest: m.digest(),
        stored: Stored::Blob,
    });
    r.handle(Input::Loaded { model: m.digest() });
    r.now += PROBATION_MS;
    r.tick(0, 10);
}

#[test]
fn redeploying_the_active_model_cancels_the_download_in_flight() {
    let mut r = rig();
    let v1 = TestModel::new(&r.signer, "1.0.0", 3000);
    let v2 = TestModel::new(&r.signer, "2.0.0", 3000);
    healthy(&mut r, 1, &v1);
    downloading(&mut r, 2, &v2);
    // The operator reverts to the model that is active.
    let revert = deploy_cmd(&r, 3, &v1, DeployMode::Activate);
    let e = r.send_command(revert);
    assert_eq!(
        names(&e),
        [
            "persist",
            "crash command.after_seq_persist",
            "progress Received",
            "unsubscribe",
            "close",
            "progress Failed",
            "progress Healthy"
        ]
    );
    assert_eq!(
        progress(&e)[1],
        (2, Phase::Failed, Some("superseded by command 3".into()))
    );
    // The command's own write forgets the older deployment.
    let first = match &e[0] {
        Effect::PersistCommand(s) => s,
        other => panic!("{other:?}"),
    };
    assert_eq!(
        (first.last_command_seq, first.one().pending.clone()),
        (3, None)
    );
    // v2's chunks arriving late change nothing.
    for i in 0..3 {
        assert!(r.handle(Input::Chunk(v2.chunk(i))).is_empty());
    }
    assert_eq!(
        r.m.state().one().active.as_ref().unwrap().model,
        v1.model_ref()
    );
}

#[test]
fn a_restart_after_a_revert_does_not_resume_the_older_download() {
    let mut r = rig();
    let v1 = TestModel::new(&r.signer, "1.0.0", 3000);
    let v2 = TestModel::new(&r.signer, "2.0.0", 3000);
    healthy(&mut r, 1, &v1);
    downloading(&mut r, 2, &v2);
    let revert = deploy_cmd(&r, 3, &v1, DeployMode::Activate);
    r.send_command(revert);
    let mut again = fresh(r.m.state().clone(), true);
    let e = again.handle(Input::Start);
    assert_eq!(names(&e), ["will"]);
}

#[test]
fn a_promote_or_a_refused_deploy_also_cancels_the_download_but_settings_do_not() {
    let mut r = rig();
    let v1 = TestModel::new(&r.signer, "1.0.0", 3000);
    let v2 = TestModel::new(&r.signer, "2.0.0", 3000);
    healthy(&mut r, 1, &v1);
    downloading(&mut r, 2, &v2);
    let e = commanded(
        &mut r,
        3,
        Action::Configure(drover_protocol::messages::AgentSettings {
            telemetry_interval_ms: 1000,
            sample_rate_ppm: 0,
        }),
    );
    assert!(!names(&e).contains(&"close".to_owned()));
    assert_eq!(
        r.m.state().one().pending.as_ref().unwrap().model,
        v2.model_ref()
    );
    let e = commanded(&mut r, 4, Action::Promote);
    assert_eq!(
        progress(&e)[1..],
        [
            (2, Phase::Failed, Some("superseded by command 4".into())),
            (4, Phase::Failed, Some("no shadow model to promote".into()))
        ]
    );
    assert_eq!(r.m.state().one().pending, None);
    // A deploy whose manifest is refused still overrides the older one.
    downloading(&mut r, 5, &v2);
    let mut bad = v1.blob.clone();
    bad.signature[0] ^= 1;
    let e = commanded(
        &mut r,
        6,
        Action::Deploy {
            manifest: bad,
            mode: DeployMode::Activate,
        },
    );
    assert_eq!(phases(&e), [Phase::Received, Phase::Failed, Phase::Refused]);
    assert_eq!(r.m.state().one().pending, None);
}

fn commanded(r: &mut Rig, seq: u64, action: Action) -> Vec<Effect> {
    let cmd = r.command(seq, action);
    r.send_command(cmd)
}

// ---------------------------------------------------------------------------------------
// Property: over random interleavings, the final active model is the highest-sequence
// command's, no older command ever activates after a newer one was accepted, and the
// persisted pending deployment is always the newest model command's.

const MODELS: usize = 3;

#[derive(Clone, Debug)]
enum Op {
    /// Deploy model k (activate or shadow).
    Deploy(usize, bool),
    /// Deploy the model active now (the operator reverts).
    Revert,
    /// Roll back to the previous slot, named when there is one.
    Rollback,
    Promote,
    Configure,
    /// Up to n missing chunks of model k arrive.
    Chunks(usize, usize),
    /// Time passes (a chunk retry or a probation) with clean traffic.
    Tick,
    /// SIGKILL after n more effects, then a restart from the persisted record.
    Kill(usize),
    /// The broker redelivers the last command.
    Redeliver,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0..MODELS, any::<bool>()).prop_map(|(k, a)| Op::Deploy(k, a || k != 2)),
        2 => Just(Op::Revert),
        1 => Just(Op::Rollback),
        1 => Just(Op::Promote),
        1 => Just(Op::Configure),
        4 => (0..MODELS, 1..4usize).prop_map(|(k, n)| Op::Chunks(k, n)),
        2 => Just(Op::Tick),
        2 => (0..12usize).prop_map(Op::Kill),
        1 => Just(Op::Redeliver),
    ]
}

/// What the newest model command leaves active, judged on the state it met.
#[derive(Clone, Debug)]
enum Want {
    Model(ModelRef),
    Rollback(Option<ModelRef>),
    Promote,
    Unchanged,
}

struct World {
    r: Rig,
    models: Vec<TestModel>,
    /// The record on disk: the last `Persist` executed.
    disk: State,
    /// Manifest digests whose verified file is in the store; chunks held per download.
    blobs: BTreeSet<Digest>,
    parts: BTreeMap<Digest, Vec<bool>>,
    loaded: Option<ModelRef>,
    served: Option<ModelRef>,
    shadow: Option<ModelRef>,
    /// Every command sent: (seq, blob, is about the model, what it wants).
    sent: Vec<(u64, SignedBlob, bool, Want)>,
    /// The active model the newest accepted model command leaves.
    expected: Option<ModelRef>,
    newest_model_cmd: u64,
    kill_after: Option<usize>,
}

impl World {
    fn new() -> World {
        let r = rig();
        let models = (0..MODELS)
            .map(|k| TestModel::new(&r.signer, &format!("{k}.0.0"), 2500 + 700 * k))
            .collect();
        World {
            disk: r.m.state().clone(),
            r,
            models,
            blobs: BTreeSet::new(),
            parts: BTreeMap::new(),
            loaded: None,
            served: None,
            shadow: None,
            sent: Vec::new(),
            expected: None,
            newest_model_cmd: 0,
            kill_after: None,
        }
    }

    /// Handles an input and the results of its asks; a kill stops everything and restarts.
    fn run(&mut self, input: Input) {
        let mut next = Some(input);
        while let Some(input) = next.take() {
            for effect in self.r.handle(input) {
                if self.kill_after == Some(0) {
                    return self.restart();
                }
                if let Some(k) = &mut self.kill_after {
                    *k -= 1;
                }
                next = self.execute(effect);
            }
        }
    }

    fn restart(&mut self) {
        self.kill_after = None;
        let now = self.r.now;
        self.r = fresh(self.disk.clone(), true);
        self.r.now = now;
        // Boot serves the persisted active model (every file here loads).
        self.served = self.disk.one().active.as_ref().map(|a| a.model.clone());
        self.shadow = self.disk.one().shadow.as_ref().map(|a| a.model.clone());
        self.run(Input::Start);
        self.run(Input::Connected);
        // The control plane re-sends the commands above the floor the hello reports.
        let floor = self.disk.last_command_seq;
        let again: Vec<_> = self.sent.iter().filter(|c| c.0 > floor).cloned().collect();
        for (seq, blob, about_model, want) in again {
            self.deliver(seq, blob, about_model, want);
        }
    }

    fn execute(&mut self, effect: Effect) -> Option<Input> {
        match effect {
            Effect::Persist(s) | Effect::PersistCommand(s) => {
                self.check_pending(&s);
                self.disk = *s;
            }
            Effect::Uplink(s) => {
                let msg = envelope::decode_uplink_unauthenticated(&s.payload).unwrap();
                if let Uplink::Progress(p) = msg.msg {
                    if p.phase == Phase::Active {
                        assert!(
                            p.command_seq >= self.newest_model_cmd,
                            "command {} activated after command {} was accepted",
                            p.command_seq,
                            self.newest_model_cmd
                        );
                    }
                }
            }
            Effect::OpenDownload {
                manifest_digest: d,
                manifest,
            } => {
                let stored = if self.blobs.contains(&d) {
                    Stored::Blob
                } else {
                    let n = manifest.chunk_count() as usize;
                    Stored::Chunks(self.parts.entry(d).or_insert(vec![false; n]).clone())
                };
                return Some(Input::Opened {
                    manifest_digest: d,
                    stored,
                });
            }
            Effect::WriteChunk {
                manifest_digest: d,
                index,
                ..
            } => {
                self.parts.get_mut(&d).unwrap()[index as usize] = true;
                return Some(Input::ChunkWritten {
                    manifest_digest: d,
                    index,
                });
            }
            Effect::FinishDownload { manifest_digest: d } => {
                assert!(self.parts.remove(&d).unwrap().iter().all(|h| *h));
                self.blobs.insert(d);
                return Some(Input::BlobReady { manifest_digest: d });
            }
            Effect::Load { model, .. } => {
                assert!(self.blobs.contains(&model.digest), "load before download");
                let digest = model.digest;
                self.loaded = Some(model);
                return Some(Input::Loaded { model: digest });
            }
            Effect::ServeLoaded { .. } => self.served = self.loaded.take(),
            Effect::ShadowLoaded { .. } => self.shadow = self.loaded.take(),
            Effect::PromoteShadow { .. } => self.served = self.shadow.take(),
            Effect::DropShadow { .. } => self.shadow = None,
            _ => {}
        }
        None
    }

    /// The persisted pending deployment is the newest accepted model command's, or none.
    fn check_pending(&self, s: &State) {
        let newest = self
            .sent
            .iter()
            .filter(|c| c.2 && c.0 <= s.last_command_seq)
            .map(|c| c.0)
            .max();
        if let Some(p) = &s.one().pending {
            assert_eq!(Some(p.command_seq), newest, "stale pending deployment");
        }
    }

    fn send(&mut self, action: Action, want: Want) {
        let seq = self.sent.last().map(|c| c.0).unwrap_or(0) + 1;
        let about_model = !matches!(action, Action::Configure(_));
        let blob = self.r.command(seq, action);
        self.sent
            .push((seq, blob.clone(), about_model, want.clone()));
        self.deliver(seq, blob, about_model, want);
    }

    fn deliver(&mut self, seq: u64, blob: SignedBlob, about_model: bool, want: Want) {
        let before = self.r.m.state().clone();
        let active = before.one().active.as_ref().map(|a| a.model.clone());
        self.run(Input::Downlink(Downlink::Command(blob)));
        if !about_model || self.r.m.state().last_command_seq != seq {
            return;
        }
        self.newest_model_cmd = seq;
        let previous = before.one().previous.as_ref().map(|a| a.model.clone());
        let shadow = before.one().shadow.as_ref().map(|a| a.model.clone());
        self.expected = match want {
            Want::Model(m) => Some(m),
            Want::Unchanged => active,
            Want::Promote => shadow.or(active),
            Want::Rollback(Some(to)) if Some(&to) == previous.as_ref() => Some(to),
            Want::Rollback(Some(_)) => active,
            Want::Rollback(None) => previous.or(active),
        };
    }

    fn apply(&mut self, op: Op) {
        let active = self
            .r
            .m
            .state()
            .one()
            .active
            .as_ref()
            .map(|a| a.model.clone());
        match op {
            Op::Deploy(k, activate) => {
                let m = &self.models[k];
                let (mode, want) = if activate {
                    (DeployMode::Activate, Want::Model(m.model_ref()))
                } else {
                    (DeployMode::Shadow, Want::Unchanged)
                };
                let manifest = m.blob.clone();
                self.send(Action::Deploy { manifest, mode }, want);
            }
            Op::Revert => {
                let m = active.unwrap_or_else(|| self.models[0].model_ref());
                let manifest = self.models.iter().find(|t| t.digest() == m.digest);
                let manifest = manifest.unwrap().blob.clone();
                let mode = DeployMode::Activate;
                self.send(Action::Deploy { manifest, mode }, Want::Model(m));
            }
            Op::Rollback => {
                let to = self
                    .r
                    .m
                    .state()
                    .one()
                    .previous
                    .as_ref()
                    .map(|p| p.model.clone());
                self.send(Action::Rollback { to: to.clone() }, Want::Rollback(to));
            }
            Op::Promote => self.send(Action::Promote, Want::Promote),
            Op::Configure => {
                let s = drover_protocol::messages::AgentSettings {
                    telemetry_interval_ms: 1000,
                    sample_rate_ppm: 0,
                };
                self.send(Action::Configure(s), Want::Unchanged);
            }
            Op::Chunks(k, n) => self.chunks(k, n),
            Op::Tick => {
                self.r.now += CHUNK_RETRY_MS.max(PROBATION_MS);
                self.run(tick());
            }
            Op::Kill(n) => self.kill_after = Some(n),
            Op::Redeliver => {
                if let Some((_, blob, ..)) = self.sent.last().cloned() {
                    self.run(Input::Downlink(Downlink::Command(blob)));
                }
            }
        }
    }

    fn chunks(&mut self, k: usize, n: usize) {
        let d = self.models[k].digest();
        let held = self.parts.get(&d).cloned().unwrap_or_default();
        let count = self.models[k].manifest.chunk_count();
        let missing: Vec<u32> = (0..count)
            .filter(|i| !held.get(*i as usize).copied().unwrap_or(false))
            .take(n)
            .collect();
        for i in missing {
            let c = self.models[k].chunk(i);
            self.run(Input::Chunk(c));
        }
    }

    /// Everything arrives and time passes until nothing is in flight.
    fn settle(&mut self) {
        self.kill_after = None;
        for _ in 0..20 {
            for k in 0..MODELS {
                self.chunks(k, usize::MAX);
            }
            self.r.now += CHUNK_RETRY_MS.max(PROBATION_MS);
            self.run(tick());
            if self.r.m.job.is_empty() && self.r.m.probation.is_empty() {
                return;
            }
        }
        panic!("the machine never settled");
    }
}

fn tick() -> Input {
    Input::Tick(Observed {
        probation: [("m".to_owned(), (0, 10))].into(),
        last_request_id: 0,
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn the_newest_command_about_the_model_always_wins(ops in prop::collection::vec(op(), 1..40)) {
        let mut w = World::new();
        for op in ops {
            w.apply(op);
        }
        w.settle();
        let active = w.r.m.state().one().active.as_ref().map(|a| a.model.clone());
        prop_assert_eq!(&active, &w.expected);
        prop_assert_eq!(&w.served, &w.expected);
        let on_disk = w.disk.one().active.as_ref().map(|a| a.model.clone());
        prop_assert_eq!(&on_disk, &w.expected);
        prop_assert_eq!(&w.disk.one().pending, &None);
    }
}
