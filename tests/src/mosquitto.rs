//! A real mosquitto broker for tests: loopback, free port, password file, pattern ACLs
//! keyed on `%u` (the authenticated username, which clients cannot choose freely, unlike
//! `%c`), persistence on. Killed when dropped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// Username the control plane connects with.
pub const CONTROL_PLANE_USER: &str = "drover-control-plane";

pub struct Mosquitto {
    child: Child,
    pub port: u16,
    dir: PathBuf,
}

/// Finds the mosquitto binary (Debian installs it in /usr/sbin).
pub fn binary() -> Option<PathBuf> {
    ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

/// The ACL Drover needs on a shared broker: each device publishes only under its own
/// uplink topics and reads only its own downlink, model chunks and the fleet keyring.
pub fn acl() -> String {
    format!(
        "user {CONTROL_PLANE_USER}\ntopic readwrite drover/#\n\n\
         pattern write drover/v1/dev/%u/up/#\n\
         pattern read drover/v1/dev/%u/down\n\
         pattern read drover/v1/model/+/chunks\n\
         pattern read drover/v1/fleet/keyring\n"
    )
}

impl Mosquitto {
    /// Starts mosquitto in `dir` with the given `(username, password)` accounts.
    pub fn start(dir: &Path, users: &[(String, String)]) -> anyhow::Result<Self> {
        let bin = binary().context("mosquitto is not installed (run .ci/install-deps.sh)")?;
        std::fs::create_dir_all(dir)?;
        let passwd = dir.join("passwd");
        std::fs::write(&passwd, "")?;
        for (user, pass) in users {
            let st = Command::new("mosquitto_passwd")
                .arg("-b")
                .arg(&passwd)
                .arg(user)
                .arg(pass)
                .status()
                .context("running mosquitto_passwd")?;
            if !st.success() {
                bail!("mosquitto_passwd failed for {user}");
            }
        }
        std::fs::write(dir.join("acl"), acl())?;
        let port = crate::free_port();
        let conf = dir.join("mosquitto.conf");
        // A queue far above any test's volume: the fleet_ingest bench's raw subscriber is
        // sent every device's messages (200,000 at 10,000 devices), and a full queue drops
        // QoS 1 messages silently, which stalled that bench. Not 0 ("no maximum" in the
        // docs): with 0, mosquitto 2.0.11 closed the ACL test's observer connection on
        // every run.
        std::fs::write(
            &conf,
            format!(
                "listener {port} 127.0.0.1\nallow_anonymous false\npassword_file {}\nacl_file {}\n\
                 persistence true\npersistence_location {}/\nautosave_interval 1\n\
                 max_inflight_messages 1000\nmax_queued_messages 10000000\nmessage_size_limit {}\n",
                passwd.display(),
                dir.join("acl").display(),
                dir.display(),
                drover_protocol::envelope::MAX_BROKER_PAYLOAD,
            ),
        )?;
        let log = std::fs::File::create(dir.join("mosquitto.log"))?;
        let child = Command::new(bin)
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .spawn()
            .context("starting mosquitto")?;
        let m = Mosquitto {
            child,
            port,
            dir: dir.to_path_buf(),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline {
                bail!("mosquitto did not listen on {port}: {}", m.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(m)
    }

    /// Starts mosquitto with a configuration written by `drover broker config mosquitto`
    /// (mutual TLS, certificate identity as username, CRL, pattern ACL) listening on
    /// `port`. `dir` holds its log.
    pub fn start_with_config(dir: &Path, conf: &Path, port: u16) -> anyhow::Result<Self> {
        let bin = binary().context("mosquitto is not installed (run .ci/install-deps.sh)")?;
        std::fs::create_dir_all(dir)?;
        let log = std::fs::File::create(dir.join("mosquitto.log"))?;
        let child = Command::new(bin)
            .arg("-c")
            .arg(conf)
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .spawn()
            .context("starting mosquitto")?;
        let m = Mosquitto {
            child,
            port,
            dir: dir.to_path_buf(),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline {
                bail!("mosquitto did not listen on {port}: {}", m.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(m)
    }

    /// Makes the running broker reload its configuration, ACL and CRL (SIGHUP).
    pub fn reload(&self) -> anyhow::Result<()> {
        let st = Command::new("kill")
            .args(["-HUP", &self.child.id().to_string()])
            .status()?;
        if !st.success() {
            bail!("could not signal mosquitto to reload");
        }
        Ok(())
    }

    /// Adds accounts to the password file and makes the running broker reload it
    /// (SIGHUP), as an operator does after enrolling devices.
    pub fn add_users(&self, users: &[(String, String)]) -> anyhow::Result<()> {
        let passwd = self.dir.join("passwd");
        for (user, pass) in users {
            let st = Command::new("mosquitto_passwd")
                .arg("-b")
                .arg(&passwd)
                .arg(user)
                .arg(pass)
                .status()?;
            if !st.success() {
                bail!("mosquitto_passwd failed for {user}");
            }
        }
        let st = Command::new("kill")
            .args(["-HUP", &self.child.id().to_string()])
            .status()?;
        if !st.success() {
            bail!("could not signal mosquitto to reload");
        }
        Ok(())
    }

    /// As [`Mosquitto::add_users`] for thousands of accounts: hashes them all in one
    /// `mosquitto_passwd -U` run instead of one process per account.
    pub fn add_users_bulk(&self, users: &[(String, String)]) -> anyhow::Result<()> {
        let plain = self.dir.join("passwd.new");
        let mut text = String::new();
        for (user, pass) in users {
            if user.contains(':') || user.contains('\n') || pass.contains('\n') {
                bail!("account {user:?} cannot go in a mosquitto password file");
            }
            text.push_str(&format!("{user}:{pass}\n"));
        }
        std::fs::write(&plain, text)?;
        let st = Command::new("mosquitto_passwd")
            .arg("-U")
            .arg(&plain)
            .status()
            .context("running mosquitto_passwd -U")?;
        if !st.success() {
            bail!("mosquitto_passwd -U failed");
        }
        let hashed = std::fs::read_to_string(&plain)?;
        let _ = std::fs::remove_file(&plain);
        let passwd = self.dir.join("passwd");
        let mut all = std::fs::read_to_string(&passwd)?;
        all.push_str(&hashed);
        std::fs::write(&passwd, all)?;
        let st = Command::new("kill")
            .args(["-HUP", &self.child.id().to_string()])
            .status()?;
        if !st.success() {
            bail!("could not signal mosquitto to reload");
        }
        // The reload is asynchronous; give it a moment before clients log in.
        std::thread::sleep(Duration::from_millis(500));
        Ok(())
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn url(&self, user: &str, pass: &str) -> String {
        format!("mqtt://{user}:{pass}@127.0.0.1:{}", self.port)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("mosquitto.log")).unwrap_or_default()
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
