//! Building HTML safely without a template engine: markup is only ever `&'static str` (written
//! in this crate's source), and every dynamic value goes through `Html::text`, which escapes it.
//! A value from the policy, the audit log or a form can never become markup.

/// HTML being built.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Html {
    out: String,
}

/// Escapes text for an HTML element's content or a quoted attribute value.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
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

impl Html {
    pub fn new() -> Html {
        Html::default()
    }

    /// Markup written in the source: only literals get here.
    pub fn raw(&mut self, markup: &'static str) -> &mut Html {
        self.out.push_str(markup);
        self
    }

    /// Text (or an attribute value inside quotes), escaped.
    pub fn text(&mut self, text: &str) -> &mut Html {
        self.out.push_str(&escape(text));
        self
    }

    /// A number.
    pub fn num(&mut self, n: impl Into<u128>) -> &mut Html {
        self.out.push_str(&n.into().to_string());
        self
    }

    /// HTML built elsewhere (itself only from literals and escaped text).
    pub fn html(&mut self, other: &Html) -> &mut Html {
        self.out.push_str(&other.out);
        self
    }

    /// `<tag>text</tag>` for a literal tag.
    pub fn el(&mut self, open: &'static str, text: &str, close: &'static str) -> &mut Html {
        self.raw(open).text(text).raw(close)
    }

    /// A hidden form field.
    pub fn hidden(&mut self, name: &'static str, value: &str) -> &mut Html {
        self.raw("<input type=\"hidden\" name=\"")
            .raw(name)
            .raw("\" value=\"")
            .text(value)
            .raw("\">")
    }

    /// `<a href="...">text</a>`; the href is escaped like any attribute value.
    pub fn link(&mut self, href: &str, text: &str) -> &mut Html {
        self.raw("<a href=\"")
            .text(href)
            .raw("\">")
            .text(text)
            .raw("</a>")
    }

    pub fn into_string(self) -> String {
        self.out
    }

    #[cfg(test)]
    pub fn as_str(&self) -> &str {
        &self.out
    }
}

/// A path segment, percent-encoded (token ids are `[A-Za-z0-9_-]`, but nothing is assumed).
pub fn path_segment(text: &str) -> String {
    text.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                char::from(b).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_special_character_is_escaped() {
        assert_eq!(
            escape(r#"<script>alert("x") & 'y'</script>"#),
            "&lt;script&gt;alert(&quot;x&quot;) &amp; &#39;y&#39;&lt;/script&gt;"
        );
        assert_eq!(escape("plain text é"), "plain text é");
    }

    #[test]
    fn dynamic_values_never_become_markup() {
        let mut h = Html::new();
        h.el("<td>", "<b>bold</b>", "</td>")
            .hidden("csrf", "\"><script>")
            .link("/tokens/a\"b", "<i>")
            .num(42u64);
        assert_eq!(
            h.as_str(),
            "<td>&lt;b&gt;bold&lt;/b&gt;</td><input type=\"hidden\" name=\"csrf\" \
             value=\"&quot;&gt;&lt;script&gt;\"><a href=\"/tokens/a&quot;b\">&lt;i&gt;</a>42"
        );
        let mut outer = Html::new();
        outer.raw("<p>").html(&h).raw("</p>");
        assert!(outer.as_str().starts_with("<p><td>&lt;b&gt;"));
    }

    #[test]
    fn path_segments_are_percent_encoded() {
        assert_eq!(path_segment("alice-1_x"), "alice-1_x");
        assert_eq!(path_segment("a/b c?"), "a%2Fb%20c%3F");
    }
}
