//! Running one configured command as flannel does (no shell; the process environment plus the
//! command's variables; a line on stdin; stdout and stderr captured together and trimmed),
//! with what flannel lacks: a deadline after which the command's whole process group is
//! killed, and a cap on the output kept.

use std::collections::HashMap;
use std::fmt;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::words;

/// Output beyond this many bytes is read and dropped, so a chatty command cannot grow the
/// daemon.
const OUTPUT_KEPT: usize = 64 * 1024;

/// One command, ready to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invocation {
    /// The option it comes from (`SubnetAddCommand`), for logs.
    pub option: &'static str,
    /// The command as configured, for logs.
    pub line: String,
    /// The program and its arguments, variables expanded.
    pub argv: Vec<String>,
    /// The variables set for it, on top of the daemon's environment.
    pub vars: Vec<(String, String)>,
    /// Written to stdin, followed by a newline.
    pub stdin: String,
}

impl Invocation {
    /// The invocation of `line` (configured as `option`) with `vars` set and `stdin` written;
    /// `None` when the line has no words.
    pub fn new(
        option: &'static str,
        line: &str,
        vars: Vec<(String, String)>,
        stdin: String,
    ) -> Option<Invocation> {
        // Variables are expanded from the daemon's environment with the command's own on top,
        // as flannel builds its map.
        let mut env: HashMap<String, String> = std::env::vars_os()
            .map(|(k, v)| {
                (
                    k.to_string_lossy().into_owned(),
                    v.to_string_lossy().into_owned(),
                )
            })
            .collect();
        env.extend(vars.iter().cloned());
        Some(Invocation {
            option,
            line: line.to_string(),
            argv: words::argv(line, &env)?,
            vars,
            stdin,
        })
    }
}

/// How a command ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ending {
    Exited(ExitStatus),
    /// Still running at the deadline: its process group was killed.
    TimedOut(Duration),
    /// It could not be started (no such program, not executable).
    NotStarted(String),
}

/// What a command did: how it ended and its output (stdout and stderr as they interleaved,
/// trimmed, at most [`OUTPUT_KEPT`] bytes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub ending: Ending,
    pub output: String,
}

impl Outcome {
    pub fn succeeded(&self) -> bool {
        matches!(self.ending, Ending::Exited(s) if s.success())
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.ending {
            Ending::Exited(s) => write!(f, "{s}")?,
            Ending::TimedOut(t) => write!(
                f,
                "timed out: still running after {}s, killed",
                t.as_secs_f64()
            )?,
            Ending::NotStarted(why) => write!(f, "could not be started: {why}")?,
        }
        write!(f, "; output: {:?}", self.output)
    }
}

/// Runs `inv`, killing it (and every process it started in its process group) when it has
/// not finished within `timeout`.
pub async fn run(inv: &Invocation, timeout: Duration) -> Outcome {
    let mut output = Vec::new();
    let ending = match spawn_and_wait(inv, timeout, &mut output).await {
        Ok(ending) => ending,
        Err(e) => Ending::NotStarted(e.to_string()),
    };
    Outcome {
        ending,
        output: String::from_utf8_lossy(&output).trim().to_string(),
    }
}

async fn spawn_and_wait(
    inv: &Invocation,
    timeout: Duration,
    output: &mut Vec<u8>,
) -> std::io::Result<Ending> {
    // One pipe for stdout and stderr, so the output interleaves as Go's CombinedOutput does.
    // Close-on-exec, so that commands started meanwhile do not inherit the write end (their
    // holding it open would delay our end of file until they finish).
    let (reader, writer) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    let mut cmd = tokio::process::Command::new(&inv.argv[0]);
    cmd.args(&inv.argv[1..])
        .envs(inv.vars.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::piped())
        .stdout(writer.try_clone()?)
        .stderr(writer)
        // Its own process group, so that a timeout kills what it started too.
        .process_group(0)
        .kill_on_drop(true);
    let mut child = cmd.spawn()?;
    // The command holds our copies of the pipe's write end: without dropping it the read
    // below never sees the end.
    drop(cmd);
    let group = GroupKiller(child.id().and_then(|p| i32::try_from(p).ok()));
    let mut stdin = child.stdin.take();
    let mut reader = tokio::net::unix::pipe::Receiver::from_owned_fd(reader)?;

    let feed = async {
        if let Some(stdin) = stdin.as_mut() {
            // A command that does not read its input closes the pipe: not an error.
            let _ = stdin.write_all(inv.stdin.as_bytes()).await;
            let _ = stdin.write_all(b"\n").await;
        }
        drop(stdin.take());
    };
    let collect = async {
        let mut buf = [0u8; 8192];
        loop {
            match reader.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let room = OUTPUT_KEPT.saturating_sub(output.len());
                    output.extend_from_slice(&buf[..n.min(room)]);
                }
            }
        }
    };
    let finished = tokio::time::timeout(timeout, async {
        let ((), (), status) = tokio::join!(feed, collect, child.wait());
        status
    })
    .await;
    match finished {
        Ok(status) => {
            // What it left running in the background is its business, as in flannel.
            group.disarm();
            Ok(Ending::Exited(status?))
        }
        Err(_) => {
            drop(group);
            let _ = child.wait().await;
            Ok(Ending::TimedOut(timeout))
        }
    }
}

/// Kills a command's process group when dropped armed: at the deadline, and when the daemon
/// drops a command still running (it shuts down).
struct GroupKiller(Option<i32>);

impl GroupKiller {
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for GroupKiller {
    fn drop(&mut self) {
        if let Some(pgid) = self.0 {
            // The group may be gone already.
            let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// A shell script in a temp dir (the dir goes when the guard drops).
    fn script(body: &str) -> (tempfile::TempDir, String) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cmd.sh");
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        let path = path.to_str().unwrap().to_string();
        (dir, path)
    }

    fn inv(line: &str, vars: &[(&str, &str)], stdin: &str) -> Invocation {
        let vars = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Invocation::new("SubnetAddCommand", line, vars, stdin.to_string()).unwrap()
    }

    const LONG: Duration = Duration::from_secs(20);

    #[tokio::test]
    async fn output_is_stdout_and_stderr_together_and_trimmed() {
        let (_dir, sh) = script("echo out; echo err >&2; echo; exit 3");
        let o = run(&inv(&sh, &[], ""), LONG).await;
        assert_eq!(o.output, "out\nerr");
        assert!(!o.succeeded());
        assert!(o.to_string().starts_with("exit status: 3"), "{o}");
    }

    #[tokio::test]
    async fn variables_reach_the_environment_and_arguments_and_stdin_gets_a_line() {
        let (_dir, sh) = script(r#"printf '%s|%s|%s|' "$SUBNET" "$1" "$2"; cat"#);
        let i = inv(
            &format!("{sh} $PUBLIC_IP x${{SUBNET}}y"),
            &[("SUBNET", "10.5.7.0/24"), ("PUBLIC_IP", "198.18.0.3")],
            "{\"k\":1}",
        );
        assert_eq!(i.argv[1..], ["198.18.0.3", "x10.5.7.0/24y"]);
        let o = run(&i, LONG).await;
        assert!(o.succeeded(), "{o}");
        // `cat` shows the stdin line with its newline before the trim.
        assert_eq!(o.output, "10.5.7.0/24|198.18.0.3|x10.5.7.0/24y|{\"k\":1}");
    }

    #[tokio::test]
    async fn a_hanging_command_and_what_it_started_are_killed_at_the_deadline() {
        let dir = tempfile::tempdir().unwrap();
        let survived = dir.path().join("survived");
        let (_sdir, sh) = script(&format!(
            "echo started; (sleep 1; touch {}) & wait",
            survived.display()
        ));
        let started = std::time::Instant::now();
        let o = run(&inv(&sh, &[], ""), Duration::from_millis(300)).await;
        assert_eq!(o.ending, Ending::TimedOut(Duration::from_millis(300)));
        assert_eq!(o.output, "started", "output before the deadline is kept");
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "run waited past its deadline"
        );
        assert!(o.to_string().contains("timed out"), "{o}");
        // The background subshell went with its group: it never gets to touch the file.
        std::thread::sleep(Duration::from_millis(1500));
        assert!(!survived.exists(), "a process of the killed group survived");
    }

    #[tokio::test]
    async fn a_missing_program_is_reported() {
        let o = run(&inv("/nonexistent/cmd a", &[], ""), LONG).await;
        assert!(matches!(o.ending, Ending::NotStarted(_)), "{o:?}");
        assert!(o.to_string().contains("No such file"), "{o}");
    }

    #[tokio::test]
    async fn output_kept_is_capped() {
        let o = run(&inv("/usr/bin/head -c 200000 /dev/zero", &[], ""), LONG).await;
        assert!(o.succeeded(), "{o}");
        assert_eq!(o.output.len(), OUTPUT_KEPT);
    }
}
