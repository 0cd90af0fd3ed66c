//! TLS files named in a broker URL, shared by every backend: a CA to trust (instead
//! of or besides the system's roots) and a client certificate with its key. Server
//! hostnames are always verified.

use std::path::{Path, PathBuf};

use crate::error::Error;

/// The TLS files a URL names (`tls_ca_file`, `tls_cert_file`, `tls_key_file`; oslo's
/// `ssl_ca_file`, `ssl_cert_file`, `ssl_key_file` are accepted too).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct TlsFiles {
    /// PEM file of the CA certificates that sign the broker's certificate.
    pub ca_file: Option<PathBuf>,
    /// PEM file of the client certificate (chain), for brokers that ask for one.
    pub cert_file: Option<PathBuf>,
    /// PEM file of the client certificate's private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: Option<PathBuf>,
}

/// The contents of [`TlsFiles`], read.
#[derive(Clone, Default)]
#[non_exhaustive]
pub struct TlsPem {
    /// The CA certificates (PEM).
    pub ca: Option<Vec<u8>>,
    /// The client certificate and its key (PEM).
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
}

impl std::fmt::Debug for TlsPem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("TlsPem")
            .field("ca", &self.ca.as_ref().map(Vec::len))
            .field("identity", &self.identity.is_some())
            .finish()
    }
}

impl TlsFiles {
    /// Takes a URL option if it is one of the TLS file options: `Some(())` when it
    /// was, `None` when the key is not a TLS option.
    pub fn set_option(&mut self, key: &str, value: &str) -> Option<()> {
        let slot = match key {
            "tls_ca_file" | "ssl_ca_file" | "cacertfile" => &mut self.ca_file,
            "tls_cert_file" | "ssl_cert_file" | "certfile" => &mut self.cert_file,
            "tls_key_file" | "ssl_key_file" | "keyfile" => &mut self.key_file,
            _ => return None,
        };
        *slot = Some(PathBuf::from(value));
        Some(())
    }

    /// The option names, for "unknown option" messages.
    pub const OPTION_NAMES: &'static str = "tls_ca_file, tls_cert_file, tls_key_file";

    /// Whether any file is named (which asks for TLS).
    pub fn any(&self) -> bool {
        self.ca_file.is_some() || self.cert_file.is_some() || self.key_file.is_some()
    }

    /// Checks that a certificate and a key come together.
    pub fn validate(&self) -> Result<(), Error> {
        if self.cert_file.is_some() != self.key_file.is_some() {
            return Err(Error::InvalidUrl(
                "tls_cert_file and tls_key_file must be given together".to_owned(),
            ));
        }
        Ok(())
    }

    /// Reads the files; an unreadable file is an error naming it.
    pub fn load(&self) -> Result<TlsPem, Error> {
        self.validate()?;
        // Each file must hold a PEM block of its kind: some TLS stacks skip what they
        // cannot parse, which would surface later as a vague handshake failure.
        let read = |what: &str, path: &Path, marker: &str| {
            let bytes = std::fs::read(path).map_err(|e| {
                Error::InvalidConfig(format!(
                    "cannot read the TLS {what} {}: {e}",
                    path.display()
                ))
            })?;
            if !bytes.windows(marker.len()).any(|w| w == marker.as_bytes()) {
                return Err(Error::InvalidConfig(format!(
                    "the TLS {what} {} holds no PEM {}",
                    path.display(),
                    marker.trim_matches('-').trim()
                )));
            }
            Ok(bytes)
        };
        const CERTIFICATE: &str = "CERTIFICATE-----";
        const KEY: &str = "PRIVATE KEY-----";
        let ca = self
            .ca_file
            .as_deref()
            .map(|p| read("CA file", p, CERTIFICATE))
            .transpose()?;
        let identity = match (&self.cert_file, &self.key_file) {
            (Some(cert), Some(key)) => Some((
                read("certificate file", cert, CERTIFICATE)?,
                read("key file", key, KEY)?,
            )),
            _ => None,
        };
        Ok(TlsPem { ca, identity })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_and_their_oslo_names() {
        let mut files = TlsFiles::default();
        assert_eq!(files.set_option("ssl_ca_file", "/ca.pem"), Some(()));
        assert_eq!(files.set_option("tls_cert_file", "/c.pem"), Some(()));
        assert_eq!(files.set_option("prefix", "x"), None);
        assert!(files.any());
        assert!(files.validate().is_err(), "a certificate without its key");
        files.set_option("keyfile", "/k.pem");
        assert!(files.validate().is_ok());
        let err = files.load().expect_err("no such files");
        assert!(err.to_string().contains("/ca.pem"), "{err}");
    }

    #[test]
    fn a_file_without_its_pem_block_is_named() {
        let dir = std::env::temp_dir().join(format!("mqrpc-tls-{}", crate::wire::new_id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let ca = dir.join("ca.pem");
        std::fs::write(&ca, "not a certificate").expect("write");
        let mut files = TlsFiles::default();
        files.set_option("ssl_ca_file", ca.to_str().expect("utf-8 path"));
        let err = files.load().expect_err("no PEM certificate");
        assert!(
            err.to_string().contains("ca.pem") && err.to_string().contains("CERTIFICATE"),
            "{err}"
        );
        std::fs::write(
            &ca,
            "-----BEGIN CERTIFICATE-----\nAA==\n-----END CERTIFICATE-----\n",
        )
        .expect("write");
        assert!(files.load().is_ok());
        std::fs::remove_dir_all(&dir).ok();
    }
}
