//! The README's quickstart, run as written, twice in a row in one directory, against the real
//! binary, with real `curl`, `python3` and `bash`.
//!
//! Two things differ from a reader's run, both outside the commands' logic: `cargo run [-q]
//! --release -- ARGS` runs the binary under test (a `cargo` on `PATH` that does only that), and
//! the shipped `gateway.toml`'s fixed ports (8443, 8080, 9090, 8000) are moved to free ones, in
//! the commands, in the outputs they show and in the config alike. Every output the README shows
//! (the `#   ` lines after a command) must appear in that command's output, in order; `...`
//! stands for anything.

mod common;

use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::process::CommandExt as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

/// One command of the quickstart and the output lines the README shows for it.
#[derive(Debug)]
struct Step {
    command: String,
    expected: Vec<String>,
}

/// The first `sh` block after the README's "## Quickstart" heading.
fn quickstart() -> String {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("README.md");
    let section = &readme[readme.find("## Quickstart").expect("a Quickstart section")..];
    let start = section.find("```sh\n").expect("an sh block") + "```sh\n".len();
    let end = start + section[start..].find("```").expect("the block's end");
    section[start..end].to_owned()
}

/// Commands (with their `\` continuation lines) and the `#   ` lines right after each: those
/// are its output. Other comments are the reader's.
fn steps(block: &str) -> Vec<Step> {
    let mut steps: Vec<Step> = Vec::new();
    let mut after_command = false;
    let mut lines = block.lines();
    while let Some(line) = lines.next() {
        if let Some(shown) = line.strip_prefix("#   ").filter(|_| after_command) {
            if let Some(step) = steps.last_mut() {
                step.expected.push(shown.to_owned());
            }
            continue;
        }
        after_command = false;
        if line.trim().is_empty() || line.starts_with('#') {
            continue;
        }
        let mut command = line.to_owned();
        while command.ends_with('\\') {
            command.push('\n');
            command.push_str(lines.next().expect("a continued line"));
        }
        steps.push(Step {
            command,
            expected: Vec::new(),
        });
        after_command = true;
    }
    steps
}

/// `text` with each of `ports`' first numbers replaced by the second where it stands alone.
fn move_ports(text: &str, ports: &[(u16, u16)]) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    'scan: while !rest.is_empty() {
        let at_boundary = !out.ends_with(|c: char| c.is_ascii_digit());
        if at_boundary {
            for (from, to) in ports {
                let from = from.to_string();
                if let Some(after) = rest.strip_prefix(&from)
                    && !after.starts_with(|c: char| c.is_ascii_digit())
                {
                    out.push_str(&to.to_string());
                    rest = after;
                    continue 'scan;
                }
            }
        }
        let c = rest.chars().next().unwrap_or_default();
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    out
}

/// Whether `line` matches `pattern`, where `...` in the pattern stands for anything.
fn matches(pattern: &str, line: &str) -> bool {
    let parts: Vec<&str> = pattern.split("...").collect();
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    let Some(mut rest) = line.strip_prefix(first) else {
        return false;
    };
    if parts.len() == 1 {
        return rest.is_empty();
    }
    for part in &parts[1..parts.len() - 1] {
        match rest.find(part) {
            Some(i) => rest = &rest[i + part.len()..],
            None => return false,
        }
    }
    rest.ends_with(last)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Runs `steps` in one bash (`set -e`) in `dir`, each with its stdout and stderr in files of its
/// own (a background process started by a step writes to that step's files, never into another
/// step's output); returns each step's output (stdout, then stderr) and whether all succeeded.
fn run_steps(dir: &Path, bin_dir: &Path, steps: &[Step]) -> (Vec<String>, bool) {
    let out = tempfile::tempdir().unwrap();
    let mut script = String::from("set -e\n");
    for (i, step) in steps.iter().enumerate() {
        // Braces, not a subshell: the step's variables (KEY, GATEWAY) stay set for the next.
        script.push_str(&format!(
            "{{ {}\n}} > \"$STEPS/{i}.out\" 2> \"$STEPS/{i}.err\"\n",
            step.command
        ));
    }
    let log = std::fs::File::create(out.path().join("bash.log")).unwrap();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut bash = Command::new("bash");
    bash.args(["--noprofile", "--norc", "-c", &script])
        .current_dir(dir)
        .env("PATH", path)
        .env("STEPS", out.path())
        .env("DOCS_KEYGATE_BIN", env!("CARGO_BIN_EXE_keygate"))
        .env("NO_PROXY", "*")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        // Its own process group: whatever a failed run leaves behind is ended with it.
        .process_group(0);
    for var in [
        "http_proxy",
        "https_proxy",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
    ] {
        bash.env_remove(var);
    }
    let mut child = bash.spawn().unwrap();
    let status = common::poll(Duration::from_secs(180), || child.try_wait().unwrap());
    // The group is the bash started here and what it started: end whatever is left of it.
    let group = nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap());
    let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
    let _ = child.wait();
    let read = |name: String| std::fs::read_to_string(out.path().join(name)).unwrap_or_default();
    let outputs: Vec<String> = (0..steps.len())
        .map(|i| {
            let mut text = read(format!("{i}.out"));
            if !text.ends_with('\n') {
                text.push('\n');
            }
            text.push_str(&read(format!("{i}.err")));
            // Progress meters redraw with \r: each redraw is a line of its own here.
            text.split(['\r', '\n'])
                .map(str::trim_end)
                .filter(|l| !l.is_empty())
                .collect::<Vec<_>>()
                .join("\n")
        })
        .collect();
    let ok = status.is_some_and(|s| s.success());
    if !ok {
        eprintln!(
            "quickstart run failed; bash said:\n{}",
            read("bash.log".into())
        );
        for (step, output) in steps.iter().zip(&outputs) {
            eprintln!("$ {}\n{output}", step.command);
        }
    }
    (outputs, ok)
}

/// Checks each step's shown output against what it printed; returns the failures.
fn check(steps: &[Step], outputs: &[String]) -> Vec<String> {
    let mut failures = Vec::new();
    for (step, output) in steps.iter().zip(outputs) {
        let mut lines = output.lines();
        for expected in step.expected.iter().filter(|e| e.as_str() != "...") {
            if !lines.any(|line| matches(expected.trim_end(), line)) {
                failures.push(format!(
                    "`{}` did not print `{expected}` (in order); it printed:\n{output}",
                    step.command
                ));
                break;
            }
        }
    }
    failures
}

#[test]
fn the_readme_quickstart_runs_as_written_twice() {
    for tool in ["bash", "curl", "python3"] {
        assert!(
            Command::new(tool)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success()),
            "{tool} is needed (scripts/install-test-deps.sh installs it)"
        );
    }
    let block = quickstart();
    let ports: Vec<(u16, u16)> = [8443, 8080, 9090, 8000]
        .into_iter()
        .map(|p| (p, free_port()))
        .collect();
    let mut steps = steps(&move_ports(&block, &ports));
    assert!(steps.len() >= 15, "{steps:#?}");

    // Checks of the test's own, after the metrics (whose count they would change), with a key
    // of their own (the quickstart's is revoked by then): the example backend serves nothing
    // from the directory the gateway runs in (no private key, no key store to download).
    let after_metrics = steps
        .iter()
        .position(|s| s.command.contains("/metrics"))
        .expect("the metrics step")
        + 1;
    let mut own = vec![Step {
        command: "CHECK_KEY=$(cargo run -q --release -- keys create --name docs-check)".into(),
        expected: Vec::new(),
    }];
    for file in ["certs/dev-key.pem", "keygate.db", "gateway.toml"] {
        own.push(Step {
            command: move_ports(
                &format!(
                    "curl -s -o /dev/null -w '%{{http_code}}\\n' --cacert certs/dev-cert.pem \
                     https://localhost:8443/{file} -H \"X-API-Key: ${{CHECK_KEY:?}}\""
                ),
                &ports,
            ),
            expected: vec!["404".into()],
        });
    }
    own.push(Step {
        command: "cargo run -q --release -- keys delete docs-check".into(),
        expected: Vec::new(),
    });
    steps.splice(after_metrics..after_metrics, own);

    let dir = tempfile::tempdir().unwrap();
    let shipped = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/gateway.toml"))
        .expect("gateway.toml");
    std::fs::write(
        dir.path().join("gateway.toml"),
        move_ports(&shipped, &ports),
    )
    .unwrap();
    let bin = tempfile::tempdir().unwrap();
    let cargo = bin.path().join("cargo");
    std::fs::write(
        &cargo,
        "#!/bin/sh\n\
         # The README's `cargo run [-q] --release -- ARGS`: the binary under test, with ARGS.\n\
         [ \"$1\" = run ] || { echo \"docs test: unexpected cargo $*\" >&2; exit 2; }\n\
         while [ \"$#\" -gt 0 ] && [ \"$1\" != -- ]; do shift; done\n\
         [ \"$#\" -gt 0 ] && shift\n\
         exec \"$DOCS_KEYGATE_BIN\" \"$@\"\n",
    )
    .unwrap();
    std::fs::set_permissions(&cargo, std::fs::Permissions::from_mode(0o755)).unwrap();

    for run in ["first", "second"] {
        let (outputs, ok) = run_steps(dir.path(), bin.path(), &steps);
        let failures = check(&steps, &outputs);
        assert!(
            ok && failures.is_empty(),
            "{run} run: exited {}; {}",
            if ok { "0" } else { "with an error" },
            failures.join("\n")
        );
        for (step, output) in steps.iter().zip(&outputs) {
            eprintln!("{run} run: {} -> {}", step.command, output.trim());
        }
    }
}

#[test]
fn shown_output_lines_match_with_gaps() {
    assert!(matches(
        "created API key 'frontend' (id key_..., hint sk_...). Store it now.",
        "created API key 'frontend' (id key_abc, hint sk_Ab…). Store it now."
    ));
    assert!(matches("HTTP/2 401", "HTTP/2 401"));
    assert!(!matches("HTTP/2 401", "HTTP/2 4011"));
    assert!(!matches("a...b", "xab"));
    assert_eq!(
        move_ports(
            "https://localhost:8443/ 18443 8443x :8000",
            &[(8443, 1), (8000, 2)]
        ),
        "https://localhost:1/ 18443 1x :2"
    );
    let parsed = steps(
        "# 1. narrative\n#    more narrative\ncmd a \\\n  b\n#   out\n\n# x\n#   not output\n",
    );
    assert_eq!(parsed.len(), 1);
    assert_eq!(parsed[0].command, "cmd a \\\n  b");
    assert_eq!(parsed[0].expected, ["out"]);
}
