//! The `troupe` binary: see `troupe --help`.

fn main() -> std::process::ExitCode {
    troupe::cli::main()
}
