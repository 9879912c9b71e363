-- relay-queue: the durable outbound queue.
--
-- A message is stored once with its raw bytes; each envelope recipient has its own row and
-- state, because one SMTP transaction may accept some recipients and defer or refuse others.
-- Workers claim due recipients with FOR UPDATE SKIP LOCKED and hold them under a lease; a
-- lease that runs out (its worker died) makes the recipient claimable again.

CREATE TABLE relay.messages (
    id              uuid PRIMARY KEY,
    idempotency_key text UNIQUE,
    return_path     text NOT NULL DEFAULT '',
    envid           text NOT NULL DEFAULT '',
    -- 0 unspecified, 1 FULL, 2 HDRS (RFC 3461 RET)
    ret             smallint NOT NULL DEFAULT 0,
    submitter       text NOT NULL DEFAULT '',
    traceparent     text NOT NULL DEFAULT '',
    body_8bit       boolean NOT NULL DEFAULT false,
    smtputf8        boolean NOT NULL DEFAULT false,
    size            bigint NOT NULL,
    raw             bytea NOT NULL,
    created         timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE relay.recipients (
    id            bigserial PRIMARY KEY,
    message_id    uuid NOT NULL REFERENCES relay.messages (id) ON DELETE CASCADE,
    address       text NOT NULL,
    -- Lower-cased domain part: the unit of routing, grouping and Flush (ETRN).
    domain        text NOT NULL,
    -- RFC 3461 NOTIFY keywords, comma-separated (empty = default: FAILURE and DELAY).
    notify        text NOT NULL DEFAULT '',
    orcpt         text NOT NULL DEFAULT '',
    state         text NOT NULL DEFAULT 'pending'
                  CHECK (state IN ('pending', 'delivering', 'delivered', 'deferred', 'failed')),
    attempts      integer NOT NULL DEFAULT 0,
    next_attempt  timestamptz NOT NULL DEFAULT now(),
    last_reply    text NOT NULL DEFAULT '',
    -- The remote MTA that gave the final answer (for the DSN Remote-MTA field).
    remote_mta    text NOT NULL DEFAULT '',
    lease_owner   uuid,
    lease_until   timestamptz,
    delay_warned  boolean NOT NULL DEFAULT false,
    -- A DSN (failure or success) has been queued for this recipient.
    dsn_sent      boolean NOT NULL DEFAULT false,
    updated       timestamptz NOT NULL DEFAULT now(),
    UNIQUE (message_id, address)
);

-- The worker's claim query: due recipients in waiting states, and expired leases.
CREATE INDEX recipients_due ON relay.recipients (next_attempt)
    WHERE state IN ('pending', 'deferred');
CREATE INDEX recipients_leased ON relay.recipients (lease_until)
    WHERE state = 'delivering';
CREATE INDEX recipients_domain ON relay.recipients (domain)
    WHERE state IN ('pending', 'deferred', 'delivering');
CREATE INDEX recipients_message ON relay.recipients (message_id);

CREATE TABLE relay.attempts (
    id            bigserial PRIMARY KEY,
    recipient_id  bigint NOT NULL REFERENCES relay.recipients (id) ON DELETE CASCADE,
    at            timestamptz NOT NULL DEFAULT now(),
    worker        uuid,
    host          text NOT NULL DEFAULT '',
    tls           boolean NOT NULL DEFAULT false,
    -- 'delivered', 'deferred' or 'failed'
    outcome       text NOT NULL,
    reply         text NOT NULL DEFAULT ''
);
CREATE INDEX attempts_recipient ON relay.attempts (recipient_id);
