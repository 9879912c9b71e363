-- The word index on every blob cost each delivery a to_tsvector() and a GIN insert, and no
-- query used it: IMAP SEARCH BODY/TEXT is a substring match, which the index cannot answer,
-- so the search always scanned the candidates' text (the index was only ORed with that
-- scan, and matched some phrases a substring does not). The column stays, nullable, so
-- replicas of the previous release still running during a rolling upgrade can go on
-- writing it; a later release drops it.
DROP INDEX IF EXISTS mailbox.blobs_fts;
ALTER TABLE mailbox.blobs ALTER COLUMN fts DROP NOT NULL;
