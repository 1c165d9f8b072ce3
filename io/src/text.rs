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

/// A string value made safe for a CSV cell (the `csv` crate quotes it). Unless `raw`: a value a
/// spreadsheet would run as a formula (starting with `=`, `+`, `-`, `@`, tab or carriage return)
/// is prefixed with `'`, and control characters other than tab and line breaks are escaped as in
/// [`Printable`]. `raw` keeps the value exact (for programs, not spreadsheets).
pub fn csv_value(v: &str, raw: bool) -> Cow<'_, str> {
    if raw {
        return Cow::Borrowed(v);
    }
    let formula = v.starts_with(['=', '+', '-', '@', '\t', '\r']);
    let escape = |c: char| needs_escape(c) && !matches!(c, '\t' | '\n' | '\r');
    if !formula && !v.chars().any(escape) {
        return Cow::Borrowed(v);
    }
    let mut s = String::with_capacity(v.len() + 1);
    if formula {
        s.push('\'');
    }
    for c in v.chars() {
        if escape(c) {
            s.push_str(&format!("\\u{{{:x}}}", c as u32));
        } else {
            s.push(c);
        }
    }
    Cow::Owned(s)
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
            ("=HYPERLINK(\"http://x\")", "'=HYPERLINK(\"http://x\")"),
            ("+cmd|' /C calc'!A0", "'+cmd|' /C calc'!A0"),
            ("@SUM(1+1)", "'@SUM(1+1)"),
            ("-2+3", "'-2+3"),
            ("\t=1", "'\t=1"),
            ("a=b", "a=b"),
            ("x,y", "x,y"),
            ("bell\u{7}", "bell\\u{7}"),
            ("two\nlines", "two\nlines"),
        ] {
            assert_eq!(csv_value(v, false), want, "{v:?}");
        }
        assert_eq!(csv_value("=1+1", true), "=1+1");
        assert_eq!(csv_value("bell\u{7}", true), "bell\u{7}");
    }
}
