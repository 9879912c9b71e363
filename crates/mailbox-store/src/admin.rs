//! Admin: domains, accounts, aliases/lists and DKIM key storage.

use mailsuite_proto::admin_server::Admin;
use mailsuite_proto::*;
use mailsuite_runtime::ServiceError;
use sqlx::Row;
use tonic::{Request, Response, Status};

use crate::Ctx;
use crate::directory::{ACCOUNT_COLUMNS, account_message};
use crate::store::{self, normalize_address, split_address};

pub struct AdminSvc(pub Ctx);

fn st(e: impl Into<ServiceError>) -> Status {
    e.into().into()
}

fn normalize_domain(d: &str) -> Result<String, ServiceError> {
    let d = d.trim().trim_end_matches('.').to_ascii_lowercase();
    let ok = !d.is_empty()
        && d.len() <= 253
        && d.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    if ok {
        Ok(d)
    } else {
        Err(ServiceError::InvalidArgument(format!(
            "bad domain name {d:?}"
        )))
    }
}

impl AdminSvc {
    async fn account_by_address(&self, address: &str) -> Result<Account, ServiceError> {
        let a = normalize_address(address)?;
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {ACCOUNT_COLUMNS} FROM mailbox.accounts WHERE address = $1"
        )))
        .bind(&a)
        .fetch_optional(&self.0.pool)
        .await?
        .ok_or_else(|| ServiceError::NotFound(format!("account {a}")))?;
        Ok(account_message(&row))
    }
}

#[tonic::async_trait]
impl Admin for AdminSvc {
    async fn add_domain(&self, req: Request<AddDomainRequest>) -> Result<Response<Domain>, Status> {
        let req = req.into_inner();
        let name = normalize_domain(&req.name).map_err(st)?;
        let catch_all = if req.catch_all.is_empty() {
            String::new()
        } else {
            normalize_address(&req.catch_all).map_err(st)?
        };
        sqlx::query("INSERT INTO mailbox.domains (name, catch_all) VALUES ($1, $2)")
            .bind(&name)
            .bind(&catch_all)
            .execute(&self.0.pool)
            .await
            .map_err(|e| match ServiceError::from(e) {
                ServiceError::AlreadyExists(_) => {
                    ServiceError::AlreadyExists(format!("domain {name}"))
                }
                e => e,
            })
            .map_err(st)?;
        Ok(Response::new(Domain { name, catch_all }))
    }

    async fn list_domains(
        &self,
        _req: Request<ListDomainsRequest>,
    ) -> Result<Response<ListDomainsResponse>, Status> {
        let rows = sqlx::query("SELECT name, catch_all FROM mailbox.domains ORDER BY name")
            .fetch_all(&self.0.pool)
            .await
            .map_err(st)?;
        Ok(Response::new(ListDomainsResponse {
            domains: rows
                .iter()
                .map(|r| Domain {
                    name: r.get(0),
                    catch_all: r.get(1),
                })
                .collect(),
        }))
    }

    async fn remove_domain(
        &self,
        req: Request<RemoveDomainRequest>,
    ) -> Result<Response<RemoveDomainResponse>, Status> {
        let name = normalize_domain(&req.into_inner().name).map_err(st)?;
        let mut tx = self.0.pool.begin().await.map_err(st)?;
        let accounts: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM mailbox.accounts a JOIN mailbox.domains d ON d.id = a.domain_id WHERE d.name = $1",
        )
        .bind(&name)
        .fetch_one(&mut *tx)
        .await
        .map_err(st)?;
        if accounts > 0 {
            return Err(st(ServiceError::Cannot(format!(
                "domain {name} still has {accounts} account(s); remove them first"
            ))));
        }
        let n = sqlx::query("DELETE FROM mailbox.domains WHERE name = $1")
            .bind(&name)
            .execute(&mut *tx)
            .await
            .map_err(st)?;
        if n.rows_affected() == 0 {
            return Err(st(ServiceError::NotFound(format!("domain {name}"))));
        }
        tx.commit().await.map_err(st)?;
        Ok(Response::new(RemoveDomainResponse {}))
    }

    async fn add_account(
        &self,
        req: Request<AddAccountRequest>,
    ) -> Result<Response<Account>, Status> {
        let req = req.into_inner();
        let (local, dom) = split_address(&req.address).ok_or_else(|| {
            st(ServiceError::InvalidArgument(format!(
                "not an address: {:?}",
                req.address
            )))
        })?;
        if local.contains('+') {
            return Err(st(ServiceError::InvalidArgument(
                "'+' is reserved for sub-addressing".into(),
            )));
        }
        if req.quota_bytes < 0 || req.quota_messages < 0 {
            return Err(st(ServiceError::InvalidArgument("negative quota".into())));
        }
        let hash = self.0.passwords.hash(&req.password).await.map_err(st)?;
        let address = format!("{local}@{dom}");
        let mut tx = self.0.pool.begin().await.map_err(st)?;
        let domain_id: i64 = sqlx::query_scalar("SELECT id FROM mailbox.domains WHERE name = $1")
            .bind(&dom)
            .fetch_optional(&mut *tx)
            .await
            .map_err(st)?
            .ok_or_else(|| {
                st(ServiceError::NotFound(format!(
                    "domain {dom} is not hosted here"
                )))
            })?;
        let alias: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM mailbox.aliases WHERE address = $1)")
                .bind(&address)
                .fetch_one(&mut *tx)
                .await
                .map_err(st)?;
        if alias {
            return Err(st(ServiceError::AlreadyExists(format!(
                "{address} is an alias"
            ))));
        }
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "INSERT INTO mailbox.accounts (domain_id, address, display_name, password_hash, quota_bytes, quota_messages)
             VALUES ($1, $2, $3, $4, $5, $6) RETURNING {ACCOUNT_COLUMNS}"
        )))
        .bind(domain_id)
        .bind(&address)
        .bind(&req.display_name)
        .bind(&hash)
        .bind(req.quota_bytes)
        .bind(req.quota_messages)
        .fetch_one(&mut *tx)
        .await
        .map_err(|e| match ServiceError::from(e) {
            ServiceError::AlreadyExists(_) => ServiceError::AlreadyExists(format!("account {address}")),
            e => e,
        })
        .map_err(st)?;
        let account = account_message(&row);
        // The default folders start subscribed (clients that show only subscribed folders
        // then show them); mailboxes created later over IMAP do not (RFC 9051 §6.3.4).
        for (name, su) in store::DEFAULT_MAILBOXES {
            store::create_mailbox(&mut tx, account.id, name, *su)
                .await
                .map_err(st)?;
            store::subscribe(&mut tx, account.id, name)
                .await
                .map_err(st)?;
        }
        tx.commit().await.map_err(st)?;
        Ok(Response::new(account))
    }

    async fn list_accounts(
        &self,
        req: Request<ListAccountsRequest>,
    ) -> Result<Response<ListAccountsResponse>, Status> {
        let dom = req.into_inner().domain.trim().to_ascii_lowercase();
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {ACCOUNT_COLUMNS} FROM mailbox.accounts
             WHERE $1 = '' OR domain_id = (SELECT id FROM mailbox.domains WHERE name = $1)
             ORDER BY address"
        )))
        .bind(&dom)
        .fetch_all(&self.0.pool)
        .await
        .map_err(st)?;
        Ok(Response::new(ListAccountsResponse {
            accounts: rows.iter().map(account_message).collect(),
        }))
    }

    async fn set_password(
        &self,
        req: Request<SetPasswordRequest>,
    ) -> Result<Response<Account>, Status> {
        let req = req.into_inner();
        let address = normalize_address(&req.address).map_err(st)?;
        let hash = self.0.passwords.hash(&req.password).await.map_err(st)?;
        let n = sqlx::query("UPDATE mailbox.accounts SET password_hash = $2 WHERE address = $1")
            .bind(&address)
            .bind(&hash)
            .execute(&self.0.pool)
            .await
            .map_err(st)?;
        if n.rows_affected() == 0 {
            return Err(st(ServiceError::NotFound(format!("account {address}"))));
        }
        Ok(Response::new(
            self.account_by_address(&address).await.map_err(st)?,
        ))
    }

    async fn set_quota(&self, req: Request<SetQuotaRequest>) -> Result<Response<Account>, Status> {
        let req = req.into_inner();
        if req.quota_bytes < 0 || req.quota_messages < 0 {
            return Err(st(ServiceError::InvalidArgument("negative quota".into())));
        }
        let address = normalize_address(&req.address).map_err(st)?;
        let n = sqlx::query(
            "UPDATE mailbox.accounts SET quota_bytes = $2, quota_messages = $3 WHERE address = $1",
        )
        .bind(&address)
        .bind(req.quota_bytes)
        .bind(req.quota_messages)
        .execute(&self.0.pool)
        .await
        .map_err(st)?;
        if n.rows_affected() == 0 {
            return Err(st(ServiceError::NotFound(format!("account {address}"))));
        }
        Ok(Response::new(
            self.account_by_address(&address).await.map_err(st)?,
        ))
    }

    async fn update_account(
        &self,
        req: Request<UpdateAccountRequest>,
    ) -> Result<Response<Account>, Status> {
        let req = req.into_inner();
        let address = normalize_address(&req.address).map_err(st)?;
        let moved_to = match req.moved_to.as_deref() {
            Some("") => Some(String::new()),
            Some(m) => Some(normalize_address(m).map_err(st)?),
            None => None,
        };
        let n = sqlx::query(
            "UPDATE mailbox.accounts SET display_name = coalesce($2, display_name),
                    enabled = coalesce($3, enabled), moved_to = coalesce($4, moved_to)
             WHERE address = $1",
        )
        .bind(&address)
        .bind(req.display_name)
        .bind(req.enabled)
        .bind(moved_to)
        .execute(&self.0.pool)
        .await
        .map_err(st)?;
        if n.rows_affected() == 0 {
            return Err(st(ServiceError::NotFound(format!("account {address}"))));
        }
        Ok(Response::new(
            self.account_by_address(&address).await.map_err(st)?,
        ))
    }

    async fn remove_account(
        &self,
        req: Request<RemoveAccountRequest>,
    ) -> Result<Response<RemoveAccountResponse>, Status> {
        let address = normalize_address(&req.into_inner().address).map_err(st)?;
        let mut tx = self.0.pool.begin().await.map_err(st)?;
        let id: i64 =
            sqlx::query_scalar("SELECT id FROM mailbox.accounts WHERE address = $1 FOR UPDATE")
                .bind(&address)
                .fetch_optional(&mut *tx)
                .await
                .map_err(st)?
                .ok_or_else(|| st(ServiceError::NotFound(format!("account {address}"))))?;
        // Drop the blob references of every message first so unreferenced content goes too.
        let boxes: Vec<i64> = sqlx::query_scalar(
            "SELECT id FROM mailbox.mailboxes WHERE account_id = $1 ORDER BY id",
        )
        .bind(id)
        .fetch_all(&mut *tx)
        .await
        .map_err(st)?;
        for mb in boxes {
            let uids: Vec<i64> =
                sqlx::query_scalar("SELECT uid FROM mailbox.messages WHERE mailbox_id = $1")
                    .bind(mb)
                    .fetch_all(&mut *tx)
                    .await
                    .map_err(st)?;
            store::remove_entries(&mut tx, id, mb, &uids, false)
                .await
                .map_err(st)?;
        }
        sqlx::query("DELETE FROM mailbox.accounts WHERE id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await
            .map_err(st)?;
        tx.commit().await.map_err(st)?;
        Ok(Response::new(RemoveAccountResponse {}))
    }

    async fn add_alias(&self, req: Request<AddAliasRequest>) -> Result<Response<Alias>, Status> {
        let req = req.into_inner();
        let (local, dom) = split_address(&req.address).ok_or_else(|| {
            st(ServiceError::InvalidArgument(format!(
                "not an address: {:?}",
                req.address
            )))
        })?;
        let address = format!("{local}@{dom}");
        if req.targets.is_empty() {
            return Err(st(ServiceError::InvalidArgument(
                "an alias needs targets".into(),
            )));
        }
        let targets: Vec<String> = req
            .targets
            .iter()
            .map(|t| normalize_address(t))
            .collect::<Result<_, _>>()
            .map_err(st)?;
        let mut tx = self.0.pool.begin().await.map_err(st)?;
        let domain_id: i64 = sqlx::query_scalar("SELECT id FROM mailbox.domains WHERE name = $1")
            .bind(&dom)
            .fetch_optional(&mut *tx)
            .await
            .map_err(st)?
            .ok_or_else(|| {
                st(ServiceError::NotFound(format!(
                    "domain {dom} is not hosted here"
                )))
            })?;
        let is_account: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM mailbox.accounts WHERE address = $1)")
                .bind(&address)
                .fetch_one(&mut *tx)
                .await
                .map_err(st)?;
        if is_account {
            return Err(st(ServiceError::AlreadyExists(format!(
                "{address} is an account"
            ))));
        }
        sqlx::query("INSERT INTO mailbox.aliases (domain_id, address, kind, targets) VALUES ($1, $2, $3, $4)")
            .bind(domain_id)
            .bind(&address)
            .bind(req.kind as i16)
            .bind(&targets)
            .execute(&mut *tx)
            .await
            .map_err(|e| match ServiceError::from(e) {
                ServiceError::AlreadyExists(_) => ServiceError::AlreadyExists(format!("alias {address}")),
                e => e,
            })
            .map_err(st)?;
        tx.commit().await.map_err(st)?;
        Ok(Response::new(Alias {
            address,
            targets,
            kind: req.kind,
        }))
    }

    async fn list_aliases(
        &self,
        req: Request<ListAliasesRequest>,
    ) -> Result<Response<ListAliasesResponse>, Status> {
        let dom = req.into_inner().domain.trim().to_ascii_lowercase();
        let rows = sqlx::query(
            "SELECT address, targets, kind FROM mailbox.aliases
             WHERE $1 = '' OR domain_id = (SELECT id FROM mailbox.domains WHERE name = $1)
             ORDER BY address",
        )
        .bind(&dom)
        .fetch_all(&self.0.pool)
        .await
        .map_err(st)?;
        Ok(Response::new(ListAliasesResponse {
            aliases: rows
                .iter()
                .map(|r| Alias {
                    address: r.get(0),
                    targets: r.get(1),
                    kind: r.get::<i16, _>(2) as i32,
                })
                .collect(),
        }))
    }

    async fn remove_alias(
        &self,
        req: Request<RemoveAliasRequest>,
    ) -> Result<Response<RemoveAliasResponse>, Status> {
        let address = normalize_address(&req.into_inner().address).map_err(st)?;
        let n = sqlx::query("DELETE FROM mailbox.aliases WHERE address = $1")
            .bind(&address)
            .execute(&self.0.pool)
            .await
            .map_err(st)?;
        if n.rows_affected() == 0 {
            return Err(st(ServiceError::NotFound(format!("alias {address}"))));
        }
        Ok(Response::new(RemoveAliasResponse {}))
    }

    async fn set_dkim_key(
        &self,
        req: Request<SetDkimKeyRequest>,
    ) -> Result<Response<DkimKey>, Status> {
        let key = req
            .into_inner()
            .key
            .ok_or_else(|| st(ServiceError::InvalidArgument("missing key".into())))?;
        let domain = normalize_domain(&key.domain).map_err(st)?;
        if key.selector.is_empty() || key.private_key_pem.is_empty() {
            return Err(st(ServiceError::InvalidArgument(
                "selector and private key are required".into(),
            )));
        }
        if !matches!(key.algorithm.as_str(), "rsa-sha256" | "ed25519-sha256") {
            return Err(st(ServiceError::InvalidArgument(format!(
                "unknown algorithm {:?}",
                key.algorithm
            ))));
        }
        sqlx::query(
            "INSERT INTO mailbox.dkim_keys (domain, selector, algorithm, private_key_pem, dns_record)
             VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (domain, selector) DO UPDATE SET algorithm = EXCLUDED.algorithm,
                 private_key_pem = EXCLUDED.private_key_pem, dns_record = EXCLUDED.dns_record,
                 created_at = now()",
        )
        .bind(&domain)
        .bind(&key.selector)
        .bind(&key.algorithm)
        .bind(&key.private_key_pem)
        .bind(&key.dns_record)
        .execute(&self.0.pool)
        .await
        .map_err(st)?;
        Ok(Response::new(DkimKey {
            domain,
            private_key_pem: String::new(),
            ..key
        }))
    }

    async fn list_dkim_keys(
        &self,
        req: Request<ListDkimKeysRequest>,
    ) -> Result<Response<ListDkimKeysResponse>, Status> {
        let req = req.into_inner();
        let dom = req.domain.trim().to_ascii_lowercase();
        let rows = sqlx::query(
            "SELECT domain, selector, algorithm, private_key_pem, dns_record FROM mailbox.dkim_keys
             WHERE $1 = '' OR domain = $1 ORDER BY domain, selector",
        )
        .bind(&dom)
        .fetch_all(&self.0.pool)
        .await
        .map_err(st)?;
        Ok(Response::new(ListDkimKeysResponse {
            keys: rows
                .iter()
                .map(|r| DkimKey {
                    domain: r.get(0),
                    selector: r.get(1),
                    algorithm: r.get(2),
                    private_key_pem: if req.include_private {
                        r.get(3)
                    } else {
                        String::new()
                    },
                    dns_record: r.get(4),
                })
                .collect(),
        }))
    }
}
