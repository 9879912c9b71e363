-- mailbox-store: domains, accounts, aliases, mailboxes, content-addressed blobs with their
-- parsed MIME metadata, mailbox entries, the modseq change log, idempotency records,
-- presence leases (for Alert) and DKIM keys (stored for relay-queue).

CREATE TABLE mailbox.domains (
    id          bigserial PRIMARY KEY,
    name        text NOT NULL UNIQUE CHECK (name = lower(name) AND name <> ''),
    catch_all   text NOT NULL DEFAULT '',
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE mailbox.accounts (
    id              bigserial PRIMARY KEY,
    domain_id       bigint NOT NULL REFERENCES mailbox.domains (id) ON DELETE CASCADE,
    address         text NOT NULL UNIQUE CHECK (address = lower(address)),
    display_name    text NOT NULL DEFAULT '',
    password_hash   text NOT NULL,
    quota_bytes     bigint NOT NULL DEFAULT 0 CHECK (quota_bytes >= 0),
    quota_messages  bigint NOT NULL DEFAULT 0 CHECK (quota_messages >= 0),
    used_bytes      bigint NOT NULL DEFAULT 0,
    used_messages   bigint NOT NULL DEFAULT 0,
    enabled         boolean NOT NULL DEFAULT true,
    moved_to        text NOT NULL DEFAULT '',
    created_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX accounts_domain ON mailbox.accounts (domain_id);

-- kind 0 = alias, 1 = distribution list (EXPN shows its members).
CREATE TABLE mailbox.aliases (
    id          bigserial PRIMARY KEY,
    domain_id   bigint NOT NULL REFERENCES mailbox.domains (id) ON DELETE CASCADE,
    address     text NOT NULL UNIQUE CHECK (address = lower(address)),
    kind        smallint NOT NULL DEFAULT 0,
    targets     text[] NOT NULL
);
CREATE INDEX aliases_domain ON mailbox.aliases (domain_id);

CREATE TABLE mailbox.mailboxes (
    id              bigserial PRIMARY KEY,
    account_id      bigint NOT NULL REFERENCES mailbox.accounts (id) ON DELETE CASCADE,
    name            text NOT NULL,
    special_use     smallint NOT NULL DEFAULT 0,
    subscribed      boolean NOT NULL DEFAULT true,
    uidvalidity     bigint NOT NULL,
    uidnext         bigint NOT NULL DEFAULT 1,
    highestmodseq   bigint NOT NULL DEFAULT 1,
    UNIQUE (account_id, name)
);

-- Raw RFC 5322 bytes stored once per unique content (id = SHA-256), with the metadata parsed
-- once at first delivery. `refcount` counts mailbox entries; a blob at 0 is deleted.
CREATE TABLE mailbox.blobs (
    id          bytea PRIMARY KEY,
    size        bigint NOT NULL,
    refcount    bigint NOT NULL DEFAULT 0,
    data        bytea NOT NULL,
    envelope    bytea NOT NULL,          -- prost-encoded mailsuite.v1.Envelope
    body        bytea NOT NULL,          -- prost-encoded mailsuite.v1.BodyPart
    headers     jsonb NOT NULL,          -- [[lowercase name, decoded value], ...]
    body_text   text NOT NULL,           -- decoded text parts, for BODY/TEXT search
    sent_date   date,
    fts         tsvector NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
-- Slicing a part out of a large message must not decompress the whole value.
ALTER TABLE mailbox.blobs ALTER COLUMN data SET STORAGE EXTERNAL;
CREATE INDEX blobs_fts ON mailbox.blobs USING gin (fts);

CREATE TABLE mailbox.messages (
    mailbox_id      bigint NOT NULL REFERENCES mailbox.mailboxes (id) ON DELETE CASCADE,
    uid             bigint NOT NULL,
    modseq          bigint NOT NULL,
    flags           text[] NOT NULL DEFAULT '{}',
    internal_date   timestamptz NOT NULL,
    date_offset     integer NOT NULL DEFAULT 0,
    size            bigint NOT NULL,
    blob_id         bytea NOT NULL REFERENCES mailbox.blobs (id),
    recent          boolean NOT NULL DEFAULT true,
    PRIMARY KEY (mailbox_id, uid)
);
CREATE INDEX messages_modseq ON mailbox.messages (mailbox_id, modseq);
CREATE INDEX messages_blob ON mailbox.messages (blob_id);

-- kind 1 = new, 2 = flags, 3 = expunge (what CONDSTORE/QRESYNC need beyond the live rows).
CREATE TABLE mailbox.changelog (
    mailbox_id  bigint NOT NULL REFERENCES mailbox.mailboxes (id) ON DELETE CASCADE,
    modseq      bigint NOT NULL,
    kind        smallint NOT NULL,
    uid         bigint NOT NULL,
    at          timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (mailbox_id, modseq, kind, uid)
);

-- Remembers the lowest modseq the change log still reaches per mailbox after pruning.
ALTER TABLE mailbox.mailboxes ADD COLUMN log_floor bigint NOT NULL DEFAULT 0;

CREATE TABLE mailbox.deliveries (
    idempotency_key text PRIMARY KEY,
    response        bytea,
    created_at      timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE mailbox.presence (
    account_id  bigint NOT NULL,
    replica     uuid NOT NULL,
    expires_at  timestamptz NOT NULL,
    PRIMARY KEY (account_id, replica)
);

CREATE TABLE mailbox.dkim_keys (
    domain          text NOT NULL,
    selector        text NOT NULL,
    algorithm       text NOT NULL,
    private_key_pem text NOT NULL,
    dns_record      text NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (domain, selector)
);

-- UIDVALIDITY values are never reused, even for a mailbox re-created under the same name.
CREATE SEQUENCE mailbox.uidvalidity START 1;

-- Per-recipient trace fields (Return-Path:, Delivered-To:) are kept with the entry, in front
-- of the shared blob, so one message to many recipients is still stored once.
ALTER TABLE mailbox.messages ADD COLUMN prefix bytea NOT NULL DEFAULT '';
