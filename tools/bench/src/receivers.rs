//! Merchant webhook receivers for `--webhooks`: a healthy endpoint (answers at once and notes
//! how long after its checkout was accepted each message arrived), a slow one (answers after
//! 2 s) and a dead one (a port nobody listens on), as a shop's systems would be on a bad day.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::http::StatusCode;
use axum::routing::post;
use axum::Router;
use chrono::{DateTime, Utc};
use serde_json::json;

use crate::bench::BenchError;
use crate::procs::free_port;

/// The three receivers' URLs, and what the healthy one heard.
pub struct Receivers {
    pub healthy: String,
    pub slow: String,
    pub dead: String,
    /// Seconds from each message's checkout acceptance (`data.requestedAt`) to its arrival.
    latencies: Arc<Mutex<Vec<f64>>>,
    /// The endpoints registered for them now.
    endpoints: Mutex<Vec<String>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Receivers {
    /// Starts the healthy and the slow receiver; the dead one is only an address.
    pub async fn start() -> Result<Self, BenchError> {
        let latencies: Arc<Mutex<Vec<f64>>> = Arc::default();
        let heard = latencies.clone();
        let healthy = Router::new().route(
            "/hooks",
            post(move |body: Bytes| {
                let heard = heard.clone();
                async move {
                    if let Some(secs) = since_accepted(&body) {
                        if let Ok(mut all) = heard.lock() {
                            all.push(secs);
                        }
                    }
                    StatusCode::NO_CONTENT
                }
            }),
        );
        let slow = Router::new().route(
            "/hooks",
            post(|| async {
                tokio::time::sleep(Duration::from_secs(2)).await;
                StatusCode::NO_CONTENT
            }),
        );
        let mut tasks = Vec::new();
        let mut urls = Vec::new();
        for app in [healthy, slow] {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            urls.push(format!("http://{}/hooks", listener.local_addr()?));
            tasks.push(tokio::spawn(async move {
                let _ = axum::serve(listener, app).await;
            }));
        }
        Ok(Self {
            healthy: urls[0].clone(),
            slow: urls[1].clone(),
            dead: format!("http://127.0.0.1:{}/hooks", free_port()?),
            latencies,
            endpoints: Mutex::default(),
            tasks,
        })
    }

    /// Registers the three as endpoints for `order.confirmed`.
    pub async fn register(
        &self,
        http: &reqwest::Client,
        base: &str,
        admin: &str,
    ) -> Result<(), BenchError> {
        for url in [&self.healthy, &self.slow, &self.dead] {
            let r = http
                .post(format!("{base}/api/admin/webhooks"))
                .bearer_auth(admin)
                .json(&json!({"url": url, "events": ["order.confirmed"]}))
                .send()
                .await?;
            if !r.status().is_success() {
                return Err(BenchError::Setup(format!(
                    "registering a webhook endpoint: {}",
                    r.text().await.unwrap_or_default()
                )));
            }
            let created: serde_json::Value = r.json().await?;
            if let (Some(id), Ok(mut ids)) = (created["id"].as_str(), self.endpoints.lock()) {
                ids.push(id.to_owned());
            }
        }
        Ok(())
    }

    /// Turns their endpoints off or back on through the admin API, as a shop would (off, the
    /// feed writes no message nobody wants and the dispatcher passes them by). The processes
    /// keep what they know of each (a dead one stays paused), which deleting and registering
    /// them anew would throw away.
    pub async fn switch(
        &self,
        on: bool,
        http: &reqwest::Client,
        base: &str,
        admin: &str,
    ) -> Result<(), BenchError> {
        let ids = self
            .endpoints
            .lock()
            .map(|ids| ids.clone())
            .unwrap_or_default();
        let verb = if on { "enable" } else { "disable" };
        for id in ids {
            let r = http
                .post(format!("{base}/api/admin/webhooks/{id}/{verb}"))
                .bearer_auth(admin)
                .send()
                .await?;
            if !r.status().is_success() {
                return Err(BenchError::Setup(format!(
                    "{verb} a webhook endpoint: {}",
                    r.text().await.unwrap_or_default()
                )));
            }
        }
        Ok(())
    }

    /// Forgets what was heard so far (the warm-up's messages).
    pub fn reset(&self) {
        if let Ok(mut all) = self.latencies.lock() {
            all.clear();
        }
    }

    /// Messages the healthy endpoint heard, and their p50 and p99 latency in ms.
    pub fn summary(&self) -> (usize, f64, f64) {
        let mut all = self.latencies.lock().map(|l| l.clone()).unwrap_or_default();
        all.sort_by(f64::total_cmp);
        let at = |q: f64| {
            if all.is_empty() {
                return 0.0;
            }
            let i = ((all.len() as f64 - 1.0) * q).round() as usize;
            all[i.min(all.len() - 1)] * 1000.0
        };
        (all.len(), at(0.5), at(0.99))
    }
}

impl Drop for Receivers {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Seconds since the message's checkout was accepted.
fn since_accepted(body: &[u8]) -> Option<f64> {
    // Only the one field is read (the rest is skipped, not built): the receivers share the
    // machine with what is measured.
    #[derive(serde::Deserialize)]
    struct Message {
        data: Data,
    }
    #[derive(serde::Deserialize)]
    struct Data {
        #[serde(rename = "requestedAt")]
        requested_at: DateTime<Utc>,
    }
    let message: Message = serde_json::from_slice(body).ok()?;
    Some((Utc::now() - message.data.requested_at).num_microseconds()? as f64 / 1e6)
}
