//! Regressions found by Dovecot's imaptest (issue 14), each named after its imaptest group:
//! the gateway over real sockets against a real mailbox-store on a fresh PostgreSQL database.

mod common;

use common::*;

/// imaptest `atoms`: LIST with every atom character in the pattern is a valid command. The
/// `&` makes it invalid modified UTF-7, which used to be answered `BAD Bad pattern` (and then
/// imaptest hung up); it is matched as written, so nothing matches.
#[tokio::test(flavor = "multi_thread")]
async fn atoms_list_with_every_atom_char_is_ok() {
    let env = env().await;
    env.account("bob@example.test").await;
    let mut c = env.login("bob@example.test").await;
    for cmd in [
        "LIST \"\" !#$&'+,-.0123456789:;<=>?@^_`|[}%*",
        "LIST (SUBSCRIBED) \"\" !#$&'+,-.0123456789:;<=>?@^_`|[}%*",
    ] {
        let r = c.cmd(cmd).await;
        assert!(tagged(&r).contains(" OK"), "{cmd}: {r}");
        assert!(!r.contains("* LIST"), "{cmd}: {r}");
    }
    // A valid modified UTF-7 pattern still decodes.
    let r = c.cmd("CREATE Entw&APw-rfe").await;
    assert!(tagged(&r).contains(" OK"), "{r}");
    let r = c.cmd("LIST \"\" Entw&APw-*").await;
    assert!(r.contains("\"/\" Entw&APw-rfe\r\n"), "{r}");
    env.stop().await;
}
