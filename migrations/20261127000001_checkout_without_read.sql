-- A checkout without its read (issue 12).
--
-- The edge remembers the lines of the carts it wrote and prices a checkout from that memory
-- and its catalog cache, skipping the read. Neither may be trusted for what gets charged, so
-- the acceptance checks both under the cart's lock: the lines, as before, and now also each
-- line's product as priced (price, currency, weight, tax code, still on sale) against the
-- catalog. Any difference refuses the acceptance (false), and the edge reads the cart and
-- prices it again, as it does when a line changed in between.
--
-- A key already used is also a refusal now (ON CONFLICT DO NOTHING) rather than an error:
-- under load one statement accepts many buyers' checkouts, and an error would fail all of
-- them and send each again alone. The edge's next read tells a replay from a reused key.
--
-- The earlier signature stays for edges of the previous release during a rolling upgrade.

CREATE FUNCTION edge.accept_checkout(
    p_user_id text, p_key text, p_hash bytea, p_order_id uuid, p_cart_id uuid,
    p_promo text, p_skus text[], p_qtys integer[],
    p_event bytea, p_traceparent text, p_msg_id text, p_subject text, p_payload bytea,
    -- The products as priced, one per line; NULL when they were read just before (no check).
    p_currency text, p_prices numeric[], p_weights integer[], p_tax_codes text[])
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
    -- Exact equality: a price stored with more places than its currency has never matches
    -- its rounded self, and such a line always takes the read (which charges it correctly).
    IF p_prices IS NOT NULL AND EXISTS (
        SELECT 1 FROM unnest(p_skus, p_prices, p_weights, p_tax_codes) AS l(sku, price, weight, tax_code)
        LEFT JOIN catalog.products p ON p.sku = l.sku
        WHERE p.sku IS NULL OR NOT p.active OR p.price <> l.price
           OR trim(p.currency) <> p_currency OR p.weight_grams <> l.weight
           OR p.tax_code <> l.tax_code)
    THEN
        RETURN false;
    END IF;
    INSERT INTO edge.checkouts
        (user_id, idempotency_key, request_hash, order_id, cart_id, event, traceparent)
    VALUES (p_user_id, p_key, p_hash, p_order_id, p_cart_id, p_event, p_traceparent)
    ON CONFLICT DO NOTHING;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    INSERT INTO edge.outbox (msg_id, subject, payload, traceparent)
    VALUES (p_msg_id, p_subject, p_payload, p_traceparent);
    UPDATE edge.carts SET status = 'checked_out', order_id = p_order_id, updated_at = now()
    WHERE cart_id = p_cart_id;
    RETURN true;
END
$$;
