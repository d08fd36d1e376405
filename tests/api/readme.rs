//! The README's "Try it" block, pasted into bash as a newcomer would, against a running edge.

use std::process::Command;

use crate::helpers::TestApp;

/// The README's first `sh` block after "## Try it".
fn try_it_block() -> String {
    let readme = include_str!("../../README.md");
    let section = readme.split("## Try it").nth(1).expect("a Try it section");
    let block = section.split("```sh\n").nth(1).expect("an sh block");
    block.split("```").next().expect("its end").to_owned()
}

#[tokio::test]
async fn the_try_it_block_runs_as_pasted_and_ends_with_the_order() {
    let app = TestApp::spawn().await;
    let address = app.base.trim_start_matches("http://").to_owned();
    let script = try_it_block()
        .replace("localhost:8080", &address)
        .replace("target/release/checkout", env!("CARGO_BIN_EXE_checkout"));
    let out = tokio::task::spawn_blocking(move || {
        Command::new("bash")
            .args(["-o", "pipefail", "-c", &script])
            .env(
                "CHECKOUT__AUTH__JWT_SECRET",
                "test-secret-of-at-least-32-bytes!!",
            )
            .output()
            .expect("bash runs")
    })
    .await
    .expect("ran");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(!stderr.contains("No such file"), "{stderr}");
    // Every answer shows, the last one being the order.
    assert!(stdout.contains("\"cartId\""), "{stdout}");
    let order_json = &stdout[stdout.rfind("\n{").map_or(0, |i| i + 1)..];
    let order: serde_json::Value = serde_json::from_str(order_json).expect("the order as JSON");
    assert!(order["orderId"].is_string(), "{order}");
    assert!(
        ["pending", "confirmed"].contains(&order["status"].as_str().unwrap_or_default()),
        "{order}"
    );
}
