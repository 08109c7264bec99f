//! `rbee-keeper`: parses the command line and hands over to `keeper::run`. Errors are one
//! line on stderr, `rbee-keeper: <reason>`, with the exit codes `keeper` defines.

use std::process::ExitCode;

use clap::Parser;
use clap::error::ErrorKind;
use keeper::{Cli, Console, EXIT_FAILURE, EXIT_USAGE};
use tokio_util::sync::CancellationToken;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err)
            if matches!(
                err.kind(),
                ErrorKind::DisplayHelp
                    | ErrorKind::DisplayVersion
                    | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            ) =>
        {
            err.exit()
        }
        Err(err) => {
            eprintln!("rbee-keeper: {}", keeper::usage_error_line(&err));
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("rbee-keeper: cannot start the async runtime: {err}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    let mut console = Console::stdio(cli.json);
    runtime.block_on(async {
        let interrupt = CancellationToken::new();
        tokio::spawn(keeper::cancel_on_ctrl_c(interrupt.clone()));
        match keeper::run(cli, &mut console, interrupt).await {
            Ok(outcome) => ExitCode::from(outcome.exit_code()),
            Err(err) => {
                console.error(&err);
                ExitCode::from(err.exit_code())
            }
        }
    })
}
