//! W3C `traceparent` (version 00): the edge starts a trace, every hop continues it.

use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use opentelemetry::Context;
use rand::Rng;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// A trace id and the id of the span that sent the message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceParent {
    pub trace_id: String,
    pub parent_id: String,
}

impl TraceParent {
    /// Starts a new trace.
    pub fn new_root() -> Self {
        let mut rng = rand::thread_rng();
        Self {
            trace_id: format!("{:032x}", rng.gen::<u128>() | 1),
            parent_id: format!("{:016x}", rng.gen::<u64>() | 1),
        }
    }

    /// The next hop of the same trace.
    pub fn child(&self) -> Self {
        Self {
            trace_id: self.trace_id.clone(),
            parent_id: format!("{:016x}", rand::thread_rng().gen::<u64>() | 1),
        }
    }

    /// Parses `00-<32 hex>-<16 hex>-<2 hex>`; anything else is ignored by callers.
    pub fn parse(value: &str) -> Option<Self> {
        let mut parts = value.trim().split('-');
        let (version, trace_id, parent_id, flags) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        let hex = |s: &str, len: usize| s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit());
        let valid = version == "00"
            && hex(trace_id, 32)
            && hex(parent_id, 16)
            && hex(flags, 2)
            && parts.next().is_none()
            && trace_id.bytes().any(|b| b != b'0')
            && parent_id.bytes().any(|b| b != b'0');
        valid.then(|| Self {
            trace_id: trace_id.to_ascii_lowercase(),
            parent_id: parent_id.to_ascii_lowercase(),
        })
    }

    /// The header value.
    pub fn header_value(&self) -> String {
        format!("00-{}-{}-01", self.trace_id, self.parent_id)
    }

    /// Makes `span` a child of this context, so its exported span joins the trace (a no-op
    /// when spans are not exported). Call before the span is first entered.
    pub fn adopt(&self, span: &tracing::Span) {
        let (Ok(trace_id), Ok(span_id)) = (
            TraceId::from_hex(&self.trace_id),
            SpanId::from_hex(&self.parent_id),
        ) else {
            return;
        };
        let remote = SpanContext::new(
            trace_id,
            span_id,
            TraceFlags::SAMPLED,
            true,
            TraceState::default(),
        );
        let _ = span.set_parent(Context::new().with_remote_span_context(remote));
    }

    /// The context to send onwards from `span`: the exported span's own ids when spans are
    /// exported, otherwise a new hop of `fallback`'s trace.
    pub fn of_span(span: &tracing::Span, fallback: &TraceParent) -> TraceParent {
        let context = span.context();
        let current = context.span();
        let sc = current.span_context();
        if sc.is_valid() {
            TraceParent {
                trace_id: sc.trace_id().to_string(),
                parent_id: sc.span_id().to_string(),
            }
        } else {
            fallback.child()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_rejects_garbage() {
        let root = TraceParent::new_root();
        assert_eq!(TraceParent::parse(&root.header_value()), Some(root.clone()));
        let child = root.child();
        assert_eq!(child.trace_id, root.trace_id);
        assert!(TraceParent::parse("00-abc-def-01").is_none());
        assert!(
            TraceParent::parse(&format!("00-{}-{}-01", "0".repeat(32), "1".repeat(16))).is_none()
        );
    }
}
