//! How flannel turns a configured command into a program and its arguments: no shell. The
//! command is split into words at white space (Go's `strings.Fields`), then `$VAR` and
//! `${VAR}` are replaced in each word (Go's `os.Expand`), so a value with spaces stays one
//! argument and quotes are plain characters.

use std::collections::HashMap;

/// The words of `command`, split at runs of Unicode white space (Go's `strings.Fields` splits
/// at what `unicode.IsSpace` accepts, which is Rust's `char::is_whitespace`).
pub fn split(command: &str) -> Vec<&str> {
    command.split_whitespace().collect()
}

/// Replaces `$NAME`, `${NAME}` and the one-character shell specials (`$1`, `$?`, `${*}`...) in
/// `word` with their value in `vars` (empty when unset), with Go's quirks kept: a `$` at the
/// end or before a character that starts no name stays; `${}` and an unclosed `${` are dropped.
pub fn expand(word: &str, vars: &HashMap<String, String>) -> String {
    let bytes = word.as_bytes();
    let mut out = String::with_capacity(word.len());
    // Start of the text not yet copied to `out`.
    let mut copied = 0;
    let mut j = 0;
    while j < bytes.len() {
        if bytes[j] == b'$' && j + 1 < bytes.len() {
            out.push_str(&word[copied..j]);
            let (name, width) = shell_name(&word[j + 1..]);
            match name {
                Some(name) => out.push_str(vars.get(name).map(String::as_str).unwrap_or("")),
                // Bad syntax: what was consumed is dropped.
                None if width > 0 => {}
                // No name after the dollar: it stays.
                None => out.push('$'),
            }
            j += width;
            copied = j + 1;
        }
        j += 1;
    }
    out.push_str(&word[copied..]);
    out
}

fn is_special(c: u8) -> bool {
    matches!(
        c,
        b'*' | b'#' | b'$' | b'@' | b'!' | b'?' | b'-' | b'0'..=b'9'
    )
}

fn is_name_char(c: u8) -> bool {
    c == b'_' || c.is_ascii_alphanumeric()
}

/// The name at the start of `s` (the text after a `$`) and how many bytes it takes; `None`
/// with a width is bad syntax to drop, `None` with width 0 is no name at all.
fn shell_name(s: &str) -> (Option<&str>, usize) {
    let b = s.as_bytes();
    if b[0] == b'{' {
        if b.len() > 2 && is_special(b[1]) && b[2] == b'}' {
            return (Some(&s[1..2]), 3);
        }
        return match s[1..].find('}') {
            Some(0) => (None, 2),
            Some(end) => (Some(&s[1..=end]), end + 2),
            None => (None, 1),
        };
    }
    if is_special(b[0]) {
        return (Some(&s[..1]), 1);
    }
    let len = b.iter().take_while(|c| is_name_char(**c)).count();
    if len == 0 {
        (None, 0)
    } else {
        (Some(&s[..len]), len)
    }
}

/// The program and its arguments for `command`, with variables from `vars`; `None` when the
/// command has no words.
pub fn argv(command: &str, vars: &HashMap<String, String>) -> Option<Vec<String>> {
    let words: Vec<String> = split(command).iter().map(|w| expand(w, vars)).collect();
    (!words.is_empty()).then_some(words)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars() -> HashMap<String, String> {
        [
            ("SUBNET", "10.5.7.0/24"),
            ("PUBLIC_IP", "198.18.0.3"),
            ("SPACED", "a b"),
            ("1", "one"),
            ("?", "status"),
            ("X_1", "x1"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }

    /// Expected values produced by Go 1.26's `os.Expand` (unchanged for years) with the same mapping (run once by
    /// hand with /usr/local/go; the table keeps them).
    #[test]
    fn expansion_matches_go_os_expand() {
        let cases = [
            ("$SUBNET", "10.5.7.0/24"),
            ("${SUBNET}", "10.5.7.0/24"),
            ("via=$PUBLIC_IP,", "via=198.18.0.3,"),
            ("${SUBNET}x", "10.5.7.0/24x"),
            ("$SUBNETx", ""),
            ("$X_1.y", "x1.y"),
            ("$UNSET", ""),
            ("a$", "a$"),
            ("$", "$"),
            ("$$", ""),
            ("$1", "one"),
            ("$12", "one2"),
            ("${1}", "one"),
            ("${?}", "status"),
            ("$?x", "statusx"),
            ("${}", ""),
            ("a${}b", "ab"),
            ("${SUBNET", "SUBNET"),
            ("$/x", "$/x"),
            ("$.", "$."),
            ("'$SUBNET'", "'10.5.7.0/24'"),
            ("\"$PUBLIC_IP\"", "\"198.18.0.3\""),
            ("${SP ACED}", ""),
            ("$é", "$é"),
            ("${é}", ""),
        ];
        let v = vars();
        for (word, want) in cases {
            assert_eq!(expand(word, &v), want, "expanding {word:?}");
        }
    }

    #[test]
    fn words_are_split_before_expansion_so_values_with_spaces_stay_one_argument() {
        let v = vars();
        assert_eq!(
            argv("  /bin/echo\t$SPACED \"quoted words\"\n${SUBNET}  ", &v).unwrap(),
            ["/bin/echo", "a b", "\"quoted", "words\"", "10.5.7.0/24"]
        );
        // An unset variable leaves an empty argument, as flannel passes it.
        assert_eq!(argv("cmd $UNSET x", &v).unwrap(), ["cmd", "", "x"]);
        // The program name is expanded too.
        assert_eq!(argv("$SUBNET", &v).unwrap(), ["10.5.7.0/24"]);
        // Non-breaking space and other Unicode spaces split, as Go's unicode.IsSpace does.
        assert_eq!(split("a\u{a0}b\u{2003}c\u{85}d"), ["a", "b", "c", "d"]);
        assert_eq!(argv(" \t\n", &v), None);
        assert_eq!(argv("", &v), None);
    }
}
