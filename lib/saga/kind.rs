//! The saga's vocabulary of event kinds: the token in subjects, message ids and the
//! `Checkout-Event` header. Below both `events` (the payloads) and `subjects` (the names made
//! of them), so neither needs the other for it.

/// The event's kind, without its payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventKind {
    Requested,
    Reserved,
    Rejected,
    Authorized,
    Committed,
    Declined,
    Confirmed,
    Failed,
    ShipRequested,
    Captured,
    Shipped,
    CancelRequested,
    Cancelled,
    RefundRequested,
    Refunded,
    CaptureFailed,
    RefundFailed,
    CancelFailed,
    TimedOut,
    ActionRequired,
    ProviderUpdate,
    ActionExpired,
}

impl EventKind {
    /// Every kind, for parsing the `Checkout-Event` header.
    pub const ALL: [EventKind; 22] = [
        Self::Requested,
        Self::Reserved,
        Self::Rejected,
        Self::Authorized,
        Self::Committed,
        Self::Declined,
        Self::Confirmed,
        Self::Failed,
        Self::ShipRequested,
        Self::Captured,
        Self::Shipped,
        Self::CancelRequested,
        Self::Cancelled,
        Self::RefundRequested,
        Self::Refunded,
        Self::CaptureFailed,
        Self::RefundFailed,
        Self::CancelFailed,
        Self::TimedOut,
        Self::ActionRequired,
        Self::ProviderUpdate,
        Self::ActionExpired,
    ];

    /// The kind a subject token or header names, if this version knows it.
    pub fn parse(token: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == token)
    }

    /// The token used in subjects, message ids and the `Checkout-Event` header.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Requested => "requested",
            Self::Reserved => "reserved",
            Self::Rejected => "rejected",
            Self::Authorized => "authorized",
            Self::Committed => "committed",
            Self::Declined => "declined",
            Self::Confirmed => "confirmed",
            Self::Failed => "failed",
            Self::ShipRequested => "ship_requested",
            Self::Captured => "captured",
            Self::Shipped => "shipped",
            Self::CancelRequested => "cancel_requested",
            Self::Cancelled => "cancelled",
            Self::RefundRequested => "refund_requested",
            Self::Refunded => "refunded",
            Self::CaptureFailed => "capture_failed",
            Self::RefundFailed => "refund_failed",
            Self::CancelFailed => "cancel_failed",
            Self::TimedOut => "timed_out",
            Self::ActionRequired => "action_required",
            Self::ProviderUpdate => "provider_update",
            Self::ActionExpired => "action_expired",
        }
    }
}
