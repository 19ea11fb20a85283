//! TLS for the proxy listeners: rustls with ALPN h2 and http/1.1. The acceptor sits behind an
//! `ArcSwap` so that a reload re-reads the certificate and key (rotation without a restart).

use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::sync::Arc;

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
    #[error("certificate and key do not make a TLS config: {0}")]
    Rustls(#[from] rustls::Error),
}

/// Builds an acceptor from PEM files.
pub fn acceptor(config: &TlsConfig) -> Result<TlsAcceptor, TlsError> {
    let certs = certificates(&config.cert)?;
    let key = private_key(&config.key)?;
    Ok(TlsAcceptor::from(Arc::new(server_config(certs, key)?)))
}

/// The rustls server config for a certificate chain and its key, with ALPN h2 and http/1.1.
pub(crate) fn server_config(
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<rustls::ServerConfig, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut server = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(server)
}

fn open(path: &Path) -> Result<BufReader<File>, TlsError> {
    File::open(path)
        .map(BufReader::new)
        .map_err(|source| TlsError::Read {
            path: path.to_path_buf(),
            source,
        })
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
}
