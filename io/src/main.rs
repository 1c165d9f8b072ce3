//! The `talon` binary.

use std::process::ExitCode;

fn main() -> ExitCode {
    talon_io::cli::main()
}
