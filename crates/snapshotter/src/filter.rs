//! containerd's filter syntax (`github.com/containerd/containerd/filters`) as
//! used on snapshots: `List` ORs its filter strings; inside one string,
//! comma-separated selectors are ANDed.
//!
//! ```text
//! selector  := fieldpath [ ("==" | "!=" | "~=") value ]
//! fieldpath := field ("." field)*      field := [A-Za-z0-9_]+ | quoted
//! value     := quoted | bare (up to "," or whitespace)
//! ```
//! Snapshot fields: `kind`, `name`, `parent`, `labels.<key>`. A field that is
//! empty or absent is "not present": `==`, `!=` and `~=` are then false.

use crate::error::{Error, Result};
use std::collections::BTreeMap;

/// The field view of a snapshot that a filter is matched against.
pub struct Fields<'a> {
    /// `active`, `view` or `committed`.
    pub kind: &'a str,
    /// The snapshot key or name.
    pub name: &'a str,
    /// The parent name, empty when there is none.
    pub parent: &'a str,
    /// The labels.
    pub labels: &'a BTreeMap<String, String>,
}

impl Fields<'_> {
    fn get(&self, path: &[String]) -> Option<&str> {
        fn non_empty(s: &str) -> Option<&str> {
            (!s.is_empty()).then_some(s)
        }
        match path.first().map(String::as_str)? {
            "kind" if path.len() == 1 => non_empty(self.kind),
            // Always present, even when empty (containerd's adaptSnapshot):
            // containerd looks remote snapshots up with `parent==""`.
            "name" if path.len() == 1 => Some(self.name),
            "parent" if path.len() == 1 => Some(self.parent),
            "labels" if path.len() > 1 => self.labels.get(&path[1..].join(".")).map(String::as_str),
            _ => None,
        }
    }
}

#[derive(Debug)]
enum Op {
    Present,
    Eq(String),
    Ne(String),
    Re(regex::Regex),
}

#[derive(Debug)]
struct Selector {
    path: Vec<String>,
    op: Op,
}

/// A parsed list of filters (OR of ANDs). Empty means "match everything".
#[derive(Debug, Default)]
pub struct Filter {
    any: Vec<Vec<Selector>>,
}

impl Filter {
    /// Parses the filter strings of a `List` request.
    pub fn parse_all<S: AsRef<str>>(filters: &[S]) -> Result<Self> {
        let mut any = Vec::new();
        for f in filters {
            let f = f.as_ref();
            if f.trim().is_empty() {
                // An empty filter matches everything.
                return Ok(Filter::default());
            }
            any.push(
                parse_one(f)
                    .map_err(|m| Error::InvalidArgument(format!("invalid filter {f:?}: {m}")))?,
            );
        }
        Ok(Filter { any })
    }

    /// Whether a snapshot matches.
    pub fn matches(&self, f: &Fields<'_>) -> bool {
        if self.any.is_empty() {
            return true;
        }
        self.any.iter().any(|all| {
            all.iter().all(|s| {
                let v = f.get(&s.path);
                match &s.op {
                    Op::Present => v.is_some(),
                    Op::Eq(x) => v == Some(x.as_str()),
                    Op::Ne(x) => v.is_some_and(|v| v != x),
                    Op::Re(re) => v.is_some_and(|v| re.is_match(v)),
                }
            })
        })
    }
}

struct Scanner<'a> {
    s: &'a [u8],
    i: usize,
}

impl Scanner<'_> {
    fn skip_ws(&mut self) {
        while self.i < self.s.len() && self.s[self.i].is_ascii_whitespace() {
            self.i += 1;
        }
    }
    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }
    fn eat(&mut self, t: &str) -> bool {
        if self.s[self.i..].starts_with(t.as_bytes()) {
            self.i += t.len();
            true
        } else {
            false
        }
    }
    fn quoted(&mut self) -> Result<String, String> {
        let q = self.s[self.i];
        self.i += 1;
        let mut out = Vec::new();
        while let Some(c) = self.peek() {
            self.i += 1;
            if c == q {
                return String::from_utf8(out).map_err(|e| e.to_string());
            }
            if c == b'\\' && q != b'`' {
                let e = self.peek().ok_or("unterminated escape")?;
                self.i += 1;
                out.push(match e {
                    b'n' => b'\n',
                    b't' => b'\t',
                    b'r' => b'\r',
                    b'0' => 0,
                    other => other,
                });
            } else {
                out.push(c);
            }
        }
        Err("unterminated quoted string".into())
    }
    fn field(&mut self) -> Result<String, String> {
        self.token("field", |c| c.is_ascii_alphanumeric() || c == b'_')
    }
    fn value(&mut self) -> Result<String, String> {
        self.token("value", |c| c != b',' && !c.is_ascii_whitespace())
    }
    /// A quoted string, or a non-empty run of bytes that `ok` accepts.
    fn token(&mut self, what: &str, ok: impl Fn(u8) -> bool) -> Result<String, String> {
        if let Some(b'"') | Some(b'`') = self.peek() {
            return self.quoted();
        }
        let st = self.i;
        while self.peek().is_some_and(&ok) {
            self.i += 1;
        }
        if st == self.i {
            return Err(format!("expected a {what} at offset {st}"));
        }
        Ok(String::from_utf8_lossy(&self.s[st..self.i]).into_owned())
    }
}

fn parse_one(f: &str) -> Result<Vec<Selector>, String> {
    let mut sc = Scanner {
        s: f.as_bytes(),
        i: 0,
    };
    let mut sels = Vec::new();
    loop {
        sc.skip_ws();
        let mut path = vec![sc.field()?];
        while sc.eat(".") {
            path.push(sc.field()?);
        }
        sc.skip_ws();
        let op = if sc.eat("==") {
            sc.skip_ws();
            Op::Eq(sc.value()?)
        } else if sc.eat("!=") {
            sc.skip_ws();
            Op::Ne(sc.value()?)
        } else if sc.eat("~=") {
            sc.skip_ws();
            let v = sc.value()?;
            Op::Re(regex::Regex::new(&v).map_err(|e| e.to_string())?)
        } else {
            Op::Present
        };
        sels.push(Selector { path, op });
        sc.skip_ws();
        match sc.peek() {
            None => return Ok(sels),
            Some(b',') => sc.i += 1,
            Some(c) => return Err(format!("unexpected {:?} at offset {}", c as char, sc.i)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(filters: &[&str], kind: &str, name: &str, parent: &str, labels: &[(&str, &str)]) -> bool {
        let labels = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Filter::parse_all(filters).unwrap().matches(&Fields {
            kind,
            name,
            parent,
            labels: &labels,
        })
    }

    #[test]
    fn containerd_forms() {
        let gc = [("containerd.io/gc.root", "check-walk")];
        assert!(m(
            &[r#"labels."containerd.io/gc.root"==check-walk"#],
            "active",
            "a",
            "",
            &gc
        ));
        assert!(m(
            &[r#"kind==active,labels."containerd.io/gc.root"==check-walk"#],
            "active",
            "a",
            "",
            &gc
        ));
        assert!(!m(
            &[r#"kind==view,labels."containerd.io/gc.root"==check-walk"#],
            "active",
            "a",
            "",
            &gc
        ));
        assert!(m(
            &["name==p", "name==a-np-wl"],
            "committed",
            "a-np-wl",
            "",
            &[]
        ));
        assert!(m(
            &["name==a-wl,labels.l"],
            "active",
            "a-wl",
            "p-wl",
            &[("l", "2")]
        ));
        assert!(!m(&["name==a-wl,labels.l"], "active", "a-wl", "p-wl", &[]));
        assert!(m(&[r#"parent!="""#], "active", "a", "p", &[]));
        assert!(!m(&[r#"parent!="""#], "active", "a", "", &[]));
        assert!(m(&["labels.l==2"], "active", "a", "", &[("l", "2")]));
        assert!(m(&["name~=^a-"], "active", "a-x", "", &[]));
        assert!(m(&[], "active", "a", "", &[]));
        assert!(Filter::parse_all(&["name=="]).is_err());
        assert!(Filter::parse_all(&["name==a b"]).is_err());
    }
}
