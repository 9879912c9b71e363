-- RFC 3030 BODY=BINARYMIME: the body is opaque octets (bare CR, LF, NUL) that may only be
-- relayed unchanged with BDAT to a server offering BINARYMIME and CHUNKING, never through DATA.
ALTER TABLE relay.messages ADD COLUMN binarymime boolean NOT NULL DEFAULT false;
