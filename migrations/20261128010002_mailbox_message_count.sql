-- The number of entries of each mailbox, kept on its row so Changes (asked by every IDLE
-- session on every new mail) and others need not count the messages each time.
--
-- Maintained by triggers on mailbox.messages rather than by the store's code, so it stays
-- right whatever writes entries (every code path, and replicas still running the previous
-- release during a rolling upgrade). Every writer already holds the mailbox row's lock when it
-- inserts, deletes or moves entries (alloc_uids / SELECT .. FOR UPDATE come first), so the
-- triggers' updates of that row add no lock and no new lock order; the count changes in the
-- same transaction as the entries, so any one snapshot sees both agree.

ALTER TABLE mailbox.mailboxes ADD COLUMN message_count bigint NOT NULL DEFAULT 0;

-- Entries are inserted one per statement (delivery, APPEND, COPY): a row trigger.
CREATE FUNCTION mailbox.message_count_insert() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE mailbox.mailboxes SET message_count = message_count + 1 WHERE id = NEW.mailbox_id;
    RETURN NULL;
END
$$;

-- Expunges delete many entries in one statement: one update per mailbox per statement.
CREATE FUNCTION mailbox.message_count_delete() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE mailbox.mailboxes mb SET message_count = mb.message_count - d.n
      FROM (SELECT mailbox_id, count(*) AS n FROM old_rows GROUP BY mailbox_id) d
     WHERE mb.id = d.mailbox_id;
    RETURN NULL;
END
$$;

-- Entries moved to another mailbox by UPDATE (RENAME INBOX).
CREATE FUNCTION mailbox.message_count_move() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE mailbox.mailboxes SET message_count = message_count - 1 WHERE id = OLD.mailbox_id;
    UPDATE mailbox.mailboxes SET message_count = message_count + 1 WHERE id = NEW.mailbox_id;
    RETURN NULL;
END
$$;

-- Triggers first, count second: CREATE TRIGGER waits for writers in flight and blocks new
-- ones until this migration commits, so the count below sees every entry committed before,
-- and the triggers count every entry written after.
CREATE TRIGGER messages_count_insert AFTER INSERT ON mailbox.messages
    FOR EACH ROW EXECUTE FUNCTION mailbox.message_count_insert();
CREATE TRIGGER messages_count_delete AFTER DELETE ON mailbox.messages
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION mailbox.message_count_delete();
CREATE TRIGGER messages_count_move AFTER UPDATE OF mailbox_id ON mailbox.messages
    FOR EACH ROW WHEN (OLD.mailbox_id IS DISTINCT FROM NEW.mailbox_id)
    EXECUTE FUNCTION mailbox.message_count_move();

UPDATE mailbox.mailboxes mb
   SET message_count = (SELECT count(*) FROM mailbox.messages m WHERE m.mailbox_id = mb.id);
