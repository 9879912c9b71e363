-- One schema per owning service: mailbox-store owns `mailbox`, relay-queue owns `relay`.
CREATE SCHEMA IF NOT EXISTS mailbox;
CREATE SCHEMA IF NOT EXISTS relay;
