-- The edge's hot path in one round trip per step (issue 12).
--
-- A cart change is "lock the cart, then read and write its lines". Sent from Rust that is
-- BEGIN, two statements and COMMIT: four round trips, each a send and a receive on both
-- sides. In a VOLATILE PL/pgSQL function every statement takes a fresh snapshot, exactly as
-- the statements of a READ COMMITTED transaction do, so the reads after the lock still see
-- whatever committed before the lock was granted. The functions below are those
-- transactions, unchanged, in one round trip.

-- A SQL function whose body holds a sub-select is never inlined: PostgreSQL parsed and
-- planned this one on every call. PL/pgSQL keeps its plan for the session.
CREATE OR REPLACE FUNCTION orders.has_failed(p_order_id uuid) RETURNS boolean
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN EXISTS (SELECT 1 FROM orders.orders WHERE order_id = p_order_id AND status = 'failed');
END
$$;

-- The catalog's answer to "what is this product now?", for statements of other services
-- (the checkout joins its cart lines to it). Inlined by the planner: an index look-up.
CREATE FUNCTION catalog.product(p_sku text) RETURNS SETOF catalog.products
LANGUAGE sql STABLE AS $$
    SELECT * FROM catalog.products WHERE sku = p_sku
$$;

-- The buyer's open cart, created or (after a failed order) reopened as needed, locked until
-- the caller's transaction ends. The latest cart's row lock serializes one buyer's cart
-- changes and checkout; when there is no cart to lock, the partial unique index "one open
-- cart per user" decides which of two first requests makes it, and the loser's next
-- attempt (a fresh snapshot) finds the winner's cart. Raises serialization_failure if a
-- concurrent request of the same buyer keeps winning.
CREATE FUNCTION edge.open_cart(p_user_id text, p_new_cart uuid, OUT cart uuid, OUT promo text)
LANGUAGE plpgsql AS $$
DECLARE
    latest record;
BEGIN
    FOR attempt IN 1..3 LOOP
        SELECT c.cart_id, c.status, c.promo_code, c.order_id INTO latest
        FROM edge.carts c WHERE c.user_id = p_user_id
        ORDER BY c.created_at DESC LIMIT 1 FOR UPDATE;
        IF FOUND AND latest.status = 'open' THEN
            cart := latest.cart_id;
            promo := latest.promo_code;
            RETURN;
        END IF;
        -- A checked-out cart whose order failed is the buyer's cart again, unless a
        -- concurrent request made a new one while the order was still pending: it did so
        -- under this cart's lock, so it committed before this statement's snapshot, and the
        -- next attempt finds it.
        IF FOUND AND latest.order_id IS NOT NULL AND orders.has_failed(latest.order_id) THEN
            UPDATE edge.carts c SET status = 'open', order_id = NULL, updated_at = now()
            WHERE c.cart_id = latest.cart_id
              AND NOT EXISTS (SELECT 1 FROM edge.carts o
                              WHERE o.user_id = p_user_id AND o.status = 'open');
            IF FOUND THEN
                cart := latest.cart_id;
                promo := latest.promo_code;
                RETURN;
            END IF;
            CONTINUE;
        END IF;
        INSERT INTO edge.carts (cart_id, user_id, status) VALUES (p_new_cart, p_user_id, 'open')
        ON CONFLICT (user_id) WHERE status = 'open' DO NOTHING;
        IF FOUND THEN
            cart := p_new_cart;
            promo := NULL;
            RETURN;
        END IF;
    END LOOP;
    RAISE EXCEPTION 'the cart of % is being changed by another request', p_user_id
        USING ERRCODE = 'serialization_failure';
END
$$;

-- Adds a line to the buyer's open cart (p_sum: summed with the line already there) or sets
-- its quantity, within the cart's limits: the line exists already or the cart has room for
-- another, no other line is in another currency, the quantity stays at most p_max_qty.
-- Returns the cart's lines as they were before the change (changed = false) plus the
-- changed line (changed = true); a data-modifying CTE's rows are not visible to the rest of
-- its statement, so the caller merges them. No changed row means nothing was written.
CREATE FUNCTION edge.write_line(
    p_user_id text, p_new_cart uuid, p_sku text, p_qty integer, p_sum boolean,
    p_max_qty integer, p_max_lines bigint, p_currency text)
RETURNS TABLE (cart uuid, promo text, item_sku text, item_qty integer, item_currency text,
               item_added_at timestamptz, changed boolean)
LANGUAGE plpgsql AS $$
DECLARE
    v_cart uuid;
    v_promo text;
BEGIN
    SELECT o.cart, o.promo INTO v_cart, v_promo FROM edge.open_cart(p_user_id, p_new_cart) o;
    RETURN QUERY
    WITH up AS (
        INSERT INTO edge.cart_items AS i (cart_id, sku, qty, currency)
        SELECT v_cart, p_sku, p_qty, p_currency
        WHERE (EXISTS (SELECT 1 FROM edge.cart_items x WHERE x.cart_id = v_cart AND x.sku = p_sku)
               OR (SELECT count(*) FROM edge.cart_items x WHERE x.cart_id = v_cart) < p_max_lines)
          AND NOT EXISTS (SELECT 1 FROM edge.cart_items x
                          WHERE x.cart_id = v_cart AND x.sku <> p_sku AND x.currency <> p_currency)
        ON CONFLICT (cart_id, sku) DO UPDATE
            SET qty = CASE WHEN p_sum THEN i.qty + EXCLUDED.qty ELSE EXCLUDED.qty END
            WHERE CASE WHEN p_sum THEN i.qty + EXCLUDED.qty ELSE EXCLUDED.qty END <= p_max_qty
        RETURNING i.sku, i.qty, i.currency, i.added_at)
    SELECT v_cart, v_promo, u.sku, u.qty, u.currency, u.added_at, true FROM up u
    UNION ALL
    SELECT v_cart, v_promo, x.sku, x.qty, x.currency, x.added_at, false
    FROM edge.cart_items x WHERE x.cart_id = v_cart;
END
$$;

-- Accepts a checkout priced from a read of the cart made before this call, if the cart is
-- still what was priced: the same promotion code and the same lines (p_skus, p_qtys), and
-- still open (or its order failed). The request row, the outbox row and the cart's new state
-- commit together. Returns false, writing nothing, if the cart changed in between: the
-- caller reads it again. A concurrent duplicate of the same request waits on the cart's
-- lock, then finds the cart checked out, returns false, and its caller finds the first
-- request's order under the key.
CREATE FUNCTION edge.accept_checkout(
    p_user_id text, p_key text, p_hash bytea, p_order_id uuid, p_cart_id uuid,
    p_promo text, p_skus text[], p_qtys integer[],
    p_event bytea, p_traceparent text, p_msg_id text, p_subject text, p_payload bytea)
RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM 1 FROM edge.carts c
    WHERE c.cart_id = p_cart_id AND c.user_id = p_user_id
      AND (c.status = 'open' OR c.order_id IS NULL OR orders.has_failed(c.order_id))
      AND c.promo_code IS NOT DISTINCT FROM p_promo
    FOR UPDATE;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    -- Read after the lock (a fresh snapshot): any line change committed before it shows.
    IF EXISTS (
        (SELECT i.sku, i.qty FROM edge.cart_items i WHERE i.cart_id = p_cart_id
         EXCEPT ALL SELECT * FROM unnest(p_skus, p_qtys))
        UNION ALL
        (SELECT * FROM unnest(p_skus, p_qtys)
         EXCEPT ALL SELECT i.sku, i.qty FROM edge.cart_items i WHERE i.cart_id = p_cart_id))
    THEN
        RETURN false;
    END IF;
    INSERT INTO edge.checkouts
        (user_id, idempotency_key, request_hash, order_id, cart_id, event, traceparent)
    VALUES (p_user_id, p_key, p_hash, p_order_id, p_cart_id, p_event, p_traceparent);
    INSERT INTO edge.outbox (msg_id, subject, payload, traceparent)
    VALUES (p_msg_id, p_subject, p_payload, p_traceparent);
    UPDATE edge.carts SET status = 'checked_out', order_id = p_order_id, updated_at = now()
    WHERE cart_id = p_cart_id;
    RETURN true;
END
$$;
