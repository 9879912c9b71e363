-- Whether the TLS session of a delivery attempt had a certificate that verified for the
-- destination name (opportunistic STARTTLS may go on without: the result is recorded).
ALTER TABLE relay.attempts ADD COLUMN tls_verified boolean NOT NULL DEFAULT false;
