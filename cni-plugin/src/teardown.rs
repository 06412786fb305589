//! Best-effort teardown for DEL: every step runs even when an earlier one failed, so that one
//! failure (a pod namespace that cannot be entered, say) does not leave the addresses and the
//! masquerade rules behind; the failures are reported together in one CNI error.

use crate::spec::{code, CniError, CniResult};

/// The failed steps of one teardown, in the order they ran.
#[derive(Debug, Default)]
pub struct Teardown {
    failures: Vec<(String, CniError)>,
}

impl Teardown {
    pub fn new() -> Teardown {
        Teardown::default()
    }

    /// Records `result` of the step described by `what`; the value when it succeeded.
    pub fn step<T>(&mut self, what: impl Into<String>, result: CniResult<T>) -> Option<T> {
        match result {
            Ok(v) => Some(v),
            Err(e) => {
                self.failures.push((what.into(), e));
                None
            }
        }
    }

    /// Ok when every step succeeded. Otherwise one error listing each failed step; its code is
    /// the first failure's when all share it, else I/O failure (5), the spec's general code.
    pub fn finish(self) -> CniResult<()> {
        let Some((_, first)) = self.failures.first() else {
            return Ok(());
        };
        let code = if self.failures.iter().all(|(_, e)| e.code == first.code) {
            first.code
        } else {
            code::IO_FAILURE
        };
        let steps: Vec<String> = self
            .failures
            .iter()
            .map(|(what, e)| format!("{what}: {}", e.msg))
            .collect();
        let details: Vec<String> = self
            .failures
            .iter()
            .filter(|(_, e)| !e.details.is_empty())
            .map(|(what, e)| format!("{what}: {}", e.details))
            .collect();
        let failed = match steps.len() {
            1 => "1 step".to_string(),
            n => format!("{n} steps"),
        };
        Err(CniError::new(
            code,
            format!(
                "DEL: {failed} failed (the others ran): {}",
                steps.join("; ")
            ),
        )
        .with_details(details.join("; ")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_step_runs_and_every_failure_is_listed() {
        let mut t = Teardown::new();
        let mut ran = Vec::new();
        let a: CniResult<()> = Err(CniError::new(code::INTERNAL, "enter netns /x: EINVAL"));
        t.step("remove eth0", a);
        ran.push("release");
        assert_eq!(t.step("release addresses", Ok(3)), Some(3));
        let c: CniResult<()> = Err(CniError::new(code::IO_FAILURE, "iptables: busy"));
        t.step("remove masquerade rules", c);
        ran.push("masq");
        assert_eq!(ran, ["release", "masq"]);
        let err = t.finish().unwrap_err();
        assert_eq!(err.code, code::IO_FAILURE, "mixed codes: the general one");
        assert_eq!(
            err.msg,
            "DEL: 2 steps failed (the others ran): remove eth0: enter netns /x: EINVAL; \
             remove masquerade rules: iptables: busy"
        );
    }

    #[test]
    fn one_failure_keeps_its_code_and_none_is_ok() {
        let mut t = Teardown::new();
        let e: CniResult<()> = Err(CniError::new(code::INTERNAL, "netlink: EBUSY"));
        t.step("remove eth0", e);
        t.step("release addresses", Ok(()));
        let err = t.finish().unwrap_err();
        assert_eq!(err.code, code::INTERNAL);
        assert!(
            err.msg.contains("1 step failed") && err.msg.contains("remove eth0: netlink: EBUSY")
        );
        let mut clean = Teardown::new();
        clean.step("release addresses", Ok(()));
        assert!(clean.finish().is_ok());
    }
}
