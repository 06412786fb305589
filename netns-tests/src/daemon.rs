//! The one way the test bed runs a long-lived process (etcd, flanneld): output appended to a
//! log file, stopped or killed on request, killed on drop, and its log tail printed when the
//! test panics. [`crate::Etcd`], [`crate::Host`] and the loopback daemons of the integration
//! tests hold one.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::{cmd, wait_until, Error, Result};

/// A background process and its log. Restartable: [`Daemon::start`] after a stop or a kill
/// starts it again with the same log (appended).
#[derive(Debug)]
pub struct Daemon {
    /// What it is, for messages: "flanneld on nt1x0-h0", "etcd member e1".
    what: String,
    log: PathBuf,
    /// How many log lines to print when the test panics.
    tail_on_panic: usize,
    child: Mutex<Option<Child>>,
}

impl Daemon {
    /// Nothing runs yet; `log` is where its output will go.
    pub fn new(what: impl Into<String>, log: impl Into<PathBuf>, tail_on_panic: usize) -> Daemon {
        Daemon {
            what: what.into(),
            log: log.into(),
            tail_on_panic,
            child: Mutex::new(None),
        }
    }

    fn child(&self) -> MutexGuard<'_, Option<Child>> {
        self.child.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts `command` with stdin closed and stdout and stderr appended to the log; a no-op
    /// while the process runs.
    pub fn start(&self, mut command: Command) -> Result<()> {
        let mut child = self.child();
        if let Some(c) = child.as_mut() {
            if c.try_wait().ok().flatten().is_none() {
                return Ok(());
            }
        }
        log_to(&mut command, &self.log)
            .map_err(|e| Error::io(format!("opening {}", self.log.display()), e))?;
        let spawned = command
            .spawn()
            .map_err(|e| Error::io(format!("starting `{}`", cmd::show(&command)), e))?;
        *child = Some(spawned);
        Ok(())
    }

    /// `Ok` while it runs; otherwise why not (exit status and log tail).
    pub fn check_alive(&self) -> Result<(), String> {
        match self.child().as_mut() {
            None => Err(format!("{} is not started", self.what)),
            Some(c) => match c.try_wait() {
                Ok(None) => Ok(()),
                Ok(Some(st)) => Err(format!(
                    "{} exited ({st}); log tail:\n{}",
                    self.what,
                    self.log_tail(25)
                )),
                Err(e) => Err(format!("waiting on {}: {e}", self.what)),
            },
        }
    }

    pub fn is_running(&self) -> bool {
        self.check_alive().is_ok()
    }

    /// SIGTERM, wait up to `grace`, then SIGKILL; always reaps. The exit status if it was
    /// running.
    pub fn stop(&self, grace: Duration) -> Option<ExitStatus> {
        let mut c = self.child().take()?;
        stop_child(&mut c, grace)
    }

    /// `kill -9` and reap.
    pub fn kill9(&self) {
        if let Some(mut c) = self.child().take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Waits for the process to exit on its own; its status.
    pub fn wait_exit(&self, timeout: Duration) -> Result<ExitStatus> {
        let what = format!("{} to exit", self.what);
        let status = wait_until(timeout, &what, || {
            let mut child = self.child();
            let c = child.as_mut().ok_or("not started")?;
            match c.try_wait() {
                Ok(Some(st)) => Ok(st),
                Ok(None) => Err("still running".to_string()),
                Err(e) => Err(e.to_string()),
            }
        })?;
        self.child().take();
        Ok(status)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child().as_ref().map(Child::id)
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The whole log (empty when there is none yet).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn log_tail(&self, lines: usize) -> String {
        cmd::tail(&self.log, lines)
    }
}

/// Closes `command`'s stdin and appends its stdout and stderr to `log`.
pub(crate) fn log_to(command: &mut Command, log: &Path) -> std::io::Result<()> {
    let out = File::options().create(true).append(true).open(log)?;
    let err = out.try_clone()?;
    command.stdin(Stdio::null()).stdout(out).stderr(err);
    Ok(())
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if std::thread::panicking() && self.tail_on_panic > 0 {
            eprintln!(
                "---- {} log tail ({}) ----\n{}",
                self.what,
                self.log.display(),
                self.log_tail(self.tail_on_panic)
            );
        }
        self.kill9();
    }
}

/// SIGTERM `c`, wait up to `grace`, then SIGKILL; always reaps. Its exit status.
pub fn stop_child(c: &mut Child, grace: Duration) -> Option<ExitStatus> {
    let _ = kill(Pid::from_raw(c.id() as i32), Signal::SIGTERM);
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Ok(Some(st)) = c.try_wait() {
            return Some(st);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = c.kill();
    c.wait().ok()
}
