//! The `Queue` gRPC service.

use std::sync::Arc;

use mailsuite_proto::queue_server::Queue;
use mailsuite_proto::{
    DeleteRequest, DeleteResponse, EnqueueChunk, EnqueueHeader, EnqueueResponse, FlushRequest,
    FlushResponse, GetMessageRequest, ListMessagesRequest, ListMessagesResponse, QueuedMessage,
    RetryRequest, RetryResponse, enqueue_chunk::Part,
};
use mailsuite_runtime::ServiceError;
use tonic::{Request, Response, Status, Streaming};

use crate::db::parse_id;
use crate::worker::Engine;

pub struct QueueService {
    pub engine: Arc<Engine>,
}

fn validate(h: &EnqueueHeader, max_recipients: usize) -> Result<(), ServiceError> {
    // Without a key a retried Enqueue (lost reply, reconnect) would queue the message twice.
    if h.idempotency_key.is_empty() {
        return Err(ServiceError::InvalidArgument(
            "an idempotency key is required".into(),
        ));
    }
    if h.recipients.is_empty() {
        return Err(ServiceError::InvalidArgument("no recipients".into()));
    }
    if h.recipients.len() > max_recipients {
        return Err(ServiceError::InvalidArgument(format!(
            "too many recipients ({} > {max_recipients})",
            h.recipients.len()
        )));
    }
    // The local part may hold anything a quoted-string can (a space, `<`, `>`, `@`, `"`):
    // smtp::smtp_path quotes it again on the way out. Control characters never (CR LF would
    // end an SMTP command), nor specials in the domain.
    let bad_addr = |a: &str| {
        let domain = a.rsplit_once('@').map(|(_, d)| d).unwrap_or(a);
        a.len() > 512
            || a.chars().any(char::is_control)
            || domain
                .bytes()
                .any(|b| b == b' ' || b == b'<' || b == b'>' || b == b'"' || b == b'\\')
    };
    if bad_addr(&h.return_path) {
        return Err(ServiceError::InvalidArgument("bad return path".into()));
    }
    for r in &h.recipients {
        match r.address.rsplit_once('@') {
            Some((l, d)) if !l.is_empty() && !d.is_empty() && !bad_addr(&r.address) => {}
            _ => {
                return Err(ServiceError::InvalidArgument(format!(
                    "bad recipient {:?}",
                    r.address
                )));
            }
        }
        for n in &r.notify {
            if !["SUCCESS", "FAILURE", "DELAY", "NEVER"].contains(&n.to_ascii_uppercase().as_str())
            {
                return Err(ServiceError::InvalidArgument(format!("bad NOTIFY {n:?}")));
            }
        }
        if r.orcpt.bytes().any(|b| b.is_ascii_control() || b == b' ') {
            return Err(ServiceError::InvalidArgument("bad ORCPT".into()));
        }
    }
    if h.envid.len() > 100 || h.envid.bytes().any(|b| b.is_ascii_control()) {
        return Err(ServiceError::InvalidArgument("bad ENVID".into()));
    }
    Ok(())
}

#[tonic::async_trait]
impl Queue for QueueService {
    async fn enqueue(
        &self,
        request: Request<Streaming<EnqueueChunk>>,
    ) -> Result<Response<EnqueueResponse>, Status> {
        let limits = &self.engine.config.limits;
        let mut stream = request.into_inner();
        let header = match stream.message().await? {
            Some(EnqueueChunk {
                part: Some(Part::Header(h)),
            }) => h,
            _ => {
                return Err(ServiceError::InvalidArgument(
                    "the first chunk must be the header".into(),
                )
                .into());
            }
        };
        validate(&header, limits.max_recipients)?;
        if header.size_hint > limits.max_message_bytes {
            return Err(ServiceError::TooLarge(format!(
                "message of {} bytes exceeds {}",
                header.size_hint, limits.max_message_bytes
            ))
            .into());
        }
        let mut raw = Vec::with_capacity(header.size_hint.min(limits.max_message_bytes) as usize);
        while let Some(chunk) = stream.message().await? {
            match chunk.part {
                Some(Part::Data(d)) => {
                    if (raw.len() + d.len()) as u64 > limits.max_message_bytes {
                        return Err(ServiceError::TooLarge(format!(
                            "message exceeds {} bytes",
                            limits.max_message_bytes
                        ))
                        .into());
                    }
                    raw.extend_from_slice(&d);
                }
                _ => {
                    return Err(
                        ServiceError::InvalidArgument("a second header chunk".into()).into(),
                    );
                }
            }
        }
        if raw.is_empty() {
            return Err(ServiceError::InvalidArgument("empty message".into()).into());
        }
        let (id, duplicate) = self.engine.db.enqueue(&header, &raw).await?;
        if !duplicate {
            self.engine.wake();
        }
        tracing::info!(queue_id = %id, duplicate, rcpts = header.recipients.len(),
            size = raw.len(), "enqueued");
        Ok(Response::new(EnqueueResponse {
            queue_id: id.to_string(),
            duplicate,
        }))
    }

    async fn get_message(
        &self,
        request: Request<GetMessageRequest>,
    ) -> Result<Response<QueuedMessage>, Status> {
        let id = parse_id(&request.get_ref().queue_id)?;
        Ok(Response::new(self.engine.db.get(id).await?))
    }

    async fn list_messages(
        &self,
        request: Request<ListMessagesRequest>,
    ) -> Result<Response<ListMessagesResponse>, Status> {
        let r = request.into_inner();
        let messages = self.engine.db.list(&r.domain, r.limit).await?;
        Ok(Response::new(ListMessagesResponse { messages }))
    }

    async fn retry(
        &self,
        request: Request<RetryRequest>,
    ) -> Result<Response<RetryResponse>, Status> {
        let r = request.into_inner();
        let id = if r.queue_id.is_empty() {
            None
        } else {
            Some(parse_id(&r.queue_id)?)
        };
        let n = self.engine.db.make_due(id, None).await?;
        self.engine.wake();
        Ok(Response::new(RetryResponse { recipients: n }))
    }

    async fn delete(
        &self,
        request: Request<DeleteRequest>,
    ) -> Result<Response<DeleteResponse>, Status> {
        let r = request.into_inner();
        let id = parse_id(&r.queue_id)?;
        let policy = crate::db::Policy {
            retry: &self.engine.config.retry,
            hostname: &self.engine.config.hostname,
            max_full_bytes: 10 * 1024 * 1024,
        };
        self.engine.db.delete(id, r.bounce, &policy).await?;
        if r.bounce {
            self.engine.wake();
        }
        Ok(Response::new(DeleteResponse {}))
    }

    async fn flush(
        &self,
        request: Request<FlushRequest>,
    ) -> Result<Response<FlushResponse>, Status> {
        let r = request.into_inner();
        if r.domain.trim().is_empty() {
            return Err(ServiceError::InvalidArgument("no domain".into()).into());
        }
        let n = self.engine.db.make_due(None, Some(r.domain.trim())).await?;
        self.engine.wake();
        Ok(Response::new(FlushResponse { recipients: n }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mailsuite_proto::EnvelopeRecipient;

    fn rcpt(a: &str) -> EnvelopeRecipient {
        EnvelopeRecipient {
            address: a.into(),
            ..Default::default()
        }
    }

    #[test]
    fn header_validation() {
        let ok = EnqueueHeader {
            idempotency_key: "k".into(),
            return_path: "a@x.test".into(),
            recipients: vec![rcpt("b@y.test")],
            ..Default::default()
        };
        assert!(validate(&ok, 10).is_ok());
        let keyless = EnqueueHeader {
            idempotency_key: String::new(),
            ..ok.clone()
        };
        assert!(matches!(
            validate(&keyless, 10),
            Err(ServiceError::InvalidArgument(_))
        ));
        let none = EnqueueHeader {
            recipients: vec![],
            ..ok.clone()
        };
        assert!(validate(&none, 10).is_err());
        let many = EnqueueHeader {
            recipients: vec![rcpt("b@y.test"); 11],
            ..ok.clone()
        };
        assert!(validate(&many, 10).is_err());
        let injected = EnqueueHeader {
            recipients: vec![rcpt("b@y.test>\r\nDATA")],
            ..ok.clone()
        };
        assert!(
            validate(&injected, 10).is_err(),
            "no SMTP command injection"
        );
        let quoted = EnqueueHeader {
            recipients: vec![rcpt("john doe@y.test"), rcpt("a@b@y.test")],
            ..ok.clone()
        };
        assert!(
            validate(&quoted, 10).is_ok(),
            "unquoted forms of quoted local parts (smtp::smtp_path quotes them again)"
        );
        let nul = EnqueueHeader {
            recipients: vec![rcpt("a\0b@y.test")],
            ..ok.clone()
        };
        assert!(validate(&nul, 10).is_err());
        let domain = EnqueueHeader {
            recipients: vec![rcpt("a@y.test> NOTIFY=NEVER")],
            ..ok.clone()
        };
        assert!(validate(&domain, 10).is_err());
        let notify = EnqueueHeader {
            recipients: vec![EnvelopeRecipient {
                address: "b@y.test".into(),
                notify: vec!["SOMETIMES".into()],
                orcpt: String::new(),
            }],
            ..ok
        };
        assert!(validate(&notify, 10).is_err());
    }
}
