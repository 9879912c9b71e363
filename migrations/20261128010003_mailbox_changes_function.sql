-- Changes (asked by every IDLE session on every new mail) as one function call. Sent as a
-- prepared statement, PostgreSQL re-planned it on every call (for `modseq > $3` alone the
-- generic plan's estimate is a third of the mailbox, so it never switched to it), and
-- planning cost 2-3x the execution (about 0.1 ms against 0.04 ms). Here the plans are kept
-- (force_generic_plan), and every range is bounded on both sides by the mailbox's
-- highestmodseq, so the generic estimate is small and the plans stay index scans whatever the
-- sizes of the mailboxes. STABLE: both queries read the caller's one snapshot.
--
-- First row (head): a = highestmodseq, b = uidnext, n = entries (mailboxes.message_count),
-- log_floor, expunged = UIDs expunged after p_since. Then the entries changed after p_since,
-- by UID: a = uid, b = modseq, flags, recent. No rows: not p_account's mailbox.
CREATE FUNCTION mailbox.changes(p_mailbox bigint, p_account bigint, p_since bigint)
RETURNS TABLE (head boolean, a bigint, b bigint, n bigint, log_floor bigint,
               expunged bigint[], flags text[], recent boolean)
LANGUAGE plpgsql STABLE
SET plan_cache_mode = force_generic_plan
AS $$
#variable_conflict use_column
DECLARE
    mb record;
BEGIN
    SELECT x.highestmodseq, x.uidnext, x.message_count, x.log_floor INTO mb
      FROM mailbox.mailboxes x WHERE x.id = p_mailbox AND x.account_id = p_account;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    RETURN QUERY
    SELECT true, mb.highestmodseq, mb.uidnext, mb.message_count, mb.log_floor,
           ARRAY(SELECT DISTINCT c.uid FROM mailbox.changelog c
                  WHERE c.mailbox_id = p_mailbox AND c.modseq > p_since
                    AND c.modseq <= mb.highestmodseq AND c.kind = 3
                  ORDER BY c.uid),
           NULL::text[], false;
    RETURN QUERY
    SELECT false, m.uid, m.modseq, 0::bigint, 0::bigint, NULL::bigint[], m.flags, m.recent
      FROM mailbox.messages m
     WHERE m.mailbox_id = p_mailbox AND m.modseq > p_since AND m.modseq <= mb.highestmodseq
     ORDER BY m.uid;
END
$$;
