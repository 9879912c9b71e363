//! Directory: address resolution (accounts, aliases, lists, `+detail`, catch-all, moved and
//! disabled accounts), authentication and sender checks.

use std::collections::{HashSet, VecDeque};

use mailsuite_proto::directory_server::Directory;
use mailsuite_proto::{
    Account, AddressKind, AuthenticateRequest, AuthenticateResponse, CheckSenderRequest,
    CheckSenderResponse, ExpandRequest, ExpandResponse, ExpandedMember, ResolveRequest,
    ResolveResponse,
};
use mailsuite_runtime::ServiceError;
use sqlx::{PgConnection, Row};
use tonic::{Request, Response, Status};

use crate::Ctx;
use crate::store::split_address;

pub struct DirectorySvc(pub Ctx);

/// What an address is, with its recursive expansion.
#[derive(Debug, Clone, Default)]
pub struct Resolution {
    pub kind: AddressKind,
    pub canonical: String,
    pub display_name: String,
    /// Local accounts (canonical addresses) that receive mail for it.
    pub local: Vec<String>,
    pub remote: Vec<String>,
    pub moved_to: String,
    pub over_quota: bool,
    /// Matched only through the domain's catch-all.
    pub catch_all: bool,
}

struct AccountRow {
    address: String,
    display_name: String,
    enabled: bool,
    moved_to: String,
    over_quota: bool,
}

/// One address in a hosted domain: what the directory holds under that exact name.
#[derive(Default)]
struct Lookup {
    catch_all: String,
    account: Option<AccountRow>,
    /// (kind, targets): kind 0 = alias, 1 = list.
    alias: Option<(i16, Vec<String>)>,
}

/// The domain with the account and the alias at `address`, in one round trip (delivery
/// resolves every recipient, so each query counts). `None`: the domain is not hosted.
async fn lookup(
    conn: &mut PgConnection,
    dom: &str,
    address: &str,
) -> Result<Option<Lookup>, sqlx::Error> {
    let row = sqlx::query(
        "SELECT d.catch_all, a.address, a.display_name, a.enabled, a.moved_to,
                (a.quota_bytes > 0 AND a.used_bytes >= a.quota_bytes)
                 OR (a.quota_messages > 0 AND a.used_messages >= a.quota_messages),
                al.kind, al.targets
           FROM mailbox.domains d
           LEFT JOIN mailbox.accounts a ON a.address = $2
           LEFT JOIN mailbox.aliases al ON al.address = $2
          WHERE d.name = $1",
    )
    .bind(dom)
    .bind(address)
    .fetch_optional(conn)
    .await?;
    Ok(row.map(|r| Lookup {
        catch_all: r.get(0),
        account: r.get::<Option<String>, _>(1).map(|address| AccountRow {
            address,
            display_name: r.get(2),
            enabled: r.get(3),
            moved_to: r.get(4),
            over_quota: r.get::<Option<bool>, _>(5).unwrap_or(false),
        }),
        alias: r
            .get::<Option<i16>, _>(6)
            .map(|kind| (kind, r.get::<Option<Vec<String>>, _>(7).unwrap_or_default())),
    }))
}

/// `alice+tag` → `alice`.
fn strip_detail(local: &str) -> Option<&str> {
    local
        .split_once('+')
        .map(|(b, _)| b)
        .filter(|b| !b.is_empty())
}

/// Expand alias/list targets recursively (loops cut, bounded depth and size).
async fn expand_targets(
    conn: &mut PgConnection,
    start: Vec<String>,
    seen: &mut HashSet<String>,
    max_depth: usize,
    max_targets: usize,
    out: &mut Resolution,
) -> Result<(), ServiceError> {
    let mut queue: VecDeque<(String, usize)> = start.into_iter().map(|t| (t, 1)).collect();
    while let Some((t, depth)) = queue.pop_front() {
        if out.local.len() + out.remote.len() >= max_targets {
            break;
        }
        let Some((l, d)) = split_address(&t) else {
            continue;
        };
        let addr = format!("{l}@{d}");
        if !seen.insert(addr.clone()) {
            continue;
        }
        let Some(first) = lookup(conn, &d, &addr).await? else {
            out.remote.push(addr);
            continue;
        };
        let base = strip_detail(&l).map(|b| format!("{b}@{d}"));
        let mut found = false;
        let mut first = Some(first);
        for candidate in std::iter::once(addr.clone()).chain(base) {
            let hit = match first.take() {
                Some(h) => h,
                None => lookup(conn, &d, &candidate).await?.unwrap_or_default(),
            };
            if let Some(a) = hit.account {
                if a.enabled && a.moved_to.is_empty() && !out.local.contains(&a.address) {
                    out.local.push(a.address);
                }
                found = true;
                break;
            }
            if let Some((_, targets)) = hit.alias {
                if depth < max_depth {
                    queue.extend(targets.into_iter().map(|t| (t, depth + 1)));
                }
                found = true;
                break;
            }
        }
        if !found {
            tracing::debug!(target = %addr, "alias target does not exist");
        }
    }
    Ok(())
}

fn account_resolution(r: &mut Resolution, a: AccountRow) {
    r.canonical = a.address.clone();
    r.display_name = a.display_name.clone();
    r.over_quota = a.over_quota;
    if !a.moved_to.is_empty() {
        r.kind = AddressKind::Moved;
        r.moved_to = a.moved_to;
    } else if !a.enabled {
        r.kind = AddressKind::Disabled;
    } else {
        r.kind = AddressKind::Account;
        r.local.push(a.address);
    }
}

/// Classify and expand one address.
pub async fn resolve(
    conn: &mut PgConnection,
    address: &str,
    max_depth: usize,
    max_targets: usize,
) -> Result<Resolution, ServiceError> {
    let Some((local, dom)) = split_address(address) else {
        return Err(ServiceError::InvalidArgument(format!(
            "not an address: {address:?}"
        )));
    };
    let full = format!("{local}@{dom}");
    let mut r = Resolution {
        canonical: full.clone(),
        ..Default::default()
    };
    // The common case, an exact account or alias, in one round trip with the domain.
    let Some(first) = lookup(conn, &dom, &full).await? else {
        r.kind = AddressKind::Remote;
        r.remote.push(full);
        return Ok(r);
    };
    let catch_all = first.catch_all.clone();
    let base = strip_detail(&local).map(|b| format!("{b}@{dom}"));
    let mut first = Some(first);
    for candidate in std::iter::once(full.clone()).chain(base) {
        let hit = match first.take() {
            Some(h) => h,
            None => lookup(conn, &dom, &candidate).await?.unwrap_or_default(),
        };
        if let Some(a) = hit.account {
            account_resolution(&mut r, a);
            return Ok(r);
        }
        if let Some((kind, targets)) = hit.alias {
            r.canonical = candidate.clone();
            r.kind = if kind == 1 {
                AddressKind::List
            } else {
                AddressKind::Alias
            };
            let mut seen = HashSet::from([candidate]);
            expand_targets(conn, targets, &mut seen, max_depth, max_targets, &mut r).await?;
            return Ok(r);
        }
    }
    if !catch_all.is_empty() {
        r.kind = AddressKind::Alias;
        r.catch_all = true;
        let mut seen = HashSet::from([full]);
        expand_targets(
            conn,
            vec![catch_all],
            &mut seen,
            max_depth,
            max_targets,
            &mut r,
        )
        .await?;
        if !r.local.is_empty() || !r.remote.is_empty() {
            return Ok(r);
        }
    }
    r.kind = AddressKind::Unknown;
    r.local.clear();
    r.remote.clear();
    Ok(r)
}

pub fn account_message(row: &sqlx::postgres::PgRow) -> Account {
    Account {
        id: row.get("id"),
        address: row.get("address"),
        display_name: row.get("display_name"),
        quota_bytes: row.get("quota_bytes"),
        quota_messages: row.get("quota_messages"),
        enabled: row.get("enabled"),
        moved_to: row.get("moved_to"),
        used_bytes: row.get("used_bytes"),
        used_messages: row.get("used_messages"),
    }
}

pub const ACCOUNT_COLUMNS: &str = "id, address, display_name, quota_bytes, quota_messages, enabled, moved_to, used_bytes, used_messages";

fn st(e: impl Into<ServiceError>) -> Status {
    e.into().into()
}

#[tonic::async_trait]
impl Directory for DirectorySvc {
    async fn resolve(
        &self,
        req: Request<ResolveRequest>,
    ) -> Result<Response<ResolveResponse>, Status> {
        let req = req.into_inner();
        let mut conn = self.0.hot.acquire().await.map_err(st)?;
        let lim = &self.0.config.limits;
        let r = resolve(
            &mut conn,
            &req.address,
            lim.max_alias_depth,
            lim.max_expansion,
        )
        .await
        .map_err(st)?;
        Ok(Response::new(ResolveResponse {
            kind: r.kind as i32,
            canonical: r.canonical,
            display_name: r.display_name,
            local_targets: r.local,
            remote_targets: r.remote,
            moved_to: r.moved_to,
            over_quota: r.over_quota,
        }))
    }

    async fn authenticate(
        &self,
        req: Request<AuthenticateRequest>,
    ) -> Result<Response<AuthenticateResponse>, Status> {
        let req = req.into_inner();
        let user = split_address(&req.username).map(|(l, d)| format!("{l}@{d}"));
        let row = match &user {
            Some(u) => sqlx::query(sqlx::AssertSqlSafe(format!(
                "SELECT {ACCOUNT_COLUMNS}, password_hash FROM mailbox.accounts WHERE address = $1"
            )))
            .bind(u)
            .fetch_optional(&self.0.pool)
            .await
            .map_err(st)?,
            None => None,
        };
        let hash: Option<String> = row.as_ref().map(|r| r.get("password_hash"));
        let ok = self
            .0
            .passwords
            .verify(&req.password, hash.as_deref())
            .await
            .map_err(st)?;
        let account = row.as_ref().map(account_message);
        let ok = ok
            && account
                .as_ref()
                .is_some_and(|a| a.enabled && a.moved_to.is_empty());
        tracing::info!(
            user = %req.username, protocol = %req.protocol, remote_ip = %req.remote_ip, ok,
            "authentication"
        );
        Ok(Response::new(AuthenticateResponse {
            ok,
            account: if ok { account } else { None },
        }))
    }

    async fn expand(
        &self,
        req: Request<ExpandRequest>,
    ) -> Result<Response<ExpandResponse>, Status> {
        let req = req.into_inner();
        let mut conn = self.0.hot.acquire().await.map_err(st)?;
        let lim = &self.0.config.limits;
        let r = resolve(
            &mut conn,
            &req.address,
            lim.max_alias_depth,
            lim.max_expansion,
        )
        .await
        .map_err(st)?;
        let mut members = Vec::new();
        match r.kind {
            AddressKind::Account => members.push(ExpandedMember {
                address: r.canonical.clone(),
                display_name: r.display_name.clone(),
            }),
            AddressKind::Alias | AddressKind::List => {
                for a in r.local.iter().chain(r.remote.iter()) {
                    let name: Option<String> = sqlx::query_scalar(
                        "SELECT display_name FROM mailbox.accounts WHERE address = $1",
                    )
                    .bind(a)
                    .fetch_optional(&mut *conn)
                    .await
                    .map_err(st)?;
                    members.push(ExpandedMember {
                        address: a.clone(),
                        display_name: name.unwrap_or_default(),
                    });
                }
            }
            _ => {}
        }
        Ok(Response::new(ExpandResponse {
            kind: r.kind as i32,
            members,
        }))
    }

    async fn check_sender(
        &self,
        req: Request<CheckSenderRequest>,
    ) -> Result<Response<CheckSenderResponse>, Status> {
        let req = req.into_inner();
        let mut conn = self.0.pool.acquire().await.map_err(st)?;
        let own: Option<String> =
            sqlx::query_scalar("SELECT address FROM mailbox.accounts WHERE id = $1 AND enabled")
                .bind(req.account_id)
                .fetch_optional(&mut *conn)
                .await
                .map_err(st)?;
        let Some(own) = own else {
            return Ok(Response::new(CheckSenderResponse { allowed: false }));
        };
        let lim = &self.0.config.limits;
        let allowed = match resolve(
            &mut conn,
            &req.address,
            lim.max_alias_depth,
            lim.max_expansion,
        )
        .await
        {
            // Own address (with any +detail), or an alias (not a list) that delivers to it.
            Ok(r) => match r.kind {
                AddressKind::Account => r.canonical == own,
                AddressKind::Alias => !r.catch_all && r.local.contains(&own),
                _ => false,
            },
            Err(_) => false,
        };
        Ok(Response::new(CheckSenderResponse { allowed }))
    }
}
