-- Storage that stays bounded (lib/retention.rs prunes in batches, off the hot path).
-- BRIN indexes: rows arrive in time order, so a few pages of summary find the old ones at
-- almost no cost to the inserts on the hot path (a btree on the timestamp would be one more
-- random-page write per event).
CREATE INDEX inventory_inbox_by_time ON inventory.inbox USING brin (handled_at);
CREATE INDEX payments_inbox_by_time ON payments.inbox USING brin (handled_at);
CREATE INDEX orders_inbox_by_time ON orders.inbox USING brin (handled_at);
CREATE INDEX outbox_by_time ON edge.outbox USING brin (created_at);
CREATE INDEX stock_movements_by_time ON inventory.stock_movements USING brin (created_at);

-- The stock ledger past retention, one row per SKU, UTC day and kind: the audit still adds
-- up (on_hand and reserved are the sums of every delta ever), the per-order detail is gone.
CREATE TABLE inventory.stock_movement_days (
    sku             text NOT NULL,
    day             date NOT NULL,
    kind            text NOT NULL,
    movements       bigint NOT NULL,
    on_hand_delta   bigint NOT NULL,
    reserved_delta  bigint NOT NULL,
    PRIMARY KEY (sku, day, kind)
);
