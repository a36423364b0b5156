//! The `keygate` binary: a thin wrapper around [`keygate::cli`].

fn main() -> std::process::ExitCode {
    keygate::cli::main()
}
