//! HTML by hand: every dynamic value goes through [`esc`] (text and attribute values
//! alike), so a device label can never open a tag. Status is always text plus an icon,
//! never colour alone.

use std::fmt::Write as _;

/// `s` escaped for HTML text and double-quoted attribute values.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// `s` escaped for a URL path segment or query value.
pub fn url(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// A Unix time in ms as UTC (`2026-12-07 00:12:03Z`), in a `<time>` element.
pub fn time(ms: u64) -> String {
    let iso = iso(ms);
    format!("<time datetime=\"{iso}\">{}</time>", iso.replace('T', " "))
}

pub fn iso(ms: u64) -> String {
    let secs = i64::try_from(ms / 1000).unwrap_or(i64::MAX);
    match jiff::Timestamp::from_second(secs) {
        Ok(t) => t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string(),
        Err(_) => "?".into(),
    }
}

/// How long ago `ms` was, from `now_ms` ("12 s ago", "3 h ago").
pub fn ago(ms: u64, now_ms: u64) -> String {
    let s = now_ms.saturating_sub(ms) / 1000;
    match s {
        0..=59 => format!("{s} s ago"),
        60..=3599 => format!("{} min ago", s / 60),
        3600..=172_799 => format!("{} h ago", s / 3600),
        _ => format!("{} d ago", s / 86_400),
    }
}

/// A status badge: an icon and the word, with a class for colour as a hint only.
pub fn badge(status: &str) -> String {
    let (icon, class) = match status {
        "online" | "healthy" | "active" | "completed" | "pass" | "ok" | "succeeded"
        | "accepted" => ("✔", "ok"),
        "running" | "deploying" | "queued" | "shadowing" | "promoting" | "installing" => {
            ("▶", "run")
        }
        "paused" | "holding" | "warn" | "no-data" | "pending" | "offline" => ("⚠", "warn"),
        "failed" | "fail" | "alert" | "rolled-back" | "rolling-back" | "aborted" | "aborting"
        | "rejected" | "decommissioned" | "cancelled" | "timed-out" => ("✖", "bad"),
        _ => ("•", "other"),
    };
    format!(
        "<span class=\"badge {class}\"><span aria-hidden=\"true\">{icon}</span> {}</span>",
        esc(status)
    )
}

/// An optional value as text, `—` when absent.
pub fn opt(v: Option<&str>) -> String {
    v.map_or_else(|| "—".to_owned(), esc)
}

/// A number with a few significant digits.
pub fn num(v: f64) -> String {
    if !v.is_finite() {
        return "—".into();
    }
    let a = v.abs();
    if a != 0.0 && !(0.001..1e6).contains(&a) {
        format!("{v:.3e}")
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.3}")
            .trim_end_matches('0')
            .trim_end_matches('.')
            .to_owned()
    }
}

/// A table: caption, header cells, rows of already-escaped cells.
pub fn table(caption: &str, head: &[&str], rows: &[Vec<String>]) -> String {
    let mut h = format!("<table><caption>{}</caption><thead><tr>", esc(caption));
    for c in head {
        let _ = write!(h, "<th scope=\"col\">{}</th>", esc(c));
    }
    h.push_str("</tr></thead><tbody>");
    if rows.is_empty() {
        let _ = write!(
            h,
            "<tr><td colspan=\"{}\">none</td></tr>",
            head.len().max(1)
        );
    }
    for r in rows {
        h.push_str("<tr>");
        for c in r {
            let _ = write!(h, "<td>{c}</td>");
        }
        h.push_str("</tr>");
    }
    h.push_str("</tbody></table>");
    h
}

/// A link with escaped text; `href` is built from [`url`]-escaped parts.
pub fn link(href: &str, text: &str) -> String {
    format!("<a href=\"{}\">{}</a>", esc(href), esc(text))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markup_in_values_is_escaped_everywhere() {
        assert_eq!(
            esc(r#"<script>alert("x")</script>&'"#),
            "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;&amp;&#39;"
        );
        assert_eq!(url("a b/<c>"), "a%20b%2F%3Cc%3E");
        assert!(badge("<b>").contains("&lt;b&gt;"));
        let t = table("c<", &["h"], &[vec![esc("<i>")]]);
        assert!(t.contains("<caption>c&lt;</caption>") && t.contains("&lt;i&gt;"));
    }

    #[test]
    fn numbers_and_times_read_well() {
        assert_eq!(num(0.02), "0.02");
        assert_eq!(num(1234.5), "1234");
        assert_eq!(num(0.0), "0");
        assert_eq!(iso(0), "1970-01-01T00:00:00Z");
        assert_eq!(ago(0, 90_000), "1 min ago");
    }
}
