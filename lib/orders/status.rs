//! The orders' vocabulary: where a recorded order stands, and the actions that move it after
//! confirmation. Below both the rows (`record`) and the action requests (`lifecycle`).

crate::text_enum! {
    /// Where a recorded order stands (`orders.orders.status`). An accepted checkout without
    /// an order row yet is pending; that state lives in no column, so it is not one of these.
    pub enum OrderStatus {
        Confirmed = "confirmed",
        Failed = "failed",
        /// Some units shipped (their share captured), more to come.
        PartiallyShipped = "partially_shipped",
        /// Every unit shipped, or the unshipped rest cancelled.
        Shipped = "shipped",
        /// Some captured money went back.
        PartiallyRefunded = "partially_refunded",
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
    /// The statuses that allow the action (what is left to ship or refund is checked under
    /// the lock).
    pub(super) fn allowed_from(self) -> &'static [OrderStatus] {
        match self {
            Self::Ship | Self::Cancel => &[
                OrderStatus::Confirmed,
                OrderStatus::PartiallyShipped,
                OrderStatus::PartiallyRefunded,
            ],
            Self::Refund => &[
                OrderStatus::PartiallyShipped,
                OrderStatus::Shipped,
                OrderStatus::PartiallyRefunded,
            ],
        }
    }

    /// The status a whole-order action (an event without a part, from before shipments in
    /// parts) ends in.
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
