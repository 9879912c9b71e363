//! `mailctl domain|account|alias ...` over the store's Admin service.

use std::io::{BufRead, IsTerminal};

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use mailsuite_proto::admin_client::AdminClient;
use mailsuite_proto::*;

use crate::{Output, store_channel};

#[derive(Subcommand, Debug)]
pub enum DomainCmd {
    /// Host a domain.
    Add {
        name: String,
        /// Deliver mail for unknown users of the domain to this address.
        #[arg(long)]
        catch_all: Option<String>,
    },
    List,
    /// Stop hosting a domain (it must have no accounts left).
    Remove {
        name: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum AccountCmd {
    /// Create an account (INBOX, Drafts, Sent, Trash, Junk and Archive are created with it).
    Add {
        address: String,
        #[arg(long)]
        name: Option<String>,
        /// Read the password from standard input (first line) instead of prompting.
        #[arg(long)]
        password_stdin: bool,
        /// Quota in bytes (0 = unlimited). Suffixes K, M, G accepted.
        #[arg(long, default_value = "0", value_parser = parse_size)]
        quota_bytes: i64,
        /// Quota in messages (0 = unlimited).
        #[arg(long, default_value_t = 0)]
        quota_messages: i64,
    },
    /// List accounts, optionally of one domain.
    List {
        #[arg(long)]
        domain: Option<String>,
    },
    /// Change a password.
    Passwd {
        address: String,
        #[arg(long)]
        password_stdin: bool,
    },
    /// Set the quota (0 = unlimited).
    Quota {
        address: String,
        #[arg(long, value_parser = parse_size)]
        bytes: i64,
        #[arg(long, default_value_t = 0)]
        messages: i64,
    },
    /// Delete an account and all its mail.
    Remove { address: String },
}

#[derive(Subcommand, Debug)]
pub enum AliasCmd {
    /// An address that forwards to other addresses (local or remote).
    Add {
        address: String,
        #[arg(required = true)]
        targets: Vec<String>,
        /// A distribution list (EXPN shows its members) rather than a plain alias.
        #[arg(long)]
        list: bool,
    },
    List {
        #[arg(long)]
        domain: Option<String>,
    },
    Remove {
        address: String,
    },
}

/// `10M` → 10485760.
pub fn parse_size(s: &str) -> Result<i64, String> {
    let s = s.trim();
    let (num, mul) = match s.chars().last().map(|c| c.to_ascii_uppercase()) {
        Some('K') => (&s[..s.len() - 1], 1024),
        Some('M') => (&s[..s.len() - 1], 1024 * 1024),
        Some('G') => (&s[..s.len() - 1], 1024 * 1024 * 1024),
        _ => (s, 1),
    };
    let n: i64 = num
        .trim()
        .parse()
        .map_err(|_| format!("not a size: {s:?}"))?;
    if n < 0 {
        return Err("a size cannot be negative".into());
    }
    n.checked_mul(mul).ok_or_else(|| "size too large".into())
}

/// The password comes from stdin or an interactive prompt, never from argv.
fn read_password(from_stdin: bool) -> Result<String> {
    let pw = if from_stdin || !std::io::stdin().is_terminal() {
        let mut line = String::new();
        std::io::stdin()
            .lock()
            .read_line(&mut line)
            .context("reading the password")?;
        line.trim_end_matches(['\r', '\n']).to_string()
    } else {
        let a = rpassword::prompt_password("Password: ").context("reading the password")?;
        let b = rpassword::prompt_password("Again: ").context("reading the password")?;
        if a != b {
            bail!("the passwords differ");
        }
        a
    };
    if pw.is_empty() {
        bail!("empty password");
    }
    Ok(pw)
}

fn yes(b: bool) -> String {
    if b { "yes" } else { "no" }.to_string()
}

fn status(e: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{}", e.message())
}

fn account_rows(accounts: &[Account]) -> Vec<Vec<String>> {
    accounts
        .iter()
        .map(|a| {
            vec![
                a.address.clone(),
                a.display_name.clone(),
                yes(a.enabled),
                a.used_bytes.to_string(),
                a.quota_bytes.to_string(),
                a.used_messages.to_string(),
                a.quota_messages.to_string(),
                a.moved_to.clone(),
            ]
        })
        .collect()
}

const ACCOUNT_HEADERS: &[&str] = &[
    "ADDRESS",
    "NAME",
    "ENABLED",
    "USED BYTES",
    "QUOTA BYTES",
    "MESSAGES",
    "QUOTA MESSAGES",
    "MOVED TO",
];

pub async fn domain(store: &str, cmd: DomainCmd, out: &Output) -> Result<()> {
    let mut c = AdminClient::new(store_channel(store)?);
    match cmd {
        DomainCmd::Add { name, catch_all } => {
            let d = c
                .add_domain(AddDomainRequest {
                    name,
                    catch_all: catch_all.unwrap_or_default(),
                })
                .await
                .map_err(status)?
                .into_inner();
            out.table(&["NAME", "CATCH-ALL"], vec![vec![d.name, d.catch_all]]);
        }
        DomainCmd::List => {
            let r = c
                .list_domains(ListDomainsRequest {})
                .await
                .map_err(status)?
                .into_inner();
            out.table(
                &["NAME", "CATCH-ALL"],
                r.domains
                    .into_iter()
                    .map(|d| vec![d.name, d.catch_all])
                    .collect(),
            );
        }
        DomainCmd::Remove { name } => {
            c.remove_domain(RemoveDomainRequest { name: name.clone() })
                .await
                .map_err(status)?;
            out.message(&format!("domain {name} removed"));
        }
    }
    Ok(())
}

pub async fn account(store: &str, cmd: AccountCmd, out: &Output) -> Result<()> {
    let mut c = AdminClient::new(store_channel(store)?);
    match cmd {
        AccountCmd::Add {
            address,
            name,
            password_stdin,
            quota_bytes,
            quota_messages,
        } => {
            let password = read_password(password_stdin)?;
            let a = c
                .add_account(AddAccountRequest {
                    address,
                    password,
                    display_name: name.unwrap_or_default(),
                    quota_bytes,
                    quota_messages,
                })
                .await
                .map_err(status)?
                .into_inner();
            out.table(ACCOUNT_HEADERS, account_rows(&[a]));
        }
        AccountCmd::List { domain } => {
            let r = c
                .list_accounts(ListAccountsRequest {
                    domain: domain.unwrap_or_default(),
                })
                .await
                .map_err(status)?
                .into_inner();
            out.table(ACCOUNT_HEADERS, account_rows(&r.accounts));
        }
        AccountCmd::Passwd {
            address,
            password_stdin,
        } => {
            let password = read_password(password_stdin)?;
            c.set_password(SetPasswordRequest {
                address: address.clone(),
                password,
            })
            .await
            .map_err(status)?;
            out.message(&format!("password of {address} changed"));
        }
        AccountCmd::Quota {
            address,
            bytes,
            messages,
        } => {
            let a = c
                .set_quota(SetQuotaRequest {
                    address,
                    quota_bytes: bytes,
                    quota_messages: messages,
                })
                .await
                .map_err(status)?
                .into_inner();
            out.table(ACCOUNT_HEADERS, account_rows(&[a]));
        }
        AccountCmd::Remove { address } => {
            c.remove_account(RemoveAccountRequest {
                address: address.clone(),
            })
            .await
            .map_err(status)?;
            out.message(&format!("account {address} removed"));
        }
    }
    Ok(())
}

pub async fn alias(store: &str, cmd: AliasCmd, out: &Output) -> Result<()> {
    let mut c = AdminClient::new(store_channel(store)?);
    let kind = |k: i32| {
        if k == AliasKind::List as i32 {
            "list"
        } else {
            "alias"
        }
        .to_string()
    };
    match cmd {
        AliasCmd::Add {
            address,
            targets,
            list,
        } => {
            let a = c
                .add_alias(AddAliasRequest {
                    address,
                    targets,
                    kind: if list {
                        AliasKind::List
                    } else {
                        AliasKind::Alias
                    } as i32,
                })
                .await
                .map_err(status)?
                .into_inner();
            out.table(
                &["ADDRESS", "KIND", "TARGETS"],
                vec![vec![a.address, kind(a.kind), a.targets.join(", ")]],
            );
        }
        AliasCmd::List { domain } => {
            let r = c
                .list_aliases(ListAliasesRequest {
                    domain: domain.unwrap_or_default(),
                })
                .await
                .map_err(status)?
                .into_inner();
            out.table(
                &["ADDRESS", "KIND", "TARGETS"],
                r.aliases
                    .into_iter()
                    .map(|a| vec![a.address, kind(a.kind), a.targets.join(", ")])
                    .collect(),
            );
        }
        AliasCmd::Remove { address } => {
            c.remove_alias(RemoveAliasRequest {
                address: address.clone(),
            })
            .await
            .map_err(status)?;
            out.message(&format!("alias {address} removed"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn sizes_parse() {
        assert_eq!(super::parse_size("10M"), Ok(10 * 1024 * 1024));
        assert_eq!(super::parse_size("512"), Ok(512));
        assert_eq!(super::parse_size("2g"), Ok(2 * 1024 * 1024 * 1024));
        assert!(super::parse_size("-1").is_err());
        assert!(super::parse_size("x").is_err());
    }
}
