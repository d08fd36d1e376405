-- A delivery's reference to its endpoint is no longer a foreign key. Endpoints are never
-- deleted (a deleted one keeps its row with deleted_at set, and its deliveries end with it), so
-- the key guarded nothing, and it cost the hot path: every delivery the feed queued ran a
-- trigger that looked the endpoint up and locked its row (FOR KEY SHARE), three per checkout
-- with three endpoints, and a dispatcher recording a failing endpoint's health waited on those
-- locks. The feed only queues deliveries for endpoints it has just read in the same statement.
ALTER TABLE webhooks.deliveries DROP CONSTRAINT IF EXISTS deliveries_endpoint_id_fkey;
