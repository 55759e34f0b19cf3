//! The device cache: every enrolled device's key and standing, loaded from the store at
//! start and updated by enroll and decommission, so the broker's login hook and ingest's
//! MAC check never wait on SQLite; the names of the active read-only integrations
//! (`drover integration create`), which the TLS front admits. Also the broker login rules.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, RwLock};

use drover_host::ct_eq;
use drover_protocol::topics;
use drover_protocol::{DeviceId, DeviceKey};

use crate::metrics::Metrics;

/// A device as the broker and ingest see it.
#[derive(Clone, Debug)]
pub struct DeviceEntry {
    pub key: DeviceKey,
    pub decommissioned: bool,
}

/// Who may log in to the embedded broker, besides enrolled devices.
#[derive(Clone, Debug, Default)]
pub struct BrokerLogins {
    /// The control plane's own login (embedded broker only).
    pub control_plane: Option<(String, String)>,
    /// Embedded broker behind the mutual-TLS front: the per-process key of the logins
    /// the front vouches for. rumqttd then accepts device logins only with this token,
    /// so its private loopback port cannot be used to skip the certificate check.
    pub front_key: Option<DeviceKey>,
}

/// Cheap to clone; every clone sees the same devices.
#[derive(Clone, Debug)]
pub struct Devices {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    map: RwLock<HashMap<DeviceId, DeviceEntry>>,
    /// Active integration names (their certificates' CN is `integration@<name>`).
    integrations: RwLock<HashSet<String>>,
    logins: BrokerLogins,
    metrics: Arc<Metrics>,
}

impl Devices {
    pub fn new(
        entries: impl IntoIterator<Item = (DeviceId, DeviceEntry)>,
        logins: BrokerLogins,
        metrics: Arc<Metrics>,
    ) -> Self {
        let d = Devices {
            inner: Arc::new(Inner {
                map: RwLock::new(HashMap::new()),
                integrations: RwLock::new(HashSet::new()),
                logins,
                metrics,
            }),
        };
        for (id, e) in entries {
            d.set(id, e);
        }
        d
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<DeviceId, DeviceEntry>> {
        self.inner.map.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds or replaces a device; keeps the enrolled-devices gauge current.
    pub fn set(&self, id: DeviceId, entry: DeviceEntry) {
        let mut map = self.inner.map.write().unwrap_or_else(|p| p.into_inner());
        map.insert(id, entry);
        let n = map.values().filter(|d| !d.decommissioned).count();
        self.inner.metrics.devices_enrolled.store(n as u64, Relaxed);
    }

    /// A device's entry, decommissioned or not (`None`: never enrolled).
    pub fn entry(&self, id: &DeviceId) -> Option<DeviceEntry> {
        self.read().get(id).cloned()
    }

    /// An active device's key (`None`: unknown or decommissioned).
    pub fn key(&self, id: &DeviceId) -> Option<DeviceKey> {
        self.read()
            .get(id)
            .filter(|d| !d.decommissioned)
            .map(|d| d.key.clone())
    }

    /// Marks an integration active (created) or not (revoked).
    pub fn set_integration(&self, name: &str, active: bool) {
        let mut set = self
            .inner
            .integrations
            .write()
            .unwrap_or_else(|p| p.into_inner());
        if active {
            set.insert(name.to_owned());
        } else {
            set.remove(name);
        }
    }

    /// Whether the integration `name` exists and is not revoked.
    pub fn integration_active(&self, name: &str) -> bool {
        self.inner
            .integrations
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains(name)
    }

    /// Ids of decommissioned devices, sorted (for the CRL).
    pub fn decommissioned(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .read()
            .iter()
            .filter(|(_, d)| d.decommissioned)
            .map(|(id, _)| id.to_string())
            .collect();
        v.sort();
        v
    }

    /// Broker authentication: the control plane's own login, or username = device id =
    /// MQTT client id and password = that device's derived MQTT password. Decommissioned:
    /// refused. The client id names the broker session (queued commands, the live
    /// connection), so a device may only use its own: another device's would take that
    /// session over. Behind the TLS front, a device login must carry the front's token
    /// instead (the front checked certificate, username, client id and password before
    /// issuing it).
    pub fn broker_login_ok(&self, client_id: &str, user: &str, pass: &str) -> bool {
        let logins = &self.inner.logins;
        if let Some((u, p)) = &logins.control_plane {
            if user == u {
                return ct_eq(pass.as_bytes(), p.as_bytes());
            }
        }
        if client_id != user {
            self.refused(user, "client id is not the device id");
            return false;
        }
        // An integration logs in only through the TLS front, which vouched for its
        // certificate; without a front (plaintext development mode) it has no login.
        if let Some(name) = user.strip_prefix(crate::pki::INTEGRATION_CN_PREFIX) {
            let ok = logins.front_key.is_some()
                && self.integration_active(name)
                && ct_eq(pass.as_bytes(), self.front_token(user).as_bytes());
            if !ok {
                self.refused(user, "not an active integration behind the TLS front");
            }
            return ok;
        }
        let ok = match &logins.front_key {
            Some(_) => {
                self.is_active(user) && ct_eq(pass.as_bytes(), self.front_token(user).as_bytes())
            }
            None => self.password_ok(user, pass),
        };
        if !ok {
            self.refused(user, "wrong password, or not an enrolled, active device");
        }
        ok
    }

    /// Counts a refused login; logs it once per username and interval.
    fn refused(&self, user: &str, why: &'static str) {
        let m = &self.inner.metrics;
        m.broker_auth_refused.fetch_add(1, Relaxed);
        let user: String = user.chars().take(100).collect();
        if let Some(suppressed) = m.login_log.due(&user, std::time::Instant::now()) {
            tracing::warn!(device_id = %user, why, suppressed, "broker refused a login");
        }
    }

    fn is_active(&self, user: &str) -> bool {
        DeviceId::new(user)
            .ok()
            .is_some_and(|id| self.key(&id).is_some())
    }

    /// Username = an enrolled, active device id and password = its derived MQTT password.
    pub fn password_ok(&self, user: &str, pass: &str) -> bool {
        DeviceId::new(user).ok().is_some_and(|id| {
            self.read().get(&id).is_some_and(|d| {
                !d.decommissioned && ct_eq(pass.as_bytes(), d.key.mqtt_password().as_bytes())
            })
        })
    }

    /// The password the TLS front substitutes for a device it has authenticated.
    pub fn front_token(&self, user: &str) -> String {
        match &self.inner.logins.front_key {
            Some(k) => topics::hex32(&k.mac(format!("drover-tls-front-v1:{user}").as_bytes())),
            None => String::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn devices(front: bool) -> Devices {
        let logins = BrokerLogins {
            control_plane: Some(("cp".into(), "cp-secret".into())),
            front_key: front.then_some(DeviceKey([7; 32])),
        };
        let entry = |k: u8, decommissioned| DeviceEntry {
            key: DeviceKey([k; 32]),
            decommissioned,
        };
        Devices::new(
            [
                (DeviceId::new("gw-1").unwrap(), entry(1, false)),
                (DeviceId::new("gw-2").unwrap(), entry(2, true)),
            ],
            logins,
            Arc::new(Metrics::default()),
        )
    }

    #[test]
    fn broker_logins_follow_enrollment_and_decommission() {
        let d = devices(false);
        let pw = |k: u8| DeviceKey([k; 32]).mqtt_password();
        assert!(d.broker_login_ok("drover-cp-1", "cp", "cp-secret"));
        assert!(!d.broker_login_ok("drover-cp-1", "cp", "wrong"));
        assert!(d.broker_login_ok("gw-1", "gw-1", &pw(1)));
        assert!(
            !d.broker_login_ok("gw-1", "gw-1", &pw(2)),
            "another device's password"
        );
        assert!(!d.broker_login_ok("gw-2", "gw-2", &pw(2)), "decommissioned");
        assert!(!d.broker_login_ok("gw-9", "gw-9", &pw(1)), "unknown");
        assert_eq!(d.decommissioned(), vec!["gw-2".to_string()]);
        assert_eq!(d.inner.metrics.devices_enrolled.load(Relaxed), 1);
    }

    #[test]
    fn behind_the_tls_front_only_the_front_token_logs_a_device_in() {
        let d = devices(true);
        let pw = DeviceKey([1; 32]).mqtt_password();
        assert!(
            !d.broker_login_ok("gw-1", "gw-1", &pw),
            "the device password skips the front"
        );
        assert!(d.broker_login_ok("gw-1", "gw-1", &d.front_token("gw-1")));
        assert!(!d.broker_login_ok("gw-1", "gw-1", &d.front_token("gw-3")));
        assert!(
            !d.broker_login_ok("gw-2", "gw-2", &d.front_token("gw-2")),
            "decommissioned"
        );
        assert!(
            !d.broker_login_ok("gw-3", "gw-1", &d.front_token("gw-1")),
            "another client id behind the front"
        );
    }

    #[test]
    fn an_integration_logs_in_only_behind_the_front_while_active() {
        let id = "integration@node-red";
        for front in [false, true] {
            let d = devices(front);
            d.set_integration("node-red", true);
            let token = d.front_token(id);
            assert_eq!(d.broker_login_ok(id, id, &token), front, "front {front}");
            assert!(!d.broker_login_ok(id, id, ""), "front {front}");
            assert!(!d.broker_login_ok("gw-1", id, &token), "another client id");
            d.set_integration("node-red", false);
            assert!(!d.broker_login_ok(id, id, &token), "revoked");
        }
    }

    #[test]
    fn a_device_login_with_another_devices_client_id_is_refused() {
        let d = devices(false);
        let pw = DeviceKey([1; 32]).mqtt_password();
        // gw-1's own credentials cannot open (take over) gw-3's session.
        assert!(!d.broker_login_ok("gw-3", "gw-1", &pw));
        assert!(!d.broker_login_ok("", "gw-1", &pw));
        assert!(d.broker_login_ok("gw-1", "gw-1", &pw));
        assert_eq!(d.inner.metrics.broker_auth_refused.load(Relaxed), 2);
    }
}
