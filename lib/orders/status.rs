//! The orders' vocabulary: where a recorded order stands, and the actions that move it after
//! confirmation. Below both the rows (`record`) and the action requests (`lifecycle`).

crate::text_enum! {
    /// Where a recorded order stands (`orders.orders.status`). An accepted checkout without
    /// an order row yet is pending; that state lives in no column, so it is not one of these.
    pub enum OrderStatus {
        Confirmed = "confirmed",
        Failed = "failed",
        Shipped = "shipped",
        Cancelled = "cancelled",
        Refunded = "refunded",
    }
}

crate::text_enum! {
    /// A change an admin or the buyer asks for (`orders.orders.pending_action` while it is
    /// in flight).
    pub enum Action {
        Ship = "ship",
        Cancel = "cancel",
        Refund = "refund",
    }
}

impl Action {
    /// The status the order must have for the action.
    pub(super) fn required_status(self) -> OrderStatus {
        match self {
            Self::Ship | Self::Cancel => OrderStatus::Confirmed,
            Self::Refund => OrderStatus::Shipped,
        }
    }

    /// The status the action ends in.
    pub(super) fn final_status(self) -> OrderStatus {
        match self {
            Self::Ship => OrderStatus::Shipped,
            Self::Cancel => OrderStatus::Cancelled,
            Self::Refund => OrderStatus::Refunded,
        }
    }

    /// What the API shows as the order's stage while the action is in flight.
    pub fn stage(self) -> &'static str {
        match self {
            Self::Ship => "shipping",
            Self::Cancel => "cancelling",
            Self::Refund => "refunding",
        }
    }
}
