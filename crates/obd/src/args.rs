//! The options every command spells the same way: how to reach registries
//! (plain HTTP, insecure TLS, credentials) and which platform. One
//! definition each, flattened into the commands that need them; older
//! spellings are rewritten by [`compat`] with a deprecation note.

use std::ffi::OsString;
use std::path::PathBuf;

use anyhow::{bail, Result};
use obd_remote::oci::Platform;
use obd_remote::registry::RegistryOptions;

/// How to reach registries.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct RegistryArgs {
    /// Talk plain HTTP to this registry (`host` or `host:port`; repeatable).
    #[arg(long = "plain-http", value_name = "HOST")]
    pub plain_http: Vec<String>,
    /// Skip TLS certificate verification for this registry (testing only;
    /// repeatable).
    #[arg(long, value_name = "HOST")]
    pub insecure: Vec<String>,
    /// Registry credentials (`{"auths": {"<host>": {"auth": "<base64
    /// user:password>"}}}`), read before the docker config and its helpers.
    #[arg(long, value_name = "FILE")]
    pub credential_file: Option<PathBuf>,
}

impl RegistryArgs {
    /// Applies the options to `opts`. An empty host (the deprecated
    /// flag without a value, see [`compat`]) means every host in `named`,
    /// the registries the command's images are on.
    pub fn apply(&self, opts: &mut RegistryOptions, named: &[&str]) {
        let each = |hosts: &[String]| -> Vec<String> {
            hosts
                .iter()
                .flat_map(|h| match h.as_str() {
                    "" => named.iter().map(|n| n.to_string()).collect(),
                    h => vec![h.to_string()],
                })
                .collect()
        };
        for h in each(&self.plain_http) {
            opts.hosts.entry(h).or_default().plain_http = true;
        }
        for h in each(&self.insecure) {
            opts.hosts.entry(h).or_default().insecure_skip_verify = true;
        }
        if let Some(f) = &self.credential_file {
            opts.credential_file = Some(f.clone());
        }
    }

    /// [`Self::apply`] to the defaults.
    pub fn options(&self, named: &[&str]) -> RegistryOptions {
        let mut o = RegistryOptions::default();
        self.apply(&mut o, named);
        o
    }
}

/// Which platform(s) of a multi-platform image.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct PlatformArgs {
    /// Platform of a multi-platform image, `os/arch[/variant]` (repeatable
    /// or comma-separated where a command takes several). Default: this
    /// machine's for commands that run the image, every platform for
    /// `convert`.
    #[arg(long = "platform", value_name = "OS/ARCH", value_delimiter = ',')]
    pub platform: Vec<String>,
}

impl PlatformArgs {
    /// Every platform given, checked.
    pub fn all(&self) -> Result<Vec<String>> {
        for p in &self.platform {
            if Platform::parse(p).is_err() {
                bail!("--platform {p}: expected os/arch[/variant], e.g. linux/amd64");
            }
        }
        Ok(self.platform.clone())
    }

    /// The one platform given, else this machine's.
    pub fn one(&self) -> Result<String> {
        match self.all()?.as_slice() {
            [] => Ok(host_platform()),
            [p] => Ok(p.clone()),
            many => bail!(
                "--platform: this command runs one platform, got {}",
                many.join(", ")
            ),
        }
    }
}

/// This machine's platform, `linux/<GOARCH>`.
pub fn host_platform() -> String {
    Platform::host().to_string()
}

/// Flags that took no value before and take a host now.
const HOST_FLAGS: [&str; 2] = ["--plain-http", "--insecure"];

/// Rewrites deprecated spellings in `args` (the whole command line) and
/// notes each on stderr: `--plain-http` / `--insecure` without a host (the
/// switch of `obd pull` and `obd trace record`) become `--plain-http=`,
/// which [`RegistryArgs::apply`] reads as "the registries of the command's
/// images". A following word is a host unless it starts with `-` or holds
/// a `/` (an image reference).
pub fn compat(args: impl IntoIterator<Item = OsString>) -> Vec<OsString> {
    let mut out: Vec<OsString> = Vec::new();
    let mut it = args.into_iter().peekable();
    while let Some(a) = it.next() {
        let flag = a
            .to_str()
            .and_then(|s| HOST_FLAGS.iter().find(|f| **f == s));
        let Some(flag) = flag else {
            out.push(a);
            continue;
        };
        let bare = match it.peek().and_then(|n| n.to_str()) {
            None => true,
            Some(n) => n.starts_with('-') || n.contains('/'),
        };
        if bare {
            eprintln!(
                "obd: `{flag}` without a host is deprecated; write `{flag} HOST` \
                 (now: the registries of the images named)"
            );
            out.push(format!("{flag}=").into());
        } else {
            out.push(a);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(v: &[&str]) -> Vec<OsString> {
        v.iter().map(OsString::from).collect()
    }

    #[test]
    fn bare_host_flags_are_rewritten() {
        let cases: [(&[&str], &[&str]); 3] = [
            (
                &["obd", "pull", "--plain-http", "r:5/a:b"],
                &["obd", "pull", "--plain-http=", "r:5/a:b"],
            ),
            (
                &["obd", "pull", "r:5/a:b", "--insecure"],
                &["obd", "pull", "r:5/a:b", "--insecure="],
            ),
            (
                &["obd", "pull", "--plain-http", "-n", "x", "r/a"],
                &["obd", "pull", "--plain-http=", "-n", "x", "r/a"],
            ),
        ];
        for (input, want) in cases {
            assert_eq!(compat(os(input)), os(want), "{input:?}");
        }
        // A host after the flag, or `=HOST`: left as it is.
        let unchanged: [&[&str]; 2] = [
            &[
                "obd",
                "convert",
                "--plain-http",
                "r:5",
                "oci:x",
                "docker://r:5/a",
            ],
            &["obd", "pull", "--plain-http=r:5", "r:5/a"],
        ];
        for input in unchanged {
            assert_eq!(compat(os(input)), os(input), "{input:?}");
        }
    }

    #[test]
    fn empty_host_means_the_named_registries() {
        let a = RegistryArgs {
            plain_http: vec!["".into(), "x:1".into()],
            insecure: vec!["".into()],
            credential_file: Some("/c.json".into()),
        };
        let o = a.options(&["r:5", "s"]);
        let plain: std::collections::BTreeSet<_> = o
            .hosts
            .iter()
            .filter(|(_, h)| h.plain_http)
            .map(|(k, _)| k.as_str())
            .collect();
        assert_eq!(plain, ["r:5", "s", "x:1"].into_iter().collect());
        assert!(o.hosts["s"].insecure_skip_verify && !o.hosts["x:1"].insecure_skip_verify);
        assert_eq!(
            o.credential_file.as_deref(),
            Some(std::path::Path::new("/c.json"))
        );
    }

    #[test]
    fn platforms() {
        let p = |v: &[&str]| PlatformArgs {
            platform: v.iter().map(|s| s.to_string()).collect(),
        };
        assert_eq!(p(&[]).one().unwrap(), host_platform());
        assert_eq!(p(&["linux/arm64/v8"]).one().unwrap(), "linux/arm64/v8");
        assert!(p(&["linux/amd64", "linux/arm64"]).one().is_err());
        assert!(p(&["amd64"]).all().is_err());
        assert_eq!(p(&[]).all().unwrap(), Vec::<String>::new());
    }
}
