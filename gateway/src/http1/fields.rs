//! A message head's fields as the lane edits and writes them: each line as
//! it came (ranges of the bytes read, written back in one copy when the
//! edits leave it alone), or as an edit made it, held
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

use std::cell::OnceCell;
use std::ops::Range;

use bytes::{BufMut, Bytes};
use http::header::{self, HeaderName, HeaderValue};

/// One line: as read (ranges of the list's source head, nothing copied or
/// counted until asked for), or as an edit made it.
#[derive(Debug, Clone)]
enum Line {
    Read(ReadLine),
    Made { spelled: Bytes, value: HeaderValue },
}

/// A line of the source head.
#[derive(Debug, Clone)]
struct ReadLine {
    name: (u32, u32),
    value: (u32, u32),
    /// `name: value` and CRLF lie in the source exactly as they are
    /// written: one copy writes the line.
    verbatim: bool,
    /// The value as a `HeaderValue`, made the first time one is asked for.
    cached: OnceCell<HeaderValue>,
}

fn range((at, len): (u32, u32)) -> Range<usize> {
    at as usize..(at + len) as usize
}

impl Line {
    fn name<'a>(&'a self, src: &'a [u8]) -> &'a [u8] {
        match self {
            Line::Read(r) => &src[range(r.name)],
            Line::Made { spelled, .. } => spelled,
        }
    }

    fn value_bytes<'a>(&'a self, src: &'a [u8]) -> &'a [u8] {
        match self {
            Line::Read(r) => &src[range(r.value)],
            Line::Made { value, .. } => value.as_bytes(),
        }
    }

    fn value<'a>(&'a self, src: &Bytes) -> &'a HeaderValue {
        match self {
            Line::Read(r) => r.cached.get_or_init(|| {
                let raw = src.slice(range(r.value));
                // A value as the parser let it through is a valid one; should
                // it not be, Pingora's own reading of it.
                HeaderValue::from_maybe_shared(raw.clone())
                    .unwrap_or_else(|_| pingora::http::header_value_from_raw(raw))
            }),
            Line::Made { value, .. } => value,
        }
    }

    fn wire_len(&self) -> usize {
        match self {
            Line::Read(r) => (r.name.1 + r.value.1) as usize + 4,
            Line::Made { spelled, value } => spelled.len() + value.len() + 4,
        }
    }
}

/// A name's lines: the first, then any more, in order.
#[derive(Debug, Clone)]
struct Entry {
    /// The name's length: most names are told apart by it alone.
    len: usize,
    first: Line,
    more: Vec<Line>,
}

impl Entry {
    fn new(first: Line, src: &[u8]) -> Entry {
        Entry {
            len: first.name(src).len(),
            first,
            more: Vec::new(),
        }
    }

    fn lines(&self) -> impl Iterator<Item = &Line> {
        std::iter::once(&self.first).chain(&self.more)
    }
}

/// The fields of one head.
#[derive(Debug, Clone, Default)]
pub struct FieldList {
    /// The head the lines as read are ranges of.
    src: Bytes,
    entries: Vec<Entry>,
    /// Names are written as spelled; otherwise in lower case, but for the
    /// dozen Pingora writes in title case (`gateway.header_case`).
    keep_case: bool,
}

impl FieldList {
    /// An empty list with room for `lines` names.
    pub fn with_capacity(lines: usize, keep_case: bool) -> Self {
        Self::over(Bytes::new(), lines, keep_case)
    }

    /// An empty list with room for `lines` names, whose lines as read are
    /// parts of `src` ([`Self::append_read`]).
    pub fn over(src: Bytes, lines: usize, keep_case: bool) -> Self {
        FieldList {
            src,
            entries: Vec::with_capacity(lines),
            keep_case,
        }
    }

    fn find(&self, name: &[u8]) -> Option<usize> {
        let src = &self.src[..];
        self.entries
            .iter()
            .position(|e| e.len == name.len() && e.first.name(src).eq_ignore_ascii_case(name))
    }

    fn push(&mut self, line: Line) {
        let src = &self.src[..];
        match self.find(line.name(src)) {
            Some(at) => self.entries[at].more.push(line),
            None => {
                let entry = Entry::new(line, src);
                self.entries.push(entry);
            }
        }
    }

    /// Add a line, after any others of its name.
    pub fn append(&mut self, spelled: Bytes, value: HeaderValue) {
        self.push(Line::Made { spelled, value });
    }

    /// Add the line of the source whose name and value are at `name` and
    /// `value`, after any others of its name. The value must be as httparse
    /// lets one through without obs-folds: no CR, LF or NUL, so that it is
    /// written as it came (one with a fold goes through [`Self::append`],
    /// unfolded as Pingora unfolds it).
    pub fn append_read(&mut self, name: Range<usize>, value: Range<usize>) {
        let src = &self.src[..];
        let (Some(_), Some(_), Ok(n_at), Ok(n_len), Ok(v_at), Ok(v_len)) = (
            src.get(name.clone()),
            src.get(value.clone()),
            u32::try_from(name.start),
            u32::try_from(name.len()),
            u32::try_from(value.start),
            u32::try_from(value.len()),
        ) else {
            return;
        };
        let verbatim = value.start == name.end + 2
            && src.get(name.end..value.start) == Some(b": ")
            && src.get(value.end..value.end + 2) == Some(b"\r\n");
        self.push(Line::Read(ReadLine {
            name: (n_at, n_len),
            value: (v_at, v_len),
            verbatim,
            cached: OnceCell::new(),
        }));
    }

    /// The line at `name` and `value` of the source, its value unfolded
    /// as Pingora unfolds one (obs-folds, and any stray CR, LF or NUL).
    pub fn append_unfolded(&mut self, name: Range<usize>, value: Range<usize>) {
        if name.end > self.src.len() || value.end > self.src.len() {
            return;
        }
        let spelled = self.src.slice(name);
        let value = pingora::http::header_value_from_raw(self.src.slice(value));
        self.append(spelled, value);
    }

    /// Replace every line of the name with this one, in the name's place.
    pub fn insert(&mut self, spelled: Bytes, value: HeaderValue) {
        let line = Line::Made { spelled, value };
        match self.find(line.name(&[])) {
            Some(at) => {
                let entry = &mut self.entries[at];
                entry.first = line;
                entry.more.clear();
            }
            None => {
                let entry = Entry::new(line, &[]);
                self.entries.push(entry);
            }
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
            .flat_map(|at| self.entries[at].lines().map(|l| l.value(&self.src)))
    }

    /// Each name once, as its first line spells it.
    pub fn names(&self) -> impl Iterator<Item = &[u8]> {
        self.entries.iter().map(|e| e.first.name(&self.src))
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
            .map(Line::wire_len)
            .sum()
    }

    /// The lines as a head carries them: `name: value` and CRLF each.
    pub fn write(&self, buf: &mut impl BufMut) {
        let src = &self.src[..];
        for line in self.entries.iter().flat_map(Entry::lines) {
            if let Line::Read(r) = line {
                if r.verbatim && self.keep_case {
                    let (at, len) = r.name;
                    let end = (r.value.0 + r.value.1) as usize + 2;
                    buf.put_slice(&src[at as usize..end]);
                    debug_assert_eq!(end - at as usize, len as usize + r.value.1 as usize + 4);
                    continue;
                }
            }
            let spelled = line.name(src);
            if self.keep_case {
                buf.put_slice(spelled);
            } else {
                match titled_bytes(spelled) {
                    Some(t) => buf.put_slice(t.as_bytes()),
                    None => {
                        for b in spelled.iter() {
                            buf.put_u8(b.to_ascii_lowercase());
                        }
                    }
                }
            }
            buf.put_slice(b": ");
            buf.put_slice(line.value_bytes(src));
            buf.put_slice(b"\r\n");
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

    #[test]
    fn lines_as_read_are_written_in_one_piece_or_rebuilt() {
        let head = Bytes::from_static(b"Host: a\r\nX-Fold: one\r\n two\r\nX-Tight:v\r\n");
        let mut f = FieldList::over(head, 3, true);
        f.append_read(0..4, 6..7);
        f.append_unfolded(9..15, 17..26);
        f.append_read(28..35, 36..37);
        // The fold unfolded as Pingora unfolds it; the tight line rebuilt.
        assert_eq!(wire(&f), "Host: a\r\nX-Fold: one two\r\nX-Tight: v\r\n");
        assert_eq!(f.wire_len(), wire(&f).len());
        assert_eq!(f.values(b"x-tight").next().unwrap(), "v");
        assert_eq!(f.values(b"HOST").next().unwrap(), "a");
        // Lower case asked for: no line goes out as it came.
        let mut f = FieldList::over(
            Bytes::from_static(b"Content-Length: 1\r\nX-A: b\r\n"),
            2,
            false,
        );
        f.append_read(0..14, 16..17);
        f.append_read(19..22, 24..25);
        assert_eq!(wire(&f), "Content-Length: 1\r\nx-a: b\r\n");
    }
}
