//! One `drover serve` per data directory, in one process too: a second server on the same
//! directory is refused (naming the directory and the holder) and takes nothing over;
//! other directories are unaffected; the directory is free again after a shutdown.

mod common;

use common::*;
use drover_control_plane::app::paths::URL_FILE;
use drover_control_plane::serve::{self, ServeError};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_server_on_the_same_data_dir_is_refused_and_takes_nothing_over() {
    let dir = tempfile::tempdir().unwrap();
    let other = tempfile::tempdir().unwrap();
    let first = start(dir.path()).await;
    let url = format!("http://{}", first.http_addr());
    let url_file = dir.path().join(URL_FILE);
    assert_eq!(std::fs::read_to_string(&url_file).unwrap().trim(), url);

    let second = serve::run(
        config(dir.path()).validate().unwrap(),
        std::future::pending(),
    )
    .await;
    let err = match second {
        Err(e) => e,
        Ok(h) => {
            let addr = h.http_addr();
            h.shutdown().await;
            panic!("a second server started on the same data dir at {addr}");
        }
    };
    assert!(matches!(err, ServeError::DataDirInUse { .. }), "{err:?}");
    let msg = err.to_string();
    for needle in [
        dir.path().display().to_string(),
        format!("pid {}", std::process::id()),
        url.clone(),
    ] {
        assert!(msg.contains(&needle), "{needle:?} missing from {msg}");
    }
    // The CLI's URL file still names the first server, which still serves.
    assert_eq!(std::fs::read_to_string(&url_file).unwrap().trim(), url);
    assert!(Api::new(&first).get("/v1/devices").await.is_array());

    // Another data dir starts beside it.
    let beside = start(other.path()).await;
    beside.shutdown().await;

    // After a shutdown the directory is free again.
    first.shutdown().await;
    let again = start(dir.path()).await;
    assert_eq!(
        std::fs::read_to_string(&url_file).unwrap().trim(),
        format!("http://{}", again.http_addr())
    );
    again.shutdown().await;
}
