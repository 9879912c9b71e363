//! A tiny authoritative DNS server on a UDP port 0 socket, for iprev tests: it answers PTR,
//! A and AAAA questions from a fixed table and everything else with one response code
//! (NXDOMAIN by default, SERVFAIL for a broken zone). No test touches the machine's resolver
//! or the internet. Shared by the unit tests (`src/verify.rs`) and the end-to-end tests.
//! hickory never asks for the PTR of a loopback address (RFC 6761: it answers `localhost`
//! itself), so tests of 127.0.0.1 pin that PTR in the `Verifier` instead.
#![allow(dead_code)]

use std::net::{IpAddr, SocketAddr};

use mail_auth::hickory_resolver::proto::op::{Message, ResponseCode};
use mail_auth::hickory_resolver::proto::rr::rdata::{A, AAAA, PTR};
use mail_auth::hickory_resolver::proto::rr::{Name, RData, Record};
use tokio::net::UdpSocket;

pub struct TestDns {
    pub addr: SocketAddr,
    records: Vec<Record>,
    otherwise: ResponseCode,
    silent: bool,
}

impl TestDns {
    /// An empty zone: every question gets NXDOMAIN until records are added.
    pub fn new() -> TestDns {
        TestDns {
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            records: Vec::new(),
            otherwise: ResponseCode::NXDomain,
            silent: false,
        }
    }

    /// Questions without a record get this code instead of NXDOMAIN.
    pub fn otherwise(mut self, code: ResponseCode) -> TestDns {
        self.otherwise = code;
        self
    }

    /// Read questions and never answer (a name server that is down or filtered).
    pub fn silent(mut self) -> TestDns {
        self.silent = true;
        self
    }

    pub fn ptr(mut self, ip: IpAddr, name: &str) -> TestDns {
        let target = Name::from_ascii(format!("{}.", name.trim_end_matches('.'))).unwrap();
        self.records.push(Record::from_rdata(
            Name::from(ip),
            60,
            RData::PTR(PTR(target)),
        ));
        self
    }

    pub fn addr(mut self, name: &str, ip: IpAddr) -> TestDns {
        let owner = Name::from_ascii(format!("{}.", name.trim_end_matches('.'))).unwrap();
        let data = match ip {
            IpAddr::V4(a) => RData::A(A(a)),
            IpAddr::V6(a) => RData::AAAA(AAAA(a)),
        };
        self.records.push(Record::from_rdata(owner, 60, data));
        self
    }

    /// Bind and serve until the runtime ends; `nameserver()` is the config string.
    pub async fn start(mut self) -> TestDns {
        let sock = UdpSocket::bind(self.addr).await.unwrap();
        self.addr = sock.local_addr().unwrap();
        let records = self.records.clone();
        let otherwise = self.otherwise;
        let silent = self.silent;
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            loop {
                let Ok((n, from)) = sock.recv_from(&mut buf).await else {
                    return;
                };
                if silent {
                    continue;
                }
                let Ok(req) = Message::from_vec(&buf[..n]) else {
                    continue;
                };
                let mut resp = Message::response(req.metadata.id, req.metadata.op_code);
                resp.metadata.recursion_desired = req.metadata.recursion_desired;
                resp.metadata.recursion_available = true;
                resp.metadata.authoritative = true;
                resp.add_queries(req.queries.clone());
                for q in &req.queries {
                    resp.add_answers(
                        records
                            .iter()
                            .filter(|r| r.name == *q.name() && r.record_type() == q.query_type())
                            .cloned(),
                    );
                }
                if resp.answers.is_empty() {
                    resp.metadata.response_code = otherwise;
                }
                if let Ok(bytes) = resp.to_vec() {
                    let _ = sock.send_to(&bytes, from).await;
                }
            }
        });
        self
    }

    pub fn nameserver(&self) -> String {
        self.addr.to_string()
    }
}
