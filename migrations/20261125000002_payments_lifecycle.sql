-- Order lifecycle after confirmation: ship (capture), cancel (void + restock), refund.
ALTER TABLE orders.orders DROP CONSTRAINT orders_status_check;
ALTER TABLE orders.orders ADD CONSTRAINT orders_status_check
    CHECK (status IN ('confirmed', 'failed', 'shipped', 'cancelled', 'refunded'));
-- A requested change still in flight (a semantic lock): 'ship', 'cancel' or 'refund'.
ALTER TABLE orders.orders ADD COLUMN pending_action text
    CHECK (pending_action IN ('ship', 'cancel', 'refund'));

-- Failed calls to the provider per order, so retries are bounded and visible.
CREATE TABLE payments.attempts (
    order_id    uuid PRIMARY KEY,
    failures    integer NOT NULL,
    last_error  text NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now()
);
