//! `mailctl queue`: inspect and steer relay-queue (list, show, retry, delete, flush).

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use mailsuite_proto::queue_client::QueueClient;
use mailsuite_proto::{
    DeleteRequest, FlushRequest, GetMessageRequest, ListMessagesRequest, QueuedMessage,
    RecipientState, RetryRequest,
};

use crate::Output;

#[derive(Args, Debug)]
pub struct QueueArgs {
    /// The relay-queue gRPC endpoint.
    #[arg(
        long,
        global = true,
        env = "MAILSUITE_QUEUE_URL",
        default_value = "http://127.0.0.1:50052"
    )]
    pub queue: String,
    #[command(subcommand)]
    pub cmd: QueueCmd,
}

#[derive(Subcommand, Debug)]
pub enum QueueCmd {
    /// Messages still waiting for at least one recipient, oldest first.
    List {
        /// Only messages with recipients in this domain.
        #[arg(long, default_value = "")]
        domain: String,
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
    /// One message and the state of each recipient.
    Show { queue_id: String },
    /// Try deferred recipients now: of one message, or of every message.
    Retry { queue_id: Option<String> },
    /// Remove a message from the queue.
    Delete {
        queue_id: String,
        /// Tell the sender with a delivery status notification (default: silently).
        #[arg(long)]
        bounce: bool,
    },
    /// Try everything queued for a domain now (like SMTP ETRN).
    Flush { domain: String },
}

fn state(s: RecipientState) -> &'static str {
    match s {
        RecipientState::Pending => "pending",
        RecipientState::Delivering => "delivering",
        RecipientState::Delivered => "delivered",
        RecipientState::Deferred => "deferred",
        RecipientState::Failed => "failed",
        RecipientState::Unspecified => "?",
    }
}

fn when(epoch: i64) -> String {
    chrono::DateTime::from_timestamp(epoch, 0)
        .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
        .unwrap_or_default()
}

fn sender(m: &QueuedMessage) -> String {
    if m.return_path.is_empty() {
        "<>".into()
    } else {
        m.return_path.clone()
    }
}

pub async fn run(args: QueueArgs, out: &Output) -> Result<()> {
    let channel = crate::channel(&args.queue, "queue")?;
    let mut q = QueueClient::new(channel);
    match args.cmd {
        QueueCmd::List { domain, limit } => {
            let msgs = q
                .list_messages(ListMessagesRequest { domain, limit })
                .await
                .context("listing the queue")?
                .into_inner()
                .messages;
            let rows = msgs
                .iter()
                .map(|m| {
                    let waiting = m
                        .recipients
                        .iter()
                        .filter(|r| {
                            matches!(
                                r.state(),
                                RecipientState::Pending
                                    | RecipientState::Deferred
                                    | RecipientState::Delivering
                            )
                        })
                        .count();
                    let next = m
                        .recipients
                        .iter()
                        .filter(|r| r.state() == RecipientState::Deferred)
                        .map(|r| r.next_attempt)
                        .min()
                        .map(when)
                        .unwrap_or_default();
                    vec![
                        m.queue_id.clone(),
                        when(m.created),
                        m.size.to_string(),
                        sender(m),
                        format!("{waiting}/{}", m.recipients.len()),
                        next,
                    ]
                })
                .collect();
            out.table(
                &[
                    "Queue ID",
                    "Queued",
                    "Size",
                    "Sender",
                    "Waiting",
                    "Next attempt",
                ],
                rows,
            );
        }
        QueueCmd::Show { queue_id } => {
            let m = q
                .get_message(GetMessageRequest { queue_id })
                .await
                .context("reading the message")?
                .into_inner();
            if !out.json {
                println!("queue id: {}", m.queue_id);
                println!("sender:   {}", sender(&m));
                println!("queued:   {}", when(m.created));
                println!("size:     {}", m.size);
                if !m.envid.is_empty() {
                    println!("envid:    {}", m.envid);
                }
                println!();
            }
            out.table(
                &[
                    "Recipient",
                    "State",
                    "Attempts",
                    "Next attempt",
                    "Last reply",
                ],
                m.recipients
                    .iter()
                    .map(|r| {
                        vec![
                            r.address.clone(),
                            state(r.state()).into(),
                            r.attempts.to_string(),
                            if r.state() == RecipientState::Deferred {
                                when(r.next_attempt)
                            } else {
                                String::new()
                            },
                            r.last_reply.clone(),
                        ]
                    })
                    .collect(),
            );
        }
        QueueCmd::Retry { queue_id } => {
            let n = q
                .retry(RetryRequest {
                    queue_id: queue_id.unwrap_or_default(),
                })
                .await
                .context("retry")?
                .into_inner()
                .recipients;
            out.message(&format!("{n} recipient(s) scheduled now"));
        }
        QueueCmd::Delete { queue_id, bounce } => {
            q.delete(DeleteRequest {
                queue_id: queue_id.clone(),
                bounce,
            })
            .await
            .context("delete")?;
            out.message(&format!(
                "{queue_id} deleted{}",
                if bounce { " (sender notified)" } else { "" }
            ));
        }
        QueueCmd::Flush { domain } => {
            let n = q
                .flush(FlushRequest {
                    domain: domain.clone(),
                })
                .await
                .context("flush")?
                .into_inner()
                .recipients;
            out.message(&format!("{n} recipient(s) for {domain} scheduled now"));
        }
    }
    Ok(())
}
