//! `queen-rbee`: not built yet. It exits with a clear error rather than pretending to run.

fn main() -> std::process::ExitCode {
    eprintln!("queen-rbee: not implemented yet in this build of rbee");
    std::process::ExitCode::from(2)
}
