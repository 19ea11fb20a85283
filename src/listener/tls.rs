//! TLS for the proxy listeners: rustls with ALPN h2, http/1.1 and http/1.0. The acceptor sits
//! behind an `ArcSwap` so that a reload re-reads the certificate and key (rotation without a
//! restart).

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

use crate::config::TlsConfig;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: no certificate found")]
    NoCertificate { path: PathBuf },
    #[error("{path}: no private key found")]
    NoKey { path: PathBuf },
    #[error(
        "{path}: the private key is encrypted; veer reads unencrypted PEM keys \
         (`openssl pkey -in KEY -out PLAIN` decrypts it)"
    )]
    EncryptedKey { path: PathBuf },
    #[error(
        "the private key is of a kind veer cannot use: RSA (2048 bits or more), ECDSA P-256 or \
         P-384, or Ed25519"
    )]
    UnsupportedKey,
    #[error("the private key is not the certificate's (the first one in the certificate file)")]
    KeyMismatch,
    #[error("the certificate cannot be used: {0}")]
    Certificate(String),
    #[error("certificate and key do not make a TLS config: {0}")]
    Rustls(#[from] rustls::Error),
}

impl TlsError {
    /// Whether the problem is the certificate file's (else the key file's, or both's).
    pub fn is_certificate(&self) -> bool {
        matches!(
            self,
            TlsError::Certificate(_) | TlsError::NoCertificate { .. }
        )
    }

    /// What rustls found wrong with the certificate and key together.
    fn of_pair(error: rustls::Error) -> TlsError {
        match error {
            rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch) => {
                TlsError::KeyMismatch
            }
            rustls::Error::InvalidCertificate(error) => {
                let detail = format!("{error:?}");
                TlsError::Certificate(if detail.contains("UnsupportedCertVersion") {
                    // What `openssl x509 -req -signkey` makes without `-extfile`.
                    "it is an X.509 v1 certificate; make a v3 one (`openssl req -x509`, or \
                     `openssl x509 -req` with an `-extfile` giving `subjectAltName`)"
                        .into()
                } else {
                    detail
                })
            }
            other => TlsError::Rustls(other),
        }
    }
}

/// Builds an acceptor from PEM files; also returns when the served certificate is valid.
/// Warns (logs) when it has expired or is not valid yet (clients refuse it, but it is served,
/// as NGINX and HAProxy serve it: an expired certificate beats none for clients told to
/// accept it), or expires soon (see [`Validity::problem`]).
pub fn acceptor(config: &TlsConfig) -> Result<(TlsAcceptor, Option<Validity>), TlsError> {
    let certs = certificates(&config.cert)?;
    let key = private_key(&config.key)?;
    let validity = certs.first().and_then(Validity::of);
    if let Some(problem) = validity.and_then(|v| v.problem(unix_now())) {
        tracing::warn!(cert = %config.cert.display(), "{problem}");
    }
    let acceptor = TlsAcceptor::from(Arc::new(server_config(certs, key)?));
    Ok((acceptor, validity))
}

/// How close to its end a certificate's validity is warned of, in seconds: 14 days.
const EXPIRES_SOON: i64 = 14 * 24 * 3600;

/// When a certificate is valid, in Unix seconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Validity {
    pub not_before: i64,
    pub not_after: i64,
}

impl Validity {
    /// The validity of a DER certificate; `None` when it cannot be parsed (rustls judges it).
    pub fn of(cert: &CertificateDer<'_>) -> Option<Validity> {
        let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
        let validity = parsed.validity();
        Some(Validity {
            not_before: validity.not_before.timestamp(),
            not_after: validity.not_after.timestamp(),
        })
    }

    /// What is wrong with the certificate at `now` (Unix seconds): expired, not valid yet, or
    /// expiring within [`EXPIRES_SOON`] or a third of its lifetime, whichever is less
    /// (renewals start about 30 days ahead, or at two thirds of a short-lived certificate's
    /// lifetime: one that is this close has failed).
    pub fn problem(&self, now: i64) -> Option<String> {
        let date = |at: i64| {
            let at = u64::try_from(at).unwrap_or(0);
            humantime::format_rfc3339_seconds(UNIX_EPOCH + std::time::Duration::from_secs(at))
        };
        if now > self.not_after {
            Some(format!(
                "the certificate expired at {}: clients will refuse it",
                date(self.not_after)
            ))
        } else if now < self.not_before {
            Some(format!(
                "the certificate is not valid before {}: clients will refuse it",
                date(self.not_before)
            ))
        } else if self.not_after - now < EXPIRES_SOON.min((self.not_after - self.not_before) / 3) {
            let hours = (self.not_after - now) / 3600;
            Some(format!(
                "the certificate expires at {}, in {} days {} hours: renew it",
                date(self.not_after),
                hours / 24,
                hours % 24
            ))
        } else {
            None
        }
    }
}

/// What is wrong with the certificate `config` names, now (see [`Validity::problem`]), for
/// `veer check`; `None` when nothing is or it cannot be read (the config check reports that).
pub fn certificate_problem(config: &TlsConfig) -> Option<String> {
    let certs = certificates(&config.cert).ok()?;
    Validity::of(certs.first()?)?.problem(unix_now())
}

fn unix_now() -> i64 {
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(since.as_secs()).unwrap_or(i64::MAX)
}

/// The rustls server config for a certificate chain and its key, with ALPN h2, http/1.1 and
/// http/1.0.
pub(crate) fn server_config(
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<rustls::ServerConfig, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    // The key's kind first, so that its problem is not told as the pair's.
    provider
        .key_provider
        .load_private_key(key.clone_key())
        .map_err(|_| TlsError::UnsupportedKey)?;
    let mut server = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(TlsError::of_pair)?;
    // http/1.0 too, which curl offers for `--http1.0`: offered alone and not listed, it
    // failed the handshake (`no_application_protocol`), though veer serves HTTP/1.0.
    server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec(), b"http/1.0".to_vec()];
    Ok(server)
}

/// A PEM file larger than this is refused: certificate chains and keys are a few KiB.
const MAX_PEM_BYTES: u64 = 1 << 20;

/// A PEM file, when it is a regular file of at most [`MAX_PEM_BYTES`]: a path to a device
/// (`/dev/zero`) was read without end, and one to a FIFO blocked the check or reload for good.
fn open(path: &Path) -> Result<BufReader<std::io::Take<File>>, TlsError> {
    let error = |source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    };
    let refused = |why: &str| error(std::io::Error::new(std::io::ErrorKind::InvalidInput, why));
    let metadata = std::fs::metadata(path).map_err(error)?;
    if !metadata.is_file() {
        return Err(refused("not a regular file"));
    }
    if metadata.len() > MAX_PEM_BYTES {
        return Err(refused(
            "larger than 1 MiB; a PEM certificate chain or key is a few KiB",
        ));
    }
    let file = File::open(path).map_err(error)?;
    Ok(BufReader::new(file.take(MAX_PEM_BYTES)))
}

/// The certificate chain in a PEM file.
pub(crate) fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = rustls_pemfile::certs(&mut open(path)?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::Read {
            path: path.to_path_buf(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_path_buf(),
        });
    }
    Ok(certs)
}

/// The first private key in a PEM file.
pub(crate) fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let found = rustls_pemfile::private_key(&mut open(path)?);
    // rustls-pemfile passes over encrypted PKCS#8 keys and cannot parse the headers of
    // encrypted PKCS#1 ones: say which it is.
    let encrypted = || {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        text.contains("ENCRYPTED PRIVATE KEY") || text.contains("Proc-Type: 4,ENCRYPTED")
    };
    let path = path.to_path_buf();
    match found {
        Ok(Some(key)) => Ok(key),
        _ if encrypted() => Err(TlsError::EncryptedKey { path }),
        Ok(None) => Err(TlsError::NoKey { path }),
        Err(source) => Err(TlsError::Read { path, source }),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn an_encrypted_key_is_named_as_such() {
        let dir = tempfile::tempdir().unwrap();
        let cases = [
            (
                "-----BEGIN ENCRYPTED PRIVATE KEY-----\nAAAA\n-----END ENCRYPTED PRIVATE KEY-----\n",
                "is encrypted",
            ),
            (
                "-----BEGIN RSA PRIVATE KEY-----\nProc-Type: 4,ENCRYPTED\n\
                 DEK-Info: AES-256-CBC,00\n\nAAAA\n-----END RSA PRIVATE KEY-----\n",
                "is encrypted",
            ),
            ("not a key\n", "no private key found"),
        ];
        for (i, (text, expected)) in cases.into_iter().enumerate() {
            let path = dir.path().join(format!("key{i}.pem"));
            std::fs::write(&path, text).unwrap();
            let error = private_key(&path).map(|_| ()).unwrap_err().to_string();
            assert!(error.contains(expected), "{text}: {error}");
        }
    }

    /// A path to a device, a FIFO or a file far too large is refused before it is read (it was
    /// read without end, or blocked for good).
    #[test]
    fn only_a_regular_file_of_a_sane_size_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo.pem");
        let made = std::process::Command::new("mkfifo").arg(&fifo).status();
        assert!(made.unwrap().success());
        let large = dir.path().join("large.pem");
        std::fs::write(&large, vec![b'A'; 1 << 20 | 1]).unwrap();
        let cases = [
            (Path::new("/dev/zero"), "not a regular file"),
            (&fifo, "not a regular file"),
            (&large, "larger than 1 MiB"),
        ];
        for (path, expected) in cases {
            let error = certificates(path).map(|_| ()).unwrap_err().to_string();
            assert!(error.contains(expected), "{}: {error}", path.display());
            let error = private_key(path).map(|_| ()).unwrap_err().to_string();
            assert!(error.contains(expected), "{}: {error}", path.display());
        }
    }

    /// An expired certificate, one not valid yet and one expiring within 14 days are named
    /// so, with the date; one valid for longer is not.
    #[test]
    fn a_certificate_outside_its_validity_is_named() {
        let (certs, _) = self_signed();
        let validity = Validity::of(&certs[0]).unwrap();
        assert!(validity.not_before < validity.not_after);
        assert_eq!(validity.problem(unix_now()), None);
        let after = validity.problem(validity.not_after + 1).unwrap();
        assert!(after.starts_with("the certificate expired at "), "{after}");
        let before = validity.problem(validity.not_before - 1).unwrap();
        assert!(before.contains("is not valid before "), "{before}");
        let fixed = Validity {
            not_before: 0,
            not_after: 1_700_000_000,
        };
        let said = fixed.problem(1_800_000_000).unwrap();
        assert!(said.contains("2023-11-14T22:13:20Z"), "{said}");
        // Within 14 days of its end it is warned of; 14 days ahead, not.
        let soon = fixed
            .problem(fixed.not_after - 13 * 86_400 - 5 * 3600)
            .unwrap();
        assert_eq!(
            soon,
            "the certificate expires at 2023-11-14T22:13:20Z, in 13 days 5 hours: renew it"
        );
        assert_eq!(fixed.problem(fixed.not_after - 14 * 86_400), None);
        // A certificate for 3 days is warned of in its last day, not all along.
        let short = Validity {
            not_before: 1_700_000_000,
            not_after: 1_700_000_000 + 3 * 86_400,
        };
        assert_eq!(short.problem(short.not_before + 2 * 86_400 - 60), None);
        assert!(short.problem(short.not_before + 2 * 86_400 + 60).is_some());
    }

    /// The certificate chain and key of a new self-signed certificate for localhost.
    fn self_signed() -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        let made = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let key = PrivateKeyDer::try_from(made.key_pair.serialize_der()).unwrap();
        (vec![made.cert.der().clone()], key)
    }

    #[test]
    fn a_key_of_another_certificate_or_of_an_unusable_kind_is_named_as_such() {
        let (certs, key) = self_signed();
        assert!(server_config(certs.clone(), key).is_ok());
        let (_, other) = self_signed();
        let error = server_config(certs.clone(), other).unwrap_err();
        assert!(matches!(error, TlsError::KeyMismatch), "{error}");
        assert!(!error.is_certificate());
        // A PKCS#8 document that holds no key rustls can use.
        let unusable = PrivateKeyDer::Pkcs8(vec![0x30, 0x03, 0x02, 0x01, 0x00].into());
        let error = server_config(certs, unusable).unwrap_err();
        assert!(matches!(error, TlsError::UnsupportedKey), "{error}");
        assert!(
            error.to_string().contains("RSA (2048 bits or more)"),
            "{error}"
        );
    }
}
