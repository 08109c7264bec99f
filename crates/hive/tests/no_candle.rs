//! The hive reads GGUF headers and applies the engine's rules with `gguf-info`; neither the hive
//! crate nor the `rbee-hive` binary may carry the engine or candle (a second candle build in CI,
//! and megabytes in the hive binary).

use std::process::Command;

/// Every package in `package`'s normal dependency tree, one per line.
fn normal_dependencies(package: &str) -> String {
    let manifest = concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml");
    let out = Command::new(env!("CARGO"))
        .args(["tree", "--offline", "-e", "normal", "--prefix", "none"])
        .args(["--manifest-path", manifest, "-p", package])
        .output()
        .expect("cargo runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "cargo tree -p {package} failed: {stderr}"
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn the_hive_does_not_depend_on_candle_or_the_engine() {
    for package in ["hive", "rbee-hive"] {
        let tree = normal_dependencies(package);
        assert!(tree.contains("gguf-info"), "no gguf-info in:\n{tree}");
        let banned: Vec<&str> = tree
            .lines()
            .filter(|line| line.starts_with("candle") || line.starts_with("rbee-engine "))
            .collect();
        assert!(
            banned.is_empty(),
            "{package}'s normal dependencies include {banned:?}"
        );
    }
}
