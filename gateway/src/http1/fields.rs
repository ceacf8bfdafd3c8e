//! A message head's fields as the lane edits and writes them: each line as
//! it came (its name's spelling, its value sharing the read buffer), held
//! in the order and grouping Pingora's header maps give them, so that a
//! head the lane writes is byte for byte the one Pingora writes after the
//! same edits.
//!
//! Pingora keeps a head in an `http::HeaderMap` (with a second map for the
//! names' spelling): the lines of one name are grouped under the first
//! one's place, replacing a name keeps its place, and removing one moves
//! the last name into its place. The same rules hold here over a plain
//! list, which a head of a few dozen lines searches faster than a map
//! hashes, and which costs one allocation.

use bytes::{BufMut, Bytes};
use http::header::{self, HeaderName, HeaderValue};

/// One line: its name as spelled, and its value.
#[derive(Debug, Clone)]
struct Line {
    spelled: Bytes,
    value: HeaderValue,
}

/// A name's lines: the first, then any more, in order.
#[derive(Debug, Clone)]
struct Entry {
    first: Line,
    more: Vec<Line>,
}

impl Entry {
    fn is(&self, name: &[u8]) -> bool {
        self.first.spelled.eq_ignore_ascii_case(name)
    }

    fn lines(&self) -> impl Iterator<Item = &Line> {
        std::iter::once(&self.first).chain(&self.more)
    }
}

/// The fields of one head.
#[derive(Debug, Clone, Default)]
pub struct FieldList {
    entries: Vec<Entry>,
    /// Names are written as spelled; otherwise in lower case, but for the
    /// dozen Pingora writes in title case (`gateway.header_case`).
    keep_case: bool,
}

impl FieldList {
    /// An empty list with room for `lines` names.
    pub fn with_capacity(lines: usize, keep_case: bool) -> Self {
        FieldList {
            entries: Vec::with_capacity(lines),
            keep_case,
        }
    }

    fn find(&self, name: &[u8]) -> Option<usize> {
        self.entries.iter().position(|e| e.is(name))
    }

    /// Add a line, after any others of its name.
    pub fn append(&mut self, spelled: Bytes, value: HeaderValue) {
        let line = Line { spelled, value };
        match self.find(&line.spelled) {
            Some(at) => self.entries[at].more.push(line),
            None => self.entries.push(Entry {
                first: line,
                more: Vec::new(),
            }),
        }
    }

    /// Replace every line of the name with this one, in the name's place.
    pub fn insert(&mut self, spelled: Bytes, value: HeaderValue) {
        let line = Line { spelled, value };
        match self.find(&line.spelled) {
            Some(at) => {
                let entry = &mut self.entries[at];
                entry.first = line;
                entry.more.clear();
            }
            None => self.entries.push(Entry {
                first: line,
                more: Vec::new(),
            }),
        }
    }

    /// Remove every line of `name`; the last name takes its place.
    pub fn remove(&mut self, name: &[u8]) -> bool {
        match self.find(name) {
            Some(at) => {
                self.entries.swap_remove(at);
                true
            }
            None => false,
        }
    }

    /// Whether a line of `name` is there.
    pub fn contains(&self, name: &[u8]) -> bool {
        self.find(name).is_some()
    }

    /// Every value of `name`, in order.
    pub fn values<'a>(&'a self, name: &[u8]) -> impl Iterator<Item = &'a HeaderValue> + 'a {
        self.find(name)
            .into_iter()
            .flat_map(|at| self.entries[at].lines().map(|l| &l.value))
    }

    /// Each name once, as its first line spells it.
    pub fn names(&self) -> impl Iterator<Item = &[u8]> {
        self.entries.iter().map(|e| &e.first.spelled[..])
    }

    /// How many lines there are.
    pub fn len(&self) -> usize {
        self.entries.iter().map(|e| 1 + e.more.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The bytes [`Self::write`] writes, so a buffer can be sized once.
    pub fn wire_len(&self) -> usize {
        self.entries
            .iter()
            .flat_map(Entry::lines)
            .map(|l| l.spelled.len() + l.value.len() + 4)
            .sum()
    }

    /// The lines as a head carries them: `name: value` and CRLF each.
    pub fn write(&self, buf: &mut impl BufMut) {
        for entry in &self.entries {
            for line in entry.lines() {
                if self.keep_case {
                    buf.put_slice(&line.spelled);
                } else {
                    match titled_bytes(&line.spelled) {
                        Some(t) => buf.put_slice(t.as_bytes()),
                        None => {
                            for b in line.spelled.iter() {
                                buf.put_u8(b.to_ascii_lowercase());
                            }
                        }
                    }
                }
                buf.put_slice(b": ");
                buf.put_slice(line.value.as_bytes());
                buf.put_slice(b"\r\n");
            }
        }
    }
}

/// The names Pingora writes in title case when a head keeps no spelling
/// (its `titled_header_name_str`, which it does not export).
pub fn titled(name: &HeaderName) -> Option<&'static str> {
    titled_bytes(name.as_str().as_bytes())
}

fn titled_bytes(name: &[u8]) -> Option<&'static str> {
    const TITLED: [(HeaderName, &str); 12] = [
        (header::ACCEPT_RANGES, "Accept-Ranges"),
        (header::AGE, "Age"),
        (header::CACHE_CONTROL, "Cache-Control"),
        (header::CONNECTION, "Connection"),
        (header::CONTENT_TYPE, "Content-Type"),
        (header::CONTENT_ENCODING, "Content-Encoding"),
        (header::CONTENT_LENGTH, "Content-Length"),
        (header::DATE, "Date"),
        (header::TRANSFER_ENCODING, "Transfer-Encoding"),
        (header::HOST, "Host"),
        (header::SERVER, "Server"),
        (header::SET_COOKIE, "Set-Cookie"),
    ];
    TITLED
        .iter()
        .find(|(n, _)| n.as_str().as_bytes().eq_ignore_ascii_case(name))
        .map(|(_, t)| *t)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(lines: &[(&'static str, &'static str)], keep_case: bool) -> FieldList {
        let mut f = FieldList::with_capacity(lines.len(), keep_case);
        for (n, v) in lines {
            f.append(
                Bytes::from_static(n.as_bytes()),
                HeaderValue::from_static(v),
            );
        }
        f
    }

    fn wire(f: &FieldList) -> String {
        let mut out = Vec::new();
        f.write(&mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn lines_of_one_name_are_grouped_and_removal_moves_the_last_name() {
        let mut f = list(&[("A", "1"), ("b", "2"), ("a", "3"), ("C", "4")], true);
        assert_eq!(wire(&f), "A: 1\r\na: 3\r\nb: 2\r\nC: 4\r\n");
        assert_eq!(f.len(), 4);
        assert!(f.remove(b"a"));
        assert_eq!(wire(&f), "C: 4\r\nb: 2\r\n");
        f.insert(Bytes::from_static(b"B"), HeaderValue::from_static("9"));
        assert_eq!(wire(&f), "C: 4\r\nB: 9\r\n");
        assert_eq!(
            f.values(b"b").map(|v| v.as_bytes()).collect::<Vec<_>>(),
            [b"9"]
        );
    }

    #[test]
    fn without_kept_case_names_are_lower_or_title_case() {
        let f = list(&[("X-Thing", "1"), ("content-length", "0")], false);
        assert_eq!(wire(&f), "x-thing: 1\r\nContent-Length: 0\r\n");
    }
}
