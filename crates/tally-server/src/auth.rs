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

    /// The role of the request's token, or 401/400 as a problem. No `Authorization`
    /// header, another scheme or an empty bearer token is a request without a token (a
    /// plain challenge); a bearer token that is too long or matches no configured hash is
    /// an invalid one (`error="invalid_token"`).
    pub fn authenticate(&self, headers: &HeaderMap) -> Result<Role, Problem> {
        let mut values = headers.get_all(header::AUTHORIZATION).iter();
        let value = values
            .next()
            .ok_or_else(|| Problem::unauthorized("an Authorization: Bearer token is required"))?;
        if values.next().is_some() {
            return Err(Problem::invalid("more than one Authorization header"));
        }
        if value.len() > self.header_bytes_max {
            return Err(Problem::invalid_token(
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
        found.ok_or_else(|| Problem::invalid_token("unknown token"))
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
/// true, makes a random 32-byte token and stores its hash there (mode 0600), written
/// through a temporary file ([`write_file_atomically`]) so that a crash leaves either no
/// file or the whole hash.
///
/// A file with nothing but whitespace in it counts as missing and is replaced. Releases
/// that wrote the file in place left it empty after a crash between creating and writing
/// it, and then refused every later start. Replacing it locks no one out: a token is
/// printed only after its hash is on disk, so no token was ever shown for an empty file,
/// and no token matches it. A file holding anything else that is not a hash is refused
/// with the file's name and what to do: someone wrote it, and replacing it would silently
/// change which token is admin.
pub fn bootstrap_admin(data_dir: &Path, generate: bool) -> std::io::Result<Option<Bootstrap>> {
    let path = data_dir.join(ADMIN_TOKEN_FILE);
    let replace_empty = match std::fs::read_to_string(&path) {
        Ok(text) if text.trim().is_empty() => true,
        Ok(text) => {
            let hash =
                TokenHash::from_hex("bootstrap-admin", Role::Admin, text.trim()).map_err(|e| {
                    std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        format!(
                            "{}: {e}; put the SHA-256 of an admin token in it (`tally \
                             token-hash`), or delete it to have a new admin token generated \
                             and printed on the next start",
                            path.display()
                        ),
                    )
                })?;
            return Ok(Some(Bootstrap {
                new_token: None,
                hash,
                path,
            }));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
        Err(e) => return Err(e),
    };
    if !generate {
        return Ok(None);
    }
    if replace_empty {
        tracing::warn!(
            path = %path.display(),
            "the admin token file is empty (left by a crash on first start); generating a new token"
        );
    }
    std::fs::create_dir_all(data_dir)?;
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    let token = hex::encode(bytes);
    let line = format!("{}\n", token_sha256_hex(&token));
    write_file_atomically(&path, replace_empty, |f| f.write_all(line.as_bytes()))?;
    Ok(Some(Bootstrap {
        hash: TokenHash::of_token("bootstrap-admin", Role::Admin, &token),
        new_token: Some(token),
        path,
    }))
}

/// Writes a file so that after a crash at any point it is either absent (or as it was)
/// or complete: `write` fills a temporary file (mode 0600) in the same directory, which
/// is fsynced, then put in place, and the directory is fsynced so the name is durable.
///
/// With `replace` false the file must not exist yet: it is put in place with a hard link,
/// which, unlike a rename, fails with `AlreadyExists` instead of replacing a file that
/// another process wrote meanwhile. With `replace` true it is renamed over the old one.
/// On error the temporary file is removed.
pub fn write_file_atomically(
    path: &Path,
    replace: bool,
    write: impl FnOnce(&mut std::fs::File) -> std::io::Result<()>,
) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path.file_name().ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{} names no file", path.display()),
        )
    })?;
    // One temporary name per process, so two starts never write the same temporary file.
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        name.to_string_lossy(),
        std::process::id()
    ));
    let written = (|| {
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create(true).truncate(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(0o600);
        }
        let mut f = opts.open(&tmp)?;
        write(&mut f)?;
        f.sync_all()?;
        drop(f);
        if replace {
            std::fs::rename(&tmp, path)?;
        } else {
            std::fs::hard_link(&tmp, path)?;
            std::fs::remove_file(&tmp)?;
        }
        sync_dir(dir)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

/// Makes a directory's entries (a new or renamed name in it) durable.
fn sync_dir(dir: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    std::fs::File::open(dir)?.sync_all()?;
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
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
    fn only_a_presented_token_that_is_not_ours_is_an_invalid_token() {
        let auth = Authenticator::new(vec![TokenHash::of_token("a", Role::Admin, "adm")], 64);
        let challenge = |h: &HeaderMap| {
            let p = auth.authorize(h, Need::Read).expect_err("401");
            assert_eq!(p.status.as_u16(), 401);
            let (_, v) = p
                .headers
                .iter()
                .find(|(n, _)| *n == header::WWW_AUTHENTICATE)
                .expect("a challenge")
                .clone();
            v.to_str().expect("ascii").to_owned()
        };
        let plain = "Bearer realm=\"tally\"";
        let invalid = "Bearer realm=\"tally\", error=\"invalid_token\"";
        assert_eq!(challenge(&HeaderMap::new()), plain);
        assert_eq!(challenge(&headers("Basic adm")), plain);
        assert_eq!(challenge(&headers("Bearer ")), plain);
        assert_eq!(challenge(&headers("Bearer nope")), invalid);
        assert_eq!(
            challenge(&headers(&format!("Bearer {}", "x".repeat(64)))),
            invalid
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

    #[test]
    fn an_empty_token_file_left_by_a_crash_is_replaced_by_a_new_token() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(ADMIN_TOKEN_FILE);
        // What creating the file and crashing before writing it left behind.
        std::fs::write(&path, "").expect("write");
        // With an admin token in the config, it is as if there were no file.
        assert!(bootstrap_admin(dir.path(), false).expect("io").is_none());
        let boot = bootstrap_admin(dir.path(), true)
            .expect("an empty file does not stop the start")
            .expect("generated");
        let token = boot.new_token.expect("a new token to print");
        assert_eq!(
            std::fs::read_to_string(&path).expect("read").trim(),
            token_sha256_hex(&token)
        );
        let again = bootstrap_admin(dir.path(), true)
            .expect("io")
            .expect("loaded");
        assert!(again.new_token.is_none(), "generated once");
        assert_eq!(again.hash, boot.hash);
    }

    #[test]
    fn a_token_file_with_something_else_is_refused_with_what_to_do() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(ADMIN_TOKEN_FILE);
        std::fs::write(&path, "not a hash\n").expect("write");
        let err = bootstrap_admin(dir.path(), true).expect_err("refused");
        let msg = err.to_string();
        assert!(msg.contains(&path.display().to_string()), "{msg}");
        assert!(
            msg.contains("tally token-hash") && msg.contains("delete it"),
            "{msg}"
        );
        assert_eq!(
            std::fs::read_to_string(&path).expect("read"),
            "not a hash\n",
            "left as it was"
        );
    }

    fn names_in(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .expect("read dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn a_write_that_fails_half_way_leaves_no_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("f");
        let err = write_file_atomically(&path, false, |f| {
            f.write_all(b"half")?;
            Err(std::io::Error::other("crash"))
        })
        .expect_err("the write failed");
        assert_eq!(err.to_string(), "crash");
        assert!(
            names_in(dir.path()).is_empty(),
            "no file, no temporary file"
        );
        // Replacing: the old file stays as it was.
        std::fs::write(&path, "old").expect("write");
        write_file_atomically(&path, true, |_| Err(std::io::Error::other("crash")))
            .expect_err("the write failed");
        assert_eq!(std::fs::read_to_string(&path).expect("read"), "old");
        assert_eq!(names_in(dir.path()), ["f"]);
    }

    #[test]
    fn a_new_file_never_replaces_one_that_exists() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("f");
        write_file_atomically(&path, false, |f| f.write_all(b"first")).expect("written");
        let err =
            write_file_atomically(&path, false, |f| f.write_all(b"second")).expect_err("exists");
        assert_eq!(err.kind(), std::io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read_to_string(&path).expect("read"), "first");
        write_file_atomically(&path, true, |f| f.write_all(b"third")).expect("replaced");
        assert_eq!(std::fs::read_to_string(&path).expect("read"), "third");
        assert_eq!(names_in(dir.path()), ["f"], "no temporary file left");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }
}
