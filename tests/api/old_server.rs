//! A nats-server older than 2.10 creates consumers without the subject filters they declare
//! (it does not know `filter_subjects`): every step would be handed every event and
//! dead-letter all it does not consume. A role refuses such a server and stops, saying why.

use std::path::PathBuf;
use std::time::Duration;

use checkout::app::{App, Role};

use crate::helpers::{nats_version, test_settings, NatsServer, TestDb};

/// Debian's own nats-server (2.9 in bookworm): `NATS_SERVER_OLD_BIN`, or the package's path.
fn old_nats_bin() -> PathBuf {
    std::env::var("NATS_SERVER_OLD_BIN")
        .map_or_else(|_| PathBuf::from("/usr/sbin/nats-server"), PathBuf::from)
}

#[tokio::test]
async fn a_server_too_old_for_the_consumers_stops_the_role_with_the_reason() {
    let bin = old_nats_bin();
    assert!(
        bin.exists(),
        "{} is missing: `apt-get install nats-server` (Debian's 2.9) or set NATS_SERVER_OLD_BIN",
        bin.display()
    );
    let version = nats_version(&bin);
    assert!(
        version.as_slice() < [2, 10].as_slice(),
        "{} is {version:?}: this test needs a server older than 2.10",
        bin.display()
    );
    let nats = NatsServer::start_bin(bin);
    let db = TestDb::new();
    let settings = test_settings(&nats, &db);
    let app = App::build(settings, &[Role::Reserve])
        .await
        .expect("the role starts");
    let ended = tokio::time::timeout(Duration::from_secs(30), app.run_until_stopped())
        .await
        .expect("the role stops by itself instead of running with unfiltered consumers");
    let error = ended.expect_err("the role stops with an error");
    let mut chain = error.to_string();
    let mut source = std::error::Error::source(&error);
    while let Some(cause) = source {
        chain.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    assert!(
        chain.contains("ignored the subject filters of consumer reserve")
            && chain.contains("needs nats-server 2.10 or newer"),
        "{chain}"
    );

    // Nothing is left that would hand the step every event.
    let client = async_nats::connect(nats.url()).await.expect("connects");
    let js = async_nats::jetstream::new(client);
    let stream = js.get_stream("CHECKOUT").await.expect("the stream");
    assert!(
        stream
            .get_consumer::<async_nats::jetstream::consumer::pull::Config>("reserve")
            .await
            .is_err(),
        "the unfiltered consumer was left on the server"
    );
}
