//! Logs and spans via `tracing`, filtered by `RUST_LOG` (default `info`); spans are exported
//! with OTLP (HTTP/protobuf) when `telemetry.otlp_endpoint` is set, as one trace per checkout
//! across every process (see `saga::trace`).

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{fmt, EnvFilter, Layer};

/// Where spans go, if anywhere.
#[derive(Debug, Clone)]
pub struct Otlp {
    /// The collector's base URL, e.g. `http://127.0.0.1:4318` (`/v1/traces` is appended).
    pub endpoint: String,
    /// `service.name`: the role(s) this process runs.
    pub service: String,
}

/// Flushes exported spans when dropped (keep it alive for the whole process).
pub struct Guard(Option<SdkTracerProvider>);

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(provider) = self.0.take() {
            if let Err(e) = provider.shutdown() {
                eprintln!("span export did not flush: {e}");
            }
        }
    }
}

/// Installs the global subscriber once; later calls (tests) are no-ops.
pub fn init(json: bool) {
    let guard = init_with(json, None);
    std::mem::forget(guard);
}

/// Installs the global subscriber, exporting spans when `otlp` is given.
pub fn init_with(json: bool, otlp: Option<Otlp>) -> Guard {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn,async_nats=warn"));
    let fmt: Box<dyn Layer<_> + Send + Sync> = if json {
        fmt::layer().json().with_target(true).boxed()
    } else {
        fmt::layer().with_target(true).boxed()
    };
    let (provider, otel) = match otlp.map(exporter) {
        Some(Ok(provider)) => {
            let tracer = provider.tracer("checkout");
            // Spans are exported whatever RUST_LOG says about logs: our own, at info.
            let spans = tracing_subscriber::filter::Targets::new()
                .with_target("checkout", tracing::Level::INFO);
            let layer = tracing_opentelemetry::layer()
                .with_tracer(tracer)
                .with_filter(spans);
            (Some(provider), Some(layer))
        }
        Some(Err(e)) => {
            eprintln!("no span export: {e}");
            (None, None)
        }
        None => (None, None),
    };
    // Already installed (a second test in the same binary): keep the first.
    let _ = tracing_subscriber::registry()
        .with(fmt.with_filter(filter))
        .with(otel)
        .try_init();
    Guard(provider)
}

fn exporter(otlp: Otlp) -> Result<SdkTracerProvider, opentelemetry_otlp::ExporterBuildError> {
    let endpoint = format!("{}/v1/traces", otlp.endpoint.trim_end_matches('/'));
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_endpoint(endpoint)
        .build()?;
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(Resource::builder().with_service_name(otlp.service).build())
        .build())
}
