//! `drover serve --advertise`: a device on another host reaches the broker by the name the
//! server advertises. The agent runs in its own network namespace (its own loopback and
//! routes, `/etc/hosts` mapping `drover-cp.test` to the server's end of a veth pair), with
//! the config `drover device enroll` wrote, copied elsewhere and not edited. Also: a
//! broker URL whose host the certificate does not carry is refused at enroll, and serve
//! refuses an unspecified listen address with no name to advertise.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use drover_control_plane::config::ServeConfig;
use drover_tests::fleet::Api;
use drover_tests::{peers_required, wait_until, workspace_bin};

const NAME: &str = "drover-cp.test";

/// A network namespace joined to this one by a veth pair; removed on drop.
struct Netns {
    name: String,
    host_if: String,
    /// This namespace's end of the pair: the address `NAME` resolves to inside.
    host_ip: String,
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip").args(args).output()?;
    anyhow::ensure!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

impl Netns {
    fn create() -> anyhow::Result<Netns> {
        let pid = std::process::id();
        let name = format!("drover-t{pid}");
        let (host_if, ns_if) = (format!("drv{pid}a"), format!("drv{pid}b"));
        let (a, b) = (200 + pid % 50, (pid / 50) % 256);
        let host_ip = format!("10.{a}.{b}.1");
        let ns_ip = format!("10.{a}.{b}.2/30");
        ip(&["netns", "add", &name])?;
        let ns = Netns {
            name,
            host_if,
            host_ip,
        };
        ip(&[
            "link",
            "add",
            &ns.host_if,
            "type",
            "veth",
            "peer",
            "name",
            &ns_if,
        ])?;
        ip(&["link", "set", &ns_if, "netns", &ns.name])?;
        ip(&[
            "addr",
            "add",
            &format!("{}/30", ns.host_ip),
            "dev",
            &ns.host_if,
        ])?;
        ip(&["link", "set", &ns.host_if, "up"])?;
        let inside = |args: &[&str]| ip(&[&["netns", "exec", &ns.name, "ip"][..], args].concat());
        inside(&["addr", "add", &ns_ip, "dev", &ns_if])?;
        inside(&["link", "set", &ns_if, "up"])?;
        inside(&["link", "set", "lo", "up"])?;
        // `ip netns exec` bind-mounts /etc/netns/<name>/hosts over /etc/hosts.
        let etc = ns.etc_dir();
        std::fs::create_dir_all(&etc)?;
        std::fs::write(
            etc.join("hosts"),
            format!("127.0.0.1 localhost\n{} {NAME}\n", ns.host_ip),
        )?;
        Ok(ns)
    }

    fn etc_dir(&self) -> PathBuf {
        Path::new("/etc/netns").join(&self.name)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = ip(&["link", "del", &self.host_if]);
        let _ = ip(&["netns", "del", &self.name]);
        let _ = std::fs::remove_dir_all(self.etc_dir());
    }
}

struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `drover serve` in process: the TLS front on every address, known to devices as `NAME`.
async fn serve_advertising(dir: &Path) -> drover_control_plane::serve::ServeHandle {
    let cfg = ServeConfig {
        data_dir: dir.to_owned(),
        http_listen: "127.0.0.1:0".into(),
        mqtt_listen: "0.0.0.0:0".into(),
        advertise: vec![NAME.into()],
        ..Default::default()
    };
    drover_control_plane::serve::run(cfg.validate().unwrap(), std::future::pending())
        .await
        .unwrap()
}

fn enroll(api: &Api, id: &str, out: &Path, extra: &[&str]) -> std::process::Output {
    Command::new(workspace_bin("drover").unwrap())
        .args(["device", "enroll", id, "--out"])
        .arg(out)
        .args(extra)
        .args(api.cli_args())
        .env_remove("DROVER_SERVER")
        .env_remove("DROVER_TOKEN")
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_on_another_host_connects_by_the_advertised_name_with_its_enrolled_config() {
    let ns = match Netns::create() {
        Ok(ns) => ns,
        Err(e) if !peers_required() => {
            eprintln!("skipped: no network namespace ({e}); CI runs this as root");
            return;
        }
        Err(e) => panic!("a network namespace is required (DROVER_REQUIRE_PEERS=1): {e}"),
    };
    let dir = tempfile::tempdir().unwrap();
    let server = serve_advertising(&dir.path().join("cp")).await;
    let port = server.mqtt_addr().port();
    let api = Api::new(format!("http://{}", server.http_addr()), server.api_token());

    let operator = dir.path().join("operator");
    std::fs::create_dir(&operator).unwrap();
    let agent_data = dir.path().join("device-data");
    let out = enroll(
        &api,
        "gw-far",
        &operator.join("agent.toml"),
        &["--agent-data-dir", agent_data.to_str().unwrap()],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(operator.join("agent.toml")).unwrap();
    assert!(
        text.contains(&format!("broker_url = \"mqtts://{NAME}:{port}\"")),
        "{text}"
    );
    assert!(text.contains("ca_file = \"gw-far.ca.pem\""), "{text}");
    assert!(!text.contains(operator.to_str().unwrap()), "{text}");
    assert!(!text.contains("api_addr"), "{text}");

    // The device's copy: somewhere else entirely, the files as they are.
    let device = dir.path().join("device").join("etc");
    std::fs::create_dir_all(&device).unwrap();
    for f in [
        "agent.toml",
        "gw-far.ca.pem",
        "gw-far.cert.pem",
        "gw-far.key.pem",
    ] {
        std::fs::copy(operator.join(f), device.join(f)).unwrap();
    }
    std::fs::remove_dir_all(&operator).unwrap();
    let log = std::fs::File::create(dir.path().join("agent.log")).unwrap();
    let agent = Agent(
        Command::new("ip")
            .args(["netns", "exec", &ns.name])
            .arg(workspace_bin("drover-agent").unwrap())
            .arg("--config")
            .arg(device.join("agent.toml"))
            .env("RUST_LOG", "info")
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap(),
    );
    let online = wait_until("the agent online", Duration::from_secs(60), || async {
        let d = api.get("/v1/devices/gw-far").await.ok()?;
        (d["online"] == true).then_some(d)
    })
    .await;
    let agent_log = std::fs::read_to_string(dir.path().join("agent.log")).unwrap_or_default();
    assert!(online.is_ok(), "{online:?}\nagent log:\n{agent_log}");
    drop(agent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enroll_refuses_a_broker_url_whose_host_the_certificate_does_not_carry() {
    let dir = tempfile::tempdir().unwrap();
    let server = serve_advertising(&dir.path().join("cp")).await;
    let port = server.mqtt_addr().port();
    let api = Api::new(format!("http://{}", server.http_addr()), server.api_token());
    let out_file = dir.path().join("gw-x.toml");
    let url = format!("mqtts://other-name.test:{port}");
    let out = enroll(&api, "gw-x", &out_file, &["--broker-url", &url]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("does not name other-name.test")
            && err.contains("--advertise other-name.test"),
        "{err}"
    );
    assert!(err.contains(NAME), "the names it carries are listed: {err}");
    assert!(!out_file.exists());
    // Refused before enrolling: the id is still free.
    assert!(api.get("/v1/devices/gw-x").await.is_err());

    // The advertised name passes, and is what the config says.
    let url = format!("mqtts://{NAME}:{port}");
    let out = enroll(&api, "gw-x", &out_file, &["--broker-url", &url]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cfg =
        drover_agent::config::AgentConfig::from_toml(&std::fs::read_to_string(&out_file).unwrap())
            .unwrap();
    assert_eq!(cfg.broker_url, url);
}

#[test]
fn serve_refuses_an_unspecified_listen_address_with_no_name_to_advertise() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(workspace_bin("drover").unwrap())
        .args([
            "serve",
            "--http-listen",
            "127.0.0.1:0",
            "--mqtt-listen",
            "0.0.0.0:0",
        ])
        .arg("--data-dir")
        .arg(dir.path())
        .env_remove("DROVER_ADVERTISE")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Bounded: a server that starts anyway is stopped and the test fails.
    let mut status = None;
    for _ in 0..600 {
        status = child.try_wait().unwrap();
        if status.is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
        panic!("drover serve started on 0.0.0.0 with nothing advertised");
    }
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert!(!status.unwrap().success());
    assert!(
        err.contains("mqtt_listen = 0.0.0.0:0")
            && err.contains("--advertise HOST[:PORT]")
            && err.contains("advertise = [\"HOST\"]"),
        "{err}"
    );
    assert!(
        !dir.path().join("drover.db").exists(),
        "refused before touching the data dir"
    );
}
