//! The `keygate` binary: a thin wrapper around [`keygate::cli`].

// mimalloc: the request path allocates and frees small objects on every worker thread (header
// maps, body frames, futures); a thread-caching allocator serves those without the global
// allocator's arena locks. Measured in docs/benchmarks.md.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    keygate::cli::main()
}
