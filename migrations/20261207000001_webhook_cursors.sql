-- An endpoint reads the message log from a cursor instead of the feed queueing a delivery row
-- per endpoint for every event. Before, three endpoints cost every checkout three delivery
-- inserts, and each delivery was rewritten twice more (claim, outcome); a dead or slow
-- endpoint's backlog was thousands of rows, written at the checkout's rate. Now a message is
-- written once; a delivery row is written once, when its first attempt is recorded; and a
-- backlog is the distance between a cursor and the end of the log, which costs nothing to grow.
--
-- Messages are read in commit order's stand-in: the writing transaction's id (`tx`), then
-- the message id. Only messages of transactions older than every transaction still running
-- are read (`tx < pg_snapshot_xmin(pg_current_snapshot())`), so a message committed late by an
-- older transaction is never passed by the cursor. The price: a writing transaction left open
-- on the server (in any database: transaction ids are the server's) holds webhooks back until
-- it ends (idle_in_transaction_session_timeout bounds it).
ALTER TABLE webhooks.messages ADD COLUMN tx xid8 NOT NULL DEFAULT '0';
-- (Messages already here have their delivery rows: 0 puts them behind every cursor.)
ALTER TABLE webhooks.messages ALTER COLUMN tx SET DEFAULT pg_current_xact_id();
CREATE INDEX messages_in_order ON webhooks.messages (tx, webhook_id);

-- cursor_tx, cursor_id: the last message this endpoint has been offered (a new endpoint starts
-- at the log's end). owner, owned_until: the dispatcher process that reads from the cursor
-- now, and until when (a lease it renews with every batch it records; one killed leaves it to
-- another when it runs out). Deliveries that were queued the old way stay rows and are sent
-- as retries are.
ALTER TABLE webhooks.endpoints
    ADD COLUMN cursor_tx xid8 NOT NULL DEFAULT pg_snapshot_xmin(pg_current_snapshot()),
    ADD COLUMN cursor_id text NOT NULL DEFAULT '',
    ADD COLUMN owner uuid,
    ADD COLUMN owned_until timestamptz;

-- The delivery log walks the log newest first by the same index the cursors read, and replay
-- and the pruner find messages by time with BRIN (nearly free): the time btree cost every
-- message an index entry that only these rare readers used.
DROP INDEX webhooks.messages_by_time;
CREATE INDEX messages_created_brin ON webhooks.messages USING brin (created_at);
-- (Messages from before this migration, at tx 0, come last in the log, among themselves by id.)
