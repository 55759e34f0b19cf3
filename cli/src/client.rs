//! The API client the CLI uses: server URL and token from flags, env, or the files a
//! local server writes in its data directory.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::Args;
use serde::de::DeserializeOwned;
use serde::Serialize;

use drover_control_plane::app::paths::{TOKEN_FILE, URL_FILE};

#[derive(Clone, Debug, Args)]
pub struct ServerArgs {
    /// API URL of `drover serve` (default: read from <data-dir>/api-url).
    #[arg(long, env = "DROVER_SERVER")]
    pub server: Option<String>,
    /// API bearer token (default: read from <data-dir>/api-token).
    #[arg(long, env = "DROVER_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Data directory of a local server, to find its URL and token.
    #[arg(long, env = "DROVER_DATA_DIR", default_value = "drover-data")]
    pub data_dir: PathBuf,
    /// PEM CA certificate(s) to trust for an https:// server (default: the fleet CA in
    /// <data-dir>/keys/ca.pem, when there is one).
    #[arg(long, env = "DROVER_CA", value_name = "PATH")]
    pub ca: Option<PathBuf>,
}

/// Failures with their own exit codes, so scripts can tell them apart.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("cannot reach the server at {url}: {detail}\nis `drover serve` running? pass --server or set DROVER_SERVER")]
    Unreachable { url: String, detail: String },
    #[error("the server's TLS certificate at {url} is not trusted ({detail}); pass --ca PATH or set DROVER_CA to the CA that issued it (the fleet CA: <data-dir>/keys/ca.pem on the server)")]
    Untrusted { url: String, detail: String },
    #[error("{message}")]
    NotFound { message: String },
    #[error("{message}")]
    Conflict { message: String },
    #[error("server refused the request ({status}): {message}")]
    Refused { status: u16, message: String },
    /// `rollout watch` saw the rollout end other than completed.
    #[error("rollout {id} ended {status}: {reason}")]
    RolloutEnded {
        id: u64,
        status: String,
        reason: String,
        code: u8,
    },
    /// `device deploy --wait` saw the deploy end other than healthy.
    #[error("deploy command {seq} to {device} {outcome}: {detail}")]
    DeployEnded {
        device: String,
        seq: u64,
        outcome: String,
        detail: String,
        code: u8,
    },
}

/// What `drover --help` and the README list (keep in step with [`CliError::exit_code`]).
pub const EXIT_CODES: &str = "Exit codes:
  0   success
  1   any other error (bad argument, file, config)
  3   not found (device, model, rollout, token)
  4   already exists / conflict
  5   server unreachable
  6   refused by the server (invalid request, 401 bad token, 403 role too low)
  7   the server's TLS certificate is not trusted (give --ca)
  10  rollout watch: the rollout paused
  11  rollout watch: the rollout rolled back
  12  rollout watch: the rollout was aborted
  20  device deploy --wait: failed, refused or rolled back
  21  device deploy --wait: the command expired unanswered
  22  device deploy --wait: --timeout passed
With --output json, errors are printed on stderr as {\"error\": MESSAGE, \"code\": N}.";

impl CliError {
    /// 3 not found, 4 already exists, 5 server unreachable, 6 other refusal; a watched
    /// rollout's end: 10 paused, 11 rolled back, 12 aborted; a waited-for deploy: 20 failed,
    /// refused or rolled back, 21 expired unanswered, 22 `--timeout` passed.
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::RolloutEnded { code, .. } | CliError::DeployEnded { code, .. } => *code,
            CliError::NotFound { .. } => 3,
            CliError::Conflict { .. } => 4,
            CliError::Unreachable { .. } => 5,
            CliError::Refused { .. } => 6,
            CliError::Untrusted { .. } => 7,
        }
    }
}

/// The API base URL from `--server`. Without a scheme it is what `drover serve` does by
/// default: `http://` for a loopback host (`localhost:8470`), `https://` for any other;
/// anything that is not an `http(s)://host[:port]` URL is refused with what to write.
pub fn server_url(given: &str) -> anyhow::Result<String> {
    let given = given.trim();
    let url = if given.contains("://") {
        given.to_owned()
    } else {
        let host = reqwest::Url::parse(&format!("http://{given}"))
            .ok()
            .and_then(|u| u.host_str().map(|h| h.trim_matches(['[', ']']).to_owned()));
        // An unparsable host stays http:// and is refused below with what to write.
        let loopback = host.is_none_or(|h| {
            h == "localhost"
                || h.parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback())
        });
        format!("{}://{given}", if loopback { "http" } else { "https" })
    };
    let parsed = reqwest::Url::parse(&url).ok().filter(|u| {
        matches!(u.scheme(), "http" | "https") && u.host_str().is_some_and(|h| !h.is_empty())
    });
    anyhow::ensure!(
        parsed.is_some(),
        "--server {given:?} is not an API URL; write it like http://127.0.0.1:8470 or \
         https://cp.example.com:8470"
    );
    Ok(url.trim_end_matches('/').to_owned())
}

pub struct Client {
    http: reqwest::Client,
    base: String,
    token: String,
}

impl Client {
    pub fn new(args: &ServerArgs) -> anyhow::Result<Self> {
        let base = match &args.server {
            Some(s) => s.clone(),
            None => {
                let p = args.data_dir.join(URL_FILE);
                std::fs::read_to_string(&p)
                    .with_context(|| format!("no --server given and cannot read {}; start `drover serve --data-dir {}` or pass --server", p.display(), args.data_dir.display()))?
                    .trim()
                    .to_owned()
            }
        };
        let token = match &args.token {
            Some(t) => t.clone(),
            None => {
                let p = args.data_dir.join(TOKEN_FILE);
                std::fs::read_to_string(&p)
                    .with_context(|| {
                        format!(
                            "no --token given and cannot read {}; pass --token or set DROVER_TOKEN",
                            p.display()
                        )
                    })?
                    .trim()
                    .to_owned()
            }
        };
        Ok(Self {
            http: http_client(args)?,
            base: server_url(&base)?,
            token,
        })
    }

    async fn send<T: DeserializeOwned>(&self, req: reqwest::RequestBuilder) -> anyhow::Result<T> {
        let resp = req
            .bearer_auth(&self.token)
            .send()
            .await
            .map_err(|e| send_error(&self.base, &e))?;
        let status = resp.status();
        if status.is_success() {
            let text = resp.text().await.context("reading the server's reply")?;
            let text = if text.is_empty() { "null" } else { &text };
            return serde_json::from_str(text)
                .context("the server's reply is not the expected JSON");
        }
        let body: serde_json::Value = resp.json().await.unwrap_or_default();
        let message = body
            .get("error")
            .and_then(|e| e.as_str())
            .unwrap_or("no detail")
            .to_owned();
        Err(match status.as_u16() {
            404 => CliError::NotFound { message },
            409 => CliError::Conflict { message },
            s => CliError::Refused { status: s, message },
        }
        .into())
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        self.send(self.http.get(format!("{}{path}", self.base)))
            .await
    }

    pub async fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> anyhow::Result<T> {
        self.send(self.http.post(format!("{}{path}", self.base)).json(body))
            .await
    }
}

/// The HTTP client, trusting `--ca` (or the fleet CA of the local data directory) for
/// https:// servers; no other roots, so a server is trusted only by the CA given.
fn http_client(args: &ServerArgs) -> anyhow::Result<reqwest::Client> {
    let local = args
        .data_dir
        .join("keys")
        .join(drover_control_plane::pki::CA_CERT_FILE);
    let ca = match &args.ca {
        Some(p) => Some(p.clone()),
        None => local.exists().then_some(local),
    };
    let mut b = reqwest::Client::builder().use_rustls_tls();
    if let Some(path) = ca {
        let pem = std::fs::read(&path)
            .with_context(|| format!("cannot read the CA file {} (--ca)", path.display()))?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem)
            .ok()
            .filter(|c| !c.is_empty())
            .with_context(|| format!("{} holds no PEM certificate (--ca)", path.display()))?;
        for c in certs {
            b = b.add_root_certificate(c);
        }
    }
    b.build().context("cannot set up the HTTP client")
}

/// A request that got no answer: an untrusted certificate (exit 7) or no server (exit 5),
/// with the whole cause chain (reqwest's own message alone says only "error sending").
fn send_error(url: &str, e: &reqwest::Error) -> CliError {
    let mut detail = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        detail.push_str(&format!(": {s}"));
        source = s.source();
    }
    let url = url.to_owned();
    if detail.contains("certificate") {
        CliError::Untrusted { url, detail }
    } else {
        CliError::Unreachable { url, detail }
    }
}

/// Prints a value as pretty JSON.
pub fn print_json<T: Serialize>(v: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// Parses `k=v`.
pub fn parse_kv(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .filter(|(k, _)| !k.is_empty())
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("{s:?} must look like key=value"))
}

#[cfg(test)]
mod tests {
    use super::server_url;

    #[test]
    fn a_server_without_a_scheme_is_what_serve_does_by_default() {
        // Loopback: plaintext (serve's `api_tls = "auto"`); any other host: TLS.
        for (given, want) in [
            ("127.0.0.1:8470", "http://127.0.0.1:8470"),
            ("localhost:8470/", "http://localhost:8470"),
            ("[::1]:8470", "http://[::1]:8470"),
            ("cp.example.com:8470", "https://cp.example.com:8470"),
            ("10.0.0.5:8470", "https://10.0.0.5:8470"),
            ("http://10.0.0.5:8470", "http://10.0.0.5:8470"),
        ] {
            assert_eq!(server_url(given).unwrap(), want, "{given}");
        }
        assert!(server_url("ftp://x").is_err());
    }
}
