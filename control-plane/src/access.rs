//! Who may call the API and what they may do: per-user bearer tokens with a role
//! (viewer < deployer < admin), stored hashed, checked against an in-memory table that
//! `drover token create|revoke` keep current; and the rule that gives every API route the
//! role it needs.
//!
//! Tokens are 32 random bytes (`drover_` + 64 hex characters). The store keeps only their
//! SHA-256 (a token has the entropy of a key, so a slow password hash adds nothing), and
//! a request is matched by hashing what it presents. The bootstrap token in
//! `<data>/api-token` (the one `--data-dir` reads) is an admin named `local-admin`; its
//! callers may still name themselves with `?by=` for the audit, as before named tokens.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use rand::RngCore as _;
use sha2::{Digest as _, Sha256};

/// What a token may do; each role may do everything the ones before it may.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    /// Reads everything (devices, models, rollouts, drift, jobs); changes nothing.
    Viewer,
    /// Viewer, and ships models: publish, deploy, label, start and operate rollouts,
    /// run and cancel training.
    Deployer,
    /// Deployer, and manages the fleet and access: enroll, decommission, keys, tokens,
    /// integration identities, the audit log.
    Admin,
}

impl Role {
    pub const ALL: [Role; 3] = [Role::Viewer, Role::Deployer, Role::Admin];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Deployer => "deployer",
            Role::Admin => "admin",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.as_str() == s)
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The authenticated caller of a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    pub name: String,
    pub role: Role,
    /// The bootstrap token from `<data>/api-token`, shared by whoever can read that file.
    pub bootstrap: bool,
}

impl Identity {
    /// Who a change's records (rollout reports, device events) name: the token's name;
    /// for the shared bootstrap token, the name its caller gives (`?by=`, `--by`), its
    /// word as before named tokens. The API's audit log always records the identity.
    pub fn actor(&self, claimed: Option<&str>) -> String {
        match claimed.map(str::trim) {
            Some(c) if self.bootstrap && is_name(c) => c.to_owned(),
            _ => self.name.clone(),
        }
    }
}

/// The bootstrap token's identity.
pub const BOOTSTRAP_NAME: &str = "local-admin";
/// Every token starts with this, so one pasted in a log or a chat is recognisable.
pub const TOKEN_PREFIX: &str = "drover_";

/// A token name: 1-64 of `[A-Za-z0-9._@-]`.
pub fn is_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '@' | '-'))
}

/// A new secret token and the hash the store keeps.
pub fn new_token() -> (String, [u8; 32]) {
    let mut b = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut b);
    let token = format!("{TOKEN_PREFIX}{}", drover_protocol::topics::hex32(&b));
    let hash = hash_token(&token);
    (token, hash)
}

pub fn hash_token(token: &str) -> [u8; 32] {
    Sha256::digest(token.trim().as_bytes()).into()
}

/// The tokens the API accepts, by hash. Cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct Tokens {
    by_hash: Arc<RwLock<HashMap<[u8; 32], Identity>>>,
}

impl Tokens {
    /// The bootstrap token plus the store's active tokens (`(name, role, hash)`).
    pub fn new(
        bootstrap: &str,
        active: impl IntoIterator<Item = (String, Role, [u8; 32])>,
    ) -> Self {
        let mut map: HashMap<[u8; 32], Identity> = active
            .into_iter()
            .map(|(name, role, hash)| {
                let id = Identity {
                    name,
                    role,
                    bootstrap: false,
                };
                (hash, id)
            })
            .collect();
        map.insert(
            hash_token(bootstrap),
            Identity {
                name: BOOTSTRAP_NAME.into(),
                role: Role::Admin,
                bootstrap: true,
            },
        );
        Tokens {
            by_hash: Arc::new(RwLock::new(map)),
        }
    }

    pub fn identify(&self, token: &str) -> Option<Identity> {
        let hash = hash_token(token);
        self.read().get(&hash).cloned()
    }

    /// The identity of a token known by its hash only (a console session keeps the
    /// hash, never the token, and is re-checked on every request, so revocation ends it).
    pub fn identify_hash(&self, hash: &[u8; 32]) -> Option<Identity> {
        self.read().get(hash).cloned()
    }

    pub fn insert(&self, hash: [u8; 32], name: &str, role: Role) {
        let id = Identity {
            name: name.to_owned(),
            role,
            bootstrap: false,
        };
        self.write().insert(hash, id);
    }

    /// Forgets every token named `name` (revocation takes effect on the next request).
    pub fn remove(&self, name: &str) {
        self.write().retain(|_, id| id.bootstrap || id.name != name);
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<[u8; 32], Identity>> {
        self.by_hash.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<[u8; 32], Identity>> {
        self.by_hash.write().unwrap_or_else(|e| e.into_inner())
    }
}

/// The role a request needs, from its method and its route's pattern (`/v1/devices/{id}`).
/// Reads need a viewer; shipping models a deployer; the fleet, keys and access an admin.
/// A route not listed needs an admin, so a new route is closed until it is classified.
pub fn required_role(method: &axum::http::Method, route: &str) -> Role {
    if method == axum::http::Method::GET || method == axum::http::Method::HEAD {
        return match route {
            "/v1/tokens" | "/v1/audit" | "/v1/integrations" => Role::Admin,
            _ => Role::Viewer,
        };
    }
    match route {
        "/v1/models"
        | "/v1/devices/{id}/deploy"
        | "/v1/devices/{id}/remove"
        | "/v1/devices/{id}/labels"
        | "/v1/rollouts"
        | "/v1/rollouts/preview"
        | "/v1/rollouts/{id}/{op}" => Role::Deployer,
        r if r.starts_with("/v1/train/") => Role::Deployer,
        _ => Role::Admin,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::Method;

    #[test]
    fn roles_follow_the_route_and_unlisted_routes_need_an_admin() {
        assert_eq!(required_role(&Method::GET, "/v1/devices"), Role::Viewer);
        assert_eq!(required_role(&Method::GET, "/v1/tokens"), Role::Admin);
        assert_eq!(required_role(&Method::GET, "/v1/integrations"), Role::Admin);
        assert_eq!(
            required_role(&Method::POST, "/v1/integrations"),
            Role::Admin
        );
        assert_eq!(
            required_role(&Method::POST, "/v1/integrations/{name}/revoke"),
            Role::Admin
        );
        assert_eq!(required_role(&Method::POST, "/v1/rollouts"), Role::Deployer);
        assert_eq!(
            required_role(&Method::POST, "/v1/rollouts/{id}/{op}"),
            Role::Deployer
        );
        assert_eq!(required_role(&Method::POST, "/v1/devices"), Role::Admin);
        assert_eq!(
            required_role(&Method::POST, "/v1/devices/{id}/decommission"),
            Role::Admin
        );
        assert_eq!(required_role(&Method::POST, "/v1/new-thing"), Role::Admin);
        assert!(Role::Viewer < Role::Deployer && Role::Deployer < Role::Admin);
    }

    #[test]
    fn tokens_are_matched_by_hash_and_revocation_forgets_them() {
        let (bootstrap, _) = new_token();
        let (alice, alice_hash) = new_token();
        assert!(alice.starts_with(TOKEN_PREFIX) && alice.len() == TOKEN_PREFIX.len() + 64);
        let t = Tokens::new(&bootstrap, [("alice".into(), Role::Viewer, alice_hash)]);
        let id = t.identify(&alice).unwrap();
        assert_eq!(
            (id.name.as_str(), id.role, id.bootstrap),
            ("alice", Role::Viewer, false)
        );
        assert_eq!(
            id.actor(Some("mallory")),
            "alice",
            "a named token cannot claim another name"
        );
        let admin = t.identify(&bootstrap).unwrap();
        assert_eq!((admin.role, admin.bootstrap), (Role::Admin, true));
        assert_eq!(admin.actor(Some("bob")), "bob");
        assert_eq!(admin.actor(Some("not a name")), BOOTSTRAP_NAME);
        assert_eq!(admin.actor(None), BOOTSTRAP_NAME);
        assert!(t.identify("drover_0000").is_none());
        t.remove("alice");
        assert!(t.identify(&alice).is_none());
        t.remove(BOOTSTRAP_NAME);
        assert!(
            t.identify(&bootstrap).is_some(),
            "the bootstrap token is not revoked by name"
        );
    }
}
