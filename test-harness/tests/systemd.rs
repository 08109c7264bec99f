//! The systemd units in docs/deploy, as an operator installs them: `systemd-analyze verify`
//! accepts them without a warning, they run as a dedicated user with the hardening settings, and
//! every directory the hive's env file points its state at is one systemd makes writable.

use std::path::{Path, PathBuf};
use std::process::Command;

use test_harness::{bin_path, scratch_dir};

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/deploy")
}

fn read(name: &str) -> String {
    let path = deploy_dir().join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// `key=value` settings of a unit or env file, comments and sections left out.
fn settings(text: &str) -> Vec<(String, String)> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#') && !l.starts_with('['))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

fn value<'a>(settings: &'a [(String, String)], key: &str) -> Option<&'a str> {
    settings
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

fn has_systemd_analyze() -> bool {
    Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Runs `systemd-analyze verify` on the unit with its `ExecStart` pointed at this build's
/// binary (verify checks that the command exists), and returns what it printed.
fn verify(unit: &str, binary: &str) -> (bool, String) {
    let text = read(unit);
    let installed = format!("/usr/local/bin/{binary}");
    assert!(
        text.contains(&format!("ExecStart={installed}")),
        "{unit} starts {installed}"
    );
    let built = bin_path(binary);
    let path = scratch_dir("systemd").join(unit);
    std::fs::write(&path, text.replace(&installed, &built.to_string_lossy())).expect("write unit");
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .expect("run systemd-analyze");
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), printed)
}

fn assert_hardened(unit: &str) {
    let s = settings(&read(unit));
    let user = value(&s, "User").unwrap_or_else(|| panic!("{unit} sets User="));
    assert_ne!(user, "root", "{unit} runs as a dedicated user");
    for (key, want) in [
        ("NoNewPrivileges", "true"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "true"),
        ("PrivateTmp", "true"),
    ] {
        assert_eq!(value(&s, key), Some(want), "{unit}: {key}={want}");
    }
}

#[test]
fn units_verify_without_warnings() {
    if !has_systemd_analyze() {
        println!("skipped: systemd-analyze is not installed (.ci/run installs it)");
        return;
    }
    for (unit, binary) in [
        ("queen-rbee.service", "queen-rbee"),
        ("rbee-hive.service", "rbee-hive"),
    ] {
        let (ok, printed) = verify(unit, binary);
        assert!(ok, "systemd-analyze verify {unit} failed:\n{printed}");
        assert!(
            printed.trim().is_empty(),
            "systemd-analyze verify {unit} warned:\n{printed}"
        );
    }
}

#[test]
fn units_are_hardened() {
    assert_hardened("queen-rbee.service");
    assert_hardened("rbee-hive.service");
}

/// With `ProtectSystem=strict` the whole file system is read-only to the hive except the
/// directories systemd creates for it: the model directory and the worker logs must be there.
#[test]
fn hive_state_lives_in_directories_systemd_makes_writable() {
    let unit = settings(&read("rbee-hive.service"));
    let mut writable: Vec<String> = Vec::new();
    for (key, root) in [
        ("StateDirectory", "/var/lib"),
        ("LogsDirectory", "/var/log"),
        ("CacheDirectory", "/var/cache"),
    ] {
        if let Some(dirs) = value(&unit, key) {
            writable.extend(dirs.split_whitespace().map(|d| format!("{root}/{d}")));
        }
    }
    if let Some(paths) = value(&unit, "ReadWritePaths") {
        writable.extend(paths.split_whitespace().map(str::to_string));
    }
    let env = settings(&read("hive.env"));
    for key in ["RBEE_HIVE_MODEL_DIR", "RBEE_LOG_DIR"] {
        let dir = value(&env, key).unwrap_or_else(|| panic!("hive.env sets {key}"));
        assert!(
            writable
                .iter()
                .any(|w| Path::new(dir).starts_with(Path::new(w))),
            "{key}={dir} is not under a directory the unit makes writable ({writable:?})"
        );
    }
}
