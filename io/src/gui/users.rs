//! GUI users: one JSON file per user under `<Datastore.location>/users/`, holding the user's role
//! and an Argon2id hash of the password (PHC string). `talon user add|list|remove|passwd` writes
//! them (atomically: temporary file, fsync, rename); the master reads a user's file at login and
//! again while the user's sessions live, so a removal, a new password or a new role takes effect
//! without restarting it (docs/gui.md, "Users and roles").

use crate::deploy::pki::Access;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Longest user name.
pub const NAME_MAX: usize = 64;
/// Shortest password `user add` and `user passwd` accept.
pub const PASSWORD_MIN: usize = 8;
/// Longest password accepted anywhere (hashing cost grows with it; a login is refused beyond it).
pub const PASSWORD_MAX: usize = 1024;
/// Largest user file read (a user record is ~200 bytes).
const FILE_MAX: u64 = 64 * 1024;

/// One user's file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct User {
    /// The login name.
    pub name: String,
    /// What the user may do.
    pub role: Access,
    /// Argon2id hash of the password, PHC string format.
    pub hash: String,
    /// When the user was added (ms since the Unix epoch).
    pub created_ms: u64,
    /// When the password or role last changed.
    pub changed_ms: u64,
}

impl User {
    /// A new user of `role` whose password is `password` (checked, then hashed with `salt`).
    pub fn new(
        name: &str,
        role: Access,
        password: &str,
        salt: [u8; 16],
        now_ms: u64,
    ) -> Result<User, String> {
        check_name(name)?;
        let mut u = User {
            name: name.to_owned(),
            role,
            hash: String::new(),
            created_ms: now_ms,
            changed_ms: now_ms,
        };
        u.set_password(password, salt)?;
        Ok(u)
    }

    /// Sets a new password (checked, then hashed with `salt`).
    pub fn set_password(&mut self, password: &str, salt: [u8; 16]) -> Result<(), String> {
        check_password(password)?;
        self.hash = hash_password(password, salt)?;
        Ok(())
    }
}

/// Checks a user name: 1–64 of `A-Z a-z 0-9 . _ -`, not starting with `.` or `-`.
pub fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= NAME_MAX
        && !name.starts_with(['.', '-'])
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "user name {name:?} is not valid: use 1 to {NAME_MAX} letters, digits, '.', '_' or '-', not starting with '.' or '-'"
        ))
    }
}

/// Checks a new password's length.
pub fn check_password(password: &str) -> Result<(), String> {
    let n = password.chars().count();
    if n < PASSWORD_MIN {
        return Err(format!(
            "the password has {n} characters; use at least {PASSWORD_MIN}"
        ));
    }
    if password.len() > PASSWORD_MAX {
        return Err(format!("the password is longer than {PASSWORD_MAX} bytes"));
    }
    Ok(())
}

/// Hashes `password` with Argon2id (the crate's default parameters: 19 MiB, 2 passes) and a
/// 16-byte salt from `salt`.
pub fn hash_password(password: &str, salt: [u8; 16]) -> Result<String, String> {
    let salt = SaltString::encode_b64(&salt).map_err(|e| format!("salt: {e}"))?;
    argon2::Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| format!("hashing the password: {e}"))
}

/// Whether `password` matches `hash` (a PHC string; a malformed one matches nothing).
pub fn verify_password(password: &str, hash: &str) -> bool {
    if password.len() > PASSWORD_MAX {
        return false;
    }
    match PasswordHash::new(hash) {
        Ok(h) => argon2::Argon2::default()
            .verify_password(password.as_bytes(), &h)
            .is_ok(),
        Err(_) => false,
    }
}

/// The users directory of a deployment.
#[derive(Clone, Debug)]
pub struct Users {
    dir: PathBuf,
}

impl Users {
    /// The users of the deployment whose datastore is at `location`.
    pub fn at(location: &Path) -> Users {
        Users {
            dir: location.join("users"),
        }
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, name: &str) -> Result<PathBuf, String> {
        check_name(name)?;
        Ok(self.dir.join(format!("{name}.json")))
    }

    /// One user, or `None` if there is no such user.
    pub fn get(&self, name: &str) -> Result<Option<User>, String> {
        let path = self.path(name)?;
        let data = match read_bounded(&path) {
            Ok(d) => d,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(format!("{}: {e}", path.display())),
        };
        let user: User = serde_json::from_slice(&data)
            .map_err(|e| format!("{}: not a user record: {e}", path.display()))?;
        if user.name != name {
            return Err(format!(
                "{}: holds user {:?}, not {name:?}",
                path.display(),
                user.name
            ));
        }
        Ok(Some(user))
    }

    /// Every user, by name.
    pub fn list(&self) -> Result<Vec<User>, String> {
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(format!("{}: {e}", self.dir.display())),
        };
        let mut users = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| format!("{}: {e}", self.dir.display()))?;
            let file = entry.file_name();
            let Some(name) = file.to_str().and_then(|f| f.strip_suffix(".json")) else {
                continue;
            };
            if check_name(name).is_err() {
                continue;
            }
            if let Some(u) = self.get(name)? {
                users.push(u);
            }
        }
        users.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(users)
    }

    /// Writes `user` (replacing any file of that name), durably.
    pub fn put(&self, user: &User) -> Result<(), String> {
        let path = self.path(&user.name)?;
        std::fs::create_dir_all(&self.dir).map_err(|e| format!("{}: {e}", self.dir.display()))?;
        let data = serde_json::to_vec_pretty(user).map_err(|e| e.to_string())?;
        crate::fsutil::write_atomic(&path, &data, 0o600)
            .map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Removes a user; false if there was none.
    pub fn remove(&self, name: &str) -> Result<bool, String> {
        let path = self.path(name)?;
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(format!("{}: {e}", path.display())),
        }
    }
}

fn read_bounded(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut data = Vec::new();
    std::fs::File::open(path)?
        .take(FILE_MAX + 1)
        .read_to_end(&mut data)?;
    if data.len() as u64 > FILE_MAX {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("larger than {FILE_MAX} bytes"),
        ));
    }
    Ok(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        for ok in ["alice", "a.b_c-d", "A9"] {
            check_name(ok).unwrap();
        }
        for bad in ["", ".x", "-x", "a/b", "a b", "é", &"x".repeat(NAME_MAX + 1)] {
            let e = check_name(bad).unwrap_err();
            assert!(e.contains("not valid"), "{e}");
        }
    }

    #[test]
    fn a_password_verifies_against_its_hash_only() {
        let h = hash_password("correct horse", [7; 16]).unwrap();
        assert!(h.starts_with("$argon2id$"), "{h}");
        assert!(verify_password("correct horse", &h));
        assert!(!verify_password("correct hors", &h));
        assert!(!verify_password("correct horse", "not a hash"));
        assert!(check_password("short").unwrap_err().contains("at least 8"));
        check_password("long enough").unwrap();
    }

    #[test]
    fn users_are_stored_listed_replaced_and_removed() {
        let tmp = tempfile::tempdir().unwrap();
        let users = Users::at(tmp.path());
        assert_eq!(users.list().unwrap(), vec![]);
        assert_eq!(users.get("bob").unwrap(), None);
        let mut u = User {
            name: "bob".into(),
            role: Access::Reader,
            hash: "h".into(),
            created_ms: 1,
            changed_ms: 1,
        };
        users.put(&u).unwrap();
        u.role = Access::Administrator;
        users.put(&u).unwrap();
        assert_eq!(users.get("bob").unwrap(), Some(u.clone()));
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(users.dir().join("bob.json"))
                .unwrap()
                .permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(users.list().unwrap(), vec![u]);
        assert!(users.remove("bob").unwrap());
        assert!(!users.remove("bob").unwrap());
        assert!(users.get("../x").unwrap_err().contains("not valid"));
        // A file whose content names another user is refused, not trusted.
        std::fs::write(
            users.dir().join("eve.json"),
            br#"{"name":"root","role":"administrator","hash":"h","created_ms":1,"changed_ms":1}"#,
        )
        .unwrap();
        assert!(users.get("eve").unwrap_err().contains("holds user"));
    }
}
