//! TLS on every broker (issue #8): each test starts a broker of its own with a TLS
//! listener on a free port, with a CA and certificates generated for the test
//! (`openssl`), and checks that
//! - a client with the CA and a client certificate makes calls over TLS,
//! - a client trusting another CA is refused,
//! - the broker's hostname is verified (the certificate names `localhost`; the same
//!   listener reached as `127.0.0.1` is refused),
//! - where the broker requires client certificates, a client without one is refused.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use mqrpc::{Client, Context, Server, Target};
use serde_json::json;

use crate::faults::{OwnBroker, free_port};
use crate::service::{self, Recorder};

/// A CA, a server certificate for `localhost` and a client certificate signed by
/// it, and a second CA that signed nothing here; removed with the value.
pub struct Pki {
    pub dir: PathBuf,
}

impl Pki {
    pub fn generate() -> Pki {
        let dir = std::env::temp_dir().join(format!("mqrpc-tls-{}", &mqrpc::wire::new_id()[..12]));
        std::fs::create_dir_all(&dir).expect("a directory for the certificates");
        let openssl = |args: &[&str]| {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(&dir)
                .output()
                .expect("openssl runs (scripts/brokers.sh installs it)");
            assert!(out.status.success(), "openssl {args:?}: {out:?}");
        };
        for ca in ["ca", "other-ca"] {
            openssl(&[
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "2",
                "-subj",
                &format!("/CN=mqrpc test {ca}"),
                "-keyout",
                &format!("{ca}.key"),
                "-out",
                &format!("{ca}.pem"),
            ]);
        }
        std::fs::write(dir.join("server.ext"), "subjectAltName=DNS:localhost\n").expect("ext");
        std::fs::write(dir.join("client.ext"), "extendedKeyUsage=clientAuth\n").expect("ext");
        for (name, ext) in [("server", "server.ext"), ("client", "client.ext")] {
            openssl(&[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-subj",
                &format!("/CN={name}"),
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.csr"),
            ]);
            openssl(&[
                "x509",
                "-req",
                "-in",
                &format!("{name}.csr"),
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "2",
                "-extfile",
                ext,
                "-out",
                &format!("{name}.pem"),
            ]);
        }
        Pki { dir }
    }

    pub fn path(&self, file: &str) -> String {
        self.dir.join(file).display().to_string()
    }

    /// URL options trusting `ca` (`ca` or `other-ca`), with the client certificate.
    fn options(&self, ca: &str, with_client_cert: bool) -> String {
        let mut options = format!("tls_ca_file={}", self.path(&format!("{ca}.pem")));
        if with_client_cert {
            options += &format!(
                "&tls_cert_file={}&tls_key_file={}",
                self.path("client.pem"),
                self.path("client.key")
            );
        }
        options
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn exists(path: &str) -> bool {
    Path::new(path).exists()
}

/// A call over TLS works: a server and a client, each on a connection of its own.
async fn calls_over(url: &str) {
    let recorder = Recorder::new();
    let topic = format!("tls_{}", &mqrpc::wire::new_id()[..10]);
    let server_side = mqrpc::connect(url)
        .await
        .expect("the server connects over TLS");
    let server = Server::builder(server_side, Target::new(&topic).server("s1"))
        .endpoint(service::endpoint("s1", &recorder))
        .start()
        .await
        .expect("server over TLS");
    let client_side = mqrpc::connect(url)
        .await
        .expect("the client connects over TLS");
    let client = Client::new(client_side, Target::new(&topic)).timeout(Duration::from_secs(10));
    let sum: i64 = client
        .call(&Context::new(), "add", json!({"a": 20, "b": 22}))
        .await
        .expect("a call over TLS");
    assert_eq!(sum, 42);
    server.shutdown().await.expect("shutdown");
}

/// An error with its sources, one line.
fn chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text += &format!(": {cause}");
        source = cause.source();
    }
    text
}

/// Connecting with `url` fails, for a reason that contains `because`.
async fn refused(what: &str, url: &str, because: &str) {
    let why = match tokio::time::timeout(Duration::from_secs(30), mqrpc::connect(url)).await {
        // Some clients connect lazily: the first use must fail then.
        Ok(Ok(transport)) => {
            let client =
                Client::new(transport, Target::new("tls_refused")).timeout(Duration::from_secs(3));
            let outcome = client
                .call::<_, i64>(&Context::new(), "add", json!({"a": 1, "b": 1}))
                .await;
            chain(&outcome.expect_err(&format!("{what}: a connection was accepted")))
        }
        Ok(Err(err)) => chain(&err),
        Err(_) => panic!("{what}: connecting neither failed nor succeeded within 30 s"),
    };
    eprintln!("{what}: refused: {why}");
    assert!(
        why.contains(because),
        "{what}: refused, but not for {because:?}: {why}"
    );
}

/// The checks every backend runs, given its URL for a host name and options.
async fn check(
    name: &str,
    url_for: impl Fn(&str, String) -> String,
    pki: &Pki,
    client_certs_required: bool,
) {
    calls_over(&url_for("localhost", pki.options("ca", true))).await;
    refused(
        &format!("{name} trusting another CA"),
        &url_for("localhost", pki.options("other-ca", true)),
        "UnknownIssuer",
    )
    .await;
    refused(
        &format!("{name} reached by a name not in the certificate"),
        &url_for("127.0.0.1", pki.options("ca", true)),
        "not valid for name",
    )
    .await;
    if client_certs_required {
        refused(
            &format!("{name} without a client certificate"),
            &url_for("localhost", pki.options("ca", false)),
            "Certificate",
        )
        .await;
    }
    eprintln!(
        "TLS {name}: calls over TLS; wrong CA, wrong host name{} refused",
        if client_certs_required {
            " and missing client certificate"
        } else {
            ""
        }
    );
}

/// Starts `program` with `args`, whitespace-separated, where `{port}`, `{cert}`,
/// `{key}` and `{ca}` stand for the port and the server's files and `''` for an
/// empty argument.
#[cfg(any(feature = "redis", feature = "nats"))]
async fn own_tls_broker(program: &'static str, args: &str, pki: &Pki) -> Option<OwnBroker> {
    let files = [
        ("{cert}", pki.path("server.pem")),
        ("{key}", pki.path("server.key")),
        ("{ca}", pki.path("ca.pem")),
    ];
    OwnBroker::start(program, |port| {
        args.split_whitespace()
            .map(|arg| match arg {
                "{port}" => port.to_string(),
                "''" => String::new(),
                other => files
                    .iter()
                    .find(|(name, _)| *name == other)
                    .map_or_else(|| other.to_owned(), |(_, path)| path.clone()),
            })
            .collect()
    })
    .await
}

#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_over_tls_with_a_client_certificate() {
    let pki = Pki::generate();
    let args = "--port 0 --tls-port {port} --bind 127.0.0.1 --tls-cert-file {cert} \
                --tls-key-file {key} --tls-ca-cert-file {ca} --tls-auth-clients yes \
                --save '' --appendonly no";
    let Some(broker) = own_tls_broker("redis-server", args, &pki).await else {
        return;
    };
    let port = broker.port;
    let url = |host: &str, options| format!("rediss://{host}:{port}/?prefix=mqrpc-tls&{options}");
    check("redis", url, &pki, true).await;
}

#[cfg(feature = "nats")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_over_tls_with_a_client_certificate() {
    let pki = Pki::generate();
    let args =
        "-a 127.0.0.1 -p {port} --tlsverify --tlscert {cert} --tlskey {key} --tlscacert {ca}";
    let Some(broker) = own_tls_broker("nats-server", args, &pki).await else {
        return;
    };
    let port = broker.port;
    let url = |host: &str, options| format!("tls://{host}:{port}?prefix=mqrpc-tls&{options}");
    check("nats", url, &pki, true).await;
}

#[cfg(feature = "amqp")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_over_tls_with_a_client_certificate() {
    let pki = Pki::generate();
    let tls_port = free_port();
    let conf = format!(
        "listeners.ssl.1 = 127.0.0.1:{tls_port}\n\
         ssl_options.cacertfile = {}\n\
         ssl_options.certfile = {}\n\
         ssl_options.keyfile = {}\n\
         ssl_options.verify = verify_peer\n\
         ssl_options.fail_if_no_peer_cert = true\n",
        pki.path("ca.pem"),
        pki.path("server.pem"),
        pki.path("server.key"),
    );
    assert!(exists(&pki.path("server.pem")));
    let Some(broker) = OwnBroker::rabbitmq_with(&conf).await else {
        return;
    };
    broker.wait_for_port(tls_port).await;
    check(
        "amqp",
        |host, options| format!("amqps://guest:guest@{host}:{tls_port}/?{options}"),
        &pki,
        true,
    )
    .await;
}
