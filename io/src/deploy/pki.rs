//! The deployment's certificates: one CA, one frontend certificate shared by every frontend (its SANs
//! name every frontend host; minions also present it to the master as a client certificate), and one
//! certificate per API user. Each certificate's role is its OU (`ca`, `frontend`, `api`), which the
//! services check when they authorise a peer.

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use std::fmt;
use std::net::IpAddr;
use talon_core::Timestamp;
use time::OffsetDateTime;

/// How long the CA is valid.
pub const CA_VALID_DAYS: i64 = 10 * 365;
/// How long frontend and API certificates are valid.
pub const LEAF_VALID_DAYS: i64 = 2 * 365;

/// A certificate's role, carried in its subject's OU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// The deployment CA.
    Ca,
    /// A frontend (master or minion).
    Frontend,
    /// An API user.
    Api,
}

impl Role {
    /// The OU value.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Ca => "ca",
            Role::Frontend => "frontend",
            Role::Api => "api",
        }
    }
}

/// What a user may do, in the GUI and through the API alike (docs/gui.md, "Users and roles"). Each
/// level may do everything the one before it may.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
#[derive(clap::ValueEnum)]
pub enum Access {
    /// Views clients, flows, hunts, results, events and the cluster.
    Reader,
    /// Also collects, hunts, cancels flows and labels clients one at a time.
    Investigator,
    /// Also manages artifacts, the client event table, labels in bulk and reads the audit log.
    Administrator,
}

impl Access {
    /// Its name.
    pub fn as_str(self) -> &'static str {
        match self {
            Access::Reader => "reader",
            Access::Investigator => "investigator",
            Access::Administrator => "administrator",
        }
    }

    /// Parses a name.
    pub fn parse(s: &str) -> Result<Access, String> {
        match s {
            "reader" => Ok(Access::Reader),
            "investigator" => Ok(Access::Investigator),
            "administrator" => Ok(Access::Administrator),
            _ => Err(format!(
                "unknown role {s:?}: use reader, investigator or administrator"
            )),
        }
    }
}

impl fmt::Display for Access {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The key type of a deployment's CA, frontend and API certificates (each leaf takes its CA's).
/// Endpoint agents keep Ed25519 whatever it is: a client's id is derived from its key.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum KeyType {
    /// ECDSA over P-256 with SHA-256: what every TLS stack accepts (BoringSSL, used by grpcio and
    /// the C++, Ruby and PHP gRPC libraries, offers no Ed25519), keys written as PKCS#8 v1.
    #[default]
    EcdsaP256,
    /// Ed25519: deterministic signatures of a fixed size (the simulator's deployments use it so
    /// that certificates and handshakes are byte-for-byte reproducible); what deployments made
    /// before ECDSA was the default hold. Its keys are written as PKCS#8 v2, which OpenSSL and
    /// BoringSSL refuse.
    Ed25519,
}

impl KeyType {
    /// The name `--key-type` takes.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyType::EcdsaP256 => "ecdsa-p256",
            KeyType::Ed25519 => "ed25519",
        }
    }

    fn algorithm(self) -> &'static rcgen::SignatureAlgorithm {
        match self {
            KeyType::EcdsaP256 => &rcgen::PKCS_ECDSA_P256_SHA256,
            KeyType::Ed25519 => &rcgen::PKCS_ED25519,
        }
    }
}

impl fmt::Display for KeyType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for KeyType {
    type Err = String;

    fn from_str(s: &str) -> Result<KeyType, String> {
        match s.to_ascii_lowercase().as_str() {
            "ecdsa-p256" | "ecdsa" | "p256" | "p-256" => Ok(KeyType::EcdsaP256),
            "ed25519" => Ok(KeyType::Ed25519),
            "rsa" => Err(
                "RSA keys are not available in this build (its cryptography library, \
                          ring, cannot generate them); use ecdsa-p256, which every TLS stack \
                          accepts"
                    .into(),
            ),
            other => Err(format!("key type {other:?}: use ecdsa-p256 or ed25519")),
        }
    }
}

/// A certificate and its private key, PEM encoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pem {
    /// The certificate.
    pub certificate: String,
    /// The private key (PKCS#8).
    pub private_key: String,
}

/// Why certificate work failed.
#[derive(Debug)]
pub struct PkiError(pub String);

impl fmt::Display for PkiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for PkiError {}

fn err(what: &str) -> impl Fn(rcgen::Error) -> PkiError + '_ {
    move |e| PkiError(format!("{what}: {e}"))
}

fn validity(params: &mut CertificateParams, now: Timestamp, days: i64) -> Result<(), PkiError> {
    let now = OffsetDateTime::from_unix_timestamp((now.as_ms() / 1000) as i64)
        .map_err(|e| PkiError(format!("clock out of range: {e}")))?;
    // A day of slack for clocks that lag the issuer's.
    params.not_before = now - time::Duration::days(1);
    params.not_after = now + time::Duration::days(days);
    Ok(())
}

fn name(cn: &str, role: Role) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    dn.push(DnType::OrganizationName, "Talon");
    dn.push(DnType::OrganizationalUnitName, role.as_str());
    dn
}

/// Creates a new deployment CA whose key (and every certificate's it issues) is of `key_type`.
pub fn new_ca(now: Timestamp, key_type: KeyType) -> Result<Pem, PkiError> {
    let key = KeyPair::generate_for(key_type.algorithm()).map_err(err("generating the CA key"))?;
    let mut params = CertificateParams::default();
    params.distinguished_name = name("Talon CA", Role::Ca);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    validity(&mut params, now, CA_VALID_DAYS)?;
    let cert = params
        .self_signed(&key)
        .map_err(err("signing the CA certificate"))?;
    Ok(Pem {
        certificate: cert.pem(),
        private_key: key.serialize_pem(),
    })
}

fn issue(
    ca: &Pem,
    (cn, role, access): (&str, Role, Option<Access>),
    sans: &[String],
    eku: Vec<ExtendedKeyUsagePurpose>,
    now: Timestamp,
) -> Result<Pem, PkiError> {
    let ca_key = KeyPair::from_pem(&ca.private_key).map_err(err("reading CA.private_key"))?;
    // The leaf's key is of the CA's type: a deployment made with one type stays with it (until
    // `config rotate-ca` gives it a new CA).
    let key = KeyPair::generate_for(ca_key.algorithm()).map_err(err("generating a key"))?;
    let issuer =
        Issuer::from_ca_cert_pem(&ca.certificate, ca_key).map_err(err("reading CA.certificate"))?;
    let mut params = CertificateParams::default();
    params.distinguished_name = name(cn, role);
    if let Some(a) = access {
        params
            .distinguished_name
            .push(DnType::CustomDnType(ROLE_OID.to_vec()), a.as_str());
    }
    params.subject_alt_names = sans
        .iter()
        .map(|h| match h.parse::<IpAddr>() {
            Ok(ip) => Ok(SanType::IpAddress(ip)),
            Err(_) => h
                .clone()
                .try_into()
                .map(SanType::DnsName)
                .map_err(err("a hostname")),
        })
        .collect::<Result<_, _>>()?;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = eku;
    params.use_authority_key_identifier_extension = true;
    validity(&mut params, now, LEAF_VALID_DAYS)?;
    let cert = params
        .signed_by(&key, &issuer)
        .map_err(err("signing a certificate"))?;
    Ok(Pem {
        certificate: cert.pem(),
        private_key: key.serialize_pem(),
    })
}

/// Issues the frontend certificate, valid for every given hostname or IP.
pub fn issue_frontend(ca: &Pem, hostnames: &[String], now: Timestamp) -> Result<Pem, PkiError> {
    let eku = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    issue(
        ca,
        ("Talon frontend", Role::Frontend, None),
        hostnames,
        eku,
        now,
    )
}

/// Issues an API user's client certificate with the administrator role.
pub fn issue_api_client(ca: &Pem, user: &str, now: Timestamp) -> Result<Pem, PkiError> {
    issue_api_user(ca, user, Access::Administrator, now)
}

/// The X.520 `role` attribute (id-at-role, 2.5.4.72): an API certificate's [`Access`], in its
/// subject. A certificate without one (made before roles existed) is an administrator's.
pub const ROLE_OID: [u64; 4] = [2, 5, 4, 72];

/// Issues an API user's client certificate carrying `access`.
pub fn issue_api_user(
    ca: &Pem,
    user: &str,
    access: Access,
    now: Timestamp,
) -> Result<Pem, PkiError> {
    issue(
        ca,
        (user, Role::Api, Some(access)),
        &[],
        vec![ExtendedKeyUsagePurpose::ClientAuth],
        now,
    )
}

/// The [`Access`] an API certificate's subject carries: its `role` attribute, administrator when it
/// has none, reader when it names no role Talon knows (least privilege).
pub fn access_of(name: &x509_parser::x509::X509Name<'_>) -> Access {
    let oid = x509_parser::der_parser::oid::Oid::from(&ROLE_OID).expect("a valid OID");
    match name.iter_by_oid(&oid).next() {
        None => Access::Administrator,
        Some(a) => a
            .as_str()
            .ok()
            .and_then(|s| Access::parse(s).ok())
            .unwrap_or(Access::Reader),
    }
}

/// An endpoint's identity: a fresh key, and a self-signed certificate over it that the client presents
/// on every TLS handshake. The client id is derived from the key, never from the certificate's text.
pub fn new_endpoint_identity(now: Timestamp) -> Result<(Pem, talon_core::ClientId), PkiError> {
    let key =
        KeyPair::generate_for(&rcgen::PKCS_ED25519).map_err(err("generating the client key"))?;
    let pem = endpoint_certificate(&key.serialize_pem(), now)?;
    Ok((pem.0, pem.1))
}

/// An endpoint identity whose Ed25519 key is made from 32 bytes of the caller's randomness (the
/// simulator's seed; any [`crate::clock::Entropy`]).
pub fn endpoint_identity_from_seed(
    seed: [u8; 32],
    now: Timestamp,
) -> Result<(Pem, talon_core::ClientId), PkiError> {
    // PKCS#8 v1 for Ed25519 (RFC 8410): a fixed prefix, then the 32-byte private key.
    let mut der = vec![
        0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04,
        0x20,
    ];
    der.extend_from_slice(&seed);
    let der = rustls::pki_types::PrivatePkcs8KeyDer::from(der);
    let key = KeyPair::from_pkcs8_der_and_sign_algo(&der, &rcgen::PKCS_ED25519)
        .map_err(err("making the client key"))?;
    endpoint_certificate(&key.serialize_pem(), now)
}

/// The self-signed certificate for an endpoint key (re-made on each start; only the key persists).
pub fn endpoint_certificate(
    key_pem: &str,
    now: Timestamp,
) -> Result<(Pem, talon_core::ClientId), PkiError> {
    let key = KeyPair::from_pem(key_pem).map_err(err("reading the client key"))?;
    let id =
        talon_core::ClientId::from_public_key(&rcgen::PublicKeyData::subject_public_key_info(&key));
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, id.as_str());
    params.distinguished_name = dn;
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    validity(&mut params, now, LEAF_VALID_DAYS)?;
    let cert = params
        .self_signed(&key)
        .map_err(err("signing the client certificate"))?;
    Ok((
        Pem {
            certificate: cert.pem(),
            private_key: key_pem.to_owned(),
        },
        id,
    ))
}

/// What a certificate says, for checks and display.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertInfo {
    /// Subject CN.
    pub common_name: String,
    /// Subject OU (the role).
    pub role: String,
    /// Issuer CN.
    pub issuer: String,
    /// DNS and IP subject alternative names.
    pub sans: Vec<String>,
    /// Expiry, seconds since the epoch.
    pub not_after_unix_s: i64,
}

pub(crate) fn first_attr(
    name: &x509_parser::x509::X509Name<'_>,
    oid: &x509_parser::der_parser::oid::Oid<'_>,
) -> String {
    name.iter_by_oid(oid)
        .next()
        .and_then(|a| a.as_str().ok())
        .unwrap_or_default()
        .to_owned()
}

fn parse_pem(pem: &str) -> Result<Vec<u8>, PkiError> {
    let (_, p) = x509_parser::pem::parse_x509_pem(pem.as_bytes())
        .map_err(|e| PkiError(format!("not a PEM certificate: {e}")))?;
    Ok(p.contents)
}

/// Reads a PEM certificate.
pub fn describe(cert_pem: &str) -> Result<CertInfo, PkiError> {
    use x509_parser::oid_registry::{OID_X509_COMMON_NAME, OID_X509_ORGANIZATIONAL_UNIT};
    let der = parse_pem(cert_pem)?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der)
        .map_err(|e| PkiError(format!("bad certificate: {e}")))?;
    let mut sans = Vec::new();
    if let Ok(Some(ext)) = cert.subject_alternative_name() {
        for n in &ext.value.general_names {
            match n {
                x509_parser::extensions::GeneralName::DNSName(d) => sans.push(d.to_string()),
                x509_parser::extensions::GeneralName::IPAddress(b) => {
                    let ip = match b.len() {
                        4 => IpAddr::from(<[u8; 4]>::try_from(*b).expect("len 4")).to_string(),
                        16 => IpAddr::from(<[u8; 16]>::try_from(*b).expect("len 16")).to_string(),
                        _ => continue,
                    };
                    sans.push(ip);
                }
                _ => {}
            }
        }
    }
    Ok(CertInfo {
        common_name: first_attr(cert.subject(), &OID_X509_COMMON_NAME),
        role: first_attr(cert.subject(), &OID_X509_ORGANIZATIONAL_UNIT),
        issuer: first_attr(cert.issuer(), &OID_X509_COMMON_NAME),
        sans,
        not_after_unix_s: cert.validity().not_after.timestamp(),
    })
}

/// True if `cert_pem`'s signature verifies under `ca_pem`'s key.
pub fn signed_by(cert_pem: &str, ca_pem: &str) -> Result<bool, PkiError> {
    let (der, ca_der) = (parse_pem(cert_pem)?, parse_pem(ca_pem)?);
    let (_, cert) = x509_parser::parse_x509_certificate(&der)
        .map_err(|e| PkiError(format!("bad certificate: {e}")))?;
    let (_, ca) = x509_parser::parse_x509_certificate(&ca_der)
        .map_err(|e| PkiError(format!("bad CA: {e}")))?;
    Ok(cert.verify_signature(Some(ca.public_key())).is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: Timestamp = Timestamp(1_790_000_000_000);

    #[test]
    fn frontend_certificate_names_every_host_and_is_signed_by_the_ca() {
        let ca = new_ca(NOW, KeyType::default()).unwrap();
        let hosts = vec!["master.example".to_string(), "127.0.0.1".to_string()];
        let fe = issue_frontend(&ca, &hosts, NOW).unwrap();
        let info = describe(&fe.certificate).unwrap();
        assert_eq!(info.sans, hosts);
        assert_eq!(
            (info.role.as_str(), info.issuer.as_str()),
            ("frontend", "Talon CA")
        );
        assert!(signed_by(&fe.certificate, &ca.certificate).unwrap());
        let other = new_ca(NOW, KeyType::default()).unwrap();
        assert!(!signed_by(&fe.certificate, &other.certificate).unwrap());
        assert_eq!(describe(&ca.certificate).unwrap().role, "ca");
    }

    #[test]
    fn api_certificate_carries_the_user_and_role() {
        let ca = new_ca(NOW, KeyType::default()).unwrap();
        let api = issue_api_client(&ca, "alice", NOW).unwrap();
        let info = describe(&api.certificate).unwrap();
        assert_eq!(
            (info.common_name.as_str(), info.role.as_str()),
            ("alice", "api")
        );
        assert_eq!(
            info.not_after_unix_s,
            (NOW.as_ms() / 1000) as i64 + LEAF_VALID_DAYS * 86_400
        );
    }

    /// The DER of a PEM private key, and the version of its PKCS#8 `PrivateKeyInfo` (0: v1).
    fn pkcs8_version(pem: &str) -> u8 {
        let der = parse_pem(pem).unwrap();
        // SEQUENCE (short or long form length), then INTEGER version.
        let at = if der[1] & 0x80 == 0 {
            2
        } else {
            2 + usize::from(der[1] & 0x7f)
        };
        assert_eq!(&der[at..at + 2], &[0x02, 0x01], "a PKCS#8 version INTEGER");
        der[at + 2]
    }

    #[test]
    fn a_new_deployment_is_ecdsa_p256_with_pkcs8_v1_keys() {
        let ca = new_ca(NOW, KeyType::EcdsaP256).unwrap();
        let fe = issue_frontend(&ca, &["m.example".to_string()], NOW).unwrap();
        let api = issue_api_client(&ca, "alice", NOW).unwrap();
        for (what, pem) in [("ca", &ca), ("frontend", &fe), ("api", &api)] {
            assert_eq!(pkcs8_version(&pem.private_key), 0, "{what}: PKCS#8 v1");
            let key = KeyPair::from_pem(&pem.private_key).unwrap();
            assert_eq!(key.algorithm(), &rcgen::PKCS_ECDSA_P256_SHA256, "{what}");
        }
        assert!(signed_by(&api.certificate, &ca.certificate).unwrap());
    }

    #[test]
    fn an_ed25519_deployment_keeps_its_key_type() {
        let ca = new_ca(NOW, KeyType::Ed25519).unwrap();
        let api = issue_api_client(&ca, "bob", NOW).unwrap();
        let key = KeyPair::from_pem(&api.private_key).unwrap();
        assert_eq!(key.algorithm(), &rcgen::PKCS_ED25519);
        assert!(signed_by(&api.certificate, &ca.certificate).unwrap());
    }

    #[test]
    fn key_types_parse_by_name_and_rsa_says_why_not() {
        assert_eq!("ECDSA".parse::<KeyType>(), Ok(KeyType::EcdsaP256));
        assert_eq!("ed25519".parse::<KeyType>(), Ok(KeyType::Ed25519));
        assert!("rsa".parse::<KeyType>().unwrap_err().contains("ecdsa-p256"));
        assert!("dsa".parse::<KeyType>().is_err());
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(describe("not a cert").is_err());
        let bad = Pem {
            certificate: "x".into(),
            private_key: "y".into(),
        };
        assert!(issue_api_client(&bad, "a", NOW).is_err());
    }

    #[test]
    fn a_seeded_endpoint_identity_is_a_function_of_its_seed() {
        let now = Timestamp(1_790_000_000_000);
        let (a, id_a) = endpoint_identity_from_seed([7; 32], now).unwrap();
        let (_, id_b) = endpoint_identity_from_seed([7; 32], now).unwrap();
        let (_, id_c) = endpoint_identity_from_seed([8; 32], now).unwrap();
        assert_eq!(id_a, id_b);
        assert_ne!(id_a, id_c);
        // Reloading the key (as from a writeback file) gives the same client.
        let (_, again) = endpoint_certificate(&a.private_key, now).unwrap();
        assert_eq!(again, id_a);
    }
}
