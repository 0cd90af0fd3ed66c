//! Skipped tests, said out loud. A test that cannot run because its broker, its
//! broker program or its Python peer is missing FAILS by default; it skips only when
//! `MQRPC_ALLOW_SKIP=1` allows it. A conformance case that does not apply to a
//! backend (a capability it lacks) skips without the opt-in: that is not a missing
//! broker.
//!
//! Every skip is written at once to the process's real stderr (not through
//! `eprintln!`, which libtest captures and hides for a passing test) and appended,
//! one line each, to the file named by `MQRPC_SKIP_LOG` when it is set.
//! `scripts/test.sh` sets it and prints the summary of what was skipped after
//! `cargo test`, outside libtest.
//!
//! This file is self-contained (std only): the command line (`mqrpc bench --raw`),
//! its tests and the conformance suite (`tests/conformance`, by `#[path]`) all
//! compile this one file.

use std::io::Write;

/// The environment variable that allows tests whose broker or peer is missing to
/// skip (value `1`) instead of failing.
pub const ALLOW_SKIP: &str = "MQRPC_ALLOW_SKIP";

/// The environment variable naming the file every skip is appended to.
pub const SKIP_LOG: &str = "MQRPC_SKIP_LOG";

/// Whether `value`, the value of `MQRPC_ALLOW_SKIP` (`None` when unset), allows a
/// test to skip when its broker or peer is missing: only `1` does.
pub fn skipping_allowed_by(value: Option<&str>) -> bool {
    value.map(str::trim) == Some("1")
}

/// Whether this process may skip tests whose broker or peer is missing.
pub fn skipping_allowed() -> bool {
    skipping_allowed_by(std::env::var(ALLOW_SKIP).ok().as_deref())
}

/// What becomes of a test whose broker or peer is missing: `Ok` with the SKIP line
/// to record, or `Err` with the message to fail with.
pub fn missing_outcome(allowed: bool, what: &str, why: &str) -> Result<String, String> {
    if allowed {
        Ok(skip_line(what, why))
    } else {
        Err(format!(
            "{what}: {why}; set {ALLOW_SKIP}=1 to skip such tests instead of failing"
        ))
    }
}

/// The line a skip of `what` because of `why` is recorded as: one line, whatever
/// the texts hold.
pub fn skip_line(what: &str, why: &str) -> String {
    let one_line = |text: &str| text.replace(['\r', '\n'], " ");
    format!("SKIP {}: {}", one_line(what), one_line(why))
}

/// A broker, broker program or peer that `what` needs is missing because of `why`:
/// panics (the default), or records a skip when `MQRPC_ALLOW_SKIP=1`; the caller
/// then returns without testing.
pub fn missing(what: &str, why: &str) {
    match missing_outcome(skipping_allowed(), what, why) {
        Ok(line) => record(&line),
        Err(message) => panic!("{message}"),
    }
}

/// [`missing`] for a broker that does not answer; always `None` (the caller's "no
/// backend, skip").
#[allow(dead_code)]
pub fn broker_unavailable<T>(backend: &str, err: &dyn std::fmt::Display) -> Option<T> {
    missing(backend, &format!("broker unavailable ({err})"));
    None
}

/// Records that `what` was skipped because of `why`, without the opt-in: for a case
/// that does not apply (a capability the backend lacks), never for a missing broker
/// (use [`missing`]).
#[allow(dead_code)]
pub fn record_skip(what: &str, why: &str) {
    record(&skip_line(what, why));
}

/// Writes `line` to the real stderr (libtest does not capture a direct write to
/// `std::io::stderr()`, only the `print!` family) and appends it to the skip log.
fn record(line: &str) {
    let text = format!("{line}\n");
    let _ = std::io::stderr().lock().write_all(text.as_bytes());
    let Some(path) = std::env::var_os(SKIP_LOG).filter(|path| !path.is_empty()) else {
        return;
    };
    // One `write` of a short line in append mode: lines of tests running at once do
    // not interleave.
    let appended = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .and_then(|mut file| file.write_all(text.as_bytes()));
    if let Err(err) = appended {
        let warning = format!(
            "warning: cannot append to {SKIP_LOG}={}: {err}\n",
            std::path::Path::new(&path).display()
        );
        let _ = std::io::stderr().lock().write_all(warning.as_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_explicit_opt_in_allows_skipping() {
        assert!(skipping_allowed_by(Some("1")));
        assert!(skipping_allowed_by(Some(" 1\n")));
        for refused in [
            None,
            Some(""),
            Some("0"),
            Some("yes"),
            Some("true"),
            Some("11"),
        ] {
            assert!(!skipping_allowed_by(refused), "{refused:?}");
        }
    }

    #[test]
    fn a_missing_broker_fails_unless_skipping_is_allowed() {
        let failed = missing_outcome(false, "redis", "broker unavailable (refused)")
            .expect_err("a missing broker fails by default");
        assert!(
            failed.contains("redis: broker unavailable (refused)"),
            "{failed}"
        );
        assert!(failed.contains("MQRPC_ALLOW_SKIP=1"), "{failed}");
        let skipped = missing_outcome(true, "redis", "broker unavailable (refused)")
            .expect("a missing broker skips when allowed");
        assert_eq!(skipped, "SKIP redis: broker unavailable (refused)");
    }

    #[test]
    fn a_skip_is_one_line() {
        assert_eq!(skip_line("a\nb", "c\r\nd"), "SKIP a b: c  d");
    }
}
