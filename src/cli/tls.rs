//! TLS for the CLI's connections to etcd (`https://` URLs): rustls with the ring provider, the
//! server verified against the CA bundle of `--etcd-cacert` (no platform roots), its certificate
//! checked for the URL's host (a DNS name or an IP address), and a client certificate for etcd's
//! `--client-cert-auth` when `--etcd-cert` and `--etcd-key` are given.
//!
//! Messages name the file and the reason, never its contents: a key file's bytes are not echoed,
//! not even in part.

use std::io;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{
    AlertDescription, CertificateError, ClientConfig, ClientConnection, Error, RootCertStore,
    StreamOwned,
};

/// An established TLS connection over TCP.
pub type TlsStream = StreamOwned<ClientConnection, TcpStream>;

/// A loaded client configuration, shared by every connection, and the files it came from (for
/// messages).
#[derive(Clone)]
pub struct Tls {
    config: Arc<ClientConfig>,
    ca: PathBuf,
    client_cert: Option<PathBuf>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("ca", &self.ca)
            .field("client_cert", &self.client_cert)
            .finish_non_exhaustive()
    }
}

/// Why a PEM file could not be read, without any of its contents.
fn pem_reason(e: &pem::Error) -> String {
    match e {
        pem::Error::Io(e) => e.to_string(),
        pem::Error::MissingSectionEnd { .. } => "a PEM section has no END line".to_string(),
        pem::Error::IllegalSectionStart { .. } => "a malformed PEM BEGIN line".to_string(),
        pem::Error::Base64Decode(_) => "a PEM section is not valid base64".to_string(),
        pem::Error::NoItemsFound => "nothing of the expected kind in it".to_string(),
        pem::Error::SectionTooLarge => "a PEM section is too large".to_string(),
        _ => "not a readable PEM file".to_string(),
    }
}

fn certificates(path: &Path, option: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let named = |reason: String| format!("{option} {}: {reason}", path.display());
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| named(pem_reason(&e)))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| named(pem_reason(&e)))?;
    if certs.is_empty() {
        return Err(named(
            "no PEM certificate in it (-----BEGIN CERTIFICATE-----)".to_string(),
        ));
    }
    Ok(certs)
}

fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| {
        let reason = match e {
            pem::Error::NoItemsFound => "no unencrypted PEM private key in it (PKCS#8 \
                 -----BEGIN PRIVATE KEY-----, or RSA or EC PRIVATE KEY; encrypted keys are not \
                 supported)"
                .to_string(),
            other => pem_reason(&other),
        };
        format!("--etcd-key {}: {reason}", path.display())
    })
}

impl Tls {
    /// Reads the CA bundle (`--etcd-cacert`) and, when given, the client certificate chain and its
    /// key (`--etcd-cert`, `--etcd-key`).
    pub fn load(ca: &Path, client: Option<(&Path, &Path)>) -> Result<Tls, String> {
        let mut roots = RootCertStore::empty();
        for (i, cert) in certificates(ca, "--etcd-cacert")?.into_iter().enumerate() {
            roots.add(cert).map_err(|e| {
                format!(
                    "--etcd-cacert {}: certificate {} cannot be used as a CA: {e}",
                    ca.display(),
                    i + 1
                )
            })?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("cannot set up TLS: {e}"))?
            .with_root_certificates(roots);
        let mut config = match client {
            None => builder.with_no_client_auth(),
            Some((cert, key)) => {
                let chain = certificates(cert, "--etcd-cert")?;
                let key_der = private_key(key)?;
                builder
                    .with_client_auth_cert(chain, key_der)
                    .map_err(|e| match e {
                        Error::InconsistentKeys(_) => format!(
                            "--etcd-key {} is not the key of the certificate in --etcd-cert {}",
                            key.display(),
                            cert.display()
                        ),
                        other => format!(
                            "--etcd-cert {} / --etcd-key {}: {other}",
                            cert.display(),
                            key.display()
                        ),
                    })?
            }
        };
        // etcd's client port also speaks gRPC (h2): ask for the JSON gateway's HTTP/1.1.
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Tls {
            config: Arc::new(config),
            ca: ca.to_path_buf(),
            client_cert: client.map(|(cert, _)| cert.to_path_buf()),
        })
    }

    /// The TLS handshake with `host` (the URL's host: its certificate must name it) over `tcp`.
    /// On failure nothing was sent but the handshake.
    pub fn connect(&self, mut tcp: TcpStream, host: &str) -> Result<TlsStream, String> {
        let name = ServerName::try_from(host.to_string())
            .map_err(|_| format!("'{host}' is neither a DNS name nor an IP address"))?;
        let mut conn = ClientConnection::new(Arc::clone(&self.config), name)
            .map_err(|e| format!("cannot start TLS: {e}"))?;
        while conn.is_handshaking() {
            match conn.complete_io(&mut tcp) {
                Ok((0, 0)) if conn.is_handshaking() => {
                    return Err(
                        "the TLS handshake stalled: the server closed the connection \
                                (is this a TLS port?)"
                            .to_string(),
                    );
                }
                Ok(_) => {}
                Err(e) => return Err(self.explain(&e, host)),
            }
        }
        Ok(StreamOwned::new(conn, tcp))
    }

    /// When `e` (from a read or write after the handshake, before any answer was read) is the
    /// server refusing the TLS session, why: the server then dropped the request unread. TLS 1.3
    /// servers check the client certificate after the client's side of the handshake is done, so
    /// that refusal arrives only with the first read.
    pub fn refusal(&self, e: &io::Error, host: &str) -> Option<String> {
        match tls_error(e) {
            Some(Error::AlertReceived(_)) => Some(self.explain(e, host)),
            _ => None,
        }
    }

    /// `e` as a sentence, with a hint for the usual causes.
    fn explain(&self, e: &io::Error, host: &str) -> String {
        let Some(error) = tls_error(e) else {
            if matches!(
                e.kind(),
                io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset
            ) {
                return "TLS handshake failed: the server closed the connection (does it serve \
                        TLS there? a plain-HTTP etcd is given as http://)"
                    .to_string();
            }
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) {
                return "TLS handshake failed: the server did not answer in time".to_string();
            }
            return format!("TLS handshake failed: {e}");
        };
        let hint = match error {
            Error::InvalidCertificate(CertificateError::UnknownIssuer) => format!(
                "the server's certificate is not signed by a CA in --etcd-cacert {}",
                self.ca.display()
            ),
            Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            ) => format!(
                "the server's certificate is not made for '{host}': give etcd's URL with a host \
                 name or IP address its certificate names"
            ),
            Error::InvalidCertificate(
                CertificateError::Expired
                | CertificateError::ExpiredContext { .. }
                | CertificateError::NotValidYet
                | CertificateError::NotValidYetContext { .. },
            ) => "check the certificate's validity dates and this machine's clock".to_string(),
            Error::InvalidCertificate(_) => "the server's certificate was not accepted".to_string(),
            Error::AlertReceived(alert) => self.alert_hint(*alert),
            Error::InvalidMessage(_) | Error::InappropriateMessage { .. } => {
                "is this a TLS port? a plain-HTTP etcd is given as http://".to_string()
            }
            _ => String::new(),
        };
        if hint.is_empty() {
            format!("TLS failed: {error}")
        } else {
            format!("TLS failed: {error} ({hint})")
        }
    }

    fn alert_hint(&self, alert: AlertDescription) -> String {
        let about_certificates = matches!(
            alert,
            AlertDescription::CertificateRequired
                | AlertDescription::BadCertificate
                | AlertDescription::UnsupportedCertificate
                | AlertDescription::CertificateRevoked
                | AlertDescription::CertificateExpired
                | AlertDescription::CertificateUnknown
                | AlertDescription::UnknownCA
                | AlertDescription::AccessDenied
                | AlertDescription::HandshakeFailure
        );
        match &self.client_cert {
            _ if !about_certificates => "the server refused the TLS session".to_string(),
            None => "the server refused the TLS session: it requires a client certificate \
                     (etcd --client-cert-auth), so give --etcd-cert and --etcd-key"
                .to_string(),
            Some(cert) => format!(
                "the server refused the client certificate in --etcd-cert {}: is it signed by \
                 the CA of etcd's --trusted-ca-file, valid now, and made for client \
                 authentication?",
                cert.display()
            ),
        }
    }
}

/// The rustls error inside an I/O error from a TLS connection.
fn tls_error(e: &io::Error) -> Option<&Error> {
    e.get_ref().and_then(|inner| inner.downcast_ref::<Error>())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(name: &str, contents: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("shieldkey-tls-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, contents).unwrap();
        path
    }

    #[test]
    fn unreadable_files_are_named_with_the_reason_and_no_contents() {
        let missing = Path::new("/nonexistent/ca.pem");
        let e = Tls::load(missing, None).unwrap_err();
        assert!(
            e.starts_with("--etcd-cacert /nonexistent/ca.pem: ") && e.contains("No such file"),
            "{e}"
        );

        let not_pem = temp("notpem.pem", "hello\n");
        let e = Tls::load(&not_pem, None).unwrap_err();
        assert!(e.contains("no PEM certificate"), "{e}");

        let secret = "c2VjcmV0LWtleS1tYXRlcmlhbA!!";
        let broken_key = temp(
            "broken.key",
            &format!("-----BEGIN PRIVATE KEY-----\n{secret}\n-----END PRIVATE KEY-----\n"),
        );
        let e = private_key(&broken_key).unwrap_err();
        assert!(e.contains("--etcd-key") && e.contains("base64"), "{e}");
        assert!(!e.contains("c2Vj") && !e.contains('!'), "{e}");

        let no_key = temp(
            "nokey.key",
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        );
        let e = private_key(&no_key).unwrap_err();
        assert!(e.contains("no unencrypted PEM private key"), "{e}");
        let _ = std::fs::remove_dir_all(no_key.parent().unwrap());
    }
}
