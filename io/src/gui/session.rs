//! GUI sessions and login back-off, in the master's memory (a restart logs everyone out). Pure: the
//! caller passes the time and the random bytes, so the policy is tested without a clock.
//!
//! - A session is a 256-bit random token (the cookie) and a 256-bit CSRF token the page sends in a
//!   header with every change. It ends after [`IDLE_MS`] unused or [`LIFETIME_MS`] in all, at
//!   logout, or when its user's file changes (checked every [`RECHECK_MS`] by the server).
//! - At most [`SESSIONS_MAX`] sessions: a login beyond it ends the least recently used one.
//! - Failed logins per user name (known or not, so names cannot be probed): the first
//!   [`FREE_FAILURES`] cost nothing, each further one locks the name for twice as long as the one
//!   before (1 s, 2 s, 4 s … up to [`LOCK_MAX_MS`]); a success clears it; a name with no failure for
//!   [`FAILURE_MEMORY_MS`] is forgotten. At most [`FAILURES_MAX`] names are remembered (the oldest
//!   is forgotten first).

use crate::clock::hex;
use crate::deploy::pki::Access;
use std::collections::HashMap;

/// Sessions held at once.
pub const SESSIONS_MAX: usize = 10_000;
/// A session unused this long ends.
pub const IDLE_MS: u64 = 60 * 60 * 1000;
/// A session ends this long after login whatever its use.
pub const LIFETIME_MS: u64 = 12 * 60 * 60 * 1000;
/// How often a live session's user file is read again.
pub const RECHECK_MS: u64 = 5_000;
/// Failed logins of one name before the back-off starts.
pub const FREE_FAILURES: u32 = 3;
/// Longest lock-out after repeated failures.
pub const LOCK_MAX_MS: u64 = 15 * 60 * 1000;
/// A name's failures are forgotten after this long without one.
pub const FAILURE_MEMORY_MS: u64 = 60 * 60 * 1000;
/// Names whose failures are remembered at once.
pub const FAILURES_MAX: usize = 10_000;

/// One logged-in user.
#[derive(Clone, Debug, PartialEq)]
pub struct Session {
    /// The user.
    pub user: String,
    /// The role it had at login (or at the last check of its file).
    pub access: Access,
    /// The CSRF token (hex).
    pub csrf: String,
    /// The user file's `changed_ms` at login: a later change ends the session.
    pub user_changed_ms: u64,
    /// When it logged in.
    pub created_ms: u64,
    /// When it was last used.
    pub used_ms: u64,
    /// When its user file was last read.
    pub checked_ms: u64,
}

#[derive(Clone, Copy, Debug)]
struct Failures {
    count: u32,
    last_ms: u64,
    locked_until_ms: u64,
}

/// Every session and every name's recent failures.
#[derive(Debug)]
pub struct Sessions {
    by_token: HashMap<String, Session>,
    failures: HashMap<String, Failures>,
    sessions_max: usize,
    failures_max: usize,
}

impl Default for Sessions {
    fn default() -> Self {
        Sessions::with_bounds(SESSIONS_MAX, FAILURES_MAX)
    }
}

/// The key of `map`'s entry with the smallest `age` (what a bound evicts first).
fn oldest<V>(map: &HashMap<String, V>, age: impl Fn(&V) -> u64) -> Option<String> {
    map.iter()
        .min_by_key(|(_, v)| age(v))
        .map(|(k, _)| k.clone())
}

/// Whether two strings are equal, in time that depends only on their lengths.
pub fn same(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

impl Sessions {
    /// Holds at most `sessions_max` sessions and `failures_max` names' failures.
    pub fn with_bounds(sessions_max: usize, failures_max: usize) -> Sessions {
        Sessions {
            by_token: HashMap::new(),
            failures: HashMap::new(),
            sessions_max: sessions_max.max(1),
            failures_max: failures_max.max(1),
        }
    }

    /// Sessions held.
    pub fn len(&self) -> usize {
        self.by_token.len()
    }

    /// Whether none is held.
    pub fn is_empty(&self) -> bool {
        self.by_token.is_empty()
    }

    /// Starts a session for `user`; returns its token. `token` and `csrf` are fresh random bytes.
    pub fn create(
        &mut self,
        user: &str,
        access: Access,
        user_changed_ms: u64,
        now_ms: u64,
        (token, csrf): ([u8; 32], [u8; 32]),
    ) -> String {
        self.expire(now_ms);
        if self.by_token.len() >= self.sessions_max
            && let Some(t) = oldest(&self.by_token, |s| s.used_ms)
        {
            self.by_token.remove(&t);
        }
        let token = hex(&token);
        self.by_token.insert(
            token.clone(),
            Session {
                user: user.to_owned(),
                access,
                csrf: hex(&csrf),
                user_changed_ms,
                created_ms: now_ms,
                used_ms: now_ms,
                checked_ms: now_ms,
            },
        );
        token
    }

    /// The live session of `token` (marked used now), or `None`: unknown, idle too long or too old
    /// (then it is ended).
    pub fn get(&mut self, token: &str, now_ms: u64) -> Option<&mut Session> {
        let s = self.by_token.get(token)?;
        if !live(s, now_ms) {
            self.by_token.remove(token);
            return None;
        }
        let s = self.by_token.get_mut(token)?;
        s.used_ms = s.used_ms.max(now_ms);
        Some(s)
    }

    /// Ends one session.
    pub fn end(&mut self, token: &str) -> bool {
        self.by_token.remove(token).is_some()
    }

    /// Ends every session of `user`.
    pub fn end_user(&mut self, user: &str) -> usize {
        let before = self.by_token.len();
        self.by_token.retain(|_, s| s.user != user);
        before - self.by_token.len()
    }

    fn expire(&mut self, now_ms: u64) {
        self.by_token.retain(|_, s| live(s, now_ms));
    }

    /// `Err(ms)` while `user` is locked out after failed logins: how long is left.
    pub fn check_lock(&mut self, user: &str, now_ms: u64) -> Result<(), u64> {
        match self.failures.get(user) {
            Some(f) if now_ms.saturating_sub(f.last_ms) >= FAILURE_MEMORY_MS => {
                self.failures.remove(user);
                Ok(())
            }
            Some(f) if f.locked_until_ms > now_ms => Err(f.locked_until_ms - now_ms),
            _ => Ok(()),
        }
    }

    /// Records a failed login of `user`; returns how long it is now locked (0: not locked).
    pub fn failed(&mut self, user: &str, now_ms: u64) -> u64 {
        if !self.failures.contains_key(user) && self.failures.len() >= self.failures_max {
            self.failures
                .retain(|_, f| now_ms.saturating_sub(f.last_ms) < FAILURE_MEMORY_MS);
            if self.failures.len() >= self.failures_max
                && let Some(u) = oldest(&self.failures, |f| f.last_ms)
            {
                self.failures.remove(&u);
            }
        }
        let f = self.failures.entry(user.to_owned()).or_insert(Failures {
            count: 0,
            last_ms: now_ms,
            locked_until_ms: 0,
        });
        if now_ms.saturating_sub(f.last_ms) >= FAILURE_MEMORY_MS {
            f.count = 0;
        }
        f.count += 1;
        f.last_ms = now_ms;
        let lock = match f.count.checked_sub(FREE_FAILURES + 1) {
            None => 0,
            Some(n) => 1000u64
                .checked_shl(n.min(40))
                .unwrap_or(LOCK_MAX_MS)
                .min(LOCK_MAX_MS),
        };
        f.locked_until_ms = now_ms + lock;
        lock
    }

    /// Clears `user`'s failures after a successful login.
    pub fn succeeded(&mut self, user: &str) {
        self.failures.remove(user);
    }

    /// Names whose failures are remembered.
    pub fn failing_names(&self) -> usize {
        self.failures.len()
    }
}

fn live(s: &Session, now_ms: u64) -> bool {
    now_ms.saturating_sub(s.used_ms) < IDLE_MS && now_ms.saturating_sub(s.created_ms) < LIFETIME_MS
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(n: u8) -> ([u8; 32], [u8; 32]) {
        ([n; 32], [n.wrapping_add(100); 32])
    }

    #[test]
    fn a_session_lives_while_used_and_ends_idle_old_or_at_logout() {
        let mut s = Sessions::default();
        let t = s.create("alice", Access::Reader, 5, 1_000, bytes(1));
        assert_eq!(t.len(), 64);
        let got = s.get(&t, 2_000).unwrap();
        assert_eq!((got.user.as_str(), got.access), ("alice", Access::Reader));
        assert_eq!(got.csrf, hex(&[101; 32]));
        assert!(s.get("nope", 2_000).is_none());
        // Used every half hour: alive until its lifetime ends.
        let mut now = 2_000;
        while now + IDLE_MS / 2 < 1_000 + LIFETIME_MS {
            now += IDLE_MS / 2;
            assert!(s.get(&t, now).is_some(), "at {now}");
        }
        assert!(s.get(&t, 1_000 + LIFETIME_MS).is_none());
        assert!(s.is_empty());
        // Idle.
        let t = s.create("alice", Access::Reader, 5, 0, bytes(2));
        assert!(s.get(&t, IDLE_MS).is_none());
        // Logout, and every session of a user.
        let a = s.create("alice", Access::Reader, 5, 0, bytes(3));
        let b = s.create("alice", Access::Reader, 5, 0, bytes(4));
        let c = s.create("bob", Access::Reader, 5, 0, bytes(5));
        assert!(s.end(&a) && !s.end(&a));
        assert_eq!(s.end_user("alice"), 1);
        assert!(s.get(&b, 1).is_none() && s.get(&c, 1).is_some());
    }

    #[test]
    fn at_its_bound_a_login_ends_the_least_recently_used_session() {
        let mut s = Sessions::with_bounds(3, 10);
        let t: Vec<String> = (0..3)
            .map(|i| s.create("u", Access::Reader, 0, i, bytes(i as u8)))
            .collect();
        s.get(&t[0], 10); // t[1] is now the least recently used.
        let new = s.create("u", Access::Reader, 0, 11, bytes(9));
        assert_eq!(s.len(), 3);
        assert!(s.get(&t[1], 12).is_none());
        for k in [&t[0], &t[2], &new] {
            assert!(s.get(k, 12).is_some());
        }
    }

    #[test]
    fn repeated_failures_lock_a_name_for_longer_each_time_and_success_clears_it() {
        let mut s = Sessions::default();
        for i in 0..FREE_FAILURES {
            assert_eq!(s.failed("alice", i as u64), 0);
            assert_eq!(s.check_lock("alice", i as u64), Ok(()));
        }
        assert_eq!(s.failed("alice", 10), 1_000);
        assert_eq!(s.check_lock("alice", 500), Err(510));
        assert_eq!(s.check_lock("alice", 1_010), Ok(()));
        assert_eq!(s.failed("alice", 1_010), 2_000);
        assert_eq!(s.failed("alice", 3_010), 4_000);
        // Capped.
        let mut lock = 0;
        for i in 0..30 {
            lock = s.failed("alice", 10_000 + i);
        }
        assert_eq!(lock, LOCK_MAX_MS);
        // Another name is not affected.
        assert_eq!(s.check_lock("bob", 10_100), Ok(()));
        s.succeeded("alice");
        assert_eq!(s.check_lock("alice", 10_100), Ok(()));
        // Forgotten after a quiet hour.
        for i in 0..10 {
            s.failed("carol", i);
        }
        assert!(s.check_lock("carol", 20).is_err());
        assert_eq!(s.check_lock("carol", 9 + FAILURE_MEMORY_MS), Ok(()));
        assert_eq!(s.failed("carol", 10 + FAILURE_MEMORY_MS), 0);
    }

    #[test]
    fn the_failure_memory_is_bounded_forgetting_the_oldest_name() {
        let mut s = Sessions::with_bounds(10, 3);
        for (i, u) in ["a", "b", "c"].iter().enumerate() {
            for _ in 0..=FREE_FAILURES {
                s.failed(u, i as u64);
            }
        }
        assert!(s.check_lock("a", 5).is_err());
        for _ in 0..=FREE_FAILURES {
            s.failed("d", 5);
        }
        assert_eq!(s.failing_names(), 3);
        assert_eq!(
            s.check_lock("a", 5),
            Ok(()),
            "the oldest name was forgotten"
        );
        assert!(s.check_lock("b", 5).is_err() && s.check_lock("d", 5).is_err());
    }

    #[test]
    fn tokens_compare_in_full() {
        assert!(same("abc", "abc"));
        assert!(!same("abc", "abd") && !same("abc", "ab") && !same("", "a"));
    }
}
