//! Text that came from an agent (hostnames, upload names, rows), made safe to show. An agent may
//! be hostile: its text must not drive the analyst's terminal (ANSI escapes), forge lines in a
//! listing or the server's log (newlines), reorder what is shown (bidirectional overrides), or run
//! as a formula when an export is opened in a spreadsheet (OWASP's CSV injection rule).

use std::borrow::Cow;
use std::fmt;

/// True for characters shown escaped: control characters (C0, DEL, C1: terminal escapes, newlines)
/// and the bidirectional overrides and isolates that reorder what follows them.
pub fn needs_escape(c: char) -> bool {
    c.is_control() || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// Shows a string with every [`needs_escape`] character written as `\u{XX}`; everything else as
/// is. Use it wherever agent text is printed or logged.
#[derive(Clone, Copy)]
pub struct Printable<'a>(pub &'a str);

impl fmt::Display for Printable<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for c in self.0.chars() {
            if needs_escape(c) {
                write!(f, "\\u{{{:x}}}", c as u32)?;
            } else {
                fmt::Write::write_char(f, c)?;
            }
        }
        Ok(())
    }
}

/// [`Printable`] as a string, borrowed when nothing needed escaping.
pub fn printable(s: &str) -> Cow<'_, str> {
    if s.chars().any(needs_escape) {
        Cow::Owned(Printable(s).to_string())
    } else {
        Cow::Borrowed(s)
    }
}

/// A string value as one CSV field (RFC 4180 quoting). Unless `raw`: a value a spreadsheet would
/// run as a formula (starting with `=`, `+`, `-`, `@`, tab or carriage return) is prefixed with `'`
/// and quoted, and control characters other than tab and line breaks are escaped as in
/// [`Printable`]. `raw` keeps the value exact (for programs, not spreadsheets).
pub fn csv_field(v: &str, raw: bool) -> String {
    let (v, formula) = if raw {
        (Cow::Borrowed(v), false)
    } else {
        let formula = v.starts_with(['=', '+', '-', '@', '\t', '\r']);
        let escaped: Cow<str> = if v
            .chars()
            .any(|c| needs_escape(c) && !matches!(c, '\t' | '\n' | '\r'))
        {
            let mut s = String::with_capacity(v.len());
            for c in v.chars() {
                if needs_escape(c) && !matches!(c, '\t' | '\n' | '\r') {
                    s.push_str(&format!("\\u{{{:x}}}", c as u32));
                } else {
                    s.push(c);
                }
            }
            Cow::Owned(s)
        } else {
            Cow::Borrowed(v)
        };
        (escaped, formula)
    };
    let prefix = if formula { "'" } else { "" };
    if formula || v.contains([',', '"', '\n', '\r']) {
        format!("\"{prefix}{}\"", v.replace('"', "\"\""))
    } else {
        v.into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terminal_escapes_newlines_and_overrides_are_shown_escaped() {
        let host = "pc\u{1b}[2J\nC.FORGED  evil\u{202e}txt.exe\u{9b}";
        let shown = Printable(host).to_string();
        assert_eq!(
            shown,
            "pc\\u{1b}[2J\\u{a}C.FORGED  evil\\u{202e}txt.exe\\u{9b}"
        );
        assert!(!shown.chars().any(needs_escape));
        assert_eq!(printable("plain host-1.example"), "plain host-1.example");
        assert!(matches!(printable("ok"), Cow::Borrowed(_)));
        // Non-ASCII text that is not a control is kept.
        assert_eq!(printable("Überwachung-東京"), "Überwachung-東京");
    }

    #[test]
    fn csv_neutralises_formulas_unless_raw() {
        for (v, want) in [
            (
                "=HYPERLINK(\"http://x\")",
                "\"'=HYPERLINK(\"\"http://x\"\")\"",
            ),
            ("+cmd|' /C calc'!A0", "\"'+cmd|' /C calc'!A0\""),
            ("@SUM(1+1)", "\"'@SUM(1+1)\""),
            ("-2+3", "\"'-2+3\""),
            ("\t=1", "\"'\t=1\""),
            ("a=b", "a=b"),
            ("x,y", "\"x,y\""),
            ("say \"hi\"", "\"say \"\"hi\"\"\""),
            ("bell\u{7}", "bell\\u{7}"),
            ("two\nlines", "\"two\nlines\""),
        ] {
            assert_eq!(csv_field(v, false), want, "{v:?}");
        }
        assert_eq!(csv_field("=1+1", true), "=1+1");
        assert_eq!(csv_field("bell\u{7}", true), "bell\u{7}");
        assert_eq!(csv_field("x,y", true), "\"x,y\"");
    }
}
