-- One edge.accept_checkout. The 13-argument signature (20261126000004) stayed beside the
-- 17-argument one (20261127000001) for edges of the release before it during a rolling
-- upgrade. That window is the length of one deploy: a release's migrations run when its first
-- process starts, and releases go out one at a time, so once every edge runs the 17-argument
-- call (the release of 2026-11-27 and every one since), nothing calls the old one. This
-- migration ships two releases later; an upgrade that skips a release must stop the old
-- edges first.
DROP FUNCTION IF EXISTS edge.accept_checkout(
    text, text, bytea, uuid, uuid, text, text[], integer[], bytea, text, text, text, bytea);
