//! The fleet CA (rcgen): device client certificates (CN = device id), the embedded broker's
//! server certificate, the control plane's own client identity for external brokers, and
//! the CRL of decommissioned devices.
//!
//! Files, under `<data>/keys/` beside the signing keys (private keys 0600, refused if
//! readable by others, like every key file): `ca.key`, `ca.pem`, `broker.key`,
//! `broker.pem`, `control-plane.key`, `control-plane.pem`, `crl.pem`, and `issued/<id>.pem`
//! (each device's certificate, public, kept so its serial can be revoked).
//!
//! The CA key is ECDSA P-256: every TLS stack the fleet meets (rustls/webpki, mosquitto's
//! OpenSSL, EMQX) verifies it, and rcgen signs it with ring, the provider rustls already uses.

use std::fs;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, KeyIdMethod, KeyPair, KeyUsagePurpose, RevocationReason,
    RevokedCertParams, SanType, SerialNumber, PKCS_ECDSA_P256_SHA256,
};
use time::OffsetDateTime;

use crate::keys::{read_private, write_private, KeyError};

pub const CA_KEY_FILE: &str = "ca.key";
pub const CA_CERT_FILE: &str = "ca.pem";
pub const BROKER_KEY_FILE: &str = "broker.key";
pub const BROKER_CERT_FILE: &str = "broker.pem";
pub const CP_KEY_FILE: &str = "control-plane.key";
pub const CP_CERT_FILE: &str = "control-plane.pem";
pub const CRL_FILE: &str = "crl.pem";
const ISSUED_DIR: &str = "issued";
/// Under `issued/`: certificates of replaced devices and revoked integrations, revoked
/// for good.
const RETIRED_DIR: &str = "retired";
/// Under `issued/`: integration certificates, `<name>.pem` (a directory, so no device id,
/// whose files are `issued/<id>.pem`, can collide with one).
const INTEGRATION_DIR: &str = "integration";
/// The CN prefix of integration identities. `@` is not allowed in a device id, so an
/// integration's certificate can never pass for a device's (nor its session for one). (Not
/// `/`: rumqttd refuses client ids with `+ $ # /`, and the CN is the client id.)
pub const INTEGRATION_CN_PREFIX: &str = "integration@";
/// How long an integration certificate is valid.
pub const INTEGRATION_CERT_VALID_DAYS: u64 = 365;
/// The control plane's certificate identity (CN) on an external broker. No device may
/// be enrolled under this id (it would inherit the control plane's ACL).
pub const CONTROL_PLANE_IDENTITY: &str = "drover-control-plane";
const DAY_MS: u64 = 86_400_000;
pub const CA_VALID_DAYS: u64 = 10 * 365;
pub const DEVICE_CERT_VALID_DAYS: u64 = 2 * 365;
pub const CRL_VALID_DAYS: u64 = 365;
/// Devices and brokers may disagree about the time by this much.
const SKEW_MS: u64 = 10 * 60 * 1000;

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("{path} is not a valid PEM certificate or key: {reason}")]
    BadFile { path: PathBuf, reason: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> PkiError + '_ {
    move |source| PkiError::Io {
        path: path.to_owned(),
        source,
    }
}

fn at(ms: u64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp((ms / 1000) as i64).unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

fn random_serial() -> SerialNumber {
    use rand::RngCore as _;
    let mut b = [0u8; 16];
    rand::rngs::OsRng.fill_bytes(&mut b);
    // Positive and non-zero: some verifiers refuse negative serials.
    b[0] = (b[0] & 0x7f) | 0x01;
    SerialNumber::from_slice(&b)
}

/// A certificate and its private key as PEM. The key is secret.
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
    pub not_after_ms: u64,
}

impl std::fmt::Debug for Issued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issued")
            .field("not_after_ms", &self.not_after_ms)
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

/// The fleet CA, loaded for signing.
pub struct FleetCa {
    dir: PathBuf,
    cert: rcgen::Certificate,
    key: KeyPair,
    pem: String,
}

impl std::fmt::Debug for FleetCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FleetCa").field("dir", &self.dir).finish()
    }
}

fn ca_params(now_ms: u64) -> CertificateParams {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "Drover fleet CA");
    dn.push(DnType::OrganizationName, "Drover");
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p.not_before = at(now_ms.saturating_sub(SKEW_MS));
    p.not_after = at(now_ms.saturating_add(CA_VALID_DAYS * DAY_MS));
    p.serial_number = Some(random_serial());
    p.key_identifier_method = KeyIdMethod::Sha256;
    p
}

impl FleetCa {
    /// Loads the CA from `<data>/keys/`, creating it (and the broker and control-plane
    /// identities) on first use.
    pub fn load_or_init(data_dir: &Path, now_ms: u64) -> Result<Self, PkiError> {
        let dir = data_dir.join("keys");
        fs::create_dir_all(&dir).map_err(io(&dir))?;
        let key_path = dir.join(CA_KEY_FILE);
        let cert_path = dir.join(CA_CERT_FILE);
        if !key_path.exists() {
            let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
            let cert = ca_params(now_ms).self_signed(&key)?;
            write_private(&cert_path, cert.pem().as_bytes())?;
            // The key last: its presence marks a complete CA.
            write_private(&key_path, key.serialize_pem().as_bytes())?;
            tracing::info!(path = %cert_path.display(), "fleet CA created");
        }
        let key_pem = String::from_utf8_lossy(&read_private(&key_path)?).into_owned();
        let key = KeyPair::from_pem(&key_pem).map_err(|e| PkiError::BadFile {
            path: key_path.clone(),
            reason: e.to_string(),
        })?;
        let pem = fs::read_to_string(&cert_path).map_err(io(&cert_path))?;
        let params = CertificateParams::from_ca_cert_pem(&pem).map_err(|e| PkiError::BadFile {
            path: cert_path.clone(),
            reason: e.to_string(),
        })?;
        // Re-creating the certificate object with the same name and key yields an issuer
        // whose signatures verify against the CA certificate on disk.
        let cert = params.self_signed(&key)?;
        let ca = FleetCa {
            dir,
            cert,
            key,
            pem,
        };
        if !ca.dir.join(CP_KEY_FILE).exists() {
            let cp = ca.issue_client(CONTROL_PLANE_IDENTITY, now_ms, CA_VALID_DAYS)?;
            write_private(&ca.dir.join(CP_CERT_FILE), cp.cert_pem.as_bytes())?;
            write_private(&ca.dir.join(CP_KEY_FILE), cp.key_pem.as_bytes())?;
        }
        Ok(ca)
    }

    pub fn ca_pem(&self) -> &str {
        &self.pem
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A client certificate with CN = `identity` (clientAuth only).
    pub fn issue_client(
        &self,
        identity: &str,
        now_ms: u64,
        valid_days: u64,
    ) -> Result<Issued, PkiError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut p = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, identity);
        p.distinguished_name = dn;
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let not_after_ms = now_ms.saturating_add(valid_days.saturating_mul(DAY_MS));
        p.not_before = at(now_ms.saturating_sub(SKEW_MS));
        p.not_after = at(not_after_ms);
        p.serial_number = Some(random_serial());
        p.use_authority_key_identifier_extension = true;
        let cert = p.signed_by(&key, &self.cert, &self.key)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            not_after_ms,
        })
    }

    /// A client certificate for a device, recorded under `issued/` for revocation.
    pub fn issue_device(&self, device: &str, now_ms: u64) -> Result<Issued, PkiError> {
        let issued = self.issue_client(device, now_ms, DEVICE_CERT_VALID_DAYS)?;
        let dir = self.dir.join(ISSUED_DIR);
        fs::create_dir_all(&dir).map_err(io(&dir))?;
        write_private(
            &dir.join(format!("{device}.pem")),
            issued.cert_pem.as_bytes(),
        )?;
        Ok(issued)
    }

    /// A client certificate for a read-only integration (CN `integration@<name>`),
    /// recorded under `issued/integration/` for revocation.
    pub fn issue_integration(&self, name: &str, now_ms: u64) -> Result<Issued, PkiError> {
        let identity = format!("{INTEGRATION_CN_PREFIX}{name}");
        let issued = self.issue_client(&identity, now_ms, INTEGRATION_CERT_VALID_DAYS)?;
        let dir = self.dir.join(ISSUED_DIR).join(INTEGRATION_DIR);
        fs::create_dir_all(&dir).map_err(io(&dir))?;
        write_private(&dir.join(format!("{name}.pem")), issued.cert_pem.as_bytes())?;
        Ok(issued)
    }

    /// Revokes an integration's certificate for good: moved to `issued/retired/`, which
    /// every CRL lists (so the name may be issued a new one).
    pub fn retire_integration_cert(&self, name: &str) -> Result<(), PkiError> {
        let path = self
            .dir
            .join(ISSUED_DIR)
            .join(INTEGRATION_DIR)
            .join(format!("{name}.pem"));
        self.retire(&path, &format!("integration.{name}"))
    }

    /// A server certificate for the broker, valid for `hosts` (names or IP addresses).
    pub fn issue_server(&self, hosts: &[String], now_ms: u64) -> Result<Issued, PkiError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut p = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(
            DnType::CommonName,
            hosts.first().cloned().unwrap_or_default(),
        );
        p.distinguished_name = dn;
        p.subject_alt_names = hosts
            .iter()
            .map(|h| match h.parse::<std::net::IpAddr>() {
                Ok(ip) => Ok(SanType::IpAddress(ip)),
                Err(_) => h.clone().try_into().map(SanType::DnsName),
            })
            .collect::<Result<_, _>>()?;
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let not_after_ms = now_ms.saturating_add(DEVICE_CERT_VALID_DAYS * DAY_MS);
        p.not_before = at(now_ms.saturating_sub(SKEW_MS));
        p.not_after = at(not_after_ms);
        p.serial_number = Some(random_serial());
        p.use_authority_key_identifier_extension = true;
        let cert = p.signed_by(&key, &self.cert, &self.key)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            not_after_ms,
        })
    }

    /// The embedded broker's server identity for exactly `hosts`: issued on first use and
    /// again whenever the set of names changes (one added, or one no longer advertised).
    pub fn broker_identity(
        &self,
        hosts: &[String],
        now_ms: u64,
    ) -> Result<(PathBuf, PathBuf), PkiError> {
        let cert = self.dir.join(BROKER_CERT_FILE);
        let key = self.dir.join(BROKER_KEY_FILE);
        let want: std::collections::BTreeSet<String> =
            hosts.iter().map(|h| h.to_ascii_lowercase()).collect();
        let same = fs::read_to_string(&cert)
            .ok()
            .and_then(|pem| cert_hosts(&pem))
            .is_some_and(|have| {
                have.iter()
                    .map(|h| h.to_ascii_lowercase())
                    .collect::<std::collections::BTreeSet<_>>()
                    == want
            });
        if !same || !key.exists() {
            tracing::info!(names = ?hosts, "broker certificate issued");
            let s = self.issue_server(hosts, now_ms)?;
            write_private(&cert, s.cert_pem.as_bytes())?;
            write_private(&key, s.key_pem.as_bytes())?;
        }
        Ok((cert, key))
    }

    /// Moves a device's certificate to `issued/retired/<id>.<serial>.pem` before its
    /// replacement gets one: the CRL lists retired certificates for good, so the replaced
    /// hardware stays locked out of an external broker (it still holds a CA-signed
    /// certificate with the same CN) after its id is active again.
    pub fn retire_device_cert(&self, device: &str) -> Result<(), PkiError> {
        let path = self.dir.join(ISSUED_DIR).join(format!("{device}.pem"));
        self.retire(&path, device)
    }

    fn retire(&self, path: &Path, stem: &str) -> Result<(), PkiError> {
        let Ok(pem) = fs::read_to_string(path) else {
            return Ok(()); // enrolled before the CA existed: it never had a certificate
        };
        let serial = cert_serial(&pem).ok_or_else(|| PkiError::BadFile {
            path: path.to_owned(),
            reason: "no certificate".into(),
        })?;
        let hex: String = serial.iter().map(|b| format!("{b:02x}")).collect();
        let dir = self.dir.join(ISSUED_DIR).join(RETIRED_DIR);
        fs::create_dir_all(&dir).map_err(io(&dir))?;
        write_private(&dir.join(format!("{stem}.{hex}.pem")), pem.as_bytes())?;
        fs::remove_file(path).map_err(io(path))?;
        Ok(())
    }

    /// Rewrites `crl.pem` listing the certificates of `revoked` devices and every retired
    /// certificate; returns its path.
    pub fn write_crl(&self, revoked: &[String], now_ms: u64) -> Result<PathBuf, PkiError> {
        let issued = self.dir.join(ISSUED_DIR);
        let mut paths: Vec<PathBuf> = revoked
            .iter()
            .map(|device| issued.join(format!("{device}.pem")))
            .collect();
        if let Ok(entries) = fs::read_dir(issued.join(RETIRED_DIR)) {
            let mut retired: Vec<PathBuf> = entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "pem"))
                .collect();
            retired.sort();
            paths.extend(retired);
        }
        let mut revoked_certs = Vec::new();
        for path in paths {
            let Ok(pem) = fs::read_to_string(&path) else {
                continue; // enrolled before the CA existed: it never had a certificate
            };
            let serial = cert_serial(&pem).ok_or_else(|| PkiError::BadFile {
                path: path.clone(),
                reason: "no certificate".into(),
            })?;
            revoked_certs.push(RevokedCertParams {
                serial_number: SerialNumber::from_slice(&serial),
                revocation_time: at(now_ms),
                reason_code: Some(RevocationReason::CessationOfOperation),
                invalidity_date: None,
            });
        }
        let crl = CertificateRevocationListParams {
            this_update: at(now_ms.saturating_sub(SKEW_MS)),
            // OpenSSL-based brokers refuse every client once the CRL they loaded is past
            // nextUpdate, so it is a year ahead; `drover serve` rewrites the file at start,
            // on each decommission and daily, and `drover doctor` warns a month before.
            next_update: at(now_ms.saturating_add(CRL_VALID_DAYS * DAY_MS)),
            crl_number: SerialNumber::from_slice(&(now_ms / 1000).to_be_bytes()),
            issuing_distribution_point: None,
            revoked_certs,
            key_identifier_method: KeyIdMethod::Sha256,
        }
        .signed_by(&self.cert, &self.key)?;
        let path = self.dir.join(CRL_FILE);
        let pem = crl.pem()?;
        write_private(&path, pem.as_bytes())?;
        Ok(path)
    }
}

fn first_cert_der(pem: &str) -> Option<Vec<u8>> {
    use rustls::pki_types::pem::PemObject as _;
    rustls::pki_types::CertificateDer::pem_slice_iter(pem.as_bytes())
        .next()?
        .ok()
        .map(|c| c.to_vec())
}

fn cert_serial(pem: &str) -> Option<Vec<u8>> {
    let der = first_cert_der(pem)?;
    let (_, c) = x509_parser::parse_x509_certificate(&der).ok()?;
    Some(c.raw_serial().to_vec())
}

fn cert_hosts(pem: &str) -> Option<Vec<String>> {
    let der = first_cert_der(pem)?;
    let (_, c) = x509_parser::parse_x509_certificate(&der).ok()?;
    let san = c.subject_alternative_name().ok()??;
    Some(
        san.value
            .general_names
            .iter()
            .filter_map(|n| match n {
                x509_parser::extensions::GeneralName::DNSName(d) => Some(d.to_string()),
                x509_parser::extensions::GeneralName::IPAddress(b) => match b.len() {
                    4 => <[u8; 4]>::try_from(*b)
                        .ok()
                        .map(|a| std::net::IpAddr::from(a).to_string()),
                    16 => <[u8; 16]>::try_from(*b)
                        .ok()
                        .map(|a| std::net::IpAddr::from(a).to_string()),
                    _ => None,
                },
                _ => None,
            })
            .collect(),
    )
}

/// The subject CN of a DER certificate (the device id for device certificates).
pub fn common_name(der: &[u8]) -> Option<String> {
    let (_, c) = x509_parser::parse_x509_certificate(der).ok()?;
    let cn = c.subject().iter_common_name().next()?;
    cn.as_str().ok().map(str::to_owned)
}

impl FleetCa {
    /// `notAfter` of the certificate issued to `device` (`None`: it has none on file).
    pub fn device_cert_not_after_ms(&self, device: &str) -> Option<u64> {
        let path = self.dir.join(ISSUED_DIR).join(format!("{device}.pem"));
        not_after_ms(&fs::read_to_string(path).ok()?)
    }
}

/// Where the certificates of active integrations are kept, `<name>.pem`, under the key
/// directory (`<data>/keys`).
pub fn integration_certs_dir(keys_dir: &Path) -> PathBuf {
    keys_dir.join(ISSUED_DIR).join(INTEGRATION_DIR)
}

/// `nextUpdate` of a PEM CRL, in ms since the epoch.
pub fn crl_next_update_ms(pem: &[u8]) -> Option<u64> {
    use rustls::pki_types::pem::PemObject as _;
    let der = rustls::pki_types::CertificateRevocationListDer::from_pem_slice(pem).ok()?;
    let (_, crl) = x509_parser::parse_x509_crl(&der).ok()?;
    let t = crl.next_update()?.timestamp();
    Some(u64::try_from(t).unwrap_or(0).saturating_mul(1000))
}

/// `notAfter` of the first certificate in a PEM file, in ms since the epoch.
pub fn not_after_ms(pem: &str) -> Option<u64> {
    let der = first_cert_der(pem)?;
    let (_, c) = x509_parser::parse_x509_certificate(&der).ok()?;
    let t = c.validity().not_after.timestamp();
    Some(u64::try_from(t).unwrap_or(0).saturating_mul(1000))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ca_issues_device_certs_with_the_id_as_cn_and_revokes_them_by_serial() {
        let dir = tempfile::tempdir().unwrap();
        let now = 1_800_000_000_000;
        let ca = FleetCa::load_or_init(dir.path(), now).unwrap();
        let again = FleetCa::load_or_init(dir.path(), now).unwrap();
        assert_eq!(ca.ca_pem(), again.ca_pem());
        let d = again.issue_device("gw-01", now).unwrap();
        let der = first_cert_der(&d.cert_pem).unwrap();
        assert_eq!(common_name(&der).as_deref(), Some("gw-01"));
        assert!(!format!("{d:?}").contains("PRIVATE"));
        // A certificate issued by the reloaded CA verifies (webpki, as the broker does)
        // against the CA on disk; one from another CA does not.
        let ca_der = first_cert_der(ca.ca_pem()).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca_der.into()).unwrap();
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            std::sync::Arc::new(roots),
            std::sync::Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .unwrap();
        let when = rustls::pki_types::UnixTime::since_unix_epoch(std::time::Duration::from_millis(
            now + 1000,
        ));
        let leaf = rustls::pki_types::CertificateDer::from(der.clone());
        assert!(verifier.verify_client_cert(&leaf, &[], when).is_ok());
        let other_dir = tempfile::tempdir().unwrap();
        let other = FleetCa::load_or_init(other_dir.path(), now).unwrap();
        let foreign = other.issue_device("gw-01", now).unwrap();
        let foreign_der =
            rustls::pki_types::CertificateDer::from(first_cert_der(&foreign.cert_pem).unwrap());
        assert!(verifier
            .verify_client_cert(&foreign_der, &[], when)
            .is_err());
        let (_, dev_x) = x509_parser::parse_x509_certificate(&der).unwrap();
        let key_mode = {
            use std::os::unix::fs::PermissionsExt as _;
            fs::metadata(dir.path().join("keys").join(CA_KEY_FILE))
                .unwrap()
                .permissions()
                .mode()
                & 0o777
        };
        assert_eq!(key_mode, 0o600);
        let crl = ca.write_crl(&["gw-01".into()], now).unwrap();
        let crl_pem = fs::read(crl).unwrap();
        use rustls::pki_types::pem::PemObject as _;
        let crl_der =
            rustls::pki_types::CertificateRevocationListDer::from_pem_slice(&crl_pem).unwrap();
        let (_, parsed) = x509_parser::parse_x509_crl(&crl_der).unwrap();
        let serials: Vec<_> = parsed
            .iter_revoked_certificates()
            .map(|r| r.raw_serial().to_vec())
            .collect();
        assert_eq!(serials, vec![dev_x.raw_serial().to_vec()]);

        // Replaced: the old certificate stays revoked while the id is active again with a
        // new one (not listed).
        ca.retire_device_cert("gw-01").unwrap();
        let fresh = ca.issue_device("gw-01", now).unwrap();
        let fresh_der = first_cert_der(&fresh.cert_pem).unwrap();
        let (_, fresh_x) = x509_parser::parse_x509_certificate(&fresh_der).unwrap();
        let crl_pem = fs::read(ca.write_crl(&[], now).unwrap()).unwrap();
        let crl_der =
            rustls::pki_types::CertificateRevocationListDer::from_pem_slice(&crl_pem).unwrap();
        let (_, parsed) = x509_parser::parse_x509_crl(&crl_der).unwrap();
        let serials: Vec<_> = parsed
            .iter_revoked_certificates()
            .map(|r| r.raw_serial().to_vec())
            .collect();
        assert_eq!(serials, vec![dev_x.raw_serial().to_vec()]);
        assert_ne!(fresh_x.raw_serial(), dev_x.raw_serial());
    }

    #[test]
    fn broker_certificate_carries_exactly_the_advertised_names_and_follows_changes() {
        let dir = tempfile::tempdir().unwrap();
        let now = 1_800_000_000_000;
        let ca = FleetCa::load_or_init(dir.path(), now).unwrap();
        let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let sans = |path: &Path| {
            let mut h = cert_hosts(&fs::read_to_string(path).unwrap()).unwrap();
            h.sort();
            h
        };
        let first = names(&["localhost", "127.0.0.1", "drover-cp.test", "192.0.2.7"]);
        let (cert, _) = ca.broker_identity(&first, now).unwrap();
        assert_eq!(
            sans(&cert),
            names(&["127.0.0.1", "192.0.2.7", "drover-cp.test", "localhost"])
        );
        let pem = fs::read_to_string(&cert).unwrap();
        // The same set (another order, another case): the certificate is kept.
        let same = names(&["DROVER-CP.test", "192.0.2.7", "localhost", "127.0.0.1"]);
        ca.broker_identity(&same, now).unwrap();
        assert_eq!(fs::read_to_string(&cert).unwrap(), pem);
        // A name no longer advertised leaves the certificate; a new one enters it.
        let changed = names(&["localhost", "127.0.0.1", "cp.example.com"]);
        ca.broker_identity(&changed, now).unwrap();
        assert_eq!(
            sans(&cert),
            names(&["127.0.0.1", "cp.example.com", "localhost"])
        );
    }
}
