//! An error and its causes on one line, for log lines and the exit message.

use std::error::Error;
use std::fmt;

/// Shows an error, then each of its causes after `: `. A cause whose text the line already
/// holds is left out: some errors (transport errors among them) repeat their cause in their own
/// message, and the line should say each thing once.
pub struct Chain<'a>(pub &'a (dyn Error + 'static));

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut line = self.0.to_string();
        let mut source = self.0.source();
        while let Some(cause) = source {
            let text = cause.to_string();
            if !line.contains(&text) {
                line.push_str(": ");
                line.push_str(&text);
            }
            source = cause.source();
        }
        f.write_str(&line)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("reading {path}")]
    struct Read {
        path: &'static str,
        #[source]
        source: std::io::Error,
    }

    #[derive(Debug, thiserror::Error)]
    #[error("starting: {0}")]
    struct Repeats(#[source] std::io::Error);

    #[test]
    fn every_cause_is_shown_in_order() {
        let inner = std::io::Error::new(std::io::ErrorKind::NotFound, "no such file");
        let e = Read {
            path: "/etc/x",
            source: inner,
        };
        assert_eq!(e.to_string(), "reading /etc/x");
        assert_eq!(Chain(&e).to_string(), "reading /etc/x: no such file");
    }

    #[test]
    fn a_cause_the_message_already_holds_is_not_repeated() {
        let e = Repeats(std::io::Error::other("refused"));
        assert_eq!(Chain(&e).to_string(), "starting: refused");
    }
}
