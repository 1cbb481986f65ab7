//! Bearer-token auth: roles, SHA-256 token hashes (never plain tokens in config), a
//! constant-time comparison, and the first-start admin token kept in the data dir.

use std::io::Write;
use std::path::{Path, PathBuf};

use axum::http::{header, HeaderMap};
use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::problem::Problem;

/// File in the data dir holding the generated admin token's SHA-256 (hex).
pub const ADMIN_TOKEN_FILE: &str = "admin-token.sha256";

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Everything.
    Admin,
    /// Spend (debit, hold, capture, void, check, authorize) and read.
    Service,
    /// Read only.
    Reader,
}

/// What a route needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    Admin,
    Service,
    Read,
}

impl Role {
    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "admin" => Some(Role::Admin),
            "service" => Some(Role::Service),
            "reader" => Some(Role::Reader),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Service => "service",
            Role::Reader => "reader",
        }
    }

    pub fn allows(self, need: Need) -> bool {
        matches!(
            (self, need),
            (Role::Admin, _)
                | (Role::Service, Need::Service | Need::Read)
                | (Role::Reader, Need::Read)
        )
    }
}

/// A configured token: its name (for logs), role and SHA-256.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenHash {
    pub name: String,
    pub role: Role,
    hash: [u8; 32],
}

impl TokenHash {
    pub fn from_hex(name: &str, role: Role, hex_hash: &str) -> Result<Self, String> {
        let bytes = hex::decode(hex_hash)
            .map_err(|_| "must be 64 hex characters (a SHA-256 of the token)".to_owned())?;
        let hash: [u8; 32] = bytes
            .try_into()
            .map_err(|_| "must be 64 hex characters (a SHA-256 of the token)".to_owned())?;
        Ok(Self {
            name: name.to_owned(),
            role,
            hash,
        })
    }

    pub fn of_token(name: &str, role: Role, token: &str) -> Self {
        Self {
            name: name.to_owned(),
            role,
            hash: sha256(token),
        }
    }
}

fn sha256(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// The hex SHA-256 of a token, as config files hold it.
pub fn token_sha256_hex(token: &str) -> String {
    hex::encode(sha256(token))
}

/// Checks `Authorization: Bearer` headers against the configured hashes.
#[derive(Debug, Clone)]
pub struct Authenticator {
    tokens: Vec<TokenHash>,
    header_bytes_max: usize,
}

impl Authenticator {
    pub fn new(tokens: Vec<TokenHash>, header_bytes_max: usize) -> Self {
        Self {
            tokens,
            header_bytes_max,
        }
    }

    /// The role of the request's token, or 401/400 as a problem.
    pub fn authenticate(&self, headers: &HeaderMap) -> Result<Role, Problem> {
        let mut values = headers.get_all(header::AUTHORIZATION).iter();
        let value = values
            .next()
            .ok_or_else(|| Problem::unauthorized("an Authorization: Bearer token is required"))?;
        if values.next().is_some() {
            return Err(Problem::invalid("more than one Authorization header"));
        }
        if value.len() > self.header_bytes_max {
            return Err(Problem::unauthorized(
                "the Authorization header is too long",
            ));
        }
        let token = value
            .to_str()
            .ok()
            .and_then(|v| {
                let (scheme, rest) = v.split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
            })
            .filter(|t| !t.is_empty())
            .ok_or_else(|| Problem::unauthorized("expected Authorization: Bearer <token>"))?;
        let presented = sha256(token);
        // Compare against every hash without stopping early, so timing says nothing about
        // which (or whether any) token matched.
        let mut found: Option<Role> = None;
        for t in &self.tokens {
            let eq: bool = t.hash.ct_eq(&presented).into();
            if eq && found.is_none() {
                found = Some(t.role);
            }
        }
        found.ok_or_else(|| Problem::unauthorized("unknown token"))
    }

    /// Authenticates and checks the role against what the route needs (401 / 403).
    pub fn authorize(&self, headers: &HeaderMap, need: Need) -> Result<Role, Problem> {
        let role = self.authenticate(headers)?;
        if role.allows(need) {
            Ok(role)
        } else {
            Err(Problem::forbidden(format!(
                "the {} role may not do this",
                role.name()
            )))
        }
    }
}

/// The admin token made on first start: `Some(token)` when it was just generated (to be
/// printed once), and the hash that is now in force.
#[derive(Debug)]
pub struct Bootstrap {
    pub new_token: Option<String>,
    pub hash: TokenHash,
    pub path: PathBuf,
}

/// Loads `<data_dir>/admin-token.sha256`, or when it does not exist and `generate` is
/// true, makes a random 32-byte token and stores its hash there (mode 0600).
pub fn bootstrap_admin(data_dir: &Path, generate: bool) -> std::io::Result<Option<Bootstrap>> {
    let path = data_dir.join(ADMIN_TOKEN_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let hash =
                TokenHash::from_hex("bootstrap-admin", Role::Admin, text.trim()).map_err(|e| {
                    std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        format!("{}: {e}", path.display()),
                    )
                })?;
            return Ok(Some(Bootstrap {
                new_token: None,
                hash,
                path,
            }));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    if !generate {
        return Ok(None);
    }
    std::fs::create_dir_all(data_dir)?;
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    let token = hex::encode(bytes);
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(&path)?;
    writeln!(f, "{}", token_sha256_hex(&token))?;
    f.sync_all()?;
    Ok(Some(Bootstrap {
        hash: TokenHash::of_token("bootstrap-admin", Role::Admin, &token),
        new_token: Some(token),
        path,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_str(v).expect("ascii"),
        );
        h
    }

    #[test]
    fn roles_and_statuses() {
        let auth = Authenticator::new(
            vec![
                TokenHash::of_token("a", Role::Admin, "adm"),
                TokenHash::of_token("s", Role::Service, "svc"),
                TokenHash::of_token("r", Role::Reader, "rd"),
            ],
            1_024,
        );
        assert_eq!(
            auth.authorize(&headers("Bearer adm"), Need::Admin).ok(),
            Some(Role::Admin)
        );
        assert_eq!(
            auth.authorize(&headers("bearer svc"), Need::Service).ok(),
            Some(Role::Service)
        );
        assert_eq!(
            auth.authorize(&headers("Bearer svc"), Need::Admin)
                .map_err(|p| p.status.as_u16()),
            Err(403)
        );
        assert_eq!(
            auth.authorize(&headers("Bearer rd"), Need::Service)
                .map_err(|p| p.status.as_u16()),
            Err(403)
        );
        assert_eq!(
            auth.authorize(&headers("Bearer rd"), Need::Read).ok(),
            Some(Role::Reader)
        );
        assert_eq!(
            auth.authorize(&headers("Bearer nope"), Need::Read)
                .map_err(|p| p.status.as_u16()),
            Err(401)
        );
        assert_eq!(
            auth.authorize(&headers("Basic adm"), Need::Read)
                .map_err(|p| p.status.as_u16()),
            Err(401)
        );
        assert_eq!(
            auth.authorize(&HeaderMap::new(), Need::Read)
                .map_err(|p| p.status.as_u16()),
            Err(401)
        );
        let mut two = headers("Bearer adm");
        two.append(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer adm"),
        );
        assert_eq!(
            auth.authorize(&two, Need::Read)
                .map_err(|p| p.status.as_u16()),
            Err(400)
        );
        let long = format!("Bearer {}", "x".repeat(2_000));
        assert_eq!(
            auth.authorize(&headers(&long), Need::Read)
                .map_err(|p| p.status.as_u16()),
            Err(401)
        );
    }

    #[test]
    fn hashes_must_be_sha256_hex() {
        assert!(TokenHash::from_hex("x", Role::Admin, &token_sha256_hex("t")).is_ok());
        assert!(TokenHash::from_hex("x", Role::Admin, "abcd").is_err());
        assert!(TokenHash::from_hex("x", Role::Admin, &"zz".repeat(32)).is_err());
    }

    #[test]
    fn bootstrap_generates_once_then_reuses() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = bootstrap_admin(dir.path(), true)
            .expect("io")
            .expect("generated");
        let token = first.new_token.clone().expect("new token");
        assert_eq!(token.len(), 64);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&first.path)
                .expect("meta")
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let again = bootstrap_admin(dir.path(), true)
            .expect("io")
            .expect("loaded");
        assert!(again.new_token.is_none());
        assert_eq!(
            again.hash,
            TokenHash::of_token("bootstrap-admin", Role::Admin, &token)
        );
        let empty = tempfile::tempdir().expect("tempdir");
        assert!(bootstrap_admin(empty.path(), false).expect("io").is_none());
    }
}
