-- IMAP subscriptions as their own rows, keyed by name: RFC 9051 §6.3.4/§6.3.6 make a
-- subscription independent of the mailbox (DELETE and RENAME leave it where it is, LIST
-- (SUBSCRIBED) shows a subscribed name that no longer exists as \NonExistent), which a flag
-- on the mailbox row cannot express: the flag went with the row.
CREATE TABLE mailbox.subscriptions (
    account_id  bigint NOT NULL REFERENCES mailbox.accounts (id) ON DELETE CASCADE,
    name        text NOT NULL,
    PRIMARY KEY (account_id, name)
);

INSERT INTO mailbox.subscriptions (account_id, name)
SELECT account_id, name FROM mailbox.mailboxes WHERE subscribed
ON CONFLICT DO NOTHING;

-- mailboxes.subscribed is no longer read or written by the store; it stays so replicas of the
-- previous release still running during a rolling upgrade can go on using it, and a later
-- release drops it. Its default was what made CREATE subscribe; new rows start unsubscribed.
ALTER TABLE mailbox.mailboxes ALTER COLUMN subscribed SET DEFAULT false;
COMMENT ON COLUMN mailbox.mailboxes.subscribed IS
    'unused since 20261203020001 (see mailbox.subscriptions); kept for rolling upgrades';

-- Until the previous release is gone, its SUBSCRIBE/UNSUBSCRIBE (an UPDATE of the flag) are
-- carried over to the table, so no subscription change is lost in the rollout window.
CREATE FUNCTION mailbox.subscribed_flag_carry() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.subscribed THEN
        INSERT INTO mailbox.subscriptions (account_id, name)
        VALUES (NEW.account_id, NEW.name) ON CONFLICT DO NOTHING;
    ELSE
        DELETE FROM mailbox.subscriptions WHERE account_id = NEW.account_id AND name = NEW.name;
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER mailboxes_subscribed_flag_carry
    AFTER UPDATE OF subscribed ON mailbox.mailboxes
    FOR EACH ROW WHEN (OLD.subscribed IS DISTINCT FROM NEW.subscribed)
    EXECUTE FUNCTION mailbox.subscribed_flag_carry();
