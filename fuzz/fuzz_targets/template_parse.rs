//! Fuzz target: `Template::parse` on any text never panics, points its errors inside
//! the text, and what it parses prints back to a template that parses the same.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pginval::rules::template::{ImageSelector, Part, Template, TemplateError};

/// Writes parts back as template source, escaping literal braces.
fn unparse(parts: &[Part]) -> String {
    let mut out = String::new();
    for part in parts {
        match part {
            Part::Literal(text) => out.push_str(&text.replace('{', "{{").replace('}', "}}")),
            Part::Column { image, name } => {
                let image = match image {
                    ImageSelector::Any => "",
                    ImageSelector::Old => "old.",
                    ImageSelector::New => "new.",
                };
                out.push_str(&format!("{{{image}{name}}}"));
            }
        }
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let Ok(source) = std::str::from_utf8(data) else {
        return;
    };
    match Template::parse(source) {
        Ok(t) => {
            let _ = t.wildcard_pattern();
            let again = Template::parse(&unparse(t.parts()))
                .unwrap_or_else(|e| panic!("{source:?} parsed but its parts do not: {e}"));
            assert_eq!(t.parts(), again.parts(), "{source:?}");
        }
        Err(e) => {
            let at = match &e {
                TemplateError::Unclosed { at }
                | TemplateError::Unmatched { at }
                | TemplateError::Empty { at }
                | TemplateError::BadName { at, .. } => *at,
            };
            let chars = source.chars().count();
            assert!((1..=chars).contains(&at), "{source:?}: {e} ({chars} chars)");
            let _ = e.to_string();
        }
    }
});
