//! Fleet operations behind the API: enroll, decommission, deploy (signed commands).
//! Synchronous (they hold the store); the API runs them on the blocking pool.

use std::collections::BTreeMap;

use drover_protocol::manifest::Artifact;
use drover_protocol::messages::{Action, Command, DeployMode};
use drover_protocol::trust::{KeyId, SigKind, SignedBlob};
use drover_protocol::{DeviceId, DeviceKey, Manifest};
use rand::RngCore as _;

use crate::app::{App, DeviceEntry};
use crate::store::{CommandRow, DeviceEventRow, ModelRow, ReplacedSeqs, Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error(transparent)]
    DeviceId(#[from] drover_protocol::topics::TopicError),
    #[error("model {0} is not published; see `drover model list`")]
    UnknownModel(String),
    #[error("model reference {0:?} must look like NAME@X.Y.Z")]
    BadModelRef(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("device id {0:?} is reserved for the control plane's broker identity")]
    ReservedId(String),
    #[error(transparent)]
    Pki(#[from] crate::pki::PkiError),
    #[error("{0}")]
    BadLabels(String),
    #[error(
        "model {model}: its signed manifest is {len} bytes, and a deploy command carries it \
         within the {max_frame}-byte downlink limit every device enforces (at most {max} bytes \
         of manifest); nothing was sent. Republish it under a new version with fewer or smaller \
         test vectors (`drover model publish --test-vectors`) or a smaller baseline"
    )]
    ManifestTooLarge {
        model: String,
        len: usize,
        max: usize,
        max_frame: usize,
    },
    #[error("a stored manifest does not decode: {0}")]
    BadManifest(String),
    #[error("device {device} cannot run {model}: {reason}; nothing was sent")]
    CannotLoad {
        device: String,
        model: String,
        reason: String,
    },
    #[error(
        "device {device} runs an agent that speaks protocol {has}, and {what} needs protocol \
         {needs} (several models per device); nothing was sent. Upgrade the device's agent \
         (`drover device show {device}` shows its version)"
    )]
    ProtocolTooOld {
        device: String,
        what: String,
        needs: u16,
        has: u16,
    },
    #[error(
        "device {device} runs an agent that speaks protocol 1 and holds one model ({active}); \
         deploying {model} would replace it. Upgrade the agent to hold both, or pass --replace \
         to replace {active} with {model}"
    )]
    WouldReplace {
        device: String,
        active: String,
        model: String,
    },
    #[error("device {device} holds no model named {model}; it holds: {held}")]
    NoSuchSlot {
        device: String,
        model: String,
        held: String,
    },
}

/// At most this many operator labels per device.
pub const MAX_LABELS: usize = 32;
/// A label key is 1 to this many bytes.
pub const MAX_LABEL_KEY_BYTES: usize = 64;
/// A label value is 1 to this many bytes.
pub const MAX_LABEL_VALUE_BYTES: usize = 256;
/// Keys under this prefix name the labels an agent declares; an operator cannot set them
/// (see docs/FLEET.md: agent labels are shown, never selected on).
pub const AGENT_LABEL_PREFIX: &str = "agent.";

/// The first 32 characters of `s`, for an error message about a label.
fn shown(s: &str) -> String {
    match s.char_indices().nth(32) {
        Some((at, _)) => format!("{}…", &s[..at]),
        None => s.to_owned(),
    }
}

/// Checks a device's operator labels against the bounds and the selector grammar
/// (`key=value|value,key!=value`), naming every offending label at once.
pub fn check_labels(labels: &BTreeMap<String, String>) -> Result<(), FleetError> {
    let mut errs = Vec::new();
    if labels.len() > MAX_LABELS {
        errs.push(format!(
            "{} labels, at most {MAX_LABELS} are allowed: remove some with --remove KEY",
            labels.len()
        ));
    }
    let bad = |c: char| c.is_control() || c.is_whitespace() || ",|=!".contains(c);
    for (key, value) in labels {
        // Shown cut short: a label may be refused for being megabytes long.
        let (k, v) = (shown(key), shown(value));
        if key.is_empty() || key.len() > MAX_LABEL_KEY_BYTES || key.chars().any(bad) {
            errs.push(format!(
                "label key {k:?} must be 1-{MAX_LABEL_KEY_BYTES} bytes without spaces or any of , | = !"
            ));
        } else if key.starts_with(AGENT_LABEL_PREFIX) {
            errs.push(format!(
                "label key {k:?}: keys starting with {AGENT_LABEL_PREFIX:?} are the agent's own; \
                 to select on one, set it under another key"
            ));
        }
        if value.is_empty() || value.len() > MAX_LABEL_VALUE_BYTES || value.chars().any(bad) {
            errs.push(format!(
                "label {k}: value {v:?} must be 1-{MAX_LABEL_VALUE_BYTES} bytes without spaces or any of , | = !"
            ));
        }
    }
    if errs.is_empty() {
        Ok(())
    } else {
        Err(FleetError::BadLabels(errs.join("; ")))
    }
}

/// Sets and removes operator labels on a device, audited. A device that comes to match
/// a running rollout's selector this way joins it late when the plan takes late joiners
/// (`labels_changed_at_ms`). Returns the labels as they now are.
pub fn relabel(
    store: &mut Store,
    id: &str,
    set: &BTreeMap<String, String>,
    remove: &[String],
    by: &str,
    now_ms: u64,
) -> Result<BTreeMap<String, String>, FleetError> {
    let device = store
        .device(id)?
        .ok_or_else(|| StoreError::UnknownDevice(id.to_owned()))?;
    if let Some(k) = remove.iter().find(|k| set.contains_key(*k)) {
        return Err(FleetError::BadLabels(format!(
            "label {k:?} is both set and removed: give it once"
        )));
    }
    let mut labels = device.labels.clone();
    for k in remove {
        labels.remove(k);
    }
    labels.extend(set.iter().map(|(k, v)| (k.clone(), v.clone())));
    check_labels(&labels)?;
    if labels == device.labels {
        return Ok(labels);
    }
    let show = |l: &BTreeMap<String, String>| {
        l.iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",")
    };
    let event = DeviceEventRow {
        at_ms: now_ms,
        kind: "labels".into(),
        by: by.to_owned(),
        detail: format!(
            "labels {{{}}} -> {{{}}}",
            show(&device.labels),
            show(&labels)
        ),
    };
    store.set_device_labels(id, &labels, now_ms, &event)?;
    tracing::info!(device_id = id, by, "device relabelled");
    Ok(labels)
}

/// The identity `device enroll` hands out: the frame/MQTT key and a client certificate
/// (CN = device id) from the fleet CA. Both keys are secret.
pub struct Enrollment {
    pub device_id: DeviceId,
    pub device_key: DeviceKey,
    pub cert: crate::pki::Issued,
    /// Set for a replacement: where the replaced device's sequence numbers stopped.
    pub replaced: Option<ReplacedSeqs>,
}

pub fn enroll(
    app: &App,
    store: &mut Store,
    id: &str,
    labels: &BTreeMap<String, String>,
    now_ms: u64,
) -> Result<Enrollment, FleetError> {
    let device_id = DeviceId::new(id)?;
    if id == crate::pki::CONTROL_PLANE_IDENTITY {
        return Err(FleetError::ReservedId(id.to_owned()));
    }
    check_labels(labels)?;
    let mut key = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut key);
    let device_key = DeviceKey(key);
    // The certificate is issued inside the insert's transaction: if issuing fails, the
    // row is rolled back and the id stays free for another attempt.
    let cert = store.enroll_device_with(&device_id, &device_key, labels, now_ms, || {
        app.ca.issue_device(id, now_ms)
    })??;
    app.devices.set(
        device_id.clone(),
        DeviceEntry {
            key: device_key.clone(),
            decommissioned: false,
        },
    );
    tracing::info!(device_id = %device_id, "device enrolled");
    Ok(Enrollment {
        device_id,
        device_key,
        cert,
        replaced: None,
    })
}

/// Enrolls the replacement of a decommissioned device under its id (`device enroll
/// --replace`): a new key and certificate, `labels` or the old ones, the device's history
/// kept. The old certificate is retired (listed in the CRL for good) and the old key is
/// gone, so the replaced hardware stays locked out. Refused for an active device.
pub fn replace(
    app: &App,
    store: &mut Store,
    id: &str,
    labels: Option<&BTreeMap<String, String>>,
    by: &str,
    now_ms: u64,
) -> Result<Enrollment, FleetError> {
    let device_id = DeviceId::new(id)?;
    if let Some(l) = labels {
        check_labels(l)?;
    }
    let mut key = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut key);
    let device_key = DeviceKey(key);
    let event = DeviceEventRow {
        at_ms: now_ms,
        kind: "replaced".into(),
        by: by.to_owned(),
        detail: "re-enrolled for a replacement: new key and certificate, the old certificate \
                 revoked for good"
            .into(),
    };
    let (cert, seqs) =
        store.replace_device_with(&device_id, &device_key, labels, &event, || {
            app.ca.retire_device_cert(id)?;
            app.ca.issue_device(id, now_ms)
        })??;
    app.devices.set(
        device_id.clone(),
        DeviceEntry {
            key: device_key.clone(),
            decommissioned: false,
        },
    );
    app.ca.write_crl(&app.devices.decommissioned(), now_ms)?;
    tracing::info!(device_id = %device_id, by, "device re-enrolled for a replacement");
    Ok(Enrollment {
        device_id,
        device_key,
        cert,
        replaced: Some(seqs),
    })
}

/// Revokes a device at once: the embedded broker refuses its logins and cuts its open
/// session, ingest refuses its frames, and the CRL for external brokers lists its
/// certificate (`<data>/keys/crl.pem`; mosquitto reads it on SIGHUP).
pub fn decommission(
    app: &App,
    store: &mut Store,
    id: &str,
    by: &str,
    now_ms: u64,
) -> Result<(), FleetError> {
    let device_id = DeviceId::new(id)?;
    if !store.decommission_device(id)? {
        return Err(StoreError::UnknownDevice(id.to_owned()).into());
    }
    store.record_device_event(
        id,
        &DeviceEventRow {
            at_ms: now_ms,
            kind: "decommissioned".into(),
            by: by.to_owned(),
            detail: "decommissioned: key and certificate revoked".into(),
        },
    )?;
    let key = app.devices.key(&device_id);
    if let Some(key) = key {
        app.devices.set(
            device_id.clone(),
            DeviceEntry {
                key,
                decommissioned: true,
            },
        );
    }
    app.tls_sessions.kick(id);
    app.ca.write_crl(&app.devices.decommissioned(), now_ms)?;
    tracing::info!(device_id = %device_id, "device decommissioned; CRL rewritten");
    Ok(())
}

/// Splits `NAME@X.Y.Z`.
pub fn parse_model_ref(s: &str) -> Result<(&str, &str), FleetError> {
    s.split_once('@')
        .filter(|(n, v)| !n.is_empty() && !v.is_empty())
        .ok_or_else(|| FleetError::BadModelRef(s.to_owned()))
}

pub fn find_model(store: &Store, model: &str) -> Result<ModelRow, FleetError> {
    let (name, version) = parse_model_ref(model)?;
    store
        .model(name, version)?
        .ok_or_else(|| FleetError::UnknownModel(model.to_owned()))
}

/// The signed manifest of a published model, as devices receive it.
pub fn manifest_blob(model: &ModelRow) -> SignedBlob {
    SignedBlob {
        kind: SigKind::Manifest,
        key_id: parse_key_id(&model.key_id),
        payload: model.payload.clone(),
        signature: model.signature.clone(),
    }
}

/// Refuses a model whose deploy command could not fit the downlink limit (one published
/// before publish checked it): refused here, with the figures, rather than sent and
/// dropped by the outbox or a device.
pub fn check_deployable(model: &ModelRow) -> Result<(), FleetError> {
    use drover_protocol::envelope::{MAX_DOWNLINK_LEN, MAX_MANIFEST_LEN};
    if model.payload.len() > MAX_MANIFEST_LEN {
        return Err(FleetError::ManifestTooLarge {
            model: format!("{}@{}", model.name, model.version),
            len: model.payload.len(),
            max: MAX_MANIFEST_LEN,
            max_frame: MAX_DOWNLINK_LEN,
        });
    }
    Ok(())
}

/// Signs `action` for `device` with sequence `seq`; the row is what the store persists.
pub fn sign_command(
    app: &App,
    device: &DeviceId,
    seq: u64,
    now_ms: u64,
    rollout_id: Option<u64>,
    action: Action,
) -> CommandRow {
    let (kind, model_digest) = match &action {
        Action::Deploy { manifest, .. } => ("deploy", Some(manifest.digest())),
        Action::Rollback { to } => ("rollback", to.as_ref().map(|m| m.digest)),
        Action::Promote => ("promote", None),
        Action::Configure(_) => ("configure", None),
        Action::RollbackModel { to, .. } => ("rollback", to.as_ref().map(|m| m.digest)),
        Action::PromoteModel { .. } => ("promote", None),
        Action::RemoveModel { .. } => ("remove", None),
    };
    let expires_at_ms = app.command_expiry_ms(now_ms);
    let cmd = Command {
        target: device.clone(),
        seq,
        issued_at_ms: now_ms,
        expires_at_ms,
        rollout_id,
        action,
    };
    let blob = app.keys.current().signing.sign_command(&cmd);
    CommandRow {
        device: device.to_string(),
        seq,
        issued_at_ms: now_ms,
        expires_at_ms,
        kind: kind.into(),
        model_digest,
        key_id: blob.key_id.0,
        payload: blob.payload,
        signature: blob.signature,
    }
}

/// The signed blob a device receives for a stored command row.
pub fn command_blob(row: &CommandRow) -> SignedBlob {
    SignedBlob {
        kind: SigKind::Command,
        key_id: KeyId(row.key_id),
        payload: row.payload.clone(),
        signature: row.signature.clone(),
    }
}

/// Refuses `action` for a device whose negotiated protocol could not read it: the
/// control plane never signs a command a device would only refuse (or fail to decode).
pub fn check_protocol(store: &Store, device: &str, action: &Action) -> Result<(), FleetError> {
    let has = store.device_protocol(device)?;
    let needs = action.min_protocol();
    if needs > has {
        let what = match action.model() {
            Some(m) => format!("a command naming model slot {m}"),
            None => "this command".into(),
        };
        return Err(FleetError::ProtocolTooOld {
            device: device.to_owned(),
            what,
            needs,
            has,
        });
    }
    Ok(())
}

/// Refuses to send `model` to a device that could not load its file: a compiled artifact
/// to an agent that only loads ONNX (before protocol 3) or whose runtime is older than the
/// one that compiled it, or a plain ONNX file to an agent without the importer. A device
/// whose runtime is not known yet is let through: its agent checks again before download.
pub fn check_runtime(store: &Store, device: &str, model: &ModelRow) -> Result<(), FleetError> {
    let manifest = Manifest::decode(&model.payload).map_err(FleetError::BadManifest)?;
    check_runtime_for(store, device, model, manifest.artifact.as_ref())
}

/// [`check_runtime`] with the model's artifact already decoded (a rollout start checks
/// every target against one manifest).
fn check_runtime_for(
    store: &Store,
    device: &str,
    model: &ModelRow,
    artifact: Option<&Artifact>,
) -> Result<(), FleetError> {
    use crate::store::DeviceRuntime;
    let refused = |reason: String| FleetError::CannotLoad {
        device: device.to_owned(),
        model: format!("{}@{}", model.name, model.version),
        reason,
    };
    match (store.device_runtime(device)?, artifact) {
        (DeviceRuntime::Reported(r), artifact) => r.check(artifact).map_err(refused),
        (DeviceRuntime::Onnx { protocol }, Some(a)) => Err(refused(format!(
            "its agent speaks protocol {protocol} and loads plain ONNX files only, and the model \
             is compiled ({} {}); upgrade the agent, or publish the model again with \
             `--format onnx`",
            a.format, a.format_version
        ))),
        _ => Ok(()),
    }
}

/// For a rollout's start: why some of `targets` could not load the model's file, naming
/// them (at most five) and the first reason; `None` when every one can.
pub fn check_all_load(
    s: &Store,
    targets: &[String],
    model: &ModelRow,
) -> Result<Option<String>, FleetError> {
    let manifest = Manifest::decode(&model.payload).map_err(FleetError::BadManifest)?;
    let mut refused = Vec::new();
    for device in targets {
        match check_runtime_for(s, device, model, manifest.artifact.as_ref()) {
            Ok(()) => {}
            Err(FleetError::CannotLoad { reason, .. }) => refused.push((device, reason)),
            Err(e) => return Err(e),
        }
    }
    let Some((_, reason)) = refused.first() else {
        return Ok(None);
    };
    let names: Vec<&str> = refused.iter().take(5).map(|(d, _)| d.as_str()).collect();
    Ok(Some(format!(
        "{} of {} target devices cannot run {}@{} ({}{}): {reason}; nothing was started",
        refused.len(),
        targets.len(),
        model.name,
        model.version,
        names.join(", "),
        if refused.len() > 5 { ", …" } else { "" },
    )))
}

/// Refuses to deploy `model` to a protocol-1 device (one model) that holds a model of
/// another name, unless `replace`: that deploy used to replace it silently.
pub fn check_one_model(
    store: &Store,
    device: &str,
    model: &ModelRow,
    replace: bool,
) -> Result<(), FleetError> {
    if replace || store.device_protocol(device)? >= 2 {
        return Ok(());
    }
    let Some(d) = store.device(device)? else {
        return Ok(());
    };
    match d.active_model {
        Some(active) if parse_model_ref(&active).is_ok_and(|(n, _)| n != model.name) => {
            Err(FleetError::WouldReplace {
                device: device.to_owned(),
                active,
                model: format!("{}@{}", model.name, model.version),
            })
        }
        _ => Ok(()),
    }
}

/// Issues a signed command removing model slot `name` from a device (protocol 2): the
/// agent unloads it and deletes its files.
pub fn remove(
    app: &App,
    store: &mut Store,
    device: &str,
    name: &str,
    now_ms: u64,
) -> Result<(CommandRow, SignedBlob), FleetError> {
    let target = DeviceId::new(device)?;
    let action = Action::RemoveModel {
        model: name.to_owned(),
    };
    check_protocol(store, device, &action)?;
    let slots = store.device_slots(device)?;
    if !slots.is_empty() && !slots.iter().any(|s| s.name == name) {
        let held: Vec<&str> = slots.iter().map(|s| s.name.as_str()).collect();
        return Err(FleetError::NoSuchSlot {
            device: device.to_owned(),
            model: name.to_owned(),
            held: held.join(", "),
        });
    }
    let built = store.issue_command(device, |seq| {
        Ok::<_, std::convert::Infallible>(sign_command(
            app,
            &target,
            seq,
            now_ms,
            None,
            action.clone(),
        ))
    })?;
    let row = match built {
        Ok(row) => row,
        Err(never) => match never {},
    };
    tracing::info!(
        device_id = device,
        model = name,
        seq = row.seq,
        "remove command issued"
    );
    let blob = command_blob(&row);
    Ok((row, blob))
}

/// Issues a signed deploy command with the device's next sequence number, persisted
/// (synchronous=FULL) before it is returned for publishing.
pub fn deploy(
    app: &App,
    store: &mut Store,
    device: &str,
    model: &ModelRow,
    mode: DeployMode,
    now_ms: u64,
) -> Result<(CommandRow, SignedBlob), FleetError> {
    let target = DeviceId::new(device)?;
    check_deployable(model)?;
    check_runtime(store, device, model)?;
    let manifest = manifest_blob(model);
    let built = store.issue_command(device, |seq| {
        Ok::<_, std::convert::Infallible>(sign_command(
            app,
            &target,
            seq,
            now_ms,
            None,
            Action::Deploy {
                manifest: manifest.clone(),
                mode,
            },
        ))
    })?;
    let row = match built {
        Ok(row) => row,
        Err(never) => match never {},
    };
    let blob = command_blob(&row);
    tracing::info!(device_id = device, model = %model.name, version = %model.version, seq = row.seq, "deploy command issued");
    Ok((row, blob))
}

/// Parses a key id printed as 16 hex digits.
pub fn parse_key_id(s: &str) -> KeyId {
    let mut id = [0u8; 8];
    for (i, b) in id.iter_mut().enumerate() {
        *b = s
            .get(2 * i..2 * i + 2)
            .and_then(|h| u8::from_str_radix(h, 16).ok())
            .unwrap_or(0);
    }
    KeyId(id)
}
