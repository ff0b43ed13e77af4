//! Problems found in a configuration, with their line and fix, and how they are
//! printed. A leaf: it imports nothing of pginval, so `config` and `rules` both use it
//! without depending on each other.

use std::fmt;
use std::path::Path;

/// One problem found in a configuration, with where it is and how to fix it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// 1-based line in the file, when the problem has a place.
    pub line: Option<usize>,
    /// What is wrong.
    pub message: String,
    /// How to fix it.
    pub fix: Option<String>,
}

impl Problem {
    /// A problem at a line, with an optional fix.
    pub fn new(line: Option<usize>, message: impl Into<String>, fix: Option<String>) -> Problem {
        Problem {
            line,
            message: message.into(),
            fix,
        }
    }
}

/// Formats one problem as `file:line: message` plus an indented `fix:` line.
pub fn write_problem(f: &mut impl fmt::Write, path: &Path, p: &Problem) -> fmt::Result {
    match p.line {
        Some(line) => writeln!(f, "  {}:{line}: {}", path.display(), p.message)?,
        None => writeln!(f, "  {}: {}", path.display(), p.message)?,
    }
    if let Some(fix) = &p.fix {
        for (i, l) in fix.lines().enumerate() {
            let lead = if i == 0 { "fix: " } else { "     " };
            writeln!(f, "      {lead}{l}")?;
        }
    }
    Ok(())
}

/// Maps byte offsets to 1-based line numbers.
#[derive(Debug, Clone)]
pub struct LineIndex {
    starts: Vec<usize>,
}

impl LineIndex {
    /// Indexes `text`.
    pub fn new(text: &str) -> LineIndex {
        let mut starts = vec![0];
        starts.extend(text.match_indices('\n').map(|(i, _)| i + 1));
        LineIndex { starts }
    }

    /// The line holding byte `offset`.
    pub fn line(&self, offset: usize) -> usize {
        self.starts.partition_point(|&s| s <= offset).max(1)
    }

    /// The line of a span, or `None` for a default value that has no place.
    pub fn line_of(&self, span: &std::ops::Range<usize>) -> Option<usize> {
        (span.end > 0).then(|| self.line(span.start))
    }
}
