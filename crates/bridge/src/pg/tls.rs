//! TLS to PostgreSQL, with libpq's `sslmode` meanings (rustls; no system
//! OpenSSL needed):
//!
//! | `sslmode` | encrypted | server certificate checked |
//! |---|---|---|
//! | `disable` | no | - |
//! | `prefer` (libpq's default), `allow` | when the server offers it | no |
//! | `require` | yes, or the connection fails | only when a root certificate is given (`sslrootcert`), as libpq does |
//! | `verify-ca` | yes | chains to the root certificate |
//! | `verify-full` | yes | chains to the root certificate and names the host |
//!
//! The root certificate is `sslrootcert=FILE` in the URL, else
//! `PGSSLROOTCERT`, else `~/.postgresql/root.crt` when it exists (libpq's
//! places). `verify-ca` and `verify-full` without one fail with that advice.

use std::path::PathBuf;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::error::{Error, Result};

/// What a URL's `sslmode` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// No TLS.
    Disable,
    /// TLS when the server offers it, unchecked.
    Prefer,
    /// TLS always; checked only against a given root certificate.
    Require,
    /// TLS, the chain checked.
    VerifyCa,
    /// TLS, the chain and the host name checked.
    VerifyFull,
}

impl Mode {
    /// Parse an `sslmode` value.
    pub fn parse(s: &str) -> Result<Mode> {
        Ok(match s {
            "disable" => Mode::Disable,
            "allow" | "prefer" => Mode::Prefer,
            "require" => Mode::Require,
            "verify-ca" => Mode::VerifyCa,
            "verify-full" => Mode::VerifyFull,
            other => {
                return Err(Error::Invalid(format!(
                    "sslmode={other:?}: use disable, prefer, require, verify-ca or verify-full"
                )));
            }
        })
    }
}

/// The root certificate file to check the server against, if any.
pub fn root_cert(given: Option<String>) -> Option<PathBuf> {
    given
        .or_else(|| {
            std::env::var("PGSSLROOTCERT")
                .ok()
                .filter(|s| !s.is_empty())
        })
        .map(PathBuf::from)
        .or_else(|| {
            let p = PathBuf::from(std::env::var_os("HOME")?).join(".postgresql/root.crt");
            p.exists().then_some(p)
        })
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Accepts any certificate (libpq's `prefer` and `require` without a root
/// certificate: encryption against eavesdropping, not against an
/// impostor), still checking the handshake's signatures.
#[derive(Debug)]
struct Unchecked(Arc<CryptoProvider>);

impl ServerCertVerifier for Unchecked {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `verify-ca`: the chain must lead to the root; the name is not checked.
#[derive(Debug)]
struct ChainOnly(Arc<rustls::client::WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForName))
            | Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

fn roots(file: &std::path::Path) -> Result<RootCertStore> {
    let mut store = RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(file).map_err(|e| {
        Error::Invalid(format!(
            "sslrootcert {}: cannot read it ({e}); give a PEM file of the server's CA",
            file.display()
        ))
    })?;
    for c in certs {
        let c = c.map_err(|e| {
            Error::Invalid(format!(
                "sslrootcert {}: not PEM certificates ({e})",
                file.display()
            ))
        })?;
        store.add(c).map_err(|e| {
            Error::Invalid(format!(
                "sslrootcert {}: a certificate is not usable ({e})",
                file.display()
            ))
        })?;
    }
    if store.is_empty() {
        return Err(Error::Invalid(format!(
            "sslrootcert {} holds no certificate",
            file.display()
        )));
    }
    Ok(store)
}

/// The TLS connector for `mode` (None for `disable`).
pub fn connector(mode: Mode, root: Option<PathBuf>) -> Result<Option<MakeRustlsConnect>> {
    let p = provider();
    let builder = ClientConfig::builder_with_provider(p.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Invalid(format!("TLS set-up: {e}")))?;
    let verified = |root: &std::path::Path| -> Result<Arc<rustls::client::WebPkiServerVerifier>> {
        rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots(root)?),
            p.clone(),
        )
        .build()
        .map_err(|e| Error::Invalid(format!("TLS set-up: {e}")))
    };
    let config = match (mode, root) {
        (Mode::Disable, _) => return Ok(None),
        (Mode::Prefer, _) | (Mode::Require, None) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Unchecked(p.clone())))
            .with_no_client_auth(),
        (Mode::Require | Mode::VerifyCa, Some(r)) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(ChainOnly(verified(&r)?)))
            .with_no_client_auth(),
        (Mode::VerifyFull, Some(r)) => builder
            .with_webpki_verifier(verified(&r)?)
            .with_no_client_auth(),
        (Mode::VerifyCa | Mode::VerifyFull, None) => {
            return Err(Error::Invalid(
                "sslmode=verify-ca/verify-full needs the server's CA certificate: add \
                 sslrootcert=FILE to the URL, set PGSSLROOTCERT, or put it at ~/.postgresql/root.crt"
                    .into(),
            ));
        }
    };
    Ok(Some(MakeRustlsConnect::new(config)))
}
